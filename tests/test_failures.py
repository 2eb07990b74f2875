"""Nothing lost, nothing hidden: every bad flag, path, record or image gets an error that names it, found
before the run directory is touched (its files hash the same before and after); skipped samples are
counted and reported; a second run on a directory is refused; kill -9 at any moment resumes exactly."""
import hashlib
import json
import os
import random
import re
import shutil
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

import common
import data
import evaluate
import train
from conftest import requires
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
    b = load_file(os.path.join(common.checkpoint_dir(str(stage)), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_creates_a_missing_out_before_evaluating(done_run, tmp_path):
    out = tmp_path / "not" / "yet"
    evaluate.main(["--ckpt", done_run.out + "/stage1", "--tasks", "vqa_color", "--eval-n", "2", "--max-new-tokens", "2",
                   "--out", str(out)])
    assert json.load(open(out / "eval.json"))["checkpoints"]["stage1"]["results"]["vqa_color"]["n"] == 2


# ----------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("flags,match", [
    (["--max-steps", "-1"], "--max-steps -1: must be >= 1"),
    (["--packing-length", "0"], "--packing-length 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be > 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
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
    refused(replace(done_run, datasets=[f"a={path}", f"a={path}:2"]), "the name 'a' is given 2 times")


def test_resume_of_a_missing_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no run to resume in "):
        train.run(config(tmp_path, stage="1", resume=True), SMALL, **QUIET)
    assert not os.path.exists(tmp_path / "run")


def test_too_short_packing_length_names_the_flag(done_run, tmp_path):
    path = make_jsonl(tmp_path, 3)
    refused(replace(done_run, datasets=[f"c={path}"], image_root=str(tmp_path / "img"), packing_length=8),
            r"colors.jsonl:\d+ .*> the packing length 8 \(raise --packing-length", error=DataError)
    # skipping cannot help when no sample fits: the loader gives up instead of spinning
    cfg = replace(done_run, datasets=[f"c={path}"], image_root=str(tmp_path / "img"), packing_length=8,
                        on_bad="skip", max_skip_rate=1.0)
    with pytest.raises(DataError, match="c: too long x"):
        loader = PackedLoader(train.build_source(cfg, 1, train.STAGES[1]), Tokenizer(), 8, on_bad="skip",
                              patience=50)
        next(loader)
    assert "--truncate" in train.build_parser().format_help()


def test_truncated_checkpoint_names_its_file(done_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src = common.checkpoint_dir(done_run.out + "/stage1")
    (ckpt / "config.json").write_bytes(open(os.path.join(src, "config.json"), "rb").read())
    blob = open(os.path.join(src, "model.safetensors"), "rb").read()
    (ckpt / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    refused(replace(done_run, stage="2", init_from=str(ckpt)), r"ckpt/model.safetensors: cannot read",
            {}, error=ValueError)
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: cannot read"):
        evaluate.main(["--ckpt", str(ckpt), "--tasks", "vqa_color", "--eval-n", "1", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- bad data, counted

def bad_lines_jsonl(tmp_path, n_bad, n_good=1):
    path = make_jsonl(tmp_path, n_good)
    with open(path, "a") as f:
        f.writelines("{not json\n" for _ in range(n_bad))
    return path


def test_mostly_bad_file_stops_the_run_naming_it(done_run, tmp_path):
    path = bad_lines_jsonl(tmp_path, 30)
    refused(replace(done_run, datasets=[f"c={path}"], image_root=str(tmp_path / "img"), on_bad="skip"),
            r"data source 'c': \d+ of \d+ samples skipped \(9\d%\), more than --max-skip-rate 0.1 \(c: malformed "
            r"JSON x\d+\); last: .*colors.jsonl:\d+: malformed JSON", error=DataError)


def test_skips_are_reported_in_the_log_and_metrics(tmp_path):
    path = bad_lines_jsonl(tmp_path, 2, n_good=12)
    lines = []
    cfg = config(tmp_path, stage="3", max_steps=2, datasets=[f"c={path}"], image_root=str(tmp_path / "img"),
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
        # a random moment a few steps past the last life's progress (a step, a checkpoint write, a rename)
        target = seen + rng.randint(1, 5)
        while proc.poll() is None and steps_logged(out) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        assert proc.poll() is None, "the run ended before it could be killed: give it more steps"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    a = load_file(os.path.join(common.checkpoint_dir(str(tmp_path / "full" / "stage1")), "model.safetensors"))
    b = load_file(os.path.join(common.checkpoint_dir(out + "/stage1"), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x)["loss"] for x in open(tmp_path / "full" / "stage1" / "metrics.jsonl")]
    rb = [json.loads(x)["loss"] for x in open(out + "/stage1/metrics.jsonl")]
    assert ra == rb


def test_bad_record_met_mid_stage_keeps_the_steps_done(tmp_path):
    """Records are checked when read: a bad line far into a file is met after some steps; those are saved."""
    lines = [json.dumps({"text": f"sample number {i} " * 4}) for i in range(2000)]
    lines[1500] = "{not json"
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, stage="1", max_steps=200, packing_length=1024, datasets=[f"t={tmp_path / 't.jsonl'}"])
    logs = []
    with pytest.raises(DataError, match=r"t.jsonl:1501: malformed JSON"):
        train.run(cfg, SMALL, log=logs.append)
    stage = str(tmp_path / "run" / "stage1")
    state = train.load_train_state(common.checkpoint_dir(stage))
    assert 0 < state["step"] < 200 and any("bad data at step" in line for line in logs)
    # resuming with the record skipped continues from that checkpoint
    out = train.run(replace(cfg, resume=True, on_bad="skip", max_skip_rate=0.5), SMALL, **QUIET)
    assert out["stages"]["stage1"].step == 200


# ----------------------------------------------------------------------------- outputs never replace what others wrote

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 3-step stage-1 run with a checkpoint after every step (step-000001..3)."""
    cfg = config(tmp_path_factory.mktemp("ckpts"), stage="1", max_steps=3, ckpt_every=1, keep_last=3)
    train.run(cfg, SMALL, **QUIET)
    return cfg


def copy_of(cfg, tmp_path):
    shutil.copytree(cfg.out, tmp_path / "run")
    return replace(cfg, out=str(tmp_path / "run"))


def one_line_error(main, argv):
    """The message of the SystemExit common.cli ends `main(argv)` with (what the user sees): one line."""
    with pytest.raises(SystemExit) as e:
        common.cli(main, argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


def test_existing_run_needs_resume_or_overwrite(done_run):
    before = tree_hash(done_run.out)
    with pytest.raises(SystemExit, match=r"--out .*run holds a run \(stage1\): --resume continues it, --overwrite "
                                         r"starts over"):
        train.run(done_run, SMALL, **QUIET)
    assert tree_hash(done_run.out) == before
    with pytest.raises(SystemExit, match="give one of them"):
        train.run(replace(done_run, resume=True, overwrite=True), SMALL, **QUIET)


def test_average_never_replaces_what_it_did_not_write(checkpointed, done_run, tmp_path):
    stage = os.path.join(checkpointed.out, "stage1")
    a, b = os.path.join(stage, "step-000002"), os.path.join(stage, "step-000003")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("{}\n")
    for out, match in [(done_run.out, r"holds what this command did not write \(\.lock, stage1\)"),
                       (checkpointed.out, "overlaps the input"),
                       (str(data_dir), r"holds what this command did not write \(train.jsonl\)"),
                       (a, "overlaps the input"), (stage, "overlaps the input")]:
        before = tree_hash(out)
        message = one_line_error(evaluate.main, ["--average", a, b, "--out", out])
        assert message.startswith(f"error: --out {out}: ") and re.search(match, message), message
        assert tree_hash(out) == before
    assert "train.jsonl: is a file" in one_line_error(evaluate.main, ["--average", a, b, "--out",
                                                                     str(data_dir / "train.jsonl")])
    # stage directories (README's example) and a rerun over its own earlier output both work
    out = str(tmp_path / "avg")
    for _ in range(2):
        evaluate.main(["--average", stage, a, "--out", out])
    mean = load_file(os.path.join(out, "model.safetensors"))
    wa, wb = (load_file(os.path.join(c, "model.safetensors")) for c in (b, a))  # stage1's latest is step 3
    assert all(torch.allclose(mean[k], (wa[k].double() / 2 + wb[k].double() / 2).to(mean[k].dtype), atol=1e-7)
               for k in mean)
    (tmp_path / "avg" / "notes.txt").write_text("mine")
    assert "did not write (notes.txt)" in one_line_error(evaluate.main, ["--average", a, b, "--out", out])
    evaluate.main(["--average", a, b, "--out", out, "--overwrite"])  # only its own files are replaced
    assert (tmp_path / "avg" / "notes.txt").read_text() == "mine"
    assert json.load(open(tmp_path / "avg" / "averaged_from.json"))["checkpoints"] == [a, b]


def test_export_hf_never_replaces_a_downloaded_model(done_run, tmp_path):
    ckpt = common.checkpoint_dir(os.path.join(done_run.out, "stage1"))
    downloaded = tmp_path / "Qwen2-0.5B"  # what a user fetched from the Hub: files export_hf does not write
    downloaded.mkdir()
    for name in ("config.json", "model.safetensors", "README.md", "generation_config.json"):
        (downloaded / name).write_text("{}")
    before = tree_hash(downloaded)
    message = one_line_error(evaluate.main, ["--export-hf", str(downloaded), "--ckpt", ckpt, "--decoder-only"])
    assert "holds what this command did not write (README.md" in message and tree_hash(downloaded) == before
    out = str(tmp_path / "hf")
    for _ in range(2):  # its own earlier export is replaced
        evaluate.main(["--export-hf", out, "--ckpt", os.path.join(done_run.out, "stage1"), "--decoder-only"])
    assert json.load(open(os.path.join(out, "exported_from.json")))["checkpoint"] == ckpt


# ----------------------------------------------------------------------------- --resume never starts over

@pytest.mark.parametrize("damage", ["no latest", "latest names a deleted checkpoint", "truncated train_state.pt",
                                    "truncated model.safetensors"])
def test_resume_continues_from_the_newest_complete_checkpoint(checkpointed, tmp_path, damage):
    cfg = copy_of(checkpointed, tmp_path)
    stage = os.path.join(cfg.out, "stage1")
    newest = os.path.join(stage, "step-000003")
    want = {k: v.clone() for k, v in load_file(os.path.join(newest, "model.safetensors")).items()}  # not the mmap
    if damage == "no latest":
        os.remove(os.path.join(stage, "latest"))
    elif damage == "latest names a deleted checkpoint":
        shutil.rmtree(newest)
    else:
        file = os.path.join(newest, damage.split()[-1])
        blob = open(file, "rb").read()
        open(file, "wb").write(blob[:len(blob) // 2])
    lines = []
    result = train.run(replace(cfg, resume=True), SMALL, log=lines.append)["stages"]["stage1"]
    took = "step-000003" if damage == "no latest" else "step-000002"
    said = [line for line in lines if line.startswith("--resume: ") and f"resuming from {os.path.join(stage, took)}"
            in line]
    assert len(said) == 1, lines
    assert {"no latest": "has no `latest` file", "latest names a deleted checkpoint": "no such directory",
            "truncated train_state.pt": "train_state.pt: cannot read the training state",
            "truncated model.safetensors": "damaged"}[damage] in said[0]
    assert not any("starting over" in line for line in lines) and result.step == 3
    # continued exactly: step 3 retrained from step 2 equals the step 3 the uninterrupted run wrote
    got = load_file(os.path.join(result.checkpoint, "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [json.loads(x)["step"] for x in open(os.path.join(stage, "metrics.jsonl"))] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_is_refused_and_deletes_nothing(checkpointed, tmp_path):
    cfg = copy_of(checkpointed, tmp_path)
    for step in (1, 2, 3):
        open(os.path.join(cfg.out, "stage1", f"step-00000{step}", "train_state.pt"), "wb").write(b"")
    refused(replace(cfg, resume=True), r"--resume: .*stage1 has no complete checkpoint \(.*step-000003/train_state.pt:"
            r" cannot read the training state.*; start over with --overwrite")


def test_resume_refuses_changed_model_flags_and_names_the_flags_it_takes(checkpointed, tmp_path):
    cfg = copy_of(checkpointed, tmp_path)
    refused(replace(cfg, resume=True), r"fixes the model; this command changes --text-hidden-size 128 \(was the "
            r"preset\)", {**SMALL, "text.hidden_size": 128})
    refused(replace(cfg, resume=True, preset="tiny-moe"), r"changes --preset tiny-moe \(was tiny\)")
    refused(replace(cfg, resume=True), r"--text-num-layers 3 \(was 2\)", {**SMALL, "text.num_layers": 3})
    lines = []
    train.run(replace(cfg, resume=True, lr=1e-3, max_steps=4), {}, log=lines.append)  # model flags may be left out
    taken = [line for line in lines if "--resume: taking the changed flags" in line]
    assert len(taken) == 1 and "--max-steps 4 (was 3)" in taken[0] and "--lr 0.001 (was the default)" in taken[0]
    args = json.load(open(os.path.join(cfg.out, "stage1", "args.json")))
    assert args["train_config"]["lr"] == 1e-3 and args["model_overrides"]["text.num_layers"] == 2
    state = train.load_train_state(common.checkpoint_dir(os.path.join(cfg.out, "stage1")))
    assert state["step"] == 4 and state["total_steps"] == 4


# ----------------------------------------------------------------------------- no loss tokens

def test_a_step_without_loss_tokens_is_skipped_and_counted(tmp_path):
    """No target in the step (every reply cut away): no update, no ZeroDivisionError, counted apart."""
    cfg = config(tmp_path, stage="3")
    m = train.build_model("tiny", None, SMALL, 0)
    sample = data.encode({"task": "t", "format": "text", "text": "some text"}, Tokenizer())
    batch = data.collate([sample])
    batch.labels[:] = data.IGNORE
    loss, stats = m(batch, loss_divisor=0.0)  # the model alone: 0, not 0 / 0
    assert float(loss.detach()) == 0.0 and stats["n_loss_tokens"] == 0
    st = train.StageRun.plan(cfg, 3)
    st.model, st.optimizer = m, train.build_optimizer(m, st.stage, 1e-3, cfg, "cpu")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dist = train.parallel.Dist(0, 1)
    s = train.train_step(m, [p for g in st.optimizer.param_groups for p in g["params"]], [batch, batch], cfg, dist,
                         train.StopRequested(), 0)
    train.optimizer_step(st, s["finite"], dist, s["empty"])
    assert s["empty"] and s["loss_tokens"] == 0 and st.empty_steps == 1 and st.bad_steps == 0 and st.step == 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_samples_whose_reply_truncate_cuts_away_are_dropped_and_reported(tmp_path):
    path = make_jsonl(tmp_path, 12)
    long_prompt = {"image": "0.png", "conversations": [{"from": "human", "value": "<image>\n" + "why? " * 300},
                                                        {"from": "gpt", "value": "red"}]}
    with open(path, "a") as f:
        f.writelines(json.dumps(long_prompt) + "\n" for _ in range(2))
    lines = []
    cfg = config(tmp_path, stage="3", max_steps=2, datasets=[f"c={path}"], image_root=str(tmp_path / "img"),
                 truncate=True, log_every=1)
    result = train.run(cfg, SMALL, log=lines.append)["stages"]["stage3"]
    assert result.status == "done"
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stage3" / "metrics.jsonl")]
    assert all(r["loss_tokens"] > 0 and r["loss"] is not None for r in rows) and rows[-1]["skipped_samples"] > 0
    assert any(f"c: reply cut away by --truncate x{rows[-1]['skipped_samples']}" in line for line in lines)
    with pytest.raises(DataError, match=r"cuts away its whole reply"):
        data.fit(data.encode(FileDataset(path, str(tmp_path / "img"))[12], Tokenizer()), 256, truncate=True)


# ----------------------------------------------------------------------------- one line, naming the file

def test_disk_full_says_so_and_what_is_kept(checkpointed, tmp_path, monkeypatch):
    cfg = copy_of(checkpointed, tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # the train_state.pt write of the next checkpoint meets a full disk
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--stage", "1", "--max-steps", "5", "--resume", "--out", cfg.out, "--device", "cpu", "--packing-length",
            "256", "--peak-tflops", "1", "--ckpt-every", "1", "--keep-last", "3", "--text-num-layers", "2",
            "--vision-depth", "1", "--vision-fullatt-blocks", "0"]
    message = one_line_error(train.main, argv)
    monkeypatch.setattr(torch, "save", real_save)
    stage = os.path.join(cfg.out, "stage1")
    assert message.startswith("error: no space left on device") and \
        f"kept: {os.path.join(stage, 'step-000003')} (complete; --resume continues from there)" in message
    assert not [d for d in os.listdir(stage) if d.startswith(".tmp")]  # the half-written checkpoint is removed
    assert common.checkpoint_dir(stage) == os.path.join(stage, "step-000003")


def test_train_and_evaluate_errors_are_one_line(done_run, tmp_path):
    ckpt = common.checkpoint_dir(os.path.join(done_run.out, "stage1"))
    stage_copy = tmp_path / "stage1"
    shutil.copytree(os.path.dirname(ckpt), stage_copy)
    (stage_copy / "latest").write_text("step-000099")  # a `latest` naming a deleted checkpoint: the newest one
    assert evaluate.resolve_checkpoints(str(stage_copy))[0][1] == str(stage_copy / os.path.basename(ckpt))
    (tmp_path / "file").write_text("x")
    train_argv = ["--stage", "1", "--max-steps", "1", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"--out .*file: is a file"):
        train.main(train_argv + ["--out", str(tmp_path / "file")])
    shutil.copytree(ckpt, tmp_path / "cut")
    blob = open(tmp_path / "cut" / "model.safetensors", "rb").read()
    (tmp_path / "cut" / "model.safetensors").write_bytes(blob[:100])
    assert "cut/model.safetensors: cannot read" in one_line_error(
        evaluate.main, ["--ckpt", str(tmp_path / "cut"), "--tasks", "vqa_color", "--eval-n", "1", "--out", str(tmp_path)])
    assert "not a checkpoint, stage directory or run directory" in one_line_error(
        evaluate.main, ["--ckpt", str(tmp_path / "nowhere"), "--tasks", "vqa_color"])
    (tmp_path / "bad.json").write_bytes(b'[{"text": "caf\xe9"}]')
    assert "bad.json:1: not UTF-8 (byte 0xe9)" in one_line_error(
        evaluate.main, ["--ckpt", ckpt, "--tasks", "", "--data", f"b={tmp_path / 'bad.json'}", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError):  # --debug: the traceback (the exception itself) comes through
        common.cli(evaluate.main, ["--ckpt", str(tmp_path / "nowhere"), "--debug"])


# ----------------------------------------------------------------------------- data files

def test_json_array_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "one"}, {"text": "two"}], indent=1).encode())
    ds = FileDataset(str(path))
    assert ds.format == "json" and [ds[i]["text"] for i in range(2)] == ["one", "two"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\n')
    assert FileDataset(str(tmp_path / "bom.jsonl"))[0]["text"] == "one"


def test_bad_files_are_named(tmp_path):
    requires("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "latin1.json").write_bytes(b'[{"text": "one"},\n {"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1.json:2: not UTF-8 \(byte 0xe9\)"):
        FileDataset(str(tmp_path / "latin1.json"))
    pq.write_table(pa.table({"text": ["x" * 50] * 100}), tmp_path / "d.parquet", row_group_size=10)
    blob = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "d.parquet").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(DataError, match=r"d.parquet: cannot read the Parquet file .*truncated"):
        FileDataset(str(tmp_path / "d.parquet"))


def test_empty_file_and_zero_weights_name_the_flag(done_run, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    good = make_jsonl(tmp_path, 3)
    refused(replace(done_run, datasets=[f"e={tmp_path / 'empty.jsonl'}", f"c={good}"], image_root=str(tmp_path / "img")),
            r"--data e=.*empty.jsonl: the file holds no records")
    refused(replace(done_run, datasets=[f"c={good}:0"], image_root=str(tmp_path / "img")),
            r"--data: every weight is 0 \(c=.*:0\)")
