"""Compute kernels: varlen attention over packed sequences, and small ops.

Every fast path sits beside its plain-torch reference. Tensors in attention are [T, heads, head_dim]
(NPU's "TND"); sample boundaries are `cu_seqlens` (int32, starts with 0), FlashAttention's convention.
Fast paths: CUDA -> our Triton kernels (FlashAttention-2, RMSNorm) and torch._grouped_mm; Ascend ->
torch_npu's fused ops (imported only there). Triton is optional: without it the CUDA paths fall back
to SDPA / plain torch, and under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors (CI).
"""
import functools
import contextlib
import math
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. Ascend or CPU-only installs: the "triton" paths are then unavailable
    triton = None


def _on_npu(x):
    """Whether x lives on an Ascend NPU, i.e. whether the small ops take their torch_npu path."""
    return x.device.type == "npu"


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


def resolve_device(name=None):
    """`--device` value -> device type; None/"auto" picks `detect_device()`. Asking for a device that
    is not there is a ValueError that says what is missing (a command's one-line error, common.cli)."""
    if name in (None, "auto"):
        return detect_device()
    if name == "npu":
        try:
            import_torch_npu()
        except RuntimeError as e:
            raise ValueError(f"--device npu: {e}") from None
        if not torch.npu.is_available():
            raise ValueError("--device npu: torch_npu is installed but sees no NPU")
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    elif name not in ("npu", "cuda", "cpu"):
        raise ValueError(f"--device {name!r}: choose from npu, cuda, cpu, auto")
    return name


def import_torch_npu():
    """torch_npu, imported only when an Ascend path is taken (it registers the "npu" device)."""
    try:
        import torch_npu
    except ImportError as e:
        raise RuntimeError("the npu paths need torch_npu (pip install -r requirements-npu.txt on an "
                           "Ascend machine with CANN)") from e
    return torch_npu


# ----------------------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("reference", "sdpa", "triton", "flash_attn", "npu")


def default_backend(device_type):
    """npu -> torch_npu's fused kernel, cuda -> our Triton kernel (SDPA without triton or before sm_80),
    cpu -> SDPA (its fused CPU kernel: 1.2x our tiled reference per tiny training step, bench.py --what step)."""
    if device_type == "npu":
        return "npu"
    if device_type == "cuda":  # our Triton kernels need sm_80 (attention_launch)
        old_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8
        return "triton" if triton is not None and not old_gpu else "sdpa"
    return "sdpa"


def _autocast_cast(*tensors):
    """Under autocast, matmul-like ops take its low-precision dtype (as torch's own matmuls do): without
    this, q/k from an fp32-weight QK-norm would reach the kernel fp32 while v is already bf16. The kernels
    then run with autocast off, so their own fp32 accumulation is not cast down."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors), torch.autocast(device_type, enabled=False)


@torch.compiler.disable  # per-sample bounds are data (host reads, a loop): each block's compiled graphs end here
def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=None,
                     cu_seqlens_k=None, max_seqlen_k=None, scale=None):
    """Attention within each packed sample. q [T, H, D], k/v [Tk, Hkv, D] with H % Hkv == 0 (GQA).

    cu_seqlens_k (default: cu_seqlens) lets keys have their own lengths (KV-cache decoding); causal
    masking is then aligned to the bottom-right, as in FlashAttention-2: query i of a sample with
    lengths (Lq, Lk) sees keys j <= i + Lk - Lq. max_seqlen(_k) size the "triton"/"flash_attn" grids
    and are trusted, as FlashAttention does (checking them would cost a host sync).
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    (q, k, v), autocast_off = _autocast_cast(q, k, v)
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with autocast_off:
        return _dispatch_attention(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal,
                                   backend or default_backend(q.device.type), scale)


