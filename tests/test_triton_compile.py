"""Every Triton kernel compiled (not run: no GPU here) for A100 (sm_80) and H100 (sm_90) by triton's own ptxas,
with exactly the launch configuration kernels.py picks there: the shared memory it asks for at launch within
the device's limit, and at most a small register spill. Triton's CPU interpreter checks neither, so without
this a kernel that cannot launch on a GPU passes every other test. Compiling needs a process without
TRITON_INTERPRET (the interpreter replaces the kernels), hence the subprocesses."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cudaDevAttrMaxSharedMemoryPerBlockOptin (CUDA C++ Programming Guide, compute capability tables): 163 KB on
# sm_80, 99 KB on sm_86, 227 KB on sm_90; kept here apart from kernels.SHARED_MEMORY so a wrong table shows
LIMIT = {80: 166_912, 86: 101_376, 90: 232_448}
MAX_STACK = 256  # bytes of per-thread stack (register spills); FlashAttention-2's tiles spill 0.6-2.1 KB here

pytestmark = pytest.mark.requires("triton")


def without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}


def launcher_config(name, dim, capability, groups=1):
    """What kernels.py launches `name` with: its launcher's pick, plus the constexprs compile_triton fixes."""
    if name.startswith("rms"):
        return kernels.rms_norm_launch(dim)
    part = name.removeprefix("attn_").removeprefix("bwd_")
    return {**kernels.attention_launch(torch.bfloat16, dim, capability)[part], "GROUPS": groups, "CAUSAL": True}


def assert_fits(r):
    where = f"{r['kernel']} dim {r['dim']} on sm_{r['capability']} with {r['config']}"
    assert r["shared"] <= LIMIT[r["capability"]], f"{where}: {r['shared']} B of shared memory"
    assert r["stack"] <= MAX_STACK, f"{where}: {r['stack']} B of stack (register spills)"


@pytest.mark.slow
def test_every_triton_kernel_fits_a100_and_h100(tmp_path):
    """bench.py --what triton: every kernel at every preset head dim / RMSNorm width, bf16, for sm_80 and sm_90,
    the dK/dV kernel for MHA and GQA."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--what", "triton", "--out", str(out)],
                          cwd=ROOT, env=without_interpreter(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["triton"]
    got = {(r["kernel"], r["dim"], r["capability"], r["groups"]): r for r in rows}
    assert set(got) == {(name, dim, cap, groups) for name in kernels.TRITON_KERNELS for cap in (80, 90)
                        for dim in bench.TRITON["widths" if name.startswith("rms") else "head_dims"]
                        for groups in ((None,) if name.startswith("rms") else (1, 2) if "dkdv" in name else (1,))}
    for (name, dim, cap, groups), r in got.items():
        assert r["config"] == launcher_config(name, dim, cap, groups)
        assert r["fits"] == (r["shared"] <= r["shared_limit"]) and r["shared_limit"] == LIMIT[cap]
        assert_fits(r)


@pytest.mark.slow
def test_held_out_head_dims_and_a_99_kb_gpu():
    """Configurations the tiles were not chosen on: head dims 96 and 160, GQA 4:1 and 8:1, and an RTX 30-series
    card (sm_86, 99 KB of shared memory) at the head dims that ask for the most."""
    cases = [(name, dim, cap, groups) for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
             for dim, cap, groups in ((96, 90, 1), (160, 80, 4), (256, 86, 8), (128, 86, 1))]
    script = ("import json, sys, torch, kernels; print(json.dumps([kernels.compile_triton(n, torch.bfloat16, d, c, g) "
              f"for n, d, c, g in {cases!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=without_interpreter(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (name, dim, cap, groups), r in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        assert (r["kernel"], r["dim"], r["capability"]) == (name, dim, cap)
        assert r["config"] == launcher_config(name, dim, cap, groups)
        assert_fits(r)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launches the kernels in the interpreter")
def test_kernels_launch_with_the_launchers_pick(monkeypatch):
    """What the compile tests check is what TritonAttention launches: each kernel gets attention_launch's pick."""
    seen = {}

    class Recorder:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, f"_attn_{name}_kernel")

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen[self.name] = {k: v for k, v in kwargs.items() if k not in ("GROUPS", "CAUSAL")}
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        monkeypatch.setattr(kernels, f"_attn_{name}_kernel", Recorder(name))
    q = torch.randn(24, 2, 80, dtype=torch.float16, requires_grad=True)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    kernels.varlen_attention(q, q, q, cu, 14, backend="triton").sum().backward()
    pick = kernels.attention_launch(torch.float16, 80, None)
    assert seen == {"fwd": pick["fwd"], "bwd_dkdv": pick["dkdv"], "bwd_dq": pick["dq"]}


def test_launcher_refuses_what_it_cannot_fit():
    """One table serves every GPU from sm_80 on (the 99 KB cards included, held out above); older GPUs and fp32
    are refused with a line naming the way out rather than failing at launch."""
    assert kernels.attention_launch(torch.bfloat16, 256, 86) == kernels.attention_launch(torch.bfloat16, 256, 90)
    assert kernels.attention_launch(torch.bfloat16, 80, 90)["fwd"]["BLOCK_D"] == 128
    with pytest.raises(ValueError, match="--attn-backend sdpa"):
        kernels.attention_launch(torch.float16, 128, 75)
    with pytest.raises(ValueError, match="SDPA"):
        kernels.attention_launch(torch.float32, 128, 80)
