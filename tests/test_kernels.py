"""Small ops and their fast paths against PyTorch / transformers: Triton RMSNorm (interpreted on CPU),
grouped matmul, chunked linear cross-entropy, and the Ascend paths through tests/fake_torch_npu.py
(which checks our torch_npu calls against the documented semantics, not the hardware)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fake_torch_npu
import kernels
from conftest import requires
from test_attention import naive_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cumulative(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


# ----------------------------------------------------------------------------- Triton RMSNorm


@pytest.mark.requires("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_rms_norm_matches_torch(dtype, monkeypatch):
    """[T, H, D] with D not a power of two (masked lanes), several rows per backward program."""
    monkeypatch.setattr(kernels.TritonRMSNorm, "BWD_PROGRAMS", 4)
    device = "cpu" if INTERPRETED else "cuda"
    x = torch.randn(7, 3, 48, device=device).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, device=device)).to(dtype).requires_grad_()
    out = kernels.TritonRMSNorm.apply(x, w, 1e-6)
    # oracle: torch's F.rms_norm in fp32, then the reference's cast-before-gain rounding
    ref = w.float() * F.rms_norm(x.float(), (48,), eps=1e-6).to(dtype).float()
    grad = torch.randn_like(out)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    ref_grads = torch.autograd.grad(ref, (x, w), grad.float())
    for g, r in zip(torch.autograd.grad(out, (x, w), grad), ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=tol * 8, rtol=tol)


# ----------------------------------------------------------------------------- grouped matmul


def assert_grouped_mm_matches_torch(x, w, counts):
    """kernels.grouped_mm against torch._grouped_mm in values and gradients."""
    out = kernels.grouped_mm(x, w, counts)
    ref = torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)):
        torch.testing.assert_close(g, r)


def test_grouped_mm_matches_torch_grouped_mm():
    """The per-expert loop against torch._grouped_mm (16-byte aligned rows), experts with 0 tokens."""
    counts = torch.tensor([3, 0, 6, 0, 1])
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(5, 8, 12, requires_grad=True)
    assert_grouped_mm_matches_torch(x, w, counts)


def test_grouped_mm_rejects_counts_not_covering_tokens():
    with pytest.raises(ValueError, match="sum to the number of tokens"):
        kernels.grouped_mm(torch.randn(10, 8), torch.randn(2, 8, 4), torch.tensor([3, 4]))


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_torch(dtype):
    T, d, V = 37, 16, 50
    hidden = torch.randn(T, d).to(dtype).requires_grad_()
    weight = torch.randn(V, d).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,))
    labels[::3] = -100
    ce, z = kernels.linear_cross_entropy(hidden, weight, labels, chunk=8, z_loss=True)
    logits = (hidden @ weight.t()).float()
    ref_ce = F.cross_entropy(logits, labels, reduction="sum")  # ignore_index=-100
    ref_z = torch.logsumexp(logits[labels != -100], -1).square().sum()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ce, ref_ce, atol=tol, rtol=tol)
    torch.testing.assert_close(z, ref_z, atol=tol, rtol=tol)
    # the CE alone (gradients formed in the forward, z unused: no backward pass of its own), then both at once
    for loss, ref_loss in ((2 * ce, 2 * ref_ce), (ce + 0.1 * z, ref_ce + 0.1 * ref_z)):
        ref_grads = torch.autograd.grad(ref_loss, (hidden, weight), retain_graph=True)
        for g, r in zip(torch.autograd.grad(loss, (hidden, weight), retain_graph=True), ref_grads):
            torch.testing.assert_close(g.float(), r.float(), atol=tol * 10, rtol=tol)


def test_linear_cross_entropy_frozen_head_and_bad_labels():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # a frozen lm_head: no dW is formed
    labels = torch.tensor([1, -100, 10, 0, -100, 4])
    ce = kernels.linear_cross_entropy(hidden, weight, labels, chunk=4)
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(torch.autograd.grad(ce, hidden)[0], torch.autograd.grad(ref, hidden)[0])
    with pytest.raises(ValueError, match="labels must be -100 or in"):
        kernels.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 11, 0, 0]))


def test_linear_cross_entropy_never_holds_full_logits():
    """Peak memory of forward+backward, replayed from the profiler's allocation events, stays well
    below one [T, V] fp32 logits tensor."""
    T, d, V = 512, 16, 2048
    hidden = torch.randn(T, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    labels = torch.randint(0, V, (T,))
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        kernels.linear_cross_entropy(hidden, weight, labels, chunk=32).backward()
    live, peak = 0, 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage
        peak = max(peak, live)
    assert peak < T * V * 4 / 2, peak


# ----------------------------------------------------------------------------- Ascend paths (fake torch_npu)


@pytest.fixture
def fake_npu(monkeypatch):
    """kernels' npu paths on CPU tensors, calling the fake torch_npu: verifies our calls only."""
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu)
    monkeypatch.setattr(kernels, "_on_npu", lambda x: True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_lengths", [None, [9, 14, 3]])
def test_npu_attention_calls(fake_npu, causal, kv_lengths):
    """TND layout, cumulative lengths, compressed causal mask (bottom-right when keys are longer),
    scale and GQA head counts: values and gradients (torch_npu's autograd, here the fake's)."""
    lengths = [5, 11, 3]
    cu, cu_k = cumulative(lengths), cumulative(kv_lengths or lengths)
    q = torch.randn(cu[-1], 4, 16, requires_grad=True)
    k = torch.randn(cu_k[-1], 2, 16, requires_grad=True)
    v = torch.randn(cu_k[-1], 2, 16, requires_grad=True)
    cu_t, cu_k_t = (torch.tensor(c, dtype=torch.int32) for c in (cu, cu_k))
    out = kernels.varlen_attention(q, k, v, cu_t, max(lengths), causal=causal, cu_seqlens_k=cu_k_t,
                                   backend="npu")
    ref = naive_attention(q, k, v, cu, cu_k, causal)
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=2e-5)