def _dispatch_attention(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, backend, scale):
    if backend in ("reference", "sdpa") and causal and int(max_seqlen) == 1 and q.shape[0] == cu_seqlens.numel() - 1:
        return _decode_attention(q, k, v, cu_seqlens_k, scale)  # KV-cache decoding: one batched product
    if backend == "reference":
        return ReferenceAttention.apply(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
    if backend == "triton":
        return _triton_attention(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen), int(max_seqlen_k),
                                 causal, scale)
    if backend == "flash_attn":
        return _flash_attn_attention(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen),
                                     int(max_seqlen_k), causal, scale)
    if backend == "npu":
        return _npu_attention(q, k, v, cu_seqlens, cu_seqlens_k, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")


_HOST_LISTS = {}  # id(cu_seqlens) -> (weakref, version, list): see host_list


def host_list(cu):
    """cu_seqlens as a Python list, synced from the device once per tensor: every layer of a forward (and its
    backward) gets the same cu_seqlens tensor, so a batch costs one host sync, not one per attention call.
    Keyed by identity and checked against the tensor's version counter, so an in-place edit is seen
    (inference-mode tensors have none: they are copied every time)."""
    if cu.is_inference():
        return cu.tolist()
    hit = _HOST_LISTS.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    values = cu.tolist()
    key = id(cu)
    _HOST_LISTS[key] = (weakref.ref(cu, lambda _: _HOST_LISTS.pop(key, None)), cu._version, values)
    return values


def _sample_bounds(cu_q, cu_k):
    """Per-sample (q_start, q_end, k_start, k_end) as Python ints (host_list's one sync per batch)."""
    cq, ck = host_list(cu_q), host_list(cu_k)
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


def _decode_attention(q, k, v, cu_k, scale):
    """One query per sample (KV-cache decoding) over packed keys: each sample's keys gathered into a row
    padded to the longest, then decode_attention."""
    lens = (cu_k[1:] - cu_k[:-1]).long()
    slot = torch.arange(int(lens.max()), device=q.device)
    index = torch.where(slot[None] < lens[:, None], cu_k[:-1, None].long() + slot[None], 0)
    return decode_attention(q, k[index], v[index], lens, scale)


def decode_attention(q, k, v, lens, scale=None):
    """One query per sample, all samples in one batched product: q [B, H, D] over keys/values [B, L, Hkv, D]
    of which sample b's first lens[b] are its own (the rest is padding, masked). The query is the sample's
    last position, so bottom-right causal masking lets it see all of its (>= 1) keys."""
    (q, k, v), autocast_off = _autocast_cast(q, k, v)
    (B, H, D), Hkv = q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    with autocast_off:
        valid = torch.arange(k.shape[1], device=q.device)[None] < lens[:, None]                  # [B, L]
        kb, vb = (x.float().transpose(1, 2) for x in (k, v))                                      # [B, Hkv, L, D]
        # GQA as a [B, Hkv, groups, D] query: each kv head read once, not repeated per query head
        s = (q.float().view(B, Hkv, H // Hkv, -1) * scale) @ kb.transpose(2, 3)                  # [B, Hkv, groups, L]
        s = s.masked_fill(~valid[:, None, None], -math.inf)
        return (s.softmax(-1) @ vb).reshape(B, H, -1).to(q.dtype)


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
    """torch's scaled_dot_product_attention over the samples, those of equal lengths (e.g. a ViT's full
    windows) stacked into one call. Samples are split off and the outputs concatenated: the backward of a
    slice or of a slice assignment would fill a whole [T, H, D] zero tensor per sample (measured: a third
    of the tiny step's attention time on CPU)."""
    bounds = _sample_bounds(cu_q, cu_k)
    if bounds[-1][1] != q.shape[0] or bounds[-1][3] != k.shape[0]:
        raise ValueError(f"cu_seqlens end at {bounds[-1][1]} (q) / {bounds[-1][3]} (k), tensors have "
                         f"{q.shape[0]} / {k.shape[0]} tokens")
    q_lens, k_lens = [qe - qs for qs, qe, _, _ in bounds], [ke - ks for _, _, ks, ke in bounds]
    split = q.split(q_lens), k.split(k_lens), v.split(k_lens)
    groups = {}
    for i, lens in enumerate(zip(q_lens, k_lens)):
        groups.setdefault(lens, []).append(i)
    out = list(split[0])  # empty samples stay as they are
    for (Lq, Lk), idx in groups.items():
        if Lq == 0:
            continue
        mask = None
        if causal and Lq != Lk:  # bottom-right alignment is not what is_causal means
            mask = _causal_mask(0, Lq, 0, Lk, Lk - Lq, q.device)
        batch = [torch.stack([x[i] for i in idx]).transpose(1, 2) for x in split]  # [n, H, L, D] each
        o = F.scaled_dot_product_attention(*batch, attn_mask=mask, scale=scale, is_causal=causal and Lq == Lk,
                                           enable_gqa=q.shape[1] != k.shape[1])
        for i, oi in zip(idx, o.transpose(1, 2).unbind(0)):
            out[i] = oi
    return torch.cat(out)


def _flash_attn_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """flash_attn's varlen kernel (bottom-right causal since v2.1, GQA native), when installed."""
    if q.dtype not in (torch.float16, torch.bfloat16):  # flash_attn: "only support fp16 and bf16 data type"
        raise ValueError(f"attention backend 'flash_attn' takes fp16/bf16, got {q.dtype}: train with --dtype bf16 "
                         f"or use the 'triton' or 'sdpa' backend")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package; "
                           "use 'triton' or 'sdpa'") from e
    return flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, softmax_scale=scale,
                                  causal=causal)


@functools.lru_cache(maxsize=None)
def _npu_causal_mask(device):
    """npu_fusion_attention's compressed causal mask for sparse_mode 3 (True = masked)."""
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)


