"""A stand-in for `torch_npu`: each op kernels.py calls, written in plain torch from Ascend's
documented semantics (the torch_npu API reference), strict about its arguments.

This verifies OUR CALLS - layout, cumulative lengths, mask convention, scale, head counts, group
lists, which half of a concatenation is the gate, which ops lack autograd - and not the hardware,
CANN's kernels or their numerics. The NPU paths are not run on Ascend hardware in CI.

Documented limits it enforces (torch_npu API reference, Ascend/op-plugin docs/context/torch_npu-<op>.md):
npu_fusion_attention's "TND" mode takes at most 1,024 entries in actual_seq_qlen/kvlen;
npu_grouped_matmul refuses group_list_type 1 (counts) with a single group, and its output is allocated
uninitialised, so a K-split (group_type 2) group with no rows is left unwritten (here: NaN);
npu_swiglu refuses an empty tensor.

Install it for one test with `monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu)`.
"""
import math

import torch
import torch.nn.functional as F

MAX_TND_SAMPLES = 1024


def _cumulative(name, seq, total):
    """actual_seq_qlen/kvlen: a host list of cumulative lengths WITHOUT the leading 0, ending at T."""
    if not isinstance(seq, (list, tuple)) or not all(isinstance(n, int) for n in seq):
        raise TypeError(f"{name} must be a host list of ints, got {type(seq).__name__}")
    ends = list(seq)
    if len(ends) > MAX_TND_SAMPLES:
        raise ValueError(f"{name} has {len(ends)} entries; TND mode takes at most {MAX_TND_SAMPLES}")
    if not ends or ends[0] <= 0:  # a leading 0 is the cu_seqlens mistake; the lists start at sample 1's end
        raise ValueError(f"{name}={ends} must be cumulative lengths without the leading 0")
    if ends[-1] != total or any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{name}={ends} must be non-decreasing cumulative lengths ending at {total}")
    return [0] + ends


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    """Models input_layout "TND" with sparse_mode 0 (no mask: full attention per sample) and 3
    (rightDownCausal with the compressed 2048x2048 triu mask, True = masked). scale defaults to 1.0,
    as documented. Returns the documented 7-tuple: (out, softmax_max, softmax_sum, softmax_out,
    seed, offset, numels); softmax_max/sum are [T, N, 8] fp32 (row max / sum repeated 8 times)."""
    if input_layout != "TND":
        raise NotImplementedError(f"fake models only input_layout 'TND', got {input_layout!r}")
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"TND wants q/k/v [T, N, D]; got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if query.shape[1] != head_num or head_num % key.shape[1]:
        raise ValueError(f"head_num={head_num} must equal the query heads ({query.shape[1]}) and be a "
                         f"multiple of the kv heads ({key.shape[1]})")
    if keep_prob != 1.0 or pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("fake models no dropout, pse, padding_mask or prefix")
    cu_q = _cumulative("actual_seq_qlen", actual_seq_qlen, query.shape[0])
    cu_k = _cumulative("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError("actual_seq_qlen and actual_seq_kvlen differ in sample count")
    if sparse_mode == 0:
        if atten_mask is not None:
            raise NotImplementedError("fake models sparse_mode 0 only without atten_mask")
    elif sparse_mode == 3:
        expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        if (atten_mask is None or atten_mask.dtype != torch.bool or atten_mask.shape != (2048, 2048)
                or not torch.equal(atten_mask.cpu(), expected)):
            raise ValueError("sparse_mode 3 needs the compressed mask triu(ones(2048, 2048, bool), 1)")
    else:
        raise NotImplementedError(f"fake models sparse_mode 0 and 3, got {sparse_mode}")

    groups = head_num // key.shape[1]
    outs, maxes, sums = [], [], []
    for i in range(len(cu_q) - 1):
        qh = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1).float()
        kh = key[cu_k[i]:cu_k[i + 1]].transpose(0, 1).float().repeat_interleave(groups, 0)
        vh = value[cu_k[i]:cu_k[i + 1]].transpose(0, 1).float().repeat_interleave(groups, 0)
        s = scale * qh @ kh.transpose(1, 2)
        if sparse_mode == 3:  # rightDownCausal: the diagonal ends at the bottom-right corner
            lq, lk = qh.shape[1], kh.shape[1]
            rows, cols = torch.arange(lq, device=s.device), torch.arange(lk, device=s.device)
            masked = cols[None] > rows[:, None] + lk - lq
            s = s.masked_fill(masked, -math.inf)
        outs.append((s.softmax(-1) @ vh).transpose(0, 1))
        m = s.amax(-1)
        maxes.append(m.transpose(0, 1))
        sums.append(torch.exp(s - m[..., None]).sum(-1).transpose(0, 1))
    out = torch.cat(outs).to(query.dtype)
    softmax_max = torch.cat(maxes).detach()[..., None].expand(-1, -1, 8)
    softmax_sum = torch.cat(sums).detach()[..., None].expand(-1, -1, 8)
    return out, softmax_max, softmax_sum, torch.empty(0), 0, 0, 0


