"""varlen attention backends against a naive softmax(QK^T)V, values and gradients."""
import math

import pytest
import torch

import kernels
from kernels import varlen_attention


def naive_attention(q, k, v, cu_q, cu_k, causal):
    """softmax(QK^T / sqrt(d)) V per sample, the whole score matrix at once, in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        qh = q[qs:qe].transpose(0, 1)
        kh = k[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        vh = v[ks:ke].transpose(0, 1).repeat_interleave(groups, 0)
        s = qh @ kh.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            lq, lk = qe - qs, ke - ks
            allowed = torch.arange(lk)[None] <= torch.arange(lq)[:, None] + lk - lq
            s = s.masked_fill(~allowed, -math.inf)
        outs.append((s.softmax(-1) @ vh).transpose(0, 1))
    return torch.cat(outs)


TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_matches_naive(backend, causal, dtype, heads, monkeypatch):
    monkeypatch.setattr(kernels.ReferenceAttention, "BLOCK", 16)  # several tiles per sample
    lengths = [5, 40, 0, 35, 1]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    h, hkv = heads
    q = torch.randn(cu[-1], h, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(cu[-1], hkv, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(cu[-1], hkv, 16, dtype=dtype, requires_grad=True)
    out = varlen_attention(q, k, v, cu_t, max(lengths), causal=causal, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref = naive_attention(q, k, v, cu, cu, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.float())
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_kv_longer_than_q_is_bottom_right_causal(backend):
    """KV-cache decoding: one new query per sample sees every cached key of its own sample."""
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 20], dtype=torch.int32)
    q, k, v = torch.randn(2, 2, 8), torch.randn(20, 1, 8), torch.randn(20, 1, 8)
    out = varlen_attention(q, k, v, cu_q, 1, causal=True, backend=backend, cu_seqlens_k=cu_k, max_seqlen_k=13)
    torch.testing.assert_close(out, naive_attention(q, k, v, [0, 1, 2], [0, 7, 20], True), atol=1e-5, rtol=1e-5)


def test_reference_memory_linear_in_length():
    """Peak memory of reference fwd+bwd, replayed from the profiler's allocation events, grows
    ~linearly: 4x the tokens costs well under the 16x a materialised score matrix would."""
    def peak_bytes(n):
        q = torch.randn(n, 2, 32, requires_grad=True)
        k = torch.randn(n, 2, 32, requires_grad=True)
        v = torch.randn(n, 2, 32, requires_grad=True)
        cu = torch.tensor([0, n], dtype=torch.int32)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = varlen_attention(q, k, v, cu, n, backend="reference")
            out.sum().backward()
        live, peak = 0, 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += ev.self_cpu_memory_usage
            peak = max(peak, live)
        return peak

    small, large = peak_bytes(512), peak_bytes(2048)
    assert large / small < 6, (small, large)  # quadratic would be ~16x
