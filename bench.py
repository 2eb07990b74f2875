"""Benchmarks, printed as tables and written to bench.json: varlen attention per backend, the small ops
(kernels.py's path vs plain torch vs torch.compile), the training loss's memory (chunked vs full logits), a
training step per attention backend (tokens/s, MFU, peak memory), packing vs padding the same samples (useful
tokens/s), a decoder attention layer with context parallelism's all-to-alls on 2 cpu ranks against one rank
(cp), on cuda (or when asked) each Triton kernel compiled for sm_80/sm_90 with its resource use (--what
triton), and (only when asked) data files' start-up cost (--what data) and our step and generation against
transformers' Qwen2.5-VL (--what peer).

    python bench.py                                  # every part but peer on the best device (npu > cuda > cpu)
    python bench.py --device cuda --what attention   # one part
    python bench.py --device cpu --what peer         # against transformers on the same weights and samples
    python bench.py --device cpu --quick             # tiny shapes, few repeats (tests/test_bench.py)
    python bench.py --what data                      # time and memory to the first batch of 1M-record files
    python bench.py --device cpu --what triton       # the Triton kernels compiled for A100/H100, no GPU needed
    python bench.py --what loader,compile            # data workers on large JPEGs; the --compile step vs eager
    python bench.py --device cuda --what gpu         # the GPU table: attention,ops,loss,step,loader,compile,peer

Timing: median of --reps calls after warm-up; device events on cuda/npu; on cpu the process's CPU time when
torch runs one thread (OMP_NUM_THREADS=1: immune to other jobs sharing the cores), else wall time.
Peak memory: the most memory allocated at once above what was allocated before the call (its inputs
excluded), from the allocator's counters on cuda/npu and from the profiler's allocation events on cpu.
"""
import argparse
import importlib.util
import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import kernels
import parallel
import train
from common import cli, device_name, peak_flops, refuse_flag, synchronize
from convert import load_hf
from kernels import resolve_device
from model import MLLM, Attention, AttentionInputs, TextConfig, compile_blocks, config_from_preset, count_parameters, \
    loss_tokens, model_flops, rope_cos_sin
from tasks import SYNTHETIC_TASKS, SyntheticTasks

# ----------------------------------------------------------------------------- shapes and presets

# attention: packed micro-batches of `tokens` tokens split into samples in these proportions
SAMPLE_SPLIT = (3, 2, 2, 1)
ATTENTION = {  # tokens, head dims, model width (heads = width // head_dim, FlashAttention-2's benchmark: 2048)
    "accel": dict(tokens=(4096, 8192, 16384), head_dims=(64, 128), width=2048),
    "cpu": dict(tokens=(1024, 2048, 4096), head_dims=(64, 128), width=256),
    "quick": dict(tokens=(256, 512), head_dims=(64,), width=128),
}
OPS = {  # tokens, hidden, heads x head_dim (rotary), MLP width, cross-entropy tokens / hidden / vocab
    "accel": dict(T=16384, hidden=4096, heads=32, head_dim=128, inter=12288, ce_T=8192, ce_hidden=4096,
                  vocab=151936),
    "cpu": dict(T=4096, hidden=1024, heads=8, head_dim=64, inter=2816, ce_T=4096, ce_hidden=128, vocab=16000),
    "quick": dict(T=256, hidden=128, heads=2, head_dim=32, inter=256, ce_T=512, ce_hidden=32, vocab=1000),
}
CE_CHUNK = {"quick": 128}  # else kernels.linear_cross_entropy's default chunk
# the training loss at the 8B preset's vocabulary: micro-batch tokens, hidden width. Full fp32 logits of 16k
# tokens are ~10 GB (and as much again for their gradient): on cpu the default stays at 4k, --loss-tokens 16384
# runs the accelerators' size (the hidden width sets the time, not the logits' memory, so cpu keeps it small)
LOSS = {"accel": dict(tokens=(16384,), hidden=4096, vocab=151936),
        "cpu": dict(tokens=(4096,), hidden=256, vocab=151936),
        "quick": dict(tokens=(256,), hidden=32, vocab=151936)}

# ~0.5B dense model for the GPU step: Qwen3-0.6B's decoder shapes (its config.json) with a 12-block ViT;
# the byte tokenizer's image_pad_id (261) stays, so the synthetic data runs on it unchanged
DENSE_0_6B = {"text.vocab_size": 151936, "text.hidden_size": 1024, "text.num_layers": 28, "text.num_heads": 16,
              "text.num_kv_heads": 8, "text.head_dim": 128, "text.intermediate_size": 3072, "text.qk_norm": True,
              "text.tie_word_embeddings": True, "text.rope_theta": 1000000.0,
              "vision.depth": 12, "vision.hidden_size": 768, "vision.num_heads": 12, "vision.intermediate_size": 3072,
              "vision.window_size": 112, "vision.fullatt_blocks": (2, 5, 8, 11)}
STEP = {  # model (preset + overrides), tokens per packed micro-batch, samples for the packing comparison
    "accel": dict(model="dense-0.6b", length=16384, packing_samples=1500),
    "cpu": dict(model="tiny", length=2048, packing_samples=256),
    "quick": dict(model="tiny", length=256, packing_samples=24),
}
MODELS = {"tiny": {}, "dense-0.6b": DENSE_0_6B}
# Triton kernels compiled ahead of time: the presets' head dims (Qwen2 64, the ViT's 80, Qwen3 128, DeepSeek-V3
# MLA 192, and the 256 the kernels accept), the RMSNorm widths (qk-norm 128, MLA latents 512/1536, ViT 1280,
# decoders 4096/7168), for A100 and H100 (and the device's own capability on cuda); bf16, train.py's GPU dtype
TRITON = dict(head_dims=(64, 80, 128, 192, 256), widths=(128, 512, 1280, 1536, 4096, 7168), capabilities=(80, 90))
# context parallelism (always 2 gloo ranks on the cpu): one Qwen3-style decoder attention layer on a packed stream
CP = {"cpu": dict(tokens=4096, hidden=512, heads=8, kv_heads=4, head_dim=64),
      "quick": dict(tokens=256, hidden=128, heads=4, kv_heads=2, head_dim=32)}
CP["accel"] = CP["cpu"]

# ----------------------------------------------------------------------------- timing and memory


