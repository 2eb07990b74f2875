"""train.py: each stage trains exactly its table's modules, resume (after Ctrl-C) equals the uninterrupted run
bit for bit, non-finite steps are skipped and counted, the schedule, the flags, atomic checkpoints, and a
JSONL dataset on disk trained and evaluated end to end."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import evaluate
import train
from model import MLLM
from test_data import FORMATS, write_records

# a smaller tiny model and short packed batches keep each run to a few seconds on 2 cores
SMALL = {"text.num_layers": 2, "vision.depth": 1, "vision.fullatt_blocks": (0,)}


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), device="cpu", max_steps=3, packing_length=256, log_every=1000,
                eval=False, peak_tflops=1.0)
    return train.TrainConfig(**{**base, **kw})


def weights(path):
    return load_file(os.path.join(common.checkpoint_dir(path), "model.safetensors"))


def changed_groups(before, after):
    return {train.module_group(k) for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_stage_trains_exactly_its_modules(tmp_path, stage):
    cfg = config(tmp_path, stage=stage, max_steps=2)
    before = {k: v.detach().clone() for k, v in
              train.build_model(cfg.preset, None, SMALL, cfg.seed).state_dict().items()}
    out = train.run(cfg, SMALL, log=lambda *a: None)
    after = weights(out["stages"][f"stage{stage}"].checkpoint)
    after["decoder.lm_head.weight"] = after["decoder.embed_tokens.weight"]  # tied: saved once
    assert after.keys() == before.keys()
    assert changed_groups(before, after) == set(train.STAGES[int(stage)].trains)
    # frozen groups are unchanged bit for bit, trained ones moved in (nearly) every tensor
    for k in before:
        if train.module_group(k) in train.STAGES[int(stage)].trains:
            assert not torch.equal(before[k], after[k]) or k.endswith("bias"), k


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, monkeypatch):
    full = train.run(config(tmp_path / "a", stage="2", max_steps=4), SMALL, log=lambda *a: None)
    real_forward, calls = MLLM.forward, []

    def forward_with_ctrl_c(self, batch, loss_divisor=None):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C arrives during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, batch, loss_divisor)

    monkeypatch.setattr(MLLM, "forward", forward_with_ctrl_c)
    cut = train.run(config(tmp_path / "b", stage="2", max_steps=4), SMALL, log=lambda *a: None)
    assert cut["stages"]["stage2"].status == "interrupted" and cut["stages"]["stage2"].step == 2
    monkeypatch.setattr(MLLM, "forward", real_forward)
    resumed = train.run(config(tmp_path / "b", stage="2", max_steps=4, resume=True), SMALL, log=lambda *a: None)
    assert resumed["stages"]["stage2"].step == 4
    a, b = weights(full["stages"]["stage2"].checkpoint), weights(resumed["stages"]["stage2"].checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in open(tmp_path / "a" / "run" / "stage2" / "metrics.jsonl")]
    rb = [json.loads(x) for x in open(tmp_path / "b" / "run" / "stage2" / "metrics.jsonl")]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def nan_on_steps(monkeypatch, bad_steps):
    real_forward, calls = MLLM.forward, []

    def forward(self, batch, loss_divisor=None):
        calls.append(1)
        loss, stats = real_forward(self, batch, loss_divisor)
        return (loss * float("nan"), stats) if len(calls) in bad_steps else (loss, stats)

    monkeypatch.setattr(MLLM, "forward", forward)


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, {2})
    out = train.run(config(tmp_path, stage="1", max_steps=3), SMALL, log=lambda *a: None)
    res = out["stages"]["stage1"]
    assert res.status == "done" and res.bad_steps == 1 and res.step == 3
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stage1" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [False, True, False] and rows[1]["loss"] is None


def test_stops_after_k_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, set(range(1, 100)))
    lines = []
    cfg = config(tmp_path, stage="1", max_steps=10, max_bad_steps=2)
    out = train.run(cfg, SMALL, log=lines.append)
    res = out["stages"]["stage1"]
    assert res.step == 2 and res.bad_steps == 2 and res.status.startswith("stopped")
    assert any("2 non-finite-loss steps in a row" in line for line in lines)
    before = train.build_model(cfg.preset, None, SMALL, cfg.seed).state_dict()
    after = weights(res.checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in after)  # no update was applied


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 100, 10
    f = [train.lr_factor(s, total, warmup) for s in range(total)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup] == pytest.approx(1.0) and f[-1] == pytest.approx(train.MIN_LR_RATIO)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))
    assert f[warmup + (total - 1 - warmup) // 2] == pytest.approx((1 + train.MIN_LR_RATIO) / 2, abs=0.02)


def test_accelerator_rng_state_is_saved_and_restored(monkeypatch):
    """An NPU's generator state (torch.npu once torch_npu is imported) goes into the checkpoint and back, as
    the CUDA one does: here a stand-in module with the same calls."""
    class FakeNpu:
        state = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
        is_available = staticmethod(lambda: True)
        get_rng_state_all = staticmethod(lambda: [t.clone() for t in FakeNpu.state])

        @staticmethod
        def set_rng_state_all(states):
            FakeNpu.state = [t.clone() for t in states]

    monkeypatch.setattr(torch, "npu", FakeNpu, raising=False)
    saved = train.rng_state()
    FakeNpu.state = [torch.tensor([9], dtype=torch.uint8)]
    train.set_rng_state(saved)
    assert torch.equal(FakeNpu.state[0], torch.tensor([1, 2, 3], dtype=torch.uint8))
    train.set_rng_state({**saved, "npu": None})  # a checkpoint from a machine without one leaves it alone


def test_dtype_defaults_to_bf16_on_accelerators():
    assert [train.resolve_dtype("auto", d) for d in ("cpu", "cuda", "npu")] == ["fp32", "bf16", "bf16"]
    assert train.resolve_dtype("fp32", "cuda") == "fp32" and train.resolve_dtype("bf16", "cpu") == "bf16"


def test_optimizer_groups_follow_the_stage_table():
    model = MLLM(train.config_from_preset("tiny", **SMALL))
    for n, stage in train.STAGES.items():
        train.set_trainable(model, stage)
        opt = train.build_optimizer(model, stage, stage.lr, train.TrainConfig(), "cpu")
        lrs = {g["module"]: g["base_lr"] for g in opt.param_groups}
        assert lrs == {m: stage.lr * stage.lr_mult[m] for m in stage.trains}
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            assert (id(p) in owned) == (train.module_group(name) in stage.trains) == p.requires_grad, (n, name)
    assert train.STAGES[2].lr_mult["vision"] < train.STAGES[2].lr_mult["decoder"]  # the ViT learns slower


def test_every_config_field_is_a_flag_with_help(capsys):
    parser = train.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in train.fields(train.TrainConfig):
        assert actions[f.name].help
    for name, _, _ in train.model_fields():
        assert actions["model." + name].help
    cfg, overrides = train.parse_args(["--stage", "2", "--text-num-layers", "3", "--vision-fullatt-blocks", "0",
                                       "--text-mrope-section", "none", "--data", "a=x.jsonl:2", "--data", "b=y.jsonl"])
    assert cfg.stage == "2" and cfg.datasets == ["a=x.jsonl:2", "b=y.jsonl"] and cfg.out == os.path.join("runs", "tiny")
    assert overrides == {"text.num_layers": 3, "vision.fullatt_blocks": (0,), "text.mrope_section": None}
    assert train.config_from_preset("tiny", **overrides).text.num_layers == 3
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "4"])
    with pytest.raises(SystemExit):
        train.parse_args(["--vision-depth", "x"])
    assert "argument --vision-depth: invalid int value: 'x'" in capsys.readouterr().err


def test_each_bound_is_taken_at_its_value_and_refused_past_it(tmp_path):
    """train.BOUNDS: a strict bound is refused at its value (--lr 0), the others taken there (--warmup 0)."""
    cfg = train.TrainConfig(out=str(tmp_path / "run"))
    for name, (bound, strict) in train.BOUNDS.items():
        if not strict:
            train.check_config(train.replace(cfg, **{name: bound}), {})
        past = bound if strict else bound - 1
        with pytest.raises(SystemExit, match=f"^{train.flag(name)} {past}: must be {'>' if strict else '>='} {bound}$"):
            train.check_config(train.replace(cfg, **{name: past}), {})
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("keep_last", [1, 2])
def test_checkpoint_is_atomic_and_latest_points_to_the_newest(tmp_path, keep_last):
    out = train.run(config(tmp_path, stage="1", max_steps=3, ckpt_every=1, keep_last=keep_last), SMALL,
                    log=lambda *a: None)
    stage_dir = tmp_path / "run" / "stage1"
    kept = ["step-000002", "step-000003"][-keep_last:]
    assert sorted(set(os.listdir(stage_dir)) - {"loss.png"}) == ["args.json", "first_samples.jsonl", "latest",
                                                                 "metrics.jsonl", *kept]
    assert common.checkpoint_dir(str(stage_dir)) == out["stages"]["stage1"].checkpoint
    state = train.load_train_state(out["stages"]["stage1"].checkpoint)
    assert state["step"] == 3 and state["stage"] == 1 and "state" in state["optimizer"] and state["loader"]["batches"] == 3


@pytest.mark.requires("matplotlib")
def test_stage_writes_loss_png(tmp_path, capsys):
    """`python train.py --stage 1 --max-steps 5` on a fresh install of requirements.txt draws the loss curve."""
    train.main(["--stage", "1", "--max-steps", "5", "--out", str(tmp_path / "run"), "--device", "cpu",
                "--packing-length", "256", "--peak-tflops", "1", "--text-num-layers", "2", "--vision-depth", "1",
                "--vision-fullatt-blocks", "0"])
    png = tmp_path / "run" / "stage1" / "loss.png"
    out = capsys.readouterr().out
    assert f"wrote {png}" in out and "fp32 compute on cpu" in out  # the start line states --dtype auto's pick
    assert "stage 1: MFU against 1 TFLOP/s per device (--peak-tflops 1)" in out  # the peak and its source
    with Image.open(png) as img:
        assert img.format == "PNG" and len(np.unique(np.asarray(img.convert("L")))) > 2  # drawn on, not blank


def make_jsonl(tmp_path, n):
    """A LLaVA-style colour dataset: PNGs of one coloured square on disk, the question and the answer."""
    colors = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220)}
    (tmp_path / "img").mkdir()
    with open(tmp_path / "colors.jsonl", "w") as f:
        for i in range(n):
            name = list(colors)[i % 3]
            img = Image.new("RGB", (56, 56), (255, 255, 255))
            img.paste(colors[name], (8 + i % 5, 8, 40 + i % 5, 40))
            img.save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the square?"},
                {"from": "gpt", "value": name}]}) + "\n")
    return tmp_path / "colors.jsonl"


def test_jsonl_dataset_trains_and_evaluates_end_to_end(tmp_path, capsys):
    path = make_jsonl(tmp_path, 12)
    cfg = config(tmp_path, stage="3", max_steps=20, packing_length=512, lr=3e-3, warmup=2,
                 datasets=[f"colors={path}:1"], image_root=str(tmp_path / "img"))
    out = train.run(cfg, SMALL, log=lambda *a: None)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stage3" / "metrics.jsonl")]
    assert out["stages"]["stage3"].status == "done" and rows[-1]["loss"] < rows[0]["loss"] / 2
    evaluate.main(["--ckpt", cfg.out, "--tasks", "", "--data", f"colors={path}", "--image-root",
                   str(tmp_path / "img"), "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "eval.json"))
    res = report["checkpoints"]["stage3"]["results"]["colors"]
    assert res["n"] == 12 and res["metric"] == "vqa" and 0 <= res["score"] <= 1
    # 20 steps teach the reply format (a colour word, then <|im_end|>), not yet the colours themselves
    predictions = [json.loads(x) for x in open(tmp_path / "predictions.jsonl")]
    assert len(predictions) == 12 and {"id", "prompt", "prediction", "reference", "score"} <= set(predictions[0])
    assert all(p["prediction"] in ("red", "green", "blue") for p in predictions[:3])
    assert "| stage3 |" in capsys.readouterr().out


def test_every_data_format_trains_and_evaluates(tmp_path):
    """--data name=path: JSONL, a JSON array, OpenAI messages (JSONL, JSON), Parquet and Arrow with image bytes,
    told from the file, mixed in one run (256 buffered reads: each file is read) and each evaluated."""
    paths = {fmt.replace(".", "_"): write_records(tmp_path, fmt, ["red"] * 4)[0] for fmt in FORMATS}
    cfg = config(tmp_path, stage="3", max_steps=2, datasets=[f"{k}={p}:1" for k, p in paths.items()],
                 image_root=str(tmp_path))
    assert train.run(cfg, SMALL, log=lambda *a: None)["stages"]["stage3"].status == "done"
    rows = [json.loads(x) for x in open(tmp_path / "run" / "stage3" / "metrics.jsonl")]
    assert len(rows) == 2 and rows[0]["loss_tokens"] > 0 and rows[0]["loss_tokens"] % 4 == 0  # "red<|im_end|>" each
    evaluate.main(["--ckpt", cfg.out, *(f"--data={k}={p}" for k, p in paths.items()), "--image-root", str(tmp_path),
                   "--out", str(tmp_path), "--max-new-tokens", "2"])
    results = json.load(open(tmp_path / "eval.json"))["checkpoints"]["stage3"]["results"]
    assert list(results) == list(paths) and all(r["n"] == 4 for r in results.values())


def test_stage3_lengths_change_what_the_runs_see(tmp_path):
    """The longer stage-3 run trains on whole conversations the shorter one cuts at turn boundaries, and on
    images at a larger pixel budget; metrics.jsonl shows both."""
    rows, pixels = {}, {}
    for length in (256, 512):
        cfg = config(tmp_path, stage="3", max_steps=8, packing_length=length, out=str(tmp_path / f"run{length}"))
        train.run(cfg, SMALL, log=lambda *a: None)
        stage = tmp_path / f"run{length}" / "stage3"
        rows[length] = [json.loads(x) for x in open(stage / "metrics.jsonl")]
        pixels[length] = json.load(open(stage / "args.json"))["pixels"]
    assert max(r["longest_sample"] for r in rows[512]) > 256  # samples the 256-token run cannot hold
    assert max(r["longest_sample"] for r in rows[256]) <= 256
    assert rows[256][-1]["truncated_samples"] > rows[512][-1]["truncated_samples"]  # ... which it cut instead
    assert pixels[512][1] == 2 * pixels[256][1] and all(0 < r["image_token_share"] < 1 for r in rows[512])
    assert rows[512][-1]["dev_loss"] > 0 and "dev_loss" not in rows[512][0]  # measured at the stage's end


def test_fit_keeps_whole_turns_and_their_images():
    from data import Tokenizer, encode, fit
    from tasks import SyntheticTasks
    tok = Tokenizer()
    source = SyntheticTasks(["vqa_color"], "train", 0, "instruct", max_turns=10)
    record = next(source[i] for i in range(100) if len(source[i]["conversations"]) >= 8)
    sample = encode(record, tok)
    cut = fit(sample, len(sample.tokens) // 2, truncate=True)
    assert cut.cut_from == len(sample.tokens) and len(cut.tokens) <= len(sample.tokens) // 2
    assert cut.tokens == sample.tokens[:len(cut.tokens)] and len(cut.tokens) in sample.turn_ends
    assert cut.tokens[-1] == tok.im_end_id  # it ends with a whole reply and its end-of-turn token
    assert 0 < len(cut.images) < len(sample.images)
    assert cut.tokens.count(tok.image_pad_id) == sum(h * w // 4 for _, (_, h, w) in cut.images)
    replies = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    kept = tok.decode([t for t in cut.labels if t != -100])
    assert kept == "".join(r + "<|im_end|>" for r in replies[:len(cut.turn_ends)])