# npu_fusion_attention's limit on the sample count in "TND" (varlen) mode: actual_seq_qlen/kvlen hold at most
# 1,024 entries (torch_npu API reference, npu_fusion_attention constraints). The ViT's windows exceed it from
# ~16k visual tokens per micro-batch on.
NPU_MAX_SAMPLES = 1024


def _npu_attention(q, k, v, cu_q, cu_k, causal, scale):
    """torch_npu.npu_fusion_attention on packed "TND" tokens; torch_npu supplies the backward.
    actual_seq_(kv)len are host lists of cumulative lengths without the leading 0; sparse_mode 3 is
    causal per sample aligned bottom-right, 0 with no mask is full attention; head_num = query heads.
    More than NPU_MAX_SAMPLES samples are attended NPU_MAX_SAMPLES at a time, outputs concatenated."""
    cq, ck = host_list(cu_q), host_list(cu_k)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens for q ({len(cq)}) and k ({len(ck)}) differ in sample count")
    npu, outs = import_torch_npu(), []
    for s in range(0, len(cq) - 1, NPU_MAX_SAMPLES):
        e = min(s + NPU_MAX_SAMPLES, len(cq) - 1)
        (q0, q1), (k0, k1) = (cq[s], cq[e]), (ck[s], ck[e])
        if q1 == q0:  # only empty samples: nothing to attend, nothing to pass the op
            outs.append(q[q0:q1])
            continue
        outs.append(npu.npu_fusion_attention(
            q[q0:q1], k[k0:k1], v[k0:k1], q.shape[1], "TND",
            atten_mask=_npu_causal_mask(q.device) if causal else None, scale=scale,
            actual_seq_qlen=[c - q0 for c in cq[s + 1:e + 1]], actual_seq_kvlen=[c - k0 for c in ck[s + 1:e + 1]],
            sparse_mode=3 if causal else 0)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _triton_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    if triton is None:
        raise RuntimeError("attention backend 'triton' needs the triton package; use 'sdpa' or 'reference'")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"attention backend 'triton' runs on cuda tensors (or on any device under "
                           f"TRITON_INTERPRET=1); got {q.device.type}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention backend 'triton' takes fp16/bf16/fp32 q, k, v of one dtype; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"attention backend 'triton' supports head_dim <= 256, got {q.shape[-1]}")
    if q.is_cuda and q.dtype == torch.float32:  # one line, once (Python's default warning filter)
        warnings.warn("attention backend 'triton': fp32 q/k/v run on SDPA (the kernels' fp32 tiles spill registers "
                      "on sm_80/sm_90, docs/DESIGN.md); --dtype bf16 runs the Triton kernels")
        return _sdpa_attention(q, k, v, cu_q, cu_k, causal, scale)
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_k.to(device=q.device, dtype=torch.int32)
    return TritonAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


# Shared memory one thread block may use, by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): 163 KB on A100 (sm_80), 227 KB on H100/B200, 99 KB on the
# sm_86/89/120 cards. A kernel asking for more fails at launch (OutOfResources); the interpreter never checks.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# Attention launch configurations for 16-bit q/k/v: padded head dim (BLOCK_D) -> kernel -> (BLOCK_M, BLOCK_N,
# num_warps, num_stages). Chosen by compiling candidates with triton 3.9 for sm_80 and sm_90: the largest
# tiles that spill at most 240 B of registers; each asks for <= 96 KB of shared memory, so one table fits
# every GPU from sm_80 on (tests/test_triton_compile.py, figures in docs/DESIGN.md). FlashAttention-2's
# 128x64 at head_dim 128 spills 608 B on sm_80; 128x64 at 256 needs 1.6 KB of stack.
ATTENTION_TILES = {64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 3), dq=(64, 64, 4, 3)),
                   128: dict(fwd=(64, 64, 8, 3), dkdv=(32, 64, 8, 3), dq=(64, 32, 8, 3)),
                   256: dict(fwd=(64, 32, 8, 3), dkdv=(32, 32, 8, 2), dq=(32, 64, 8, 2))}