def host_clock(device):
    """Seconds for host-timed runs: on cpu with one torch thread, this process's CPU time, so other jobs on a
    shared machine do not count; otherwise wall time (after synchronizing the device)."""
    return time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def time_ms(fn, device, warmup, reps):
    """Median wall time of fn() in ms after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device == "cpu":
        clock, times = host_clock(device), []
        for _ in range(reps):
            t0 = clock()
            fn()
            times.append(1e3 * (clock() - t0))
        return statistics.median(times)
    mod = getattr(torch, device)
    events = [(mod.Event(enable_timing=True), mod.Event(enable_timing=True)) for _ in range(reps)]
    mod.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    mod.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_mib(fn, device):
    """Most memory (MiB) allocated at once during fn() above what was allocated before it."""
    if device == "cpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # every allocation (+bytes) and free (-bytes) with its time: the running sum is the memory in use
        mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        return max(0, max(itertools.accumulate(b for _, b in mem), default=0)) / 2 ** 20
    mod = getattr(torch, device)
    mod.synchronize()
    mod.reset_peak_memory_stats()
    base = mod.memory_allocated()
    fn()
    mod.synchronize()
    return (mod.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------- attention


def attention_flops(lengths, heads, head_dim, causal):
    """Forward FLOPs by FlashAttention-2's benchmark convention (benchmarks/benchmark_flash_attention.py in
    Dao-AILab/flash-attention): 4 * L^2 * heads * head_dim per sample (QK^T and PV), halved when causal;
    the backward counts 2.5x the forward."""
    return sum(4 * n * n * heads * head_dim for n in lengths) / (2 if causal else 1)


def attention_backends(device):
    names = ["reference", "sdpa"]
    if kernels.triton is not None and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")  # on cpu only under Triton's interpreter
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    if device == "npu":
        names.append("npu")
    return names


def split_tokens(tokens):
    lengths = [tokens * p // sum(SAMPLE_SPLIT) for p in SAMPLE_SPLIT]
    lengths[0] += tokens - sum(lengths)
    return lengths


def attention_call(backend, device):
    """varlen_attention with `backend`; "sdpa" on cuda is pinned to SDPA's flash kernel, so our kernels are
    measured against FlashAttention-2 as PyTorch ships it rather than whichever SDPA kernel it picks."""
    def call(q, k, v, cu, max_len, causal):
        if backend == "sdpa" and device == "cuda":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return kernels.varlen_attention(q, k, v, cu, max_len, causal=causal, backend="sdpa")
        return kernels.varlen_attention(q, k, v, cu, max_len, causal=causal, backend=backend)
    return call


def bench_attention(device, size, warmup, reps):
    shapes, dtype = ATTENTION[size], torch.float32 if device == "cpu" else torch.bfloat16
    ours = kernels.default_backend(device)
    rows = []
    for tokens, head_dim, causal in itertools.product(shapes["tokens"], shapes["head_dims"], (True, False)):
        heads, lengths = shapes["width"] // head_dim, split_tokens(tokens)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
        fwd_flops = attention_flops(lengths, heads, head_dim, causal)
        shape_rows = []
        for backend in attention_backends(device):
            attn = attention_call(backend, device)
            fwd = lambda: attn(q, k, v, cu, max(lengths), causal)  # noqa: E731
            fwd_bwd = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)  # noqa: E731
            # the plain-torch reference loops over tiles in Python: a few calls suffice off the cpu
            w, r = (1, min(reps, 3)) if backend == "reference" and device != "cpu" else (warmup, reps)
            fwd_ms = time_ms(fwd, device, w, r)
            fb_ms = time_ms(fwd_bwd, device, w, r)
            shape_rows.append(dict(
                backend=backend, tokens=tokens, samples=len(lengths), heads=heads, head_dim=head_dim,
                causal=causal, dtype=str(dtype).removeprefix("torch."), fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                fwd_tflops=fwd_flops / fwd_ms / 1e9, fwd_bwd_tflops=3.5 * fwd_flops / fb_ms / 1e9,
                peak_mib=peak_mib(fwd_bwd, device)))
        by = {r["backend"]: r for r in shape_rows}
        for r in shape_rows:  # speed relative to the baselines: > 1 is faster than them
            r["x_sdpa"] = by["sdpa"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["x_sdpa_fwd"] = by["sdpa"]["fwd_ms"] / r["fwd_ms"]
            if "flash_attn" in by:
                r["x_flash_attn"] = by["flash_attn"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["ours"] = r["backend"] == ours
        rows += shape_rows
    return rows


# ----------------------------------------------------------------------------- Triton kernels


def triton_capabilities(device):
    own = [kernels.cuda_capability(torch.device(device))] if device == "cuda" else []
    return sorted({*TRITON["capabilities"], *(c for c in own if c in kernels.SHARED_MEMORY)})


def bench_triton(device):
    """Each Triton kernel compiled for each capability with the launch configuration kernels.py picks there:
    shared memory against the device's limit, registers and spills (compile_triton). On cuda each head dim
    is also run forward and backward against SDPA (max abs error of output and gradients)."""
    if kernels.triton is None:
        raise RuntimeError("--what triton needs the triton package")
    rows = []
    for cap in triton_capabilities(device):
        for name in kernels.TRITON_KERNELS:
            # MHA (the ViT, MLA) and GQA compile differently only where the kernel loops over a kv head's queries
            for dim, groups in itertools.product(TRITON["widths" if name.startswith("rms") else "head_dims"],
                                                 (1, 2) if name == "attn_bwd_dkdv" else (1,)):
                r = kernels.compile_triton(name, torch.bfloat16, dim, cap, groups)
                c = r["config"]
                r["tiles"] = f"{c['BLOCK_M']}x{c['BLOCK_N']}" if "BLOCK_M" in c else str(c["BLOCK_D"])
                rows.append({**r, "warps": c["num_warps"], "fits": r["shared"] <= r["shared_limit"]})
    if device == "cuda":
        rows += [triton_vs_sdpa(dim) for dim in TRITON["head_dims"]]
    return rows


def triton_vs_sdpa(head_dim, lengths=(700, 300, 24), device="cuda", dtype=torch.bfloat16):
    """Our Triton attention at `head_dim` (causal, GQA 2:1) against SDPA on the same inputs."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths), 4, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lengths), 2, head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    got, ref = (kernels.varlen_attention(q, k, v, cu, max(lengths), backend=b) for b in ("triton", "sdpa"))
    err = [(a.float() - b.float()).abs().max().item() for a, b in zip(
        (got, *torch.autograd.grad(got, (q, k, v), dout)), (ref, *torch.autograd.grad(ref, (q, k, v), dout)))]
    return dict(kernel="attention on device", dtype=str(dtype).removeprefix("torch."), dim=head_dim,
                capability=kernels.cuda_capability(q.device), max_err_out=err[0], max_err_grad=max(err[1:]))


# ----------------------------------------------------------------------------- small ops


def plain_rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_rope(x, cos, sin):
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]).to(x.dtype)


def plain_swiglu(gate, up):
    return F.silu(gate) * up


