"""A checkpoint cut short on purpose: kill -9 in each of save_checkpoint's write phases (the tensors file before
its rename, train_state.pt half written, the directory before its rename, `latest` before its switch, the old
checkpoints half pruned) loses no complete checkpoint, and --resume ends equal to the uninterrupted run bit for bit;
a second Ctrl-C while the first one's checkpoint is written aborts at once, leaving the checkpoints before it
whole, and copies of the first arriving together count once."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import common
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--stage", "1", "--max-steps", "3", "--ckpt-every", "1", "--keep-last", "1", "--device", "cpu",
         "--packing-length", "256", "--peak-tflops", "1", "--log-every", "1000", "--text-num-layers", "2",
         "--vision-depth", "1", "--vision-fullatt-blocks", "0"]
VICTIM = "step-000002"  # the checkpoint every test here interrupts; step-000001 is complete before it

# a training process that dies (SIGKILL: no cleanup, no flush) in one write phase of VICTIM, or (phase "ctrl-c")
# gets Ctrl-C twice during step 2, then once more while writing VICTIM's train_state.pt; the same thread count as
# tests/conftest.py, so its arithmetic is the in-process runs'
RUNNER = textwrap.dedent("""
    import io, os, shutil, signal, sys, time
    import torch
    sys.path.insert(0, sys.argv[1])
    import common, train
    phase, victim = sys.argv[2], sys.argv[3]
    torch.set_num_threads(2)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    replace, save, rmtree, train_step = os.replace, torch.save, shutil.rmtree, train.train_step

    def os_replace(src, dst):
        if (phase == "tensors" and src.endswith(f".tmp-{victim}/model.safetensors.tmp")
                or phase == "directory" and dst.endswith("/" + victim)
                or phase == "latest" and dst.endswith("/latest") and open(src).read() == victim):
            kill()
        replace(src, dst)

    def torch_save(obj, f):
        if f"/.tmp-{victim}/" in getattr(f, "name", ""):
            if phase == "train_state":
                buf = io.BytesIO()
                save(obj, buf)
                f.write(buf.getvalue()[:buf.tell() // 2])
                f.flush()
                kill()
            if phase == "ctrl-c":
                print("writing", victim, flush=True)
                time.sleep(train.StopRequested.AGAIN_S + 0.2)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)
        save(obj, f)

    def shutil_rmtree(path, *a, **k):
        name, stage = os.path.basename(path), os.path.dirname(path)
        if phase == "prune" and name.startswith("step-") and os.path.isdir(os.path.join(stage, victim)):
            os.remove(os.path.join(path, "model.safetensors"))
            kill()
        rmtree(path, *a, **k)

    calls = []
    def step_with_ctrl_c(*a, **k):
        calls.append(1)
        if phase == "ctrl-c" and len(calls) == 2:  # a terminal's Ctrl-C and torchrun's copy of it
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*a, **k)

    os.replace, torch.save, shutil.rmtree, train.train_step = os_replace, torch_save, shutil_rmtree, step_with_ctrl_c
    common.cli(train.main, sys.argv[4:])
""")


def interrupted(out, phase):
    return subprocess.run([sys.executable, "-c", RUNNER, ROOT, phase, VICTIM, *FLAGS, "--out", out],
                          capture_output=True, text=True, timeout=300)


def finished(out):
    """The stage's final weights, its metrics rows' (step, loss) and its directory listing."""
    stage = os.path.join(out, "stage1")
    rows = [json.loads(line) for line in open(os.path.join(stage, "metrics.jsonl"))]
    return (load_file(os.path.join(common.checkpoint_dir(stage), "model.safetensors")),
            [(r["step"], r["loss"]) for r in rows], sorted(os.listdir(stage)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole") / "run")
    train.main([*FLAGS, "--out", out])
    return finished(out)


def complete(stage):
    return sorted(d for d in os.listdir(stage) if d.startswith("step-") and common.checkpoint_damage(
        os.path.join(stage, d), ("config.json", "model.safetensors", "train_state.pt")) is None)


def resumed_equals(out, uninterrupted):
    train.main([*FLAGS, "--out", out, "--resume"])
    weights, rows, listing = finished(out)
    want_weights, want_rows, want_listing = uninterrupted
    assert rows == want_rows and listing == want_listing
    assert weights.keys() == want_weights.keys() and all(torch.equal(weights[k], want_weights[k]) for k in weights)


# phase -> the complete checkpoints it leaves (`latest` names the last; a pruned one may be half gone)
PHASES = {"tensors": ["step-000001"], "train_state": ["step-000001"], "directory": ["step-000001"],
          "latest": ["step-000001", VICTIM], "prune": [VICTIM]}


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_in_each_checkpoint_write_phase_loses_nothing_and_resumes_exactly(tmp_path, uninterrupted, phase):
    out = str(tmp_path / "run")
    stage = os.path.join(out, "stage1")
    proc = interrupted(out, phase)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert complete(stage) == PHASES[phase]
    latest = open(os.path.join(stage, "latest")).read()
    assert latest == ("step-000001" if phase != "prune" else VICTIM)
    ckpt, state = train.resume_point(stage, log=lambda *a: None)
    assert ckpt == os.path.join(stage, latest) and state["step"] == int(latest[-6:])
    resumed_equals(out, uninterrupted)


def test_second_ctrl_c_while_checkpointing_aborts_and_keeps_the_checkpoint_before(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    stage = os.path.join(out, "stage1")
    proc = interrupted(out, "ctrl-c")
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]  # aborted by the second Ctrl-C, as a shell sees
    # the two copies of the first counted once: step 2 finished and its checkpoint began
    assert proc.stdout.count("SIGINT: finishing this step") == 1 and f"writing {VICTIM}" in proc.stdout
    assert "KeyboardInterrupt" in proc.stderr
    assert sorted(d for d in os.listdir(stage) if "step-" in d) == ["step-000001"]  # no half-written VICTIM
    assert complete(stage) == ["step-000001"] and open(os.path.join(stage, "latest")).read() == "step-000001"
    resumed_equals(out, uninterrupted)
