"""Nothing lost, nothing hidden: every bad flag, path, record or image gets an error that names it, found
before the run directory is touched (its files hash the same before and after); skipped samples are
counted and reported; a second run on a directory is refused; kill -9 at any moment resumes exactly."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import train
from data import DataError, FileDataset, PackedLoader, Tokenizer, encode

from test_train import SMALL, config, make_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *a: None)


def tree_hash(path):
    """One hash of every file under `path` (names and bytes); .lock only records who ran last."""
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f != ".lock":
                h.update(os.path.relpath(os.path.join(d, f), path).encode())
                h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 2-step stage-1 run (the directory the failing commands below must leave alone)."""
    tmp = tmp_path_factory.mktemp("done")
    cfg = config(tmp, stage="1", max_steps=2)
    train.run(cfg, SMALL, **QUIET)
    return cfg


def refused(cfg, match, overrides=SMALL, error=SystemExit):
    """Run cfg, expect an error matching `match`, and check the run directory did not change."""
    before = tree_hash(cfg.out)
    with pytest.raises(error, match=match):  # even when told to start over, checks come before any deletion
        train.run(replace(cfg, overwrite=not cfg.resume), overrides, **QUIET)
    assert tree_hash(cfg.out) == before


# ----------------------------------------------------------------------------- work lost

def test_init_from_typo_leaves_the_stage_alone(done_run):
    refused(replace(done_run, init_from=done_run.out + "/stage0"), r"--init-from .*stage0: no checkpoint", {})


def test_init_from_inside_the_stage_it_overwrites_is_refused(done_run):
    refused(replace(done_run, init_from=done_run.out + "/stage1"), r"--init-from .*stage1 lies inside", {})


def test_fsdp_without_torchrun_is_refused_before_the_directory(done_run):
    refused(replace(done_run, fsdp="ours"), r"--fsdp ours .* torchrun")


def test_second_run_on_the_same_out_is_refused(done_run):
    holder = train.run_lock(done_run.out)  # an open lock: what a running training holds
    try:
        refused(done_run, rf"--out .* in use .*pid {os.getpid()} on ")
    finally:
        holder.close()
    train.run(replace(done_run, max_steps=1, overwrite=True), SMALL, **QUIET)  # released: usable again


