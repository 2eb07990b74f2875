"""bench.py: the quick CPU run writes every part's rows with finite positive figures; the FLOP convention,
the profiler-based peak memory and the padding emulation hold on known cases. No timing is asserted."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
import common
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(row, keys):
    return all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0 for k in keys)


def test_quick_cpu_run_writes_every_part(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: other test processes share the 2 cores, and spinning OpenMP threads would crawl;
    # no TRITON_INTERPRET: the interpreted kernel is tested in test_attention.py, far too slow to time
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--quick", "--out", str(out),
                           "--what", "attention,ops,loss,step,packing,data,cp"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu"

    shapes = bench.ATTENTION["quick"]
    att = res["attention"]
    for tokens in shapes["tokens"]:
        for head_dim in shapes["head_dims"]:
            for causal in (True, False):
                got = {r["backend"]: r for r in att
                       if (r["tokens"], r["head_dim"], r["causal"]) == (tokens, head_dim, causal)}
                assert set(got) == {"reference", "sdpa"}  # triton only under TRITON_INTERPRET on cpu
                for r in got.values():
                    assert positive(r, ["fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops", "peak_mib", "x_sdpa"])
                    flops = bench.attention_flops(bench.split_tokens(tokens), r["heads"], head_dim, causal)
                    assert math.isclose(r["fwd_tflops"] * r["fwd_ms"] * 1e9, flops, rel_tol=1e-9)
                    assert math.isclose(r["fwd_bwd_tflops"] * r["fwd_bwd_ms"] * 1e9, 3.5 * flops, rel_tol=1e-9)
                assert got["sdpa"]["x_sdpa"] == 1.0 and got["sdpa"]["ours"] and not got["reference"]["ours"]

    ops = {(r["op"], r["impl"]): r for r in res["ops"]}
    assert set(ops) == {(op, impl) for op in ("rms_norm", "apply_rope", "swiglu", "linear_cross_entropy")
                        for impl in ("kernels", "torch")}  # --quick skips torch.compile
    assert all(positive(r, ["fwd_ms", "fwd_bwd_ms", "peak_mib"]) for r in ops.values())
    # memory, not time: chunked cross-entropy never holds the [T, vocab] fp32 logits and their gradient
    assert ops["linear_cross_entropy", "kernels"]["peak_mib"] < ops["linear_cross_entropy", "torch"]["peak_mib"]

    loss = {r["impl"]: r for r in res["loss"]}
    assert set(loss) == {"chunked", "full"} and all(positive(r, ["fwd_bwd_ms", "peak_mib"]) for r in loss.values())
    assert loss["full"]["peak_mib"] > loss["full"]["logits_mib"]  # the fp32 logits are really held
    assert loss["chunked"]["peak_mib"] < loss["full"]["peak_mib"]

    assert [r["attn_backend"] for r in res["step"]] == ["sdpa", "reference"]  # the default first
    for step in res["step"]:
        assert step["model"] == "tiny" and positive(step, ["step_ms", "tokens_per_s", "tflops", "mfu", "peak_tflops",
                                                           "peak_mib", "x_default"])
        # MFU = model FLOP/s over common.peak_flops' figure; on cpu a measured fp32 matmul, named in the output
        assert math.isclose(step["mfu"], step["tflops"] / step["peak_tflops"], rel_tol=1e-9)
        assert step["peak_source"].startswith("measured: float32 1024^3 matmul")
    assert f"MFU against {res['step'][0]['peak_tflops']:.3g} TFLOP/s (measured: float32" in proc.stdout

    pk = res["packing"]
    assert [r["stage"] for r in pk] == [2, 3]
    for r in pk:
        assert positive(r, ["useful_tokens", "packed_tokens_per_s", "padded_tokens_per_s", "speedup"])
        assert r["padded_tokens"] >= r["useful_tokens"] and 0 <= r["pad_fraction"] < 1
        assert r["packed_batches"] <= r["padded_batches"]
    assert set(res["summary"]) and all(math.isfinite(v) and v > 0 for v in res["summary"].values())

    assert [(r["format"], r["records"]) for r in res["data"]] == [("jsonl", 2000), ("json", 2000), ("parquet", 200),
                                                                   ("arrow", 200)]
    assert all(positive(r, ["file_mib", "index_s", "first_batch_s", "peak_mib"]) for r in res["data"])

    (cp,) = res["cp"]  # 2 gloo ranks on half the tokens each against one rank on all
    assert cp["tokens"] == bench.CP["quick"]["tokens"]
    assert positive(cp, ["one_rank_ms", "two_ranks_ms", "all_to_all_ms", "x_one_rank"])


def test_attention_flops_convention():
    # FlashAttention-2's benchmark: 4 L^2 H D per sample forward, half of it when causal
    assert bench.attention_flops([1024], 16, 128, causal=False) == 4 * 1024 ** 2 * 16 * 128
    assert bench.attention_flops([1024, 512], 2, 64, causal=True) == 2 * (1024 ** 2 + 512 ** 2) * 2 * 64
    assert sum(bench.split_tokens(4097)) == 4097


def test_mfu_peak_is_the_flag_then_the_datasheet_then_a_measured_matmul(monkeypatch):
    """common.peak_flops, the one denominator of MFU in train.py and bench.py."""
    assert common.peak_flops("cpu", torch.float32, peak_tflops=2.5) == (2.5e12, "--peak-tflops 2.5")
    for name, key, tflops in (("NVIDIA H100 80GB HBM3", "H100", 989), ("NVIDIA H100 PCIe", "H100 PCIe", 756),
                              ("NVIDIA A100-SXM4-80GB", "A100", 312), ("Ascend910B2", "910B", 313)):
        monkeypatch.setattr(common, "device_name", lambda device: name)
        device = "npu" if "Ascend" in name else "cuda"
        assert common.peak_flops(device, torch.bfloat16) == (tflops * 1e12, f"datasheet: {key} dense bf16 {tflops} TFLOP/s")
        assert common.peak_flops(device, torch.bfloat16, peak_tflops=100)[0] == 100e12  # the flag wins
    monkeypatch.undo()
    clock = iter(range(100)).__next__  # each timed 1024^3 matmul takes one tick of this clock
    flops, source = common.peak_flops("cpu", torch.float32, clock=clock)
    assert flops == 2 * 1024 ** 3 and source.startswith("measured: float32 1024^3 matmul on ")
    assert common.peak_flops("cpu", torch.float32)[0] > 0


def test_cpu_peak_memory_counts_allocations_above_the_start():
    held = torch.ones(2 ** 20)  # allocated before: not counted
    mib = bench.peak_mib(lambda: (torch.ones(2 ** 20) + held).sum(), "cpu")  # two 4 MiB temporaries at once
    assert 8.0 <= mib < 8.1


def test_padding_emulation_pads_each_sample_to_its_batch_longest():
    samples = bench.synthetic_samples(3, 20)
    batches = bench.pad_to_longest(samples, 300, pad_id=data.Tokenizer().eos_id)
    seen = []
    for b in batches:
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        assert len(set(lens)) == 1 and len(lens) * lens[0] <= 300  # one [B, Lmax] batch within the budget
        for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
            seen.append(samples[len(seen)])
            n = len(seen[-1].tokens)
            assert b.input_ids[s:s + n].tolist() == seen[-1].tokens
            assert (b.input_ids[s + n:e] == data.Tokenizer().eos_id).all() and (b.labels[s + n:e] == -100).all()
            assert (b.position_ids[s:e] == torch.arange(e - s)).all()
    assert len(seen) == len(samples)


@pytest.mark.slow  # ~30-70 s on 2 shared cores: five checkpoint loads a side, four steps (two compiled), generations
def test_peer_bench_runs_and_losses_agree():
    """bench.py --what peer at its quick size: ours and transformers' Qwen2.5-VL on one checkpoint give the same
    loss (bench_peer raises before timing otherwise) and the same greedy replies; no timing is asserted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess above: 2 spinning threads on 2 shared cores crawl
    try:
        rows = {r["case"]: r for r in bench.bench_peer("cpu", "quick", reps=1)}
    finally:
        torch.set_num_threads(threads)
    assert set(rows) == {"train, short replies", "train, long replies", "greedy generation",
                         "train, short replies, compiled", "train, long replies, compiled"}
    short, long = rows["train, short replies"], rows["train, long replies"]
    for r in (short, long, rows["train, short replies, compiled"], rows["train, long replies, compiled"]):
        assert r["loss_rel_diff"] < 1e-5 and 5.0 < r["loss_ours"] < 7.0  # random weights: ~ln(263), not ~0
        assert positive(r, ["ours_tokens_per_s", "transformers_tokens_per_s", "speedup"])
    assert long["pad_fraction"] < short["pad_fraction"] and long["useful_tokens"] > short["useful_tokens"]
    gen = rows["greedy generation"]
    assert gen["replies_agree"] == 1.0 and positive(gen, ["ours_tokens_per_s", "transformers_tokens_per_s"])