def test_fake_torch_npu_catches_wrong_calls():
    """The fake is strict enough to fail a wrong call: lengths with the leading 0 or as a tensor,
    a missing scale (documented default 1.0), a causal mode without its compressed mask."""
    q = torch.randn(6, 2, 16)
    call = dict(head_num=2, input_layout="TND", actual_seq_qlen=[2, 6], actual_seq_kvlen=[2, 6])
    with pytest.raises(ValueError, match="without the leading 0"):
        fake_torch_npu.npu_fusion_attention(q, q, q, **{**call, "actual_seq_qlen": [0, 2, 6]})
    with pytest.raises(TypeError, match="host list"):
        fake_torch_npu.npu_fusion_attention(q, q, q, **{**call, "actual_seq_kvlen": torch.tensor([2, 6])})
    with pytest.raises(ValueError, match="compressed mask"):
        fake_torch_npu.npu_fusion_attention(q, q, q, **call, sparse_mode=3)
    unscaled = fake_torch_npu.npu_fusion_attention(q, q, q, **call)[0]
    assert not torch.allclose(unscaled, naive_attention(q, q, q, [0, 2, 6], [0, 2, 6], False), atol=1e-3)


def test_npu_attention_splits_past_the_sample_limit(fake_npu):
    """More samples than npu_fusion_attention's 1,024 (the ViT's windows at ~16k visual tokens): the calls
    each stay within the limit and together equal one attention over all samples."""
    lengths = [1 + i % 3 for i in range(fake_torch_npu.MAX_TND_SAMPLES + 30)]
    cu = torch.tensor(cumulative(lengths), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, 16, requires_grad=True) for _ in range(3))
    out = kernels.varlen_attention(q, k, v, cu, 3, backend="npu")
    ref = kernels.varlen_attention(q, k, v, cu, 3, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=2e-5)


def test_host_lists_synced_once_per_batch(monkeypatch):
    """Every attention call of a forward and backward reads the same cu_seqlens: one host copy, and a
    changed tensor (in place) is read again."""
    cu = torch.tensor(cumulative([3, 5]), dtype=torch.int32)
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or real(t))
    q = torch.randn(8, 2, 16, requires_grad=True)
    for _ in range(3):
        kernels.varlen_attention(q, q, q, cu, 5, backend="reference").sum().backward()
    assert len(calls) == 1
    cu[1] = 4
    assert kernels.host_list(cu) == [0, 4, 8] and len(calls) == 2
    with torch.inference_mode():  # no version counter to check: read every time
        assert kernels.host_list(torch.tensor([0, 2])) == [0, 2]


def test_npu_small_ops(fake_npu):
    requires("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    x = torch.randn(5, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    out = kernels.rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x, (64,), w, eps=1e-5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w)))

    angles = torch.randn(5, 32)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    ref_q, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(kernels.apply_rope(x, cos, sin), ref_q[0].transpose(0, 1))

    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(kernels.swiglu(gate, up), F.silu(gate) * up)


def test_npu_rope_falls_back_for_unsupported_head_dim(fake_npu, monkeypatch):
    """The ViT's head_dim 80 takes the plain path rather than npu_rotary_mul."""
    def refuse(*args, **kwargs):
        raise AssertionError("npu_rotary_mul called for head_dim 80")
    monkeypatch.setattr(fake_torch_npu, "npu_rotary_mul", refuse)
    x, angles = torch.randn(5, 2, 80), torch.randn(5, 40)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(kernels.apply_rope(x, cos, sin),
                               x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None])


@pytest.mark.parametrize("counts", [[4, 0, 2, 3, 0], [5], [0, 0]])
def test_npu_grouped_mm(fake_npu, counts):
    """Forward and the autograd wrapper's grouped backward (the op itself has no autograd): idle experts
    get zero gradients though the op leaves them unwritten, one expert (EP with as many ranks as
    experts) and no rows at all (a rank nothing was routed to) are valid calls."""
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(len(counts), 8, 4, requires_grad=True)
    assert_grouped_mm_matches_torch(x, w, counts)
    gate = torch.randn(int(counts.sum()), 6)
    torch.testing.assert_close(kernels.swiglu(gate, gate), F.silu(gate) * gate)


def test_fake_torch_npu_enforces_documented_limits():
    """The limits the fake follows fail a call that breaks them, so a regression in our calls shows."""
    q = torch.randn(fake_torch_npu.MAX_TND_SAMPLES + 1, 1, 16)
    ends = list(range(1, q.shape[0] + 1))
    with pytest.raises(ValueError, match="at most 1024"):
        fake_torch_npu.npu_fusion_attention(q, q, q, 1, "TND", actual_seq_qlen=ends, actual_seq_kvlen=ends)
    x, w = torch.randn(3, 8), torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="more than one group"):
        fake_torch_npu.npu_grouped_matmul([x], [w], group_list=[3], split_item=2, group_type=0, group_list_type=1)
    dw = fake_torch_npu.npu_grouped_matmul([x.t()], [torch.randn(3, 4)], group_list=[3, 3], split_item=3,
                                           group_type=2, group_list_type=0)[0]
    assert dw[0].isfinite().all() and dw[1].isnan().all()  # the idle group is left unwritten
    with pytest.raises(ValueError, match="empty"):
        fake_torch_npu.npu_swiglu(torch.empty(0, 6))


def test_npu_requested_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    with pytest.raises(ValueError, match="--device npu: the npu paths need torch_npu"):
        kernels.resolve_device("npu")
    q = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="torch_npu"):
        kernels.varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, backend="npu")
