"""varlen attention backends against a naive softmax(QK^T)V, values and gradients.

The "triton" backend runs on CUDA when there is one, else in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is unavailable)."""
import math
import os

import pytest
import torch

import kernels
from conftest import requires
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
            rows, cols = torch.arange(lq, device=q.device), torch.arange(lk, device=q.device)
            allowed = cols[None] <= rows[:, None] + lk - lq
            s = s.masked_fill(~allowed, -math.inf)
        outs.append((s.softmax(-1) @ vh).transpose(0, 1))
    return torch.cat(outs)


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def device_for(backend, dtype):
    """Where a backend's test tensors live; skips what this machine cannot run."""
    if backend != "triton":
        return "cpu"
    requires("triton")
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("triton 3.9's interpreter multiplies bf16 tl.dot operands as raw uint16 bits")
    return "cpu" if INTERPRETED else "cuda"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16-32 so the tiny test samples span several query and key tiles."""
    monkeypatch.setattr(kernels.ReferenceAttention, "BLOCK", 16)
    launch = kernels.attention_launch
    tiles = dict(fwd=(32, 16), dkdv=(16, 32), dq=(16, 32))
    monkeypatch.setattr(kernels, "attention_launch", lambda *args: {
        name: {**cfg, "BLOCK_M": tiles[name][0], "BLOCK_N": tiles[name][1]} for name, cfg in launch(*args).items()})


def random_qkv(lengths, heads, head_dim, dtype, device, kv_lengths=None):
    def cumulative(ns):
        cu = [0]
        for n in ns:
            cu.append(cu[-1] + n)
        return cu
    cu, cu_k = cumulative(lengths), cumulative(kv_lengths or lengths)
    h, hkv = heads
    q = torch.randn(cu[-1], h, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(cu_k[-1], hkv, head_dim, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(cu_k[-1], hkv, head_dim, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, cu, cu_k


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_matches_naive(backend, causal, dtype, heads, small_tiles):
    lengths = [5, 40, 0, 35, 1]
    q, k, v, cu, _ = random_qkv(lengths, heads, 16, dtype, device_for(backend, dtype))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
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


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_stacks_equal_length_samples(causal):
    """sdpa runs samples of equal length (a ViT's windows) as one batch: values and gradients still per sample."""
    lengths = [16, 8, 16, 0, 8, 16, 3]
    q, k, v, cu, _ = random_qkv(lengths, (4, 2), 16, torch.float32, "cpu")
    out = varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 16, causal=causal, backend="sdpa")
    ref = naive_attention(q, k, v, cu, cu, causal)
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_kv_longer_than_q_is_bottom_right_causal(backend):
    """KV-cache decoding: one new query per sample sees every cached key of its own sample."""
    device = device_for(backend, torch.float32)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(n, h, 16, device=device) for n, h in ((2, 2), (20, 1), (20, 1)))
    out = varlen_attention(q, k, v, cu_q, 1, causal=True, backend=backend, cu_seqlens_k=cu_k,
                           max_seqlen_k=13)
    torch.testing.assert_close(out, naive_attention(q, k, v, [0, 1, 2], [0, 7, 20], True), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_chunked_prefill_bottom_right_causal_grads(backend, small_tiles):
    """Several new queries per sample over a longer cache (Lk > Lq > 1): values and gradients."""
    device = device_for(backend, torch.float32)
    q, k, v, cu, cu_k = random_qkv([5, 20], (4, 2), 16, torch.float32, device, kv_lengths=[12, 37])
    cu_t, cu_k_t = (torch.tensor(c, dtype=torch.int32, device=device) for c in (cu, cu_k))
    out = varlen_attention(q, k, v, cu_t, 20, causal=True, backend=backend, cu_seqlens_k=cu_k_t,
                           max_seqlen_k=37)
    ref = naive_attention(q, k, v, cu, cu_k, True)
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_head_dims(head_dim, dtype, small_tiles):
    """The decoder's head dims (64, 128) and the ViT's 80 (padded to a 128 tile and masked)."""
    device = device_for("triton", dtype)
    q, k, v, cu, _ = random_qkv([9, 30], (2, 1), head_dim, dtype, device)
    out = varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32, device=device), 30, causal=False,
                           backend="triton")
    ref = naive_attention(q, k, v, cu, cu, False)
    grad = torch.randn_like(out)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.float())
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=atol * 4, rtol=rtol)


def test_default_backends():
    assert kernels.default_backend("npu") == "npu"
    assert kernels.default_backend("cuda") == ("triton" if kernels.triton is not None else "sdpa")
    assert kernels.default_backend("cpu") == "sdpa"  # measured fastest there (bench.py --what step)


@pytest.mark.requires("triton")
def test_triton_backend_refuses_cpu_tensors_outside_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="cuda"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, backend="triton")


def test_flash_attn_refuses_fp32_in_one_line():
    """flash_attn itself rejects fp32 ("only support fp16 and bf16"); the backend says so before importing it."""
    q = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="'flash_attn' takes fp16/bf16, got torch.float32"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, backend="flash_attn")


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


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_autocast_runs_attention_in_the_autocast_dtype(backend):
    """QK-norm with fp32 weights under bf16 autocast hands over fp32 q/k and bf16 v: attention must
    run all three in bf16, as a matmul under autocast would (a mixed-dtype kernel call used to fail)."""
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    q, k = torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    v = torch.randn(20, 2, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, cu, 11, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = varlen_attention(q.bfloat16(), k.bfloat16(), v, cu, 11, backend=backend)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