def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(y, rstd) with rstd = 1/sqrt(mean(x^2) + eps) over the last dim; gamma's dtype must match x's."""
    if gamma.dtype != x.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must match x dtype {x.dtype}")
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    """half mode: r1 * x + r2 * cat(-x2, x1); all three 4-D (BSND/BNSD/SBND), D even."""
    if rotary_mode != "half":
        raise NotImplementedError("fake models rotary_mode 'half'")
    if input.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
        raise ValueError(f"npu_rotary_mul wants 4-D input, r1, r2; got {input.dim()}, {r1.dim()}, {r2.dim()}")
    if r1.shape[-1] != input.shape[-1] or r2.shape != r1.shape or input.shape[-1] % 2:
        raise ValueError("npu_rotary_mul: r1/r2 must share input's even last dim")
    torch.broadcast_shapes(input.shape, r1.shape)
    x1, x2 = input.chunk(2, dim=-1)
    return r1 * input + r2 * torch.cat((-x2, x1), dim=-1)


def npu_swiglu(x, dim=-1):
    """silu(A) * B, A the first half of x along dim; an empty x is refused."""
    if not x.numel():
        raise ValueError(f"npu_swiglu: empty input {tuple(x.shape)}")
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def npu_grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=-1,
                       group_list_type=0, **unused):
    """The two single-tensor cases of the documented op: group_type 0 splits x's rows (x [N, K],
    weight [E, K, M] -> [N, M], split_item 2/3) and group_type 2 splits the contraction axis
    (x [K, N], weight [N, M] -> [E, K, M], split_item 3). group_list holds per-group sizes when
    group_list_type is 1, cumulative ends when 0. Like the real op it has no autograd."""
    if not isinstance(x, list) or not isinstance(weight, list) or len(x) != 1 or len(weight) != 1:
        raise TypeError("npu_grouped_matmul takes lists: fake models one x and one weight tensor")
    if bias is not None or unused:
        raise NotImplementedError(f"fake models no bias/quantisation arguments: {sorted(unused)}")
    if group_list_type not in (0, 1):
        raise ValueError(f"group_list_type must be 0 or 1, got {group_list_type}")
    if isinstance(group_list, torch.Tensor):
        if group_list.dtype != torch.int64:
            raise TypeError(f"group_list tensor must be int64, got {group_list.dtype}")
        group_list = group_list.tolist()
    if group_list_type == 1 and len(group_list) == 1:
        raise ValueError("npu_grouped_matmul: group_list_type 1 (per-group counts) needs more than one group")
    ends = list(torch.tensor(group_list).cumsum(0).tolist()) if group_list_type == 1 else list(group_list)
    bounds = list(zip([0] + ends[:-1], ends))
    (a,), (b,) = x, weight
    with torch.no_grad():
        if group_type == 0 and split_item in (2, 3):
            if b.dim() != 3 or len(ends) != b.shape[0] or ends[-1] != a.shape[0]:
                raise ValueError(f"group_type 0: weight [E, K, M] with E={len(ends)} groups covering "
                                 f"{a.shape[0]} rows; got weight {tuple(b.shape)}, group ends {ends}")
            return [torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(bounds)])]
        if group_type == 2 and split_item == 3:
            if b.dim() != 2 or ends[-1] != a.shape[1] or b.shape[0] != a.shape[1]:
                raise ValueError(f"group_type 2: x [K, N], weight [N, M], groups covering N; got "
                                 f"{tuple(a.shape)}, {tuple(b.shape)}, group ends {ends}")
            out = torch.full((len(bounds), a.shape[0], b.shape[1]), math.nan, dtype=a.dtype)  # uninitialised
            for g, (s, e) in enumerate(bounds):
                if e > s:
                    out[g] = a[:, s:e] @ b[s:e]
            return [out]
    raise NotImplementedError(f"fake models group_type 0 (split_item 2/3) and 2 (split_item 3); got "
                              f"group_type {group_type}, split_item {split_item}")