def attention_launch(dtype, head_dim, capability=None):
    """The Triton attention kernels' launch configuration for q/k/v of `dtype` and `head_dim` on a GPU of compute
    capability `capability` (e.g. 90; None = the interpreter, nothing to fit): {"fwd" | "dkdv" | "dq":
    dict(BLOCK_M, BLOCK_N, num_warps, num_stages and the constexprs all three share)}."""
    if capability is not None and capability < 80:  # bf16 tensor cores, and >= 99 KB of shared memory
        raise ValueError(f"attention backend 'triton' needs a GPU of compute capability >= 8.0, got "
                         f"{capability / 10:.1f}; use --attn-backend sdpa")
    if capability is not None and dtype == torch.float32:
        raise ValueError("attention_launch: fp32 attention runs on SDPA on a GPU (its Triton tiles spill)")
    block_d = max(16, triton.next_power_of_2(head_dim))
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=block_d,
                  DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")  # tf32 = the 16-bit default
    return {name: dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, **shared)
            for name, (m, n, w, st) in ATTENTION_TILES[max(64, block_d)].items()}


@functools.lru_cache(maxsize=None)
def cuda_capability(device):
    """A CUDA device's compute capability as one number (9.0 -> 90); None for other devices (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


if triton is not None:
    # FlashAttention-2 (Dao 2023) over packed samples: program (block, sample, head) finds its rows
    # from cu_seqlens; head_dim is padded to a power of two (the ViT's 80 -> 128) and masked.
    # Scores live in the log2 domain (s * scale * log2 e) so the softmax uses exp2; LSE is saved
    # in those units. Causal masking is bottom-right: key j is visible to query i iff j <= i + Lk - Lq.

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, cu_q, cu_k, scale_log2, n_q,
                         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                         GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
        """FlashAttention-2 Alg. 1: one query tile, an online softmax over key tiles, fp32 state."""
        start_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q0, k0 = tl.load(cu_q + b), tl.load(cu_k + b)
        len_q, len_k = tl.load(cu_q + b + 1) - q0, tl.load(cu_k + b + 1) - k0
        if start_m * BLOCK_M >= len_q:
            return
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < len_q
        d_ok = offs_d < HEAD_DIM
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        hk = h // GROUPS  # GQA: consecutive query heads share one kv head
        k_base = K + k0.to(tl.int64) * sk_t + hk * sk_h
        v_base = V + k0.to(tl.int64) * sv_t + hk * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag = len_k - len_q
        end_n = len_k
        if CAUSAL:  # key tiles wholly above the diagonal are skipped
            end_n = tl.minimum(len_k, (start_m + 1) * BLOCK_M + diag)
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            visible = (cols < len_k)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key outputs 0
        tl.store(O + rows[:, None] * so_t + h * so_h + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + h * n_q + q0 + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k, scale, scale_log2, n_q,
                              sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sdk_t, sdk_h,
                              GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
        """FlashAttention-2 Alg. 2, outer loop over key tiles: dV = P^T dO, dK = scale dS^T Q with
        P recomputed from the saved LSE and dS = P * (dP - D). The GROUPS query heads that share a
        kv head are summed here, so GQA needs no atomics."""
        start_n, b, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q0, k0 = tl.load(cu_q + b), tl.load(cu_k + b)
        len_q, len_k = tl.load(cu_q + b + 1) - q0, tl.load(cu_k + b + 1) - k0
        if start_n * BLOCK_N >= len_k:
            return
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < len_k
        d_ok = offs_d < HEAD_DIM
        kv_mask = col_ok[:, None] & d_ok[None, :]
        cols = (k0 + offs_n).to(tl.int64)
        k = tl.load(K + cols[:, None] * sk_t + hk * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + hk * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        diag = len_k - len_q
        begin_m = 0
        if CAUSAL:  # queries before the key tile's diagonal never see it
            begin_m = tl.maximum(start_n * BLOCK_N - diag, 0)
        for g in range(GROUPS):
            h = hk * GROUPS + g
            for start_m in range(begin_m, len_q, BLOCK_M):
                rows_in = start_m + offs_m
                row_ok = rows_in < len_q
                rows = (q0 + rows_in).to(tl.int64)
                q_mask = row_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(DO + rows[:, None] * so_t + h * so_h + offs_d[None, :], mask=q_mask, other=0.0)
                lse = tl.load(LSE + h * n_q + rows, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + h * n_q + rows, mask=row_ok, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
                visible = row_ok[:, None] & col_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= rows_in[:, None] + diag)
                p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        out_off = cols[:, None] * sdk_t + hk * sdk_h + offs_d[None, :]
        tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_q, cu_k, scale, scale_log2, n_q,
                            sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                            GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
        """FlashAttention-2 Alg. 2's dQ = scale dS K, as its own pass over key tiles per query tile
        (recomputing P rather than accumulating dQ with atomics)."""
        start_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q0, k0 = tl.load(cu_q + b), tl.load(cu_k + b)
        len_q, len_k = tl.load(cu_q + b + 1) - q0, tl.load(cu_k + b + 1) - k0
        if start_m * BLOCK_M >= len_q:
            return
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < len_q
        d_ok = offs_d < HEAD_DIM
        q_mask = row_ok[:, None] & d_ok[None, :]
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * so_t + h * so_h + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * n_q + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * n_q + rows, mask=row_ok, other=0.0)
        hk = h // GROUPS
        k_base = K + k0.to(tl.int64) * sk_t + hk * sk_h
        v_base = V + k0.to(tl.int64) * sv_t + hk * sv_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag = len_k - len_q
        end_n = len_k
        if CAUSAL:
            end_n = tl.minimum(len_k, (start_m + 1) * BLOCK_M + diag)
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < len_k)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            visible = row_ok[:, None] & (cols < len_k)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.store(DQ + rows[:, None] * so_t + h * so_h + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


class TritonAttention(torch.autograd.Function):
    """Our varlen FlashAttention-2 in Triton: the kernels above, fp32 accumulation, O(T) memory, launched with
    attention_launch's tiles for the device."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        T, H, D = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(H, T, dtype=torch.float32, device=q.device)  # log2 units
        launch = attention_launch(q.dtype, D, cuda_capability(q.device))
        fwd = launch["fwd"]
        grid = (triton.cdiv(max_q, fwd["BLOCK_M"]), len(cu_q) - 1, H)
        _attn_fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, scale * math.log2(math.e), T,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                               v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                               GROUPS=H // k.shape[1], CAUSAL=causal, **fwd)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.causal, ctx.scale, ctx.launch = max_q, max_k, causal, scale, launch
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = dout.contiguous()
        T, H, _ = q.shape
        # FlashAttention-2 Alg. 2 line 4: D_i = rowsum(dO_i * O_i), one fused torch reduction
        delta = (dout.float() * out.float()).sum(-1).t().contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        common = dict(GROUPS=H // k.shape[1], CAUSAL=ctx.causal)
        dkdv, dq_launch = ctx.launch["dkdv"], ctx.launch["dq"]
        scales = (ctx.scale, ctx.scale * math.log2(math.e), T)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   dout.stride(0), dout.stride(1))
        n_samples = len(cu_q) - 1
        _attn_bwd_dkdv_kernel[(triton.cdiv(ctx.max_k, dkdv["BLOCK_N"]), n_samples, k.shape[1])](
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *scales, *strides, dk.stride(0), dk.stride(1),
            **common, **dkdv)
        _attn_bwd_dq_kernel[(triton.cdiv(ctx.max_q, dq_launch["BLOCK_M"]), n_samples, H)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, *scales, *strides, **common, **dq_launch)
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------- small ops


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm (Zhang & Sennrich 2019) in fp32, cast back before the gain as Qwen/Llama do.
    Fused: torch_npu.npu_rms_norm on Ascend, our Triton kernel on CUDA."""
    if _on_npu(x):
        return import_torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
    if x.is_cuda and triton is not None and x.numel() and not torch.compiler.is_compiling():  # else inductor fuses it
        return TritonRMSNorm.apply(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
        """One row: rstd = 1/sqrt(mean(x^2) + eps); y = w * cast(x * rstd), the reference's rounding."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        y = (x * rstd).to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, n_rows, stride_x, stride_dy, stride_dx,
                             D, BLOCK_D: tl.constexpr):
        """Rows pid, pid + P, ...: dx = rstd (g - xhat mean(g xhat)) with g = dy w; this program's
        share of dw = sum_rows dy cast(xhat) goes to DW_PARTIAL[pid] (summed by the caller)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], tl.float32)
        for row in range(pid, n_rows, tl.num_programs(0)):
            r = tl.cast(row, tl.int64)
            x = tl.load(X + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + r)
            xhat = x * rstd
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / D))
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=ok)


def rms_norm_launch(dim):
    """One row per program, the whole row in registers: more warps for wider rows keep each thread's share
    (x, dy, w, the dw partial) at <= 16 values, so rows up to DeepSeek-V3's 7168 do not spill."""
    block_d = triton.next_power_of_2(dim)
    return dict(BLOCK_D=block_d, num_warps=min(16, max(4, block_d // 512)))


class TritonRMSNorm(torch.autograd.Function):
    """rms_norm as two Triton kernels (one read of x forward, one of x and dy backward)."""

    BWD_PROGRAMS = 512  # enough rows per program to amortise the dw partials, enough programs to fill a GPU

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        n, D = x2.shape
        y = torch.empty(n, D, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        _rms_norm_fwd_kernel[(n,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, **rms_norm_launch(D))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], D)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, D = x2.shape
        dy2 = dy.reshape(n, D)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        dx = torch.empty(n, D, dtype=x2.dtype, device=x2.device)
        programs = min(n, TritonRMSNorm.BWD_PROGRAMS)
        dw_partial = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_partial, n, x2.stride(0),
                                          dy2.stride(0), dx.stride(0), D, **rms_norm_launch(D))
        return dx.view(ctx.x_shape), dw_partial.sum(0).to(weight.dtype), None


# ----------------------------------------------------------------------------- Triton kernels compiled ahead of time

TRITON_KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "rms_norm_fwd", "rms_norm_bwd")
# argument types by name: pointers to the input dtype ("*{}"), to fp32 and int32; fp32 scalars; the rest int32
_ARG_TYPES = {**dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "W", "Y", "DY", "DX"), "*{}"),
              **dict.fromkeys(("LSE", "DELTA", "RSTD", "DW_PARTIAL"), "*fp32"), "cu_q": "*i32", "cu_k": "*i32",
              **dict.fromkeys(("scale", "scale_log2", "eps"), "fp32")}


