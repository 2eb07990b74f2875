"""Compute kernels: device detection, varlen attention over packed sequences, and small ops.

Every fast path sits beside its plain-torch reference. Tensors in attention are [T, heads, head_dim]
(NPU's "TND"); sample boundaries are `cu_seqlens` (int32, starts with 0), FlashAttention's convention.
"""
import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- devices


def detect_device():
    """The best available device type: npu > cuda > cpu."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
        if torch.npu.is_available():
            return "npu"
    except ImportError:
        pass
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("reference", "sdpa")


def default_backend(device_type):
    return "reference"


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=None,
                     cu_seqlens_k=None, max_seqlen_k=None, scale=None):
    """Attention within each packed sample. q [T, H, D], k/v [Tk, Hkv, D] with H % Hkv == 0 (GQA).

    cu_seqlens_k (default: cu_seqlens) lets keys have their own lengths (KV-cache decoding); causal
    masking is then aligned to the bottom-right, as in FlashAttention-2: query i of a sample with
    lengths (Lq, Lk) sees keys j <= i + Lk - Lq.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = backend or default_backend(q.device.type)
    if backend == "reference":
        return ReferenceAttention.apply(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")


def _sample_bounds(cu_q, cu_k):
    """Per-sample (q_start, q_end, k_start, k_end) as Python ints (one host sync)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens for q ({len(cq)}) and k ({len(ck)}) differ in sample count")
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _expand_kv(x, groups):
    """[Hkv, L, D] -> [Hkv*groups, L, D]: each kv head serves `groups` consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def _causal_mask(i0, i1, j0, j1, offset, device):
    """True where query row i (global index in sample) may see key j: j <= i + offset."""
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return cols <= rows + offset


class ReferenceAttention(torch.autograd.Function):
    """FlashAttention-2 written plainly (Dao 2023, Alg. 1-2): tiles of queries and keys, an online
    softmax in fp32, and a backward that recomputes probabilities from the saved logsumexp, so
    memory is O(T * H * D) plus one tile, never O(T^2)."""

    BLOCK = 128

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale):
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(H, q.shape[0], dtype=torch.float32, device=q.device)
        B = ReferenceAttention.BLOCK
        for qs, qe, ks, ke in _sample_bounds(cu_q, cu_k):
            Lq, Lk = qe - qs, ke - ks
            if Lq == 0:
                continue
            qh = q[qs:qe].transpose(0, 1).float()                          # [H, Lq, D]
            kh = _expand_kv(k[ks:ke].transpose(0, 1).float(), H // Hkv)    # [H, Lk, D]
            vh = _expand_kv(v[ks:ke].transpose(0, 1).float(), H // Hkv)
            offset = Lk - Lq
            for i0 in range(0, Lq, B):
                i1 = min(i0 + B, Lq)
                qi = qh[:, i0:i1] * scale
                m = torch.full((H, i1 - i0), -math.inf, device=q.device)
                l = torch.zeros(H, i1 - i0, device=q.device)
                acc = torch.zeros(H, i1 - i0, D, device=q.device)
                kend = min(Lk, i1 + offset) if causal else Lk
                for j0 in range(0, kend, B):
                    j1 = min(j0 + B, kend)
                    s = qi @ kh[:, j0:j1].transpose(1, 2)                  # [H, bq, bk]
                    if causal and j1 - 1 > i0 + offset:
                        s = s.masked_fill(~_causal_mask(i0, i1, j0, j1, offset, q.device), -math.inf)
                    m_new = torch.maximum(m, s.amax(-1))
                    m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # rows with no key yet
                    p = torch.exp(s - m_safe[..., None])
                    alpha = torch.exp(m - m_safe)
                    l = l * alpha + p.sum(-1)
                    acc = acc * alpha[..., None] + p @ vh[:, j0:j1]
                    m = m_new
                l_safe = l.clamp_min(torch.finfo(torch.float32).tiny)
                out[qs + i0:qs + i1] = (acc / l_safe[..., None]).transpose(0, 1).to(q.dtype)
                lse[:, qs + i0:qs + i1] = m + torch.log(l_safe)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
        G = H // Hkv
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        # FlashAttention-2 backward: D_i = rowsum(dO_i * O_i) replaces the softmax Jacobian's sum
        delta = (dout.float() * out.float()).sum(-1).transpose(0, 1)        # [H, T]
        B = ReferenceAttention.BLOCK
        for qs, qe, ks, ke in _sample_bounds(cu_q, cu_k):
            Lq, Lk = qe - qs, ke - ks
            if Lq == 0 or Lk == 0:
                continue
            qh = q[qs:qe].transpose(0, 1).float()
            doh = dout[qs:qe].transpose(0, 1).float()
            kh = _expand_kv(k[ks:ke].transpose(0, 1).float(), G)
            vh = _expand_kv(v[ks:ke].transpose(0, 1).float(), G)
            dqh = torch.zeros_like(qh)
            dkh = torch.zeros_like(kh)
            dvh = torch.zeros_like(vh)
            offset = Lk - Lq
            for j0 in range(0, Lk, B):
                j1 = min(j0 + B, Lk)
                first_q = max(0, j0 - offset) if causal else 0
                for i0 in range(first_q - first_q % B, Lq, B):
                    i1 = min(i0 + B, Lq)
                    s = (qh[:, i0:i1] * scale) @ kh[:, j0:j1].transpose(1, 2)
                    p = torch.exp(s - lse[:, qs + i0:qs + i1, None])
                    if causal:
                        p = p * _causal_mask(i0, i1, j0, j1, offset, q.device)
                    do_i = doh[:, i0:i1]
                    dvh[:, j0:j1] += p.transpose(1, 2) @ do_i
                    dp = do_i @ vh[:, j0:j1].transpose(1, 2)
                    ds = p * (dp - delta[:, qs + i0:qs + i1, None])
                    dqh[:, i0:i1] += scale * ds @ kh[:, j0:j1]
                    dkh[:, j0:j1] += scale * ds.transpose(1, 2) @ qh[:, i0:i1]
            dq[qs:qe] = dqh.transpose(0, 1)
            # GQA: a kv head's gradient is the sum over the query heads that share it
            dk[ks:ke] = dkh.view(Hkv, G, Lk, D).sum(1).transpose(0, 1)
            dv[ks:ke] = dvh.view(Hkv, G, Lk, D).sum(1).transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _sdpa_attention(q, k, v, cu_q, cu_k, causal, scale):
    """torch's scaled_dot_product_attention one sample at a time (no cross-sample mask needed)."""
    out = torch.empty_like(q)
    for qs, qe, ks, ke in _sample_bounds(cu_q, cu_k):
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0:
            continue
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        mask = None
        if causal and Lq != Lk:  # bottom-right alignment is not what is_causal means
            mask = _causal_mask(0, Lq, 0, Lk, Lk - Lq, q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                           is_causal=causal and Lq == Lk,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[qs:qe] = o[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- small ops


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm (Zhang & Sennrich 2019) in fp32, cast back before the gain as Qwen/Llama do."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotary embedding (RoFormer, Su et al. 2021) in the half-split layout: x*cos + rotate_half(x)*sin.
    x [T, H, D]; cos/sin [T, D] (already repeated over the two halves)."""
    xf = x.float()
    return (xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]).to(x.dtype)


def swiglu(gate, up):
    """SwiGLU (Shazeer 2020): silu(gate) * up."""
    return F.silu(gate) * up