@pytest.mark.requires("triton")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels under the interpreter")
def test_triton_vs_sdpa_row_on_the_interpreter():
    """The GPU check bench.py --what triton runs per head dim, here on CPU tensors (fp16: the interpreter
    mishandles bf16 dots): it runs and its errors are the kernels' fp16 rounding, not a mismatch."""
    row = bench.triton_vs_sdpa(80, lengths=(20, 9), device="cpu", dtype=torch.float16)
    assert row["dim"] == 80 and row["dtype"] == "float16" and row["capability"] is None
    assert 0 < row["max_err_out"] < 5e-3 and 0 < row["max_err_grad"] < 2e-2


def test_loader_bench_rows():
    """bench.py --what loader at its quick size: a row per worker count, every loader giving the batches the
    training loop used (the same sample count per batch), figures finite and positive; no timing asserted."""
    rows = bench.bench_loader("cpu", "quick", reps=1)
    assert [r["workers"] for r in rows] == list(bench.LOADER_WORKERS) and rows[0]["x_workers_0"] == 1.0
    assert all(positive(r, ["loader_samples_per_s", "samples_per_batch", "step_needs_samples_per_s",
                            "loop_steps_per_s"]) for r in rows)


@pytest.mark.slow  # compiles the tiny model's blocks
def test_compile_bench_rows():
    rows = {r["mode"]: r for r in bench.bench_compile("cpu", "quick", warmup=1, reps=2)}
    assert set(rows) == {"eager", "compiled"} and rows["compiled"]["distinct_lengths"] > 1
    assert rows["compiled"]["first_loss_rel_diff"] < 1e-3 and rows["compiled"]["max_loss_rel_diff"] < 1e-2
    assert positive(rows["compiled"], ["step_ms", "tokens_per_s", "x_eager"])
