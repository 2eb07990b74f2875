"""audit.py end to end at a toy size (one seed; the two-level interval itself is tested in test_evaluate): every
comparison gets a paired difference inside its interval, the
picture is written, and a finished seed is read back instead of trained again."""
import json
import os

import pytest

import audit
import train

FLAGS = ["--device", "cpu", "--max-steps", "1", "--eval-n", "3", "--eval-dev-n", "3", "--tasks", "vqa_color,vqa_count",
         "--stage3-lengths", "256,512", "--resolutions", "28x28", "--peak-tflops", "1", "--log-every", "1000",
         "--text-num-layers", "2", "--vision-depth", "1", "--vision-fullatt-blocks", "0", "--eval-max-pixels", "3136"]


def test_audit_runs_seeds_and_reports_intervals(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "audit")
    audit.main(["--seeds", "1", "--out", out, *FLAGS])
    report = json.load(open(os.path.join(out, "audit.json")))
    labels = [r["comparison"] for r in report["table"]]
    assert len(labels) == 6 and labels[0].startswith("stage 2") and labels[-1].startswith("resolution search")
    for r in report["table"]:
        assert r["lo"] <= r["mean"] <= r["hi"] and r["a_mean"] - r["b_mean"] == pytest.approx(r["mean"])
    assert os.path.getsize(os.path.join(out, "audit.png")) > 0
    seed = json.load(open(os.path.join(out, "seed-1", "scores.json")))
    assert set(seed["scores"]) == {"stage3-256", "stage3-512", "stage3-avg", "no-stage2",
                                   "stage3-avg + resolution search"}
    assert all(len(v) == 3 for s in seed["scores"].values() for v in s.values())
    assert "| stage 2 (multitask pre-training)" in capsys.readouterr().out

    def no_training(*a, **k):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(train, "run", no_training)
    audit.main(["--seeds", "1", "--out", out, *FLAGS])
    assert json.load(open(os.path.join(out, "audit.json")))["table"] == report["table"]
    # --jobs 2: seed 1 is read back, seed 2 is trained by a child process (train.run above is patched only here)
    audit.main(["--seeds", "1,2", "--jobs", "2", "--out", out, *FLAGS])
    assert "stage3-avg" in open(os.path.join(out, "seed-2.log")).read()
    assert os.path.isfile(os.path.join(out, "seed-2", "scores.json")) and not os.path.exists(os.path.join(out, "seed-1.log"))
    assert "| comparison (2 seeds)" in capsys.readouterr().out


def test_search_gets_a_row_per_task_it_moved():
    def seed(ocr_gain):
        base = {"ocr": [0.0, 0.5, 0.0, 1.0], "vqa_color": [1.0, 0.0, 1.0, 1.0]}
        searched = {"ocr": [v + ocr_gain for v in base["ocr"]], "vqa_color": base["vqa_color"]}
        names = ["stage3-512", "stage3-1024", "no-stage2", "stage3-avg"]
        return {"scores": {n: base for n in names} | {"stage3-avg + resolution search": searched},
                "chosen": {"ocr": 12544, "vqa_color": 7056}}
    table = audit.audit_table([seed(0.25), seed(0.5)], [512, 1024], default=7056)
    rows = {r["comparison"]: r for r in table}
    assert "resolution search vs the default, vqa_color alone" not in rows
    ocr = rows["resolution search vs the default, ocr alone"]
    assert ocr["mean"] == pytest.approx(0.375) and ocr["lo"] <= 0.375 <= ocr["hi"]
    assert rows["resolution search vs the default resolution"]["mean"] == pytest.approx(0.375 / 2)  # over both tasks


def test_a_stopped_seed_stops_the_audit_and_resumes(tmp_path, monkeypatch):
    out, calls = str(tmp_path / "audit"), []

    def fake_run(cfg, overrides, log=print):  # stage 1 stops (Ctrl-C), leaving its directory behind
        calls.append((cfg.out, cfg.resume))
        os.makedirs(os.path.join(cfg.out, "stage1"), exist_ok=True)
        return {"stages": {"stage1": train.StageResult("ckpt", 3, 0, "interrupted", 1.0)}}

    monkeypatch.setattr(train, "run", fake_run)
    for _ in range(2):
        with pytest.raises(SystemExit, match="stage1 interrupted; run the same command again to continue"):
            audit.main(["--seeds", "4", "--out", out, *FLAGS])
    assert calls == [(os.path.join(out, "seed-4"), False), (os.path.join(out, "seed-4"), True)]
