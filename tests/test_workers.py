"""Data workers (data.PackedLoader workers=N): the same batches as the in-process loader, bit for bit, over a
resume and with skipped records; the workers end with the run on SIGTERM, a bad record and kill -9. JPEG
draft decoding stays within its stated pixel tolerance."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import train
from data import DataError, FileDataset, PackedLoader, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--text-num-layers", "1", "--vision-depth", "1", "--vision-fullatt-blocks", "0"]


def photo(w, h, seed):
    """A JPEG with what a photo has for a resampler: smooth shading, sensor noise, hard edges and small text."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    shade = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1) * 80 + 128
    img = Image.fromarray(np.clip(shade + rng.normal(0, 12, shade.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.rectangle([x0, y0, x0 + int(rng.integers(5, w // 3)), y0 + int(rng.integers(5, h // 3))],
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw.text((x0, y0), "OCR 123", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_dataset(tmp_path, n=40, bad=(5, 17, 18)):
    """n LLaVA-style records with JPEGs of varied sizes; the lines in `bad` are malformed or miss their image."""
    (tmp_path / "img").mkdir(exist_ok=True)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(n):
            name = f"{i}.jpg"
            if i not in bad:
                (tmp_path / "img" / name).write_bytes(photo(200 + 37 * (i % 7), 150 + 29 * (i % 5), i))
            rec = {"image": name, "conversations": [{"from": "human", "value": f"<image>\nWhat is {i}?"},
                                                    {"from": "gpt", "value": "x" * (3 + 11 * (i % 4))}]}
            f.write("{not json\n" if i == bad[0] else json.dumps(rec) + "\n")
    return FileDataset(str(tmp_path / "d.jsonl"), str(tmp_path / "img"))


def assert_same_batch(a, b):
    for k, v in a.__dict__.items():
        w = getattr(b, k)
        assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, k


def test_worker_batches_equal_in_process_batches_over_a_resume(tmp_path):
    ds = jpeg_dataset(tmp_path)
    kw = dict(max_tokens=160, seed=1, min_pixels=56 * 56, max_pixels=84 * 84, on_bad="skip", buffer_size=6,
              max_skip_rate=0.5)
    ref = PackedLoader(ds, Tokenizer(), **kw)
    want = [next(ref) for _ in range(14)]  # past the first epoch (37 good records): the reshuffled order too
    assert ref.skipped > 0 and len({b.image_grid.shape[0] for b in want}) > 1
    first = PackedLoader(ds, Tokenizer(), workers=2, **kw)
    try:
        for b in want[:6]:
            assert_same_batch(next(first), b)
        state = first.state_dict()
    finally:
        first.close()
    resumed = PackedLoader(ds, Tokenizer(), workers=3, **kw)
    try:
        resumed.load_state_dict(state)
        for b in want[6:]:
            assert_same_batch(next(resumed), b)
        assert resumed.state_dict() == ref.state_dict() and resumed.skips == ref.skips
    finally:
        resumed.close()
    assert resumed.pool is None and not any(p.name.startswith("data worker") for p in
                                            __import__("multiprocessing").active_children())


def test_worker_raises_the_bad_record_as_in_process(tmp_path):
    ds = jpeg_dataset(tmp_path, n=12)
    for workers in (0, 2):
        loader = PackedLoader(ds, Tokenizer(), 160, max_pixels=84 * 84, buffer_size=12, workers=workers)
        with pytest.raises(DataError, match=r"d.jsonl:6: malformed JSON") as e:
            next(loader)
        loader.close()
        assert e.value.reason == "malformed JSON"


class LoggedRecords:
    """Text-only records of one token length; each read appends its index to `log` (from any process)."""

    def __init__(self, log, n=500):
        self.log, self.n = log, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return {"format": "conversation", "conversations": [{"from": "human", "value": f"What is {1000 + i}?"},
                                  {"from": "gpt", "value": f"{2000 + i}"}]}


def test_workers_prefetch_at_most_two_batches_of_tokens(tmp_path):
    """Workers queue PREFETCH_BATCHES * max_tokens tokens ahead of the loader at most (each worker its share, one
    sample at least) and hold the next one encoded, whatever the sample count: they wait there for credit."""
    log = tmp_path / "reads"
    source, max_tokens, n = LoggedRecords(log), 200, 2
    size = len(data.encode(source[0], Tokenizer()).tokens)
    log.unlink()
    loader = PackedLoader(source, Tokenizer(), max_tokens, buffer_size=4, workers=n)
    try:
        next(loader)
        time.sleep(2)  # the workers fill their budget and wait for credit
        ahead = len(log.read_text().split()) - loader.reads
        assert n <= ahead <= n * (max(1, data.PREFETCH_BATCHES * max_tokens // n // size) + 1), (ahead, size)
    finally:
        loader.close()


def test_draft_decode_within_the_stated_tolerance():
    """Where the resize shrinks a JPEG 2x or more it is decoded at reduced DCT scale: pixels within
    DRAFT_TOLERANCE (0..255) of the full decode, patch grid identical; no draft where it does not shrink."""
    mean_tol, max_tol = data.DRAFT_TOLERANCE
    std = torch.tensor(data.CLIP_STD).repeat_interleave(data.PATCH ** 2)
    for (w, h), budget in [((1600, 1200), (56 * 56, 112 * 112)), ((900, 1500), (56 * 56, 224 * 224)),
                           ((3000, 2000), (56 * 56, 448 * 448)), ((640, 480), (56 * 56, 28 * 28 * 1280))]:
        jpeg = photo(w, h, w)
        full, grid = data.process_image(data.load_image_bytes(jpeg), *budget)
        img = data.load_image_bytes(jpeg, budget)
        draft, grid2 = data.process_image(img, *budget)
        assert grid == grid2
        shrink = min(w / (grid[2] * data.PATCH), h / (grid[1] * data.PATCH))
        assert (img.size != (w, h)) == (shrink >= 2 * data.DRAFT_GAP), (w, h, budget, img.size)
        diff = (full - draft).abs() * std * 255
        assert diff.mean() <= mean_tol and diff.max() <= max_tol, (w, h, budget, diff.mean(), diff.max())


def children(pid):
    """Pids of pid's child processes (Linux /proc)."""
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                if p.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def run_flags(tmp_path, *extra):
    return ["--device", "cpu", "--stage", "3", "--max-steps", "6", "--packing-length", "160", "--out",
            str(tmp_path / "run"), "--log-every", "1", "--peak-tflops", "1", "--no-eval", "--data-workers", "2",
            "--data", f"d={tmp_path / 'd.jsonl'}:1", "--image-root", str(tmp_path / "img"),
            "--max-pixels", str(84 * 84), *SMALL, *extra]


@pytest.fixture
def started(monkeypatch):
    """The pids of every data worker started."""
    pids, real_init = [], data.Workers.__init__

    def init(self, *args):
        real_init(self, *args)
        pids.extend(p.pid for p in self.procs)

    monkeypatch.setattr(data.Workers, "__init__", init)
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_with_the_run_on_sigterm_and_on_a_bad_record(tmp_path, monkeypatch, started):
    """In this process: SIGTERM during step 2 stops the run after it with a checkpoint and its workers reaped;
    a bad record met by a worker stops the run with the record's error, its workers reaped too."""
    jpeg_dataset(tmp_path, n=30, bad=(25,))
    real_forward, calls = train.MLLM.forward, []

    def forward_with_sigterm(self, batch, loss_divisor=None):
        calls.append(1)
        if len(calls) == 2:
            assert all(alive(p) for p in started)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, batch, loss_divisor)

    monkeypatch.setattr(train.MLLM, "forward", forward_with_sigterm)
    torch.set_num_threads(1)
    before = set(children(os.getpid()))  # earlier tests' long-lived helpers (e.g. inductor's compile workers)
    train.main(run_flags(tmp_path, "--on-bad", "skip"))
    assert len(calls) == 2 and os.path.isdir(tmp_path / "run" / "stage3" / "step-000002")
    assert len(started) == 2 and not wait_gone(started) and not set(children(os.getpid())) - before
    row = json.loads(open(tmp_path / "run" / "stage3" / "metrics.jsonl").readline())
    assert 0 <= row["data_wait"] <= 1
    started.clear()
    with pytest.raises(DataError, match=r"d.jsonl:26: malformed JSON"):
        train.main(run_flags(tmp_path, "--overwrite"))
    assert len(started) == 2 and not wait_gone(started) and not set(children(os.getpid())) - before


class FailingRecords:
    """Records whose reads fail in a data worker (any process but the one that built it): `how` is "raise" (a
    bug in a reader, not a bad record) or "die" (the worker killed, as the OOM killer would)."""

    def __init__(self, how):
        self.how, self.parent = how, os.getpid()

    def __len__(self):
        return 100

    def __getitem__(self, i):
        if os.getpid() != self.parent:
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ZeroDivisionError(f"reader bug at {i}")
        return {"format": "text", "text": f"record {i}"}


@pytest.mark.parametrize("how, error", [("raise", r"data worker 0 failed on read 0:\n(.|\n)*ZeroDivisionError: "
                                                  r"reader bug at"),
                                        ("die", r"data worker 0 \(pid \d+\) died with exit code -9")])
def test_a_failing_worker_stops_the_loader_with_its_cause(how, error, started):
    loader = PackedLoader(FailingRecords(how), Tokenizer(), 64, buffer_size=2, workers=2)
    with pytest.raises(RuntimeError, match=error):
        next(loader)
    assert loader.pool is None and len(started) == 2 and not wait_gone(started)  # the loader closed its workers


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_the_step_raises(tmp_path, monkeypatch, started):
    """An exception in the training process (here the forward of step 2) ends the run's workers with it."""
    jpeg_dataset(tmp_path, n=30, bad=(25,))
    real_forward, calls = train.MLLM.forward, []

    def failing_forward(self, batch, loss_divisor=None):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in step 2")
        return real_forward(self, batch, loss_divisor)

    monkeypatch.setattr(train.MLLM, "forward", failing_forward)
    torch.set_num_threads(1)
    before = set(children(os.getpid()))
    with pytest.raises(MemoryError, match="step 2"):
        train.main(run_flags(tmp_path, "--on-bad", "skip"))
    assert len(started) == 2 and not wait_gone(started) and not set(children(os.getpid())) - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_workers_die_with_a_killed_run(tmp_path):
    """kill -9 of the training process (nothing of it runs after): its workers die with it, no orphans."""
    jpeg_dataset(tmp_path, n=30, bad=(25,))
    proc = subprocess.Popen([sys.executable, "train.py", *run_flags(tmp_path, "--max-steps", "1000",
                                                                    "--on-bad", "skip")],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "step     1/" in line:
                break
        workers = children(proc.pid)
        assert len(workers) == 2, workers
    finally:
        proc.kill()
        proc.wait()
    assert not wait_gone(workers)


def test_default_worker_count_and_bad_flag(monkeypatch, tmp_path):
    """The CPUs per local rank less 2, at most 8; a negative count is refused naming the flag."""
    for cpus, ranks, want in ((2, 1, 0), (16, 1, 8), (16, 2, 6), (14, 8, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert train.data_workers(None) == want
    assert train.data_workers(3) == 3
    with pytest.raises(SystemExit, match="--data-workers -1: must be >= 0"):
        train.main(run_flags(tmp_path, "--data-workers", "-1"))
