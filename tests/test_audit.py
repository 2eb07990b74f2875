"""audit.py end to end at a toy size (one seed; the two-level interval itself is tested in test_evaluate): every
comparison gets a paired difference inside its interval, the
picture is written, and a finished seed is read back instead of trained again."""
import json
import os

import pytest

import audit
import train

FLAGS = ["--device", "cpu", "--max-steps", "1", "--eval-n", "3", "--eval-dev-n", "3", "--tasks", "vqa_color,vqa_count",
         "--stage3-lengths", "256,512", "--resolutions", "784:784", "--peak-tflops", "1", "--log-every", "1000",
         "--text-num-layers", "2", "--vision-depth", "1", "--vision-fullatt-blocks", "0", "--eval-max-pixels", "3136"]


@pytest.mark.requires("matplotlib")  # audit.png
def test_audit_runs_seeds_and_reports_intervals(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "audit")
    audit.main(["--seeds", "1", "--out", out, *FLAGS])
    report = json.load(open(os.path.join(out, "audit.json")))
    labels = [r["comparison"] for r in report["table"]]
    assert len(labels) == 9 and labels[0].startswith("stage 2") and labels[-1].startswith("average + search")
    for r in report["table"]:
        assert r["lo"] <= r["mean"] <= r["hi"] and r["a_mean"] - r["b_mean"] == pytest.approx(r["mean"])
    assert os.path.getsize(os.path.join(out, "audit.png")) > 0
    seed = json.load(open(os.path.join(out, "seed-1", "scores.json")))
    assert set(seed["scores"]) == {"stage3-256", "stage3-512", "stage3-avg", "no-stage2", "stage3-avg (dev weight)",
                                   *(f"{n} + resolution search" for n in ("stage3-256", "stage3-512", "stage3-avg"))}
    assert 0 < seed["averaging"]["dev_alpha"] < 1
    assert all(len(v) == 3 for s in seed["scores"].values() for v in s.values())
    assert "| stage 2 vs stage 3 from stage 1 given stage 2's steps too" in capsys.readouterr().out

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


def test_the_combination_rows_pair_the_right_runs():
    """The better single length is picked on test means; search on the average is compared with search on it."""
    def seed(gain):
        base = {"ocr": [0.0, 0.5, 0.0, 1.0], "vqa_color": [1.0, 0.0, 1.0, 1.0]}
        plus = {t: [v + gain for v in s] for t, s in base.items()}
        scores = {n: base for n in ("stage3-512", "no-stage2", "stage3-avg", "stage3-avg (dev weight)")}
        return {"scores": scores | {"stage3-1024": plus, "stage3-512 + resolution search": base,
                                    "stage3-1024 + resolution search": plus,
                                    "stage3-avg + resolution search": {t: [v + 2 * gain for v in s]
                                                                       for t, s in base.items()}}}
    rows = {r["comparison"]: r for r in audit.audit_table([seed(0.25), seed(0.5)], [512, 1024])}
    assert rows["average vs the better single length (stage3-1024)"]["mean"] == pytest.approx(-0.375)
    combination = rows["average + search vs stage3-1024 + search (the combination)"]
    assert combination["mean"] == pytest.approx(0.375) and combination["lo"] <= 0.375 <= combination["hi"]
    assert rows["resolution search on the average vs the average"]["mean"] == pytest.approx(0.75)


def test_a_stopped_seed_stops_the_audit_and_resumes(tmp_path, monkeypatch):
    out, calls = str(tmp_path / "audit"), []

    def fake_run(cfg, overrides, log=print):  # stage 1 stops (Ctrl-C), leaving its directory behind
        calls.append((cfg.out, cfg.resume))
        os.makedirs(os.path.join(cfg.out, "stage1"), exist_ok=True)
        stopped = train.replace(train.StageRun.plan(cfg, 1, os.path.join(cfg.out, "stage1")), step=3,
                                status="interrupted")
        return {"stages": {"stage1": stopped}}

    monkeypatch.setattr(train, "run", fake_run)
    for _ in range(2):
        with pytest.raises(SystemExit, match="stage1 interrupted; run the same command again to continue"):
            audit.main(["--seeds", "4", "--out", out, *FLAGS])
    assert calls == [(os.path.join(out, "seed-4"), False), (os.path.join(out, "seed-4"), True)]