def test_torn_metrics_line_is_dropped_on_resume_and_resume_is_exact(tmp_path):
    full = train.run(config(tmp_path / "a", stage="1", max_steps=4), SMALL, **QUIET)
    cfg = config(tmp_path / "b", stage="1", max_steps=4, ckpt_every=2, keep_last=2)
    train.run(cfg, SMALL, **QUIET)
    stage = tmp_path / "b" / "run" / "stage1"
    (stage / "latest").write_text("step-000002")  # as if killed after step 3, mid-write of its metrics row
    rows = open(stage / "metrics.jsonl").read().splitlines()
    (stage / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n" + rows[3][:20])
    lines = []
    train.run(replace(cfg, resume=True), SMALL, log=lines.append)
    assert any("metrics.jsonl: dropped 1 unreadable line" in line for line in lines)
    assert [json.loads(x)["step"] for x in open(stage / "metrics.jsonl")] == [1, 2, 3, 4]
    a = load_file(os.path.join(full["stages"]["stage1"].checkpoint, "model.safetensors"))
    b = load_file(os.path.join(train.checkpoint_dir(str(stage)), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_creates_a_missing_out_before_evaluating(done_run, tmp_path):
    out = tmp_path / "not" / "yet"
    evaluate.main(["--ckpt", done_run.out + "/stage1", "--tasks", "vqa_color", "--n", "2", "--max-new-tokens", "2",
                   "--out", str(out)])
    assert json.load(open(out / "eval.json"))["checkpoints"]["stage1"]["results"]["vqa_color"]["n"] == 2


# ----------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("flags,match", [
    (["--max-steps", "-1"], "--max-steps -1: must be >= 1"),
    (["--packing-length", "0"], "--packing-length 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be > 0"),
    (["--max-skip-rate", "2"], "--max-skip-rate 2.0 must lie in"),
    (["--data", "a=x.jsonl:abc"], r"--data 'a=x.jsonl:abc': weight 'abc' is not a number"),
    (["--data", "a=x.jsonl:-1"], r"--data 'a=x.jsonl:-1': weight '-1' must be a finite number >= 0"),
    (["--data", "a=missing.jsonl"], "--data a=missing.jsonl: no such file"),
])
def test_bad_flag_is_named_and_nothing_changes(done_run, flags, match):
    cfg, overrides = train.parse_args(flags + ["--out", done_run.out, "--stage", "1", "--device", "cpu"])
    refused(cfg, match, overrides)


def test_duplicate_data_names_are_refused(done_run, tmp_path):
    path = make_jsonl(tmp_path, 3)
    refused(replace(done_run, data=[f"a={path}", f"a={path}:2"]), "the name 'a' is given 2 times")


def test_resume_of_a_missing_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no run to resume in "):
        train.run(config(tmp_path, stage="1", resume=True), SMALL, **QUIET)
    assert not os.path.exists(tmp_path / "run")


def test_too_short_packing_length_names_the_flag(done_run, tmp_path):
    path = make_jsonl(tmp_path, 3)
    refused(replace(done_run, data=[f"c={path}"], image_root=str(tmp_path / "img"), packing_length=8),
            r"colors.jsonl:\d+ .*> the packing length 8 \(raise --packing-length", error=DataError)
    # skipping cannot help when no sample fits: the loader gives up instead of spinning
    cfg = replace(done_run, data=[f"c={path}"], image_root=str(tmp_path / "img"), packing_length=8,
                        on_bad="skip", max_skip_rate=1.0)
    with pytest.raises(DataError, match="c: too long x"):
        loader = PackedLoader(train.build_source(cfg, 1, train.STAGES[1]), Tokenizer(), 8, on_bad="skip",
                              patience=50)
        next(loader)
    assert "--truncate" in train.build_parser().format_help()


def test_truncated_checkpoint_names_its_file(done_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src = train.checkpoint_dir(done_run.out + "/stage1")
    (ckpt / "config.json").write_bytes(open(os.path.join(src, "config.json"), "rb").read())
    blob = open(os.path.join(src, "model.safetensors"), "rb").read()
    (ckpt / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    refused(replace(done_run, stage="2", init_from=str(ckpt)), r"ckpt/model.safetensors: cannot read",
            {}, error=ValueError)
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: cannot read"):
        evaluate.main(["--ckpt", str(ckpt), "--tasks", "vqa_color", "--n", "1", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- bad data, counted

def bad_lines_jsonl(tmp_path, n_bad, n_good=1):
    path = make_jsonl(tmp_path, n_good)
    with open(path, "a") as f:
        f.writelines("{not json\n" for _ in range(n_bad))
    return path


def test_mostly_bad_file_stops_the_run_naming_it(done_run, tmp_path):
    path = bad_lines_jsonl(tmp_path, 30)
    refused(replace(done_run, data=[f"c={path}"], image_root=str(tmp_path / "img"), on_bad="skip"),
            r"data source 'c': \d+ of \d+ samples skipped \(9\d%\), more than --max-skip-rate 0.1 \(c: malformed "
            r"JSON x\d+\); last: .*colors.jsonl:\d+: malformed JSON", error=DataError)


def test_skips_are_reported_in_the_log_and_metrics(tmp_path):
    path = bad_lines_jsonl(tmp_path, 2, n_good=12)
    lines = []
    cfg = config(tmp_path, stage="3", max_steps=2, data=[f"c={path}"], image_root=str(tmp_path / "img"),
                 on_bad="skip", max_skip_rate=0.5, log_every=1)
    train.run(cfg, SMALL, log=lines.append)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stage3" / "metrics.jsonl")]
    skipped = rows[-1]["skipped_samples"]  # every read of a bad line counts (the buffer reads the file many times)
    assert skipped > 0 and any(f"skipped {skipped} samples" in line for line in lines if "step" in line)
    assert any(f"stage 3: skipped {skipped} samples (c: malformed JSON x{skipped}; last: {path}:" in line
               for line in lines)


def test_loader_counts_skips_by_source_and_reason_and_stops_past_the_rate(tmp_path):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    rec = lambda img: {"task": "t", "format": "caption", "images": [str(tmp_path / img)], "text": "<image>x"}  # noqa: E731
    mix = data.Mixture({"good": [rec("ok.png")] * 4, "bad": [rec("bad.png")] * 4}, {"good": 3, "bad": 1})
    loader = PackedLoader(mix, Tokenizer(), 512, on_bad="skip", buffer_size=40)
    next(loader)
    assert set(loader.skips) == {("bad", "unreadable image")} and loader.skipped > 0
    assert loader.skipped == loader.source_reads["bad"] and loader.source_reads["good"] >= 40
    loader2 = PackedLoader(mix, Tokenizer(), 512, on_bad="skip", buffer_size=100, max_skip_rate=0.5)
    with pytest.raises(DataError, match=r"data source 'bad': \d+ of \d+ samples skipped \(100%\)"):
        next(loader2)
    state = loader.state_dict()  # skip counts survive a resume
    again = PackedLoader(mix, Tokenizer(), 512, on_bad="skip", buffer_size=40)
    again.load_state_dict(state)
    assert again.skips == loader.skips and again.source_reads == loader.source_reads


# ----------------------------------------------------------------------------- images and paths

def test_decompression_bomb_is_a_data_error_naming_file_and_line(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "big.png", "text": "a caption"}) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit, as 196 MP is for PIL's
    ds = FileDataset(str(tmp_path / "d.jsonl"), str(tmp_path))
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot read image .*big.png.*decompression bomb") as e:
        encode(ds[0], Tokenizer())
    assert e.value.reason == "image too large"
    loader = PackedLoader(data.Mixture({"d": ds, "t": [{"task": "t", "format": "text", "text": "hi"}]},
                                       {"d": 1, "t": 1}), Tokenizer(), 64, on_bad="skip", buffer_size=8)
    next(loader)
    assert loader.skips[("d", "image too large")] > 0


@pytest.mark.parametrize("mode,full", [("I;16", 65535), ("I", 65535), ("F", 1.0)])
def test_high_bit_depth_images_keep_their_grey_levels(tmp_path, mode, full):
    ramp = np.linspace(0, full, 256).reshape(1, 256).repeat(4, 0)
    img = Image.fromarray(ramp.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert img.mode == mode
    if mode == "I;16":  # through a PNG file, as a dataset gives it
        img.save(tmp_path / "r.png")
        img = data.load_image(str(tmp_path / "r.png"))
    rgb = np.asarray(data.to_rgb(img)).astype(int)
    assert rgb.shape == (4, 256, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[0, :, 0] - np.arange(256)).max() <= 1  # the ramp stays a ramp (PIL alone clips at 255)


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_image_paths_stay_inside_the_root(tmp_path, path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (56, 56)).save(tmp_path / "outside.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": path, "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: image path .* leaves the image root"):
        FileDataset(str(tmp_path / "d.jsonl"), str(root))[0]
    if path == "../outside.png":
        ds = FileDataset(str(tmp_path / "d.jsonl"), str(root), allow_outside_root=True)
        assert os.path.isfile(ds[0]["images"][0])


# ----------------------------------------------------------------------------- kill -9

def cli(out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--device", "cpu", "--stage", "1", "--max-steps", "40",
            "--packing-length", "256", "--ckpt-every", "2", "--log-every", "1", "--peak-tflops", "1", "--out", out,
            "--text-num-layers", "2", "--vision-depth", "1", "--vision-fullatt-blocks", "0", *extra]


def steps_logged(out):
    path = os.path.join(out, "stage1", "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.isfile(path) else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    subprocess.run(cli(str(tmp_path / "full")), check=True, capture_output=True, timeout=300)
    rng, out, kills = random.Random(0), str(tmp_path / "cut"), 0
    while True:
        # as a user would: --resume once the stage has started (killed earlier, there is nothing to resume)
        resume = ["--resume"] if os.path.isdir(out + "/stage1") else []
        seen = steps_logged(out)
        proc = subprocess.Popen(cli(out, *resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills == 4:
            assert proc.wait(timeout=300) == 0
            break
        while proc.poll() is None and steps_logged(out) <= seen:  # training has moved on: kill at a random moment
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.6))
        assert proc.poll() is None, "the run ended before it could be killed: give it more steps"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    a = load_file(os.path.join(train.checkpoint_dir(str(tmp_path / "full" / "stage1")), "model.safetensors"))
    b = load_file(os.path.join(train.checkpoint_dir(out + "/stage1"), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x)["loss"] for x in open(tmp_path / "full" / "stage1" / "metrics.jsonl")]
    rb = [json.loads(x)["loss"] for x in open(out + "/stage1/metrics.jsonl")]
    assert ra == rb


def test_bad_record_met_mid_stage_keeps_the_steps_done(tmp_path):
    """Records are checked when read: a bad line far into a file is met after some steps; those are saved."""
    lines = [json.dumps({"text": f"sample number {i} " * 4}) for i in range(2000)]
    lines[1500] = "{not json"
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, stage="1", max_steps=200, packing_length=1024, data=[f"t={tmp_path / 't.jsonl'}"])
    logs = []
    with pytest.raises(DataError, match=r"t.jsonl:1501: malformed JSON"):
        train.run(cfg, SMALL, log=logs.append)
    stage = str(tmp_path / "run" / "stage1")
    state = train.load_train_state(train.checkpoint_dir(stage))
    assert 0 < state["step"] < 200 and any("bad data at step" in line for line in logs)
    # resuming with the record skipped continues from that checkpoint
    out = train.run(replace(cfg, resume=True, on_bad="skip", max_skip_rate=0.5), SMALL, **QUIET)
    assert out["stages"]["stage1"].steps == 200