def plain_cross_entropy(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")


def op_cases(device, size):
    """name -> (kernels.py's function, plain torch, inputs, inputs that take gradients)."""
    s, dtype = OPS[size], torch.float32 if device == "cpu" else torch.bfloat16
    rand = lambda *shape, dt=dtype: torch.randn(*shape, device=device, dtype=dt)  # noqa: E731
    x, w = rand(s["T"], s["hidden"]), 1 + 0.1 * rand(s["hidden"], dt=torch.float32)
    xr = rand(s["T"], s["heads"], s["head_dim"])
    angles = torch.rand(s["T"], s["head_dim"] // 2, device=device) * 6.3
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    gate, up = rand(s["T"], s["inter"]), rand(s["T"], s["inter"])
    h, wv = rand(s["ce_T"], s["ce_hidden"]), 0.05 * rand(s["vocab"], s["ce_hidden"])
    labels = torch.randint(0, s["vocab"], (s["ce_T"],), device=device)
    chunk = CE_CHUNK.get(size, 1024)
    return {
        "rms_norm": (kernels.rms_norm, plain_rms_norm, (x, w), (x, w)),
        "apply_rope": (kernels.apply_rope, plain_rope, (xr, cos, sin), (xr,)),
        "swiglu": (kernels.swiglu, plain_swiglu, (gate, up), (gate, up)),
        "linear_cross_entropy": (lambda h, w, y: kernels.linear_cross_entropy(h, w, y, chunk=chunk),
                                 plain_cross_entropy, (h, wv, labels), (h, wv)),
    }


def bench_ops(device, size, warmup, reps, compile_too):
    rows = []
    for name, (ours, plain, inputs, grad_inputs) in op_cases(device, size).items():
        for t in grad_inputs:
            t.requires_grad_(True)
        impls = {"kernels": ours, "torch": plain}
        if compile_too:
            impls["torch.compile"] = torch.compile(plain)
        for impl, fn in impls.items():
            row = dict(op=name, impl=impl, shape="x".join(map(str, inputs[0].shape)),
                       dtype=str(inputs[0].dtype).removeprefix("torch."))
            try:
                dout = torch.randn_like(fn(*inputs))
                fwd = lambda: fn(*inputs)  # noqa: E731
                fwd_bwd = lambda: torch.autograd.grad(fn(*inputs), grad_inputs, dout)  # noqa: E731
                row.update(fwd_ms=time_ms(fwd, device, warmup, reps), fwd_bwd_ms=time_ms(fwd_bwd, device, warmup, reps),
                           peak_mib=peak_mib(fwd_bwd, device))
            except Exception as e:  # torch.compile needs a working inductor backend (a C++ compiler on cpu)
                if impl != "torch.compile":
                    raise
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
        for t in grad_inputs:
            t.requires_grad_(False)
    return rows


# ----------------------------------------------------------------------------- the training loss


def full_logits_loss(hidden, weight, targets, z_loss):
    """The loss as it was before MLLM.forward went chunked: [tokens, vocab] fp32 logits, CE + z-loss."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="sum") + z_loss * torch.logsumexp(logits, -1).square().sum()


def chunked_loss(hidden, weight, targets, z_loss):
    """MLLM.forward's loss: kernels.linear_cross_entropy, logits 1024 tokens at a time."""
    ce, z = kernels.linear_cross_entropy(hidden, weight, targets, z_loss=True)
    return ce + z_loss * z


def bench_loss(device, size, reps, tokens_list, impls):
    """Peak memory (and time) of the loss forward+backward (gradients for hidden states and the head)."""
    s, dtype = LOSS[size], torch.float32 if device == "cpu" else torch.bfloat16
    fns = {"chunked": chunked_loss, "full": full_logits_loss}
    rows = []
    for tokens in tokens_list or s["tokens"]:
        hidden = torch.randn(tokens, s["hidden"], device=device, dtype=dtype, requires_grad=True)
        weight = (0.02 * torch.randn(s["vocab"], s["hidden"], device=device, dtype=dtype)).requires_grad_(True)
        targets = torch.randint(0, s["vocab"], (tokens,), device=device)
        for impl in impls:
            fwd_bwd = lambda: torch.autograd.grad(fns[impl](hidden, weight, targets, 1e-4), (hidden, weight))  # noqa: E731
            rows.append(dict(impl=impl, tokens=tokens, hidden=s["hidden"], vocab=s["vocab"],
                             dtype=str(dtype).removeprefix("torch."), fwd_bwd_ms=time_ms(fwd_bwd, device, 0, reps),
                             peak_mib=peak_mib(fwd_bwd, device),
                             logits_mib=tokens * s["vocab"] * 4 / 2 ** 20))
            if device == "cpu" and os.path.exists("/proc/self/statm"):  # Linux
                rows[-1]["rss_growth_mib"] = loss_rss_growth_mib(impl, tokens, s["hidden"], s["vocab"])
    return rows


def loss_rss_growth_mib(impl, tokens, hidden, vocab):
    """Peak RSS growth (MiB) of one loss forward+backward in a fresh process: what the OS sees, allocator
    caching included (the profiler's peak counts live tensors only)."""
    code = f"import bench; bench.loss_rss_child({impl!r}, {tokens}, {hidden}, {vocab})"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def loss_rss_child(impl, tokens, hidden, vocab):
    """Prints the peak RSS above the RSS once the inputs exist (ru_maxrss: KiB on Linux)."""
    import resource
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (0.02 * torch.randn(vocab, hidden)).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,))
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    fns = {"chunked": chunked_loss, "full": full_logits_loss}
    fns[impl](h, w, targets, 1e-4).backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


# ----------------------------------------------------------------------------- training step and packing


def synthetic_samples(stage_num, n, seed=0):
    """n encoded samples of train.py's stage `stage_num` synthetic mix, in mixture order."""
    stage = train.STAGES[stage_num]
    source = data.Mixture({t: SyntheticTasks([t], "train", seed, style=stage.style) for t in stage.mix},
                          dict(stage.mix), seed)
    tok = data.Tokenizer()
    return [data.encode(source[i], tok) for i in range(n)]


def step_model(name, device, attn_backend=None):
    """The model MODELS[name] that a step benchmark trains: fp32 on cpu; bf16 weights and activations on cuda/npu
    (train.py's fp32 weights under bf16 autocast do the same matmul work in bf16; here the weights are bf16 too,
    the usual throughput benchmark setup)."""
    torch.manual_seed(0)
    config = config_from_preset("tiny", **MODELS[name])
    return MLLM(config, attn_backend=attn_backend).to(device, torch.float32 if device == "cpu" else torch.bfloat16).train()


