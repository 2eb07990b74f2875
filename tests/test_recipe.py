"""The default `python train.py` (--stage all) at a few steps: stages 1 and 2, stage 3 at two packing lengths with
the same token budget, their average, the evaluation of the stage-3 checkpoints and the resolution search, with
what it writes checked against itself: eval.json, results.md, results.png and the average's weights."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import train
from tasks import SYNTHETIC_TASKS

LENGTHS, STEPS, EVAL_N = (256, 512), 1, 1
RESOLUTIONS = ("3136:3136", "12544:1000000")  # MIN:MAX pixel budgets the search tries besides the default
CHECKPOINTS = [f"stage3-{n}" for n in LENGTHS] + ["stage3-avg"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    train.main(["--max-steps", str(STEPS), "--stage3-lengths", ",".join(map(str, LENGTHS)), "--packing-length", "256",
                "--eval-n", str(EVAL_N), "--eval-dev-n", str(EVAL_N), "--resolutions", ",".join(RESOLUTIONS),
                "--out", str(out), "--device", "cpu", "--peak-tflops", "1", "--log-every", "1000",
                "--text-num-layers", "2", "--vision-depth", "1", "--vision-fullatt-blocks", "0"])
    return out, json.loads((out / "eval.json").read_text())


def weights(stage_dir):
    return load_file(os.path.join(common.checkpoint_dir(str(stage_dir)), "model.safetensors"))


def test_stage3_runs_share_a_token_budget_and_average_to_their_mean(run):
    out, _ = run
    for n in LENGTHS:  # steps scale as the stage's own packing length / n: the same tokens at every length
        state = train.load_train_state(common.checkpoint_dir(str(out / f"stage3-{n}")))
        rows = [json.loads(line) for line in open(out / f"stage3-{n}" / "metrics.jsonl")]
        assert state["stage"] == 3 and state["step"] == round(STEPS * train.STAGES[3].packing_length / n)
        assert [r["step"] for r in rows] == list(range(1, state["step"] + 1))
        assert json.loads((out / f"stage3-{n}" / "args.json").read_text())["train_config"]["packing_length"] == n
    a, b, avg = (weights(out / name) for name in CHECKPOINTS)
    assert avg.keys() == a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(avg[k], ((a[k].double() + b[k].double()) / 2).to(a[k].dtype)) for k in a)


@pytest.mark.requires("matplotlib")  # results.png
def test_evaluation_scores_every_task_of_every_stage3_checkpoint(run):
    out, report = run
    assert list(report["checkpoints"]) == CHECKPOINTS
    assert report["checkpoints"]["stage3-avg"]["path"] == str(out / "stage3-avg")
    for name, c in report["checkpoints"].items():
        assert set(c["results"]) == set(SYNTHETIC_TASKS), name
        assert all(r["n"] == EVAL_N and 0 <= r["score"] <= 1 for r in c["results"].values()), name
    # stages 1 and 2 never saw an instruction prompt: their dev reply loss instead of scores
    assert set(report["dev_reply_loss_not_scored"]) == {"stage1", "stage2"}
    assert all(0 < v < math.inf for v in report["dev_reply_loss_not_scored"].values())
    table = (out / "results.md").read_text().strip().splitlines()
    assert table[0].split("|")[2:-2] == [f" {t} " for t in report["checkpoints"]["stage3-avg"]["results"]]
    rows = {r.split("|")[1].strip(): [float(x) for x in r.split("|")[2:-1]] for r in table[2:]}
    assert list(rows) == CHECKPOINTS + ["stage3-avg + resolution search"] and table == report["table"].splitlines()
    for name in CHECKPOINTS:  # the table's cells are eval.json's scores in %, then their mean
        scores = [100 * r["score"] for r in report["checkpoints"][name]["results"].values()]
        assert rows[name] == pytest.approx(scores + [sum(scores) / len(scores)], abs=0.051)
    with Image.open(out / "results.png") as img:
        assert img.format == "PNG" and len(np.unique(np.asarray(img.convert("L")))) > 2
    assert sum(1 for _ in open(out / "predictions.jsonl")) == len(CHECKPOINTS) * len(SYNTHETIC_TASKS) * EVAL_N


def test_resolution_search_chooses_among_its_candidates(run):
    out, report = run
    search = report["resolution_search"]
    # the default candidate is the budget the longest stage-3 run trained at
    trained = json.loads((out / f"stage3-{max(LENGTHS)}" / "args.json").read_text())["pixels"]
    candidates = {*RESOLUTIONS, f"{trained[0]}:{trained[1]}"}
    assert search["checkpoint"] == str(out / "stage3-avg") and set(search["dev"]) == candidates
    assert set(search["chosen"]) == set(SYNTHETIC_TASKS) and set(search["chosen"].values()) <= candidates
    default = report["checkpoints"]["stage3-avg"]["results"]
    for task, budget in search["chosen"].items():  # where the default stays, so does its test score
        if budget == f"{trained[0]}:{trained[1]}":
            assert search["test_searched"][task] == default[task]["score"], task