def compile_triton(name, dtype, dim, capability, groups=1):
    """Compile one of TRITON_KERNELS ahead of time for an NVIDIA GPU of compute capability `capability` (80, 90;
    no GPU needed, triton ships ptxas) with exactly the launch configuration its launcher picks there, `dim`
    being the head dim (attention) or the row width (RMSNorm), `groups` the query heads per kv head (1 folds
    the dK/dV kernel's loop over them; any larger count compiles alike). Returns the shared memory per block
    it asks for at launch (bytes, against SHARED_MEMORY), registers per thread and stack bytes (register
    spills), as cuobjdump -res-usage reads them from the cubin. Needs a process without TRITON_INTERPRET=1."""
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    kernel = globals()[f"_{name}_kernel"]
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_triton: Triton's interpreter is on (TRITON_INTERPRET=1); run without it")
    launch = (attention_launch(dtype, dim, capability)[name.removeprefix("attn_").removeprefix("bwd_")]
              if name.startswith("attn") else rms_norm_launch(dim))
    options = {k: launch.pop(k) for k in ("num_warps", "num_stages") if k in launch}
    if name.startswith("attn"):
        launch.update(GROUPS=groups, CAUSAL=True)
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    signature = {arg: "constexpr" if arg in launch else _ARG_TYPES.get(arg, "i32").format(ty)
                 for arg in kernel.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs=launch),
                              target=GPUTarget("cuda", capability, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return dict(kernel=name, dtype=ty, dim=dim, capability=capability, groups=launch.get("GROUPS"),
                shared=compiled.metadata.shared,
                shared_limit=SHARED_MEMORY[capability], regs=int(regs), stack=int(stack),
                config={**launch, **options})


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotary embedding (RoFormer, Su et al. 2021) in the half-split layout: x*cos + rotate_half(x)*sin.
    x [T, H, D]; cos/sin [T, D] (already repeated over the two halves). On CUDA it stays plain torch:
    an elementwise op that torch.compile fuses with its neighbours, unmeasured against a kernel here."""
    if _on_npu(x) and x.shape[-1] % 64 == 0:  # npu_rotary_mul's head-dim limits vary by release
        c, s = (t.to(x.dtype)[None, :, None, :] for t in (cos, sin))  # BSND layout, cos/sin "1S1D"
        return import_torch_npu().npu_rotary_mul(x[None], c, s)[0]
    xf = x.float()
    return (xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]).to(x.dtype)


def swiglu(gate, up):
    """SwiGLU (Shazeer 2020): silu(gate) * up. npu_swiglu takes [gate, up] concatenated; on CUDA it
    stays plain torch (elementwise, left to torch.compile), like apply_rope."""
    if _on_npu(gate) and gate.numel():  # npu_swiglu refuses an empty tensor (an EP rank with no routed rows)
        return import_torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- grouped matmul (MoE)


def grouped_mm(x, w, counts):
    """Per-expert matmuls over tokens sorted by expert: x [N, K], w [E, K, M], counts [E] tokens per
    expert (zeros allowed) -> [N, M], rows of expert e multiplied by w[e].
    Fast paths: npu_grouped_matmul on Ascend, torch._grouped_mm on CUDA (rows must be 16-byte
    aligned); the reference is a loop over experts, which also checks counts against N."""
    (x, w), autocast_off = _autocast_cast(x, w)
    with autocast_off:
        return _grouped_mm(x, w, counts)


def _grouped_mm(x, w, counts):
    if _on_npu(x):
        return NpuGroupedMM.apply(x, w, counts)
    if x.is_cuda and (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * w.element_size()) % 16 == 0:
        return torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    sizes = counts.tolist()
    if len(sizes) != w.shape[0] or sum(sizes) != x.shape[0]:
        raise ValueError(f"grouped_mm: counts {sizes} must have one entry per expert ({w.shape[0]}) and "
                         f"sum to the number of tokens ({x.shape[0]})")
    return torch.cat([xe @ we for xe, we in zip(x.split(sizes), w)])


class NpuGroupedMM(torch.autograd.Function):
    """npu_grouped_matmul has no autograd of its own: forward groups x's rows (group_type 0);
    backward is dx = grouped(dy, w^T) and dw[e] = x_e^T dy_e, a grouping of the contraction axis
    (group_type 2). The group list is cumulative ends (group_list_type 0): per-expert counts
    (type 1) are refused for a single group, which a rank holding one expert has."""

    @staticmethod
    def forward(ctx, x, w, counts):
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        ctx.save_for_backward(x, w, counts, ends)
        if not x.shape[0]:  # a rank with no routed rows: nothing reaches the op
            return x.new_empty(0, w.shape[2])
        return import_torch_npu().npu_grouped_matmul([x], [w], group_list=ends, split_item=2, group_type=0,
                                               group_list_type=0)[0]

    @staticmethod
    def backward(ctx, dy):
        x, w, counts, ends = ctx.saved_tensors
        if not x.shape[0]:
            return torch.zeros_like(x), torch.zeros_like(w), None
        npu = import_torch_npu()
        dx = npu.npu_grouped_matmul([dy], [w.transpose(1, 2)], group_list=ends, split_item=2,
                                    group_type=0, group_list_type=0)[0]
        dw = npu.npu_grouped_matmul([x.t()], [dy], group_list=ends, split_item=3, group_type=2,
                                    group_list_type=0)[0]
        # the op leaves an expert with no rows unwritten (its output is allocated uninitialised): an idle
        # expert's gradient is zero by selection, not by whatever memory it got
        return dx, torch.where((counts > 0)[:, None, None], dw, 0), None


# ----------------------------------------------------------------------------- cross-entropy


# a chunk's fp32 logits are at most this many bytes (151,936-token vocabulary: 441 tokens a chunk): the loss's
# memory is then a few chunks plus the head's fp32 gradient, whatever the micro-batch's token count
LOSS_CHUNK_BYTES = 256 * 2 ** 20


def linear_cross_entropy(hidden, weight, labels, chunk=None, z_loss=False):
    """Sum over tokens with labels != -100 of cross-entropy(hidden @ weight^T, labels), and with
    z_loss=True also the sum of logsumexp^2 (the z-loss term of PaLM / MM1), as (ce, z).
    hidden [T, d], weight [V, d]. Logits exist only `chunk` tokens at a time (default: LOSS_CHUNK_BYTES of
    fp32 logits), so [T, V] fp32 logits never do. Plain torch: runs on every device."""
    keep = labels != -100
    hidden, labels = hidden[keep], labels[keep]
    if labels.numel() and (labels.min() < 0 or labels.max() >= weight.shape[0]):
        raise ValueError(f"linear_cross_entropy: labels must be -100 or in [0, {weight.shape[0]}); got "
                         f"min {labels.min().item()}, max {labels.max().item()}")
    chunk = chunk or max(1, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    (hidden, weight), autocast_off = _autocast_cast(hidden, weight)  # backward recomputes in the same dtype
    grads = torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad
    with autocast_off:
        ce, z = LinearCrossEntropy.apply(hidden, weight, labels, chunk, grads)
    return (ce, z) if z_loss else ce


def _ce_chunks(hidden, weight, labels, chunk, lse=None, grads=(False, False), g_z=None):
    """One pass over the chunks. Forward (lse None): the CE and z sums, the per-token logsumexp, and where
    `grads` asks, the CE's gradients (dh, dw) formed here from the chunk's softmax, so backward need not
    recompute the logits (Liger-Kernel's fused linear cross-entropy). Backward of the z-loss (lse given):
    the gradients of g_z * sum(lse^2), d/dlogits = 2 g_z lse softmax."""
    need_dh, need_dw = grads
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    sums, forward = torch.zeros(2, dtype=torch.float32, device=hidden.device), lse is None
    lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if forward else lse
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i:i + chunk], labels[i:i + chunk]
        p = (h @ weight.t()).float()  # in place from here on: one [chunk, V] fp32 buffer
        if forward:
            lse[i:i + chunk] = lse_c = torch.logsumexp(p, dim=-1)
            sums[0] += (lse_c - p.gather(1, y[:, None])[:, 0]).sum()
            sums[1] += lse_c.square().sum()
        lse_c = lse[i:i + chunk]
        if not (need_dh or need_dw):
            continue
        p.sub_(lse_c[:, None]).exp_()  # softmax
        if forward:
            p[torch.arange(len(y), device=y.device), y] -= 1
        else:
            p.mul_((2 * g_z * lse_c)[:, None])
        g = p.to(hidden.dtype)
        if need_dh:
            dh[i:i + chunk] = g @ weight
        if need_dw:
            torch.addmm(dw, g.t(), h, out=dw) if g.dtype == dw.dtype else dw.add_((g.t() @ h).float())
    return sums, lse, dh, dw


class LinearCrossEntropy(torch.autograd.Function):
    """Chunked over tokens. The CE's gradients are formed in the forward (the logits computed once); backward
    scales them by the incoming gradient and recomputes the logits only for a z-loss that is used."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, grads):
        sums, lse, dh, dw = _ce_chunks(hidden, weight, labels, chunk, grads=grads)
        ctx.save_for_backward(hidden, weight, labels, lse, dh, dw)
        ctx.chunk, ctx.grads = chunk, grads
        ctx.set_materialize_grads(False)  # an unused z output gets None: no z-loss pass
        return sums[0], sums[1]

    @staticmethod
    def backward(ctx, g_ce, g_z):
        hidden, weight, labels, lse, dh, dw = ctx.saved_tensors
        dh = None if dh is None or g_ce is None else dh * g_ce.to(dh.dtype)
        dw = None if dw is None or g_ce is None else dw * g_ce
        if g_z is not None:
            _, _, zh, zw = _ce_chunks(hidden, weight, labels, ctx.chunk, lse, ctx.grads, g_z)
            dh = zh if dh is None else dh + zh if zh is not None else dh
            dw = zw if dw is None else dw + zw if zw is not None else dw
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None