def step_function(model, optimizer):
    """The timed training step on one (PackedBatch, loss divisor): forward, backward, clipping, AdamW; returns
    the loss (a tensor: reading it would wait for the device inside the timing)."""
    def step(batch):
        b, n_loss = batch
        loss, _ = model(b, loss_divisor=n_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def bench_step(device, size, warmup, reps, peak_override):
    """One row per attention backend (the reference's Python tiles only on cpu): same initial weights and
    batches, the backends' steps interleaved batch by batch so drifting machine load hits them alike."""
    s = STEP[size]
    ours = kernels.default_backend(device)
    backends = [ours] + [b for b in attention_backends(device) if b != ours and (device == "cpu" or b != "reference")]
    # stage 3's samples average ~75 tokens: enough for warmup + reps full micro-batches (the last,
    # least full bins of best-fit-decreasing are not timed)
    samples = synthetic_samples(3, (warmup + reps + 2) * s["length"] // 60)
    batches = data.pack(samples, s["length"])[:warmup + reps]
    divisors = [max(1, loss_tokens(b)) for b in batches]
    batches = [(b.to(device), n) for b, n in zip(batches, divisors)]
    runs = {}
    for backend in backends:
        model = step_model(s["model"], device, backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        runs[backend] = (model, optimizer, step_function(model, optimizer), [])
    clock = host_clock(device)
    for i, b in enumerate(batches):
        for model, optimizer, step, times in runs.values():
            synchronize(device)
            t0 = clock()
            step(b)
            synchronize(device)
            if i >= warmup:
                times.append(clock() - t0)
    timed = [b for b, _ in batches[warmup:]]
    tokens = sum(int(b.input_ids.shape[0]) for b in timed)
    config = runs[ours][0].config
    # PaLM-style model FLOPs (model.model_flops: MoE activated experts, MLA dims), every module training
    flops = sum(sum(model_flops(config, b).values()) for b in timed)
    peak, peak_source = peak_flops(device, torch.float32 if device == "cpu" else torch.bfloat16, peak_override,
                                   host_clock(device))
    print(f"step: MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    rows = []
    for backend, (model, optimizer, step, times) in runs.items():
        # weights and optimizer state are allocated before the profiled step
        static = sum(t.numel() * t.element_size() for t in
                     itertools.chain(model.parameters(), (v for st in optimizer.state.values() for v in st.values()
                                                          if torch.is_tensor(v))))
        rows.append(dict(model=s["model"], params_m=count_parameters(config) / 1e6, length=s["length"],
                         samples_per_step=statistics.mean(len(b.cu_seqlens) - 1 for b in timed), steps=len(timed),
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."), attn_backend=backend,
                         ours=backend == ours, step_ms=1e3 * statistics.median(times),
                         tokens_per_s=tokens / sum(times), tflops=flops / sum(times) / 1e12,
                         mfu=flops / sum(times) / peak, peak_tflops=peak / 1e12, peak_source=peak_source,
                         peak_mib=static / 2 ** 20 + peak_mib(lambda: step(batches[-1]), device)))
    for r in rows:
        r["x_default"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def pad_to_longest(samples, length, pad_id):
    """[B, Lmax] micro-batches of consecutive samples with B * Lmax <= length, each sample right-padded to
    Lmax with pad_id (label -100) and kept as its own sequence, so the pads are computed as in a padded
    batch; emitted in the packed format so both sides run the same code."""
    groups, cur = [], []
    for s in samples:
        if cur and (len(cur) + 1) * max(len(x.tokens) for x in cur + [s]) > length:
            groups.append(cur)
            cur = []
        cur.append(s)
    groups.append(cur)
    batches = []
    for g in groups:
        longest = max(len(s.tokens) for s in g)
        padded = [data.Sample(s.tokens + [pad_id] * (longest - len(s.tokens)),
                              s.labels + [data.IGNORE] * (longest - len(s.tokens)), s.images, s.task, s.answer,
                              s.id, s.image_starts) for s in g]
        batches.append(data.collate(padded))
    return batches


def bench_packing(device, size, reps):
    s = STEP[size]
    model = step_model(s["model"], device)
    rows = []
    for stage_num in (2, 3):
        samples = synthetic_samples(stage_num, s["packing_samples"])
        useful = sum(len(x.tokens) for x in samples)
        n_loss = sum(loss_tokens(data.collate([x])) for x in samples)
        layouts = {"packed": data.pack(samples, s["length"]),
                   "padded": pad_to_longest(samples, s["length"], data.Tokenizer().eos_id)}
        layouts = {k: [b.to(device) for b in v] for k, v in layouts.items()}

        def run(batches):  # forward + backward of every micro-batch (gradient accumulation, no update)
            for b in batches:
                loss, _ = model(b, loss_divisor=n_loss)
                loss.backward()
            model.zero_grad(set_to_none=True)

        for batches in layouts.values():  # warm-up: one micro-batch of each layout
            run(batches[:1])
        clock, seconds = host_clock(device), {k: [] for k in layouts}
        for _ in range(reps):  # alternate the layouts so drifting machine load hits both alike
            for k, batches in layouts.items():
                synchronize(device)
                t0 = clock()
                run(batches)
                synchronize(device)
                seconds[k].append(clock() - t0)
        t = {k: statistics.median(v) for k, v in seconds.items()}
        computed = {k: sum(int(b.input_ids.shape[0]) for b in v) for k, v in layouts.items()}
        rows.append(dict(model=s["model"], stage=stage_num, style=train.STAGES[stage_num].style, samples=len(samples),
                         length=s["length"], useful_tokens=useful, packed_batches=len(layouts["packed"]),
                         padded_batches=len(layouts["padded"]), padded_tokens=computed["padded"],
                         pad_fraction=1 - useful / computed["padded"], packed_tokens_per_s=useful / t["packed"],
                         padded_tokens_per_s=useful / t["padded"], speedup=t["padded"] / t["packed"]))
    return rows


# ----------------------------------------------------------------------------- context parallelism


def cp_layer(shape):
    """A decoder attention layer, an input and its AttentionInputs over a packed stream (SAMPLE_SPLIT)."""
    torch.manual_seed(0)
    c = TextConfig(vocab_size=16, hidden_size=shape["hidden"], num_layers=1, num_heads=shape["heads"],
                   num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], intermediate_size=16)
    lengths = split_tokens(shape["tokens"])
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    a = AttentionInputs(*rope_cos_sin(positions, c.head_dim, c.rope_theta, None), cu, max(lengths))
    return Attention(c, 0), torch.randn(shape["tokens"], c.hidden_size), a


def forward_backward(layer, x, a):
    layer(x.detach().requires_grad_(), a).sum().backward()


def rank_ms(fn, warmup, reps, ranks=1):
    """Median ms of fn() on the host clock (one thread: the process's CPU time, so the other jobs and ranks on
    the cores do not count, waiting for a peer neither), each call started together on every rank; of the
    slowest rank."""
    times, clock = [], host_clock("cpu")
    for i in range(warmup + reps):
        if ranks > 1:
            tdist.barrier()
        t0 = clock()
        fn()
        times.append(1e3 * (clock() - t0))
    ms = torch.tensor(statistics.median(times[warmup:]))
    if ranks > 1:
        tdist.all_reduce(ms, op=tdist.ReduceOp.MAX)
    return float(ms)


def _cp_rank(rank, port, shape, warmup, reps, out):
    """One of bench_cp's 2 ranks: its half of the tokens through the layer (Ulysses all-to-alls around the
    kernel), and the all-to-alls alone (q, k, v to heads, the output back to tokens)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    layer, x, a = cp_layer(shape)
    split = parallel.split_sequence(shape["tokens"], parallel.Group(None, rank, 2))
    mine = replace(a, cos=a.cos[split.lo:split.hi], sin=a.sin[split.lo:split.hi], split=split)
    layer_ms = rank_ms(lambda: forward_backward(layer, x[split.lo:split.hi], mine), warmup, reps, 2)
    t, d = split.hi - split.lo, shape["head_dim"]
    q, kv = torch.randn(t, shape["heads"], d), torch.randn(t, shape["kv_heads"], d)
    o = split.to_heads(q)  # the kernel's output has q's shape
    exchange = lambda: (split.to_heads(q), split.to_heads(kv), split.to_heads(kv), split.to_tokens(o))  # noqa
    a2a_ms = rank_ms(exchange, warmup, reps, 2)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"two_ranks_ms": layer_ms, "all_to_all_ms": a2a_ms}, f)
    tdist.destroy_process_group()


def bench_cp(size, warmup, reps):
    """Context parallelism's cost per decoder layer: attention (projections, rotary, kernel) forward + backward
    on one rank over the whole packed stream, against 2 gloo ranks on half the tokens each with the
    all-to-alls (x_one_rank: 0.5 is perfect scaling)."""
    shape = CP[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    layer, x, a = cp_layer(shape)
    one_ms = rank_ms(lambda: forward_backward(layer, x, a), warmup, reps)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:  # a free port for the ranks' rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_cp_rank, args=(port, shape, warmup, reps, os.path.join(tmp, "cp.json")), nprocs=2)
        with open(os.path.join(tmp, "cp.json")) as f:
            two = json.load(f)
    return [dict(**shape, one_rank_ms=one_ms, **two, x_one_rank=two["two_ranks_ms"] / one_ms)]


# ----------------------------------------------------------------------------- data start-up

DATA_RECORDS = {"quick": 2_000, "cpu": 1_000_000, "accel": 1_000_000}  # records per file (Parquet, Arrow: a tenth)


def write_data_files(folder, n):
    """The same LLaVA-style colour question n times as JSONL and as a JSON array (one 56x84 PNG on disk), and
    n/10 times as Parquet and as Arrow with the PNG's bytes in every row (the_cauldron's columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    Image.new("RGB", (56, 84), "red").save(os.path.join(folder, "red.png"))
    line = json.dumps({"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                             {"from": "gpt", "value": "red"}]})
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        f.writelines(line + "\n" for _ in range(n))
    with open(os.path.join(folder, "d.json"), "w") as f:
        f.write("[\n" + ",\n".join(line for _ in range(n)) + "\n]\n")
    with open(os.path.join(folder, "red.png"), "rb") as f:
        png = f.read()
    rows = n // 10
    # distinct bytes per row (a counter after the PNG's end, which decoders ignore), as distinct images would be
    table = pa.table({"images": [[{"bytes": png + i.to_bytes(4, "little"), "path": None}] for i in range(rows)],
                      "texts": [[{"user": "Color?", "assistant": "red"}]] * rows})
    pq.write_table(table, os.path.join(folder, "d.parquet"), row_group_size=1000)
    with pa.ipc.new_stream(os.path.join(folder, "d.arrow"), table.schema) as writer:  # datasets' save_to_disk
        writer.write_table(table, max_chunksize=1000)
    return {"jsonl": n, "json": n, "parquet": rows, "arrow": rows}


def data_start(path, folder):
    """Seconds to index a data file (data.FileDataset) and to its first packed batch (PackedLoader encodes
    its 256-sample buffer first)."""
    t0 = time.perf_counter()
    ds = data.FileDataset(path, folder)
    t_index = time.perf_counter() - t0
    next(data.PackedLoader(ds, data.Tokenizer(), 4096))
    return t_index, time.perf_counter() - t0


def bench_data(size):
    """Start-up cost of large data files: wall time to index and to the first batch, then (a second run,
    traced, so tracing does not slow the timed one) the peak of Python and numpy allocations meanwhile."""
    import tempfile
    import tracemalloc
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt, n in write_data_files(folder, DATA_RECORDS[size]).items():
            path = os.path.join(folder, f"d.{fmt}")
            t_index, t_first = data_start(path, folder)
            tracemalloc.start()
            data_start(path, folder)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            rows.append(dict(format=fmt, records=n, file_mib=os.path.getsize(path) / 2 ** 20, index_s=t_index,
                             first_batch_s=t_first, peak_mib=peak / 2 ** 20))
    return rows


# ----------------------------------------------------------------------------- peer: transformers' Qwen2.5-VL

# the same tiny random weights in both (tiny's shapes as a Hugging Face Qwen2.5-VL, M-RoPE over head_dim 32),
# the same image + conversation samples; long replies are the short ones' answers repeated to ~LONG tokens
PEER = {"full": dict(samples=24, micro_batch=8, long_reply=300, new_tokens=32),
        "quick": dict(samples=4, micro_batch=2, long_reply=40, new_tokens=4)}
PEER_TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
PEER_VISION = dict(depth=2, hidden_size=96, intermediate_size=256, num_heads=4, out_hidden_size=192,
                   window_size=56, fullatt_block_indexes=[1])


def save_peer_checkpoint(path):
    """A random Qwen2.5-VL checkpoint at `path` on our byte tokenizer's ids, weights drawn wider than HF's
    init so logits differ from uniform (a key-map error would show in the loss check)."""
    import transformers
    tok = data.Tokenizer()
    ids = dict(pad_token_id=tok.eos_id, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.vocab_size + 1, **PEER_TEXT, **ids), vision_config=PEER_VISION,
        image_token_id=tok.image_pad_id, video_token_id=tok.vocab_size, vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    theirs = transformers.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.05 * torch.randn_like(p))
    theirs.save_pretrained(path)


def peer_models(device, path):
    """(ours, transformers') fresh from the checkpoint at `path`: ours through convert.load_hf."""
    import transformers
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return load_hf(path).to(device).train(), theirs.to(device).train()


def peer_samples(n, long_reply=0, for_generation=False):
    """n synthetic image + conversation samples (every task but text-only arithmetic); long_reply > 0 repeats
    each answer to about that many characters (byte tokenizer: tokens), +-5% so lengths differ a little."""
    tasks = [t for t in SYNTHETIC_TASKS if t != "arithmetic"]
    source, tok, rng = SyntheticTasks(tasks, "train", 0, style="instruct"), data.Tokenizer(), random.Random(0)
    out = []
    for i in range(n):
        rec = source[i]
        if long_reply:
            answer = rec["conversations"][-1]["value"]
            size = int(long_reply * rng.uniform(0.95, 1.05))
            rec["conversations"][-1]["value"] = ((answer + ". ") * (size // (len(answer) + 2) + 1))[:size]
        out.append(data.encode(rec, tok, for_generation=for_generation))
    return out


def hf_inputs(samples, device, left_pad=False):
    """Samples -> transformers' padded [B, Lmax] inputs (pads: <|endoftext|>, label -100, mask 0), pixels as
    its [P, 3*2*14*14] two-frame patches (a still image repeats its frame, as its processor does)."""
    tok = data.Tokenizer()
    longest = max(len(s.tokens) for s in samples)
    ids = torch.full((len(samples), longest), tok.eos_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, s in enumerate(samples):
        cols = slice(longest - len(s.tokens), longest) if left_pad else slice(0, len(s.tokens))
        ids[i, cols], labels[i, cols], mask[i, cols] = torch.tensor(s.tokens), torch.tensor(s.labels), 1
    patches = torch.cat([p for s in samples for p, _ in s.images])
    pixels = patches.view(-1, 3, 1, 14, 14).expand(-1, 3, 2, 14, 14).reshape(len(patches), -1)
    grid = torch.tensor([g for s in samples for _, g in s.images])
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                                             image_grid_thw=grid, mm_token_type_ids=(ids == tok.image_pad_id).int()).items()}


def peer_train(ours, theirs, samples, device, micro_batch, reps):
    """Losses of both on the same samples, then one optimizer step over all of them (gradient accumulation
    over micro-batches: ours packed, theirs padded, same token budget), A/B interleaved; useful tokens/s."""
    useful = sum(len(s.tokens) for s in samples)
    hf_batches = [hf_inputs(samples[i:i + micro_batch], device) for i in range(0, len(samples), micro_batch)]
    budget = max(b["input_ids"].numel() for b in hf_batches)
    packed = [b.to(device) for b in data.pack(samples, budget, mrope=True)]
    n_loss = sum(loss_tokens(b) for b in packed)
    hf_targets = [int((b["labels"][:, 1:] != -100).sum()) for b in hf_batches]
    ours_loss = lambda b: ours(b, loss_divisor=n_loss)[0]  # noqa: E731
    theirs_loss = lambda b, n: theirs(**b).loss * n / n_loss  # noqa: E731  (theirs: mean over its targets)
    with torch.no_grad():
        a, b = sum(ours_loss(x) for x in packed).item(), sum(theirs_loss(x, n) for x, n in zip(hf_batches, hf_targets)).item()
    if sum(hf_targets) != n_loss or abs(a - b) > 1e-4 * abs(b):
        raise RuntimeError(f"peer: losses disagree (ours {a:.6f} over {n_loss} targets, transformers {b:.6f} over "
                           f"{sum(hf_targets)}): not the same model, timing them would mean nothing")
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, theirs)}

    def step(model, losses):
        for loss in losses:
            loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)
    runs = {"ours": lambda: step(ours, [lambda x=x: ours_loss(x) for x in packed]),
            "transformers": lambda: step(theirs, [lambda x=x, n=n: theirs_loss(x, n) for x, n in zip(hf_batches, hf_targets)])}
    seconds = interleaved(runs, device, reps)
    padded = sum(b["input_ids"].numel() for b in hf_batches)
    return dict(samples=len(samples), useful_tokens=useful, pad_fraction=1 - useful / padded, loss_ours=a,
                loss_transformers=b, loss_rel_diff=abs(a - b) / abs(b), ours_tokens_per_s=useful / seconds["ours"],
                transformers_tokens_per_s=useful / seconds["transformers"], speedup=seconds["transformers"] / seconds["ours"])


def interleaved(runs, device, reps):
    """Median seconds of each fn in `runs` after one warm-up call each, the fns alternating call by call."""
    for fn in runs.values():
        fn()
    clock, seconds = host_clock(device), {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            seconds[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in seconds.items()}


def peer_generate(ours, theirs, prompts, device, new_tokens, reps):
    """Greedy decoding of every prompt at once: our packed KV-cache generate vs transformers' generate
    (left-padded batch), no stop token; new tokens/s and the share of replies that agree token for token."""
    batch = data.collate(prompts, mrope=True).to(device)
    inputs = hf_inputs(prompts, device, left_pad=True)
    inputs.pop("labels")
    outputs = {}

    def ours_gen():
        outputs["ours"] = ours.generate(batch, new_tokens)

    def theirs_gen():
        with torch.no_grad():
            out = theirs.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        outputs["transformers"] = out[:, inputs["input_ids"].shape[1]:].tolist()
    ours.eval(), theirs.eval()
    seconds = interleaved({"ours": ours_gen, "transformers": theirs_gen}, device, reps)
    n = len(prompts) * new_tokens
    agree = sum(a == b for a, b in zip(outputs["ours"], outputs["transformers"])) / len(prompts)
    return dict(samples=len(prompts), new_tokens=new_tokens, ours_tokens_per_s=n / seconds["ours"],
                transformers_tokens_per_s=n / seconds["transformers"], speedup=seconds["transformers"] / seconds["ours"],
                replies_agree=agree)


def bench_peer(device, size, reps):
    """Our training step and generation against transformers' Qwen2.5-VL on the same weights and samples."""
    if importlib.util.find_spec("transformers") is None:
        raise RuntimeError("--what peer needs transformers (pip install -r requirements-dev.txt)")
    p = PEER["quick" if size == "quick" else "full"]
    rows = []
    with tempfile.TemporaryDirectory() as path:
        save_peer_checkpoint(path)
        for case, long_reply in (("train, short replies", 0), ("train, long replies", p["long_reply"])):
            samples = peer_samples(p["samples"], long_reply)
            rows.append(dict(case=case, **peer_train(*peer_models(device, path), samples, device, p["micro_batch"],
                                                     reps)))
        rows += peer_compiled(device, path, p, reps)
        prompts = peer_samples(p["samples"], for_generation=True)
        rows.append(dict(case="greedy generation", **peer_generate(*peer_models(device, path), prompts, device,
                                                                  p["new_tokens"], reps)))
    return rows


def peer_compiled(device, path, p, reps):
    """The training rows again with our blocks compiled (model.compile_blocks), timed against transformers
    eager in one interleaved run; the warm-up call, which compiles, is not timed."""
    rows = []
    for case, long_reply in (("train, short replies", 0), ("train, long replies", p["long_reply"])):
        ours, theirs = peer_models(device, path)
        rows.append(dict(case=f"{case}, compiled", **peer_train(compile_blocks(ours), theirs,
                                                               peer_samples(p["samples"], long_reply), device,
                                                               p["micro_batch"], reps)))
    return rows


# ----------------------------------------------------------------------------- data workers and --compile

# a data-bound case: LLaVA-style records with large JPEGs at a 112x112 budget, tiny model, 4,096 tokens (the
# decode and resize cost more than the step, which is what data workers are for)
LOADER = {"accel": dict(records=400, size=(1600, 1200), length=4096, batches=6, model="tiny"),
          "cpu": dict(records=400, size=(1600, 1200), length=4096, batches=6, model="tiny"),
          "quick": dict(records=40, size=(320, 240), length=512, batches=2, model="tiny")}
LOADER_WORKERS = (0, 1, 2)
LOADER_WARM_BATCHES = 2  # the loop is timed in steady state: after the workers' prefetch has filled


def write_jpeg_records(folder, n, size):
    """n LLaVA-style records, each its own JPEG of `size` (noise over a gradient: photo-like to the codec)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        for i in range(n):
            pixels = np.clip(ramp * (i % 5 + 1) / 5 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
            f.write(json.dumps({"image": f"{i}.jpg", "conversations": [
                {"from": "human", "value": f"<image>\nDescribe image {i}."},
                {"from": "gpt", "value": "A gradient with noise. " * (1 + i % 4)}]}) + "\n")
    return data.FileDataset(os.path.join(folder, "d.jsonl"), folder)


def bench_loader(device, size, reps):
    """Loader samples/s at 0, 1, 2 --data-workers (the loader alone), what one training step consumes (samples
    per batch / eager step time), and the wall-clock step rate of a training loop fed by each loader, the
    settings interleaved round by round; each round starts every loader fresh from the same position (its
    buffer filled in process, untimed), so no loader prefetches while another is timed. The loader alone is
    timed from its start (workers forked, nothing prefetched), the loop after LOADER_WARM_BATCHES batches."""
    s = LOADER[size]
    rows, threads = [], torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the step keeps one core busy, as it keeps an accelerator's host thread busy
    with tempfile.TemporaryDirectory() as folder:
        ds = write_jpeg_records(folder, s["records"], s["size"])
        kw = dict(max_tokens=s["length"], max_pixels=112 * 112, buffer_size=64)
        start = data.PackedLoader(ds, data.Tokenizer(), **kw)
        next(start)
        state = start.state_dict()
        model = step_model(s["model"], device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step = step_function(model, opt)
        alone, loop, per_batch = {n: [] for n in LOADER_WORKERS}, {n: [] for n in LOADER_WORKERS}, []
        for _ in range(reps):
            for n in LOADER_WORKERS:
                for timed, with_model in ((alone, False), (loop, True)):
                    loader = data.PackedLoader(ds, data.Tokenizer(), workers=n, **kw)
                    loader.load_state_dict(state)
                    warm = LOADER_WARM_BATCHES if with_model else 0
                    for i in range(warm + s["batches"]):
                        if i == warm:
                            reads, t0 = loader.reads, time.perf_counter()
                        b = next(loader)
                        per_batch.append(len(b.cu_seqlens) - 1)
                        if with_model:
                            step((b.to(device), max(1, loss_tokens(b))))
                            synchronize(device)
                    timed[n].append((loader.reads - reads, time.perf_counter() - t0))
                    loader.close()
        step_s = statistics.median(t / s["batches"] for t in [x for _, x in loop[0]]) - statistics.median(
            t / s["batches"] for t in [x for _, x in alone[0]])
        samples_per_batch = statistics.mean(per_batch)
        for n in LOADER_WORKERS:
            rate = statistics.median(r / t for r, t in alone[n])
            steps_per_s = statistics.median(s["batches"] / t for _, t in loop[n])
            rows.append(dict(workers=n, image=f"{s['size'][0]}x{s['size'][1]} jpeg", max_pixels=112 * 112,
                             length=s["length"], loader_samples_per_s=rate, samples_per_batch=samples_per_batch,
                             step_needs_samples_per_s=samples_per_batch / max(step_s, 1e-9),
                             loop_steps_per_s=steps_per_s, cpus=len(os.sched_getaffinity(0)),
                             torch_threads=torch.get_num_threads()))
    torch.set_num_threads(threads)
    for r in rows:
        r["x_workers_0"] = r["loop_steps_per_s"] / rows[0]["loop_steps_per_s"]
    return rows


def bench_compile(device, size, warmup, reps):
    """The training step with model.compile_blocks against eager: same initial weights, the same packed batches
    (lengths varying), steps interleaved; compile time is the first compiled step less the first eager one
    (wall time: inductor compiles in worker processes)."""
    s = STEP[size]
    samples = synthetic_samples(3, (warmup + reps + 2) * s["length"] // 60)
    batches = data.pack(samples, s["length"])[:warmup + reps]
    batches = [(b.to(device), max(1, loss_tokens(b))) for b in batches]
    runs = {}
    for name in ("eager", "compiled"):
        model = step_model(s["model"], device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        model = compile_blocks(model) if name == "compiled" else model
        runs[name] = (model, [], [], step_function(model, opt))  # times, losses
    clock, first = host_clock(device), {}
    for i, b in enumerate(batches):
        for name, (model, times, losses, step) in runs.items():
            synchronize(device)
            t0, wall = clock(), time.perf_counter()  # compiling runs in worker processes too: wall time
            loss = step(b)
            synchronize(device)
            times.append(clock() - t0)
            losses.append(loss.item())
            first.setdefault(name, time.perf_counter() - wall)
    eager = runs["eager"]
    tokens = sum(int(b.input_ids.shape[0]) for b, _ in batches[warmup:])
    rows = []
    for name, (model, times, losses, _) in runs.items():
        rows.append(dict(model=s["model"], length=s["length"], mode=name, steps=reps,
                         distinct_lengths=len({int(b.input_ids.shape[0]) for b, _ in batches}),
                         step_ms=1e3 * statistics.median(times[warmup:]),
                         tokens_per_s=tokens / sum(times[warmup:]),
                         first_step_s=first[name], compile_s=max(0.0, first["compiled"] - first["eager"]),
                         first_loss_rel_diff=abs(losses[0] - eager[2][0]) / abs(eager[2][0]),
                         max_loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(losses, eager[2]))))
    for r in rows:
        r["x_eager"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


# the GPU table: README's one command fills it (--what gpu)
GPU_TABLE = "attention,ops,loss,step,loader,compile,peer"


# ----------------------------------------------------------------------------- tables and main

COLUMNS = {
    "attention": ["backend", "tokens", "head_dim", "heads", "causal", "dtype", "fwd_ms", "fwd_bwd_ms", "fwd_tflops",
                  "fwd_bwd_tflops", "peak_mib", "x_sdpa_fwd", "x_sdpa", "x_flash_attn"],
    "ops": ["op", "impl", "shape", "dtype", "fwd_ms", "fwd_bwd_ms", "peak_mib", "error"],
    "step": ["model", "params_m", "length", "samples_per_step", "dtype", "attn_backend", "step_ms", "tokens_per_s",
             "x_default", "tflops", "mfu", "peak_tflops", "peak_mib"],
    "loss": ["impl", "tokens", "hidden", "vocab", "dtype", "fwd_bwd_ms", "peak_mib", "rss_growth_mib", "logits_mib"],
    "peer": ["case", "samples", "useful_tokens", "pad_fraction", "new_tokens", "loss_rel_diff", "ours_tokens_per_s",
             "transformers_tokens_per_s", "speedup", "replies_agree"],
    "packing": ["model", "stage", "style", "samples", "length", "useful_tokens", "packed_batches", "padded_batches",
                "pad_fraction", "packed_tokens_per_s", "padded_tokens_per_s", "speedup"],
    "data": ["format", "records", "file_mib", "index_s", "first_batch_s", "peak_mib"],
    "triton": ["kernel", "dtype", "dim", "groups", "capability", "tiles", "warps", "shared", "shared_limit", "fits",
               "regs", "stack", "max_err_out", "max_err_grad"],
    "cp": ["tokens", "hidden", "heads", "kv_heads", "head_dim", "one_rank_ms", "two_ranks_ms", "all_to_all_ms",
           "x_one_rank"],
    "loader": ["workers", "image", "max_pixels", "length", "loader_samples_per_s", "samples_per_batch",
               "step_needs_samples_per_s", "loop_steps_per_s", "x_workers_0", "cpus"],
    "compile": ["model", "length", "mode", "steps", "distinct_lengths", "step_ms", "tokens_per_s", "x_eager",
                "compile_s", "first_loss_rel_diff", "max_loss_rel_diff"],
}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) and abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def print_table(title, rows):
    cols = [c for c in COLUMNS[title] if any(c in r for r in rows)]
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n## {title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def summary(result):
    """The figures the targets are stated in (README's Performance section; measured ones in docs/LOG.md)."""
    out = {}
    for r in result.get("attention", []):
        if r["ours"] and r["backend"] != "sdpa":
            out[f"attention {r['backend']}/sdpa fwd+bwd T={r['tokens']} D={r['head_dim']} "
                f"{'causal' if r['causal'] else 'full'}"] = r["x_sdpa"]
    ce = {r["impl"]: r for r in result.get("ops", []) if r["op"] == "linear_cross_entropy" and "peak_mib" in r}
    if {"kernels", "torch"} <= ce.keys():
        out["cross-entropy peak memory, full logits / chunked"] = ce["torch"]["peak_mib"] / ce["kernels"]["peak_mib"]
    loss = {(r["impl"], r["tokens"]): r for r in result.get("loss", [])}
    for (impl, tokens), r in loss.items():
        if impl == "chunked" and ("full", tokens) in loss:
            out[f"loss peak memory chunked / full logits, vocab {r['vocab']}, {tokens} tokens"] = (
                r["peak_mib"] / loss["full", tokens]["peak_mib"])
    for r in result.get("step", []):
        if r["ours"]:
            out[f"step {r['model']} MFU"] = r["mfu"]
        else:
            out[f"step {r['model']} tokens/s, {r['attn_backend']} / default ({result['step'][0]['attn_backend']})"] = (
                r["x_default"])
    for r in result.get("peer", []):
        out[f"ours / transformers tokens/s, {r['case']}"] = r["speedup"]
    for r in result.get("packing", []):
        out[f"packing/padding useful tokens/s, stage {r['stage']}"] = r["speedup"]
    for r in result.get("cp", []):
        out[f"attention layer + all-to-all on 2 cpu ranks / 1 rank, {r['tokens']} tokens"] = r["x_one_rank"]
    for r in result.get("loader", [])[1:]:
        out[f"training loop steps/s, {r['workers']} data workers / 0 ({r['image']}, {r['cpus']} cpus)"] = r["x_workers_0"]
    for r in result.get("compile", [])[1:]:
        out[f"step tokens/s, compiled / eager ({r['model']}, {r['length']} tokens)"] = r["x_eager"]
    for r in result.get("loss", []):
        if "rss_growth_mib" in r:
            out[f"loss peak RSS growth MiB, {r['impl']}, vocab {r['vocab']}, {r['tokens']} tokens"] = r["rss_growth_mib"]
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, npu, cpu or auto (npu > cuda > cpu)")
    p.add_argument("--what", default=None,
                   help="comma-separated parts to run (default: attention,ops,loss,step,packing,cp, and triton on "
                        "cuda; also: triton, each Triton kernel compiled for sm_80/sm_90; data, start-up cost of "
                        "1M-record data files; peer, against transformers' Qwen2.5-VL; loader, data workers on large "
                        "JPEGs; compile, --compile's step; gpu, the GPU table: " + GPU_TABLE + ")")
    p.add_argument("--out", default="bench.json", help="where the results go (JSON)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no torch.compile (a smoke test)")
    p.add_argument("--warmup-reps", type=int, default=None, help="untimed calls before timing (default 3 on cuda/npu, 1 on cpu)")
    refuse_flag(p, "--warmup", "untimed calls are --warmup-reps (train.py's --warmup is the lr schedule's "
                "warm-up steps)")
    p.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 10 on cuda/npu, 3 on cpu)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: common.PEAK_TFLOPS "
                   "by device name, else a measured matmul: fp32 on cpu, bf16 elsewhere)")
    p.add_argument("--loss-tokens", default=None, help="comma-separated token counts for the loss part (default "
                   "16384 on cuda/npu, 4096 on cpu: full fp32 logits of 16k tokens need ~30 GB)")
    p.add_argument("--loss-impls", default="chunked,full", help="loss part: chunked (ours), full (fp32 logits)")
    return p


def run_part(part, args, device, size, warmup, reps):
    """The rows of one --what part."""
    if part == "loss":
        return bench_loss(device, size, reps, [int(t) for t in args.loss_tokens.split(",")] if args.loss_tokens
                          else None, [i.strip() for i in args.loss_impls.split(",")])
    return {"attention": lambda: bench_attention(device, size, warmup, reps),
            "ops": lambda: bench_ops(device, size, warmup, reps, compile_too=not args.quick),
            "peer": lambda: bench_peer(device, size, reps),
            "step": lambda: bench_step(device, size, warmup, reps, args.peak_tflops),
            "packing": lambda: bench_packing(device, size, reps),
            "triton": lambda: bench_triton(device),
            "cp": lambda: bench_cp(size, warmup, reps),
            "loader": lambda: bench_loader(device, size, reps),
            "compile": lambda: bench_compile(device, size, warmup, reps),
            "data": lambda: bench_data(size)}[part]()


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device == "cuda" and kernels.triton is not None
    what = args.what or "attention,ops,loss,step,packing,cp" + (",triton" if on_gpu else "")
    parts = [w.strip() for w in (GPU_TABLE if what == "gpu" else what).split(",") if w.strip()]
    unknown = [w for w in parts if w not in COLUMNS]
    if unknown or not parts:
        p.error(f"--what: unknown part(s) {unknown}; choose from {', '.join(COLUMNS)}")
    size = "quick" if args.quick else "cpu" if device == "cpu" else "accel"
    warmup = args.warmup_reps if args.warmup_reps is not None else 1 if device == "cpu" or args.quick else 3
    reps = args.reps if args.reps is not None else 2 if args.quick else 3 if device == "cpu" else 10
    torch.manual_seed(0)
    result = {"command": " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": device, "device_name": device_name(device), "torch": torch.__version__,
              "triton": getattr(kernels.triton, "__version__", None), "warmup": warmup, "reps": reps,
              "host_clock": "process CPU time" if host_clock(device) is time.process_time else "wall"}
    print(f"bench: {device} ({result['device_name']}), torch {torch.__version__}, "
          f"median of {reps} after {warmup} warm-up, {result['host_clock']} on the host")
    for part in parts:
        t0 = time.perf_counter()
        result[part] = rows = run_part(part, args, device, size, warmup, reps)
        result[f"{part}_seconds"] = time.perf_counter() - t0
        print_table(part, rows)
        result["summary"] = summary(result)
        with open(args.out, "w") as f:  # after every part, so a later failure keeps what was measured
            json.dump(result, f, indent=1)
    print("\n## summary")
    for k, v in result["summary"].items():
        print(f"{k}: {v:.3g}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    cli(main)
