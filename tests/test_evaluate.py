"""evaluate.py: the scorers on hand-made cases, checkpoint averaging (the mean; mismatched configs refused),
resolution search (argmax on the dev slice, ties, a real tiny run) and the command line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
from model import MLLM, config_from_preset
from tasks import SYNTHETIC_TASKS, TASK_METRIC

SMALL = {"text.num_layers": 1, "vision.depth": 1, "vision.fullatt_blocks": (0,)}


# ----------------------------------------------------------------------------- scorers


def test_vqa_accuracy():
    assert evaluate.vqa_accuracy("Two", "2") == 1.0  # number words, case
    assert evaluate.vqa_accuracy("the red.", "red") == 1.0  # articles, punctuation
    assert evaluate.vqa_accuracy("1.5", "15") == 0.0  # a decimal point is not punctuation
    assert evaluate.vqa_accuracy("blue", "red") == 0.0
    # ten annotators, two said "cat": each leave-one-out subset has 1 or 2 matches -> (2 * 1/3 + 8 * 2/3) / 10
    refs = ["cat", "cat"] + ["dog"] * 8
    assert evaluate.vqa_accuracy("cat", refs) == pytest.approx(0.6)
    assert evaluate.vqa_accuracy("dog", refs) == pytest.approx(1.0)  # >= 3 others agree in every subset


def test_anls():
    assert evaluate.anls("HELLO", "hello") == 1.0
    assert evaluate.anls("helo", "hello") == pytest.approx(1 - 1 / 5)  # one edit over max length 5
    assert evaluate.anls("abcdef", "abcxyz") == 0.0  # NL = 3/6 = 0.5 is not < 0.5
    assert evaluate.anls("abcdex", "abcdef") == pytest.approx(1 - 1 / 6)
    assert evaluate.anls("xyz", ["abc", "xyw"]) == pytest.approx(1 - 1 / 3)  # best reference
    assert evaluate.anls("", "abc") == 0.0


def test_iou_at_05():
    assert evaluate.parse_box("at (10,20),(30,40).") == (10, 20, 30, 40)
    assert evaluate.parse_box("( 1.5 , 2 ) , ( 3 , 4 )") == (1.5, 2, 3, 4)
    assert evaluate.parse_box("no box") is None
    assert evaluate.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert evaluate.iou_at_05("(0,0),(10,10)", "(0,0),(10,10)") == 1.0
    assert evaluate.iou_at_05("(5,0),(15,10)", "(0,0),(10,10)") == 0.0  # IoU 1/3
    assert evaluate.iou_at_05("(2,0),(12,10)", "(0,0),(10,10)") == 1.0  # IoU 8/12
    assert evaluate.iou_at_05("(10,10),(0,0)", "(0,0),(10,10)") == 1.0  # corners in either order
    assert evaluate.iou_at_05("somewhere", "(0,0),(10,10)") == 0.0
    with pytest.raises(ValueError, match="no box"):
        evaluate.iou_at_05("(0,0),(1,1)", "left")


def test_choice_and_exact():
    for pred in ("B", "(B)", "B.", "Answer: B", "b) no, B"):
        assert evaluate.choice_match(pred, "B") == 1.0, pred
    assert evaluate.choice_letter("Apple") is None and evaluate.choice_match("A", "B") == 0.0
    assert evaluate.exact_match(" 12 ", "12") == 1.0 and evaluate.exact_match("12.", "12") == 0.0
    assert set(TASK_METRIC.values()) <= set(evaluate.SCORERS)


# ----------------------------------------------------------------------------- averaging


def save_model(path, seed, **overrides):
    torch.manual_seed(seed)
    model = MLLM(config_from_preset("tiny", **{**SMALL, **overrides}))
    model.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


def test_average_is_the_weighted_mean(tmp_path):
    a, b = save_model(tmp_path / "a", 1), save_model(tmp_path / "b", 2)
    avg = evaluate.average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "avg"))
    on_disk = load_file(tmp_path / "avg" / "model.safetensors")
    for k in a:
        assert not torch.equal(a[k], b[k]) or a[k].unique().numel() == 1, k  # the two really differ
        torch.testing.assert_close(on_disk[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
        assert torch.equal(on_disk[k], avg[k])
    weighted = evaluate.average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], weights=[1, 3])
    for k in a:
        torch.testing.assert_close(weighted[k], 0.25 * a[k] + 0.75 * b[k], rtol=0, atol=1e-7)
    assert json.load(open(tmp_path / "avg" / "config.json")) == json.load(open(tmp_path / "a" / "config.json"))
    MLLM.from_pretrained(str(tmp_path / "avg"))  # a loadable checkpoint


def test_average_refuses_mismatched_configs(tmp_path):
    save_model(tmp_path / "a", 1)
    save_model(tmp_path / "b", 1, **{"text.num_layers": 2, "image_pad_id": 260})
    with pytest.raises(ValueError, match=r"configs differ in image_pad_id, text\.num_layers"):
        evaluate.average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "avg"))
    assert not os.path.exists(tmp_path / "avg")
    with pytest.raises(ValueError, match="weights"):
        evaluate.average_checkpoints([str(tmp_path / "a"), str(tmp_path / "a")], weights=[1])


# ----------------------------------------------------------------------------- resolution search


def test_parse_resolution():
    assert evaluate.parse_resolution("0.4M") == 400_000
    assert evaluate.parse_resolution("200k") == 200_000
    assert evaluate.parse_resolution("56x56") == 3136 == evaluate.parse_resolution("3136")
    for bad in ("big", "10"):
        with pytest.raises(ValueError):
            evaluate.parse_resolution(bad)
    assert evaluate.parse_budget("112x112:1M", 3136) == (12544, 1_000_000)  # min above an image upscales it
    assert evaluate.parse_budget("56x56", 784) == (784, 3136)  # max alone: the run's min
    with pytest.raises(ValueError, match="min_pixels 12544 above max_pixels 3136"):
        evaluate.parse_budget("112x112:56x56", 784)


def correct(k, n):
    """Per-sample scores: the first k of n right."""
    return [1.0] * k + [0.0] * (n - k)


def test_select_resolutions_moves_only_beyond_noise():
    n = 200
    dev = {100: {"a": correct(60, n), "b": correct(150, n), "c": correct(101, n), "d": correct(150, n)},
           200: {"a": correct(150, n), "b": correct(150, n), "c": correct(101, n), "d": correct(101, n)},
           400: {"a": correct(60, n), "b": correct(60, n), "c": correct(100, n), "d": correct(100, n)}}
    # a: 200 beats the default by 45 points -> 200; b: 100 and 200 both do, tied -> the smaller;
    # c: one sample better is noise -> the default; d: the best of the two clear winners -> 100
    assert evaluate.select_resolutions(dev, default=400) == {"a": 200, "b": 100, "c": 400, "d": 100}
    # a 5-point gain on 40 samples (2 of 40) is within noise; the same 5 points on 2,000 samples is not
    small = {1: {"t": correct(22, 40)}, 2: {"t": correct(20, 40)}}
    large = {1: {"t": correct(1100, 2000)}, 2: {"t": correct(1000, 2000)}}
    assert evaluate.select_resolutions(small, default=2) == {"t": 2}
    assert evaluate.select_resolutions(large, default=2) == {"t": 1}


def test_bootstrap_ci_matches_closed_forms():
    # one seed, one task: the interval of a mean is mean +- 1.96 sd / sqrt(n) (normal approximation)
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], 900, p=[0.2, 0.5, 0.3])
    ci = evaluate.bootstrap_ci([{"t": d}], n_boot=4000)
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert ci["mean"] == pytest.approx(d.mean())
    assert ci["lo"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert ci["hi"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    # two seeds with no sample noise (differences 0 and 1): the mean of two seeds drawn with replacement is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is exactly [0, 1]
    ci = evaluate.bootstrap_ci([{"t": np.zeros(50)}, {"t": np.ones(50)}])
    assert (ci["mean"], ci["lo"], ci["hi"]) == (0.5, 0.0, 1.0)
    # tasks weigh the same whatever their sizes
    assert evaluate.bootstrap_ci([{"a": np.ones(10), "b": np.zeros(1000)}])["mean"] == 0.5


def test_resolution_search_picks_beyond_noise_then_scores_test(monkeypatch):
    """A controlled scorer: each task's per-sample scores are a known function of (split, pixel budget)."""
    best = {"t1": (0, 784), "t2": (3136, 7056)}  # t2: small images upscaled

    def fake_evaluate(model, tokenizer, sets, min_pixels, max_pixels, **kw):
        out = {}
        for t, (split,) in sets.items():
            hit = (min_pixels, max_pixels) == best[t]
            scores = correct(90 if hit else 45, 100) if split == "dev" else correct(9 if hit else 4, 10)
            out[t] = {"score": sum(scores) / len(scores), "scores": scores}
        return out

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    dev_sets, test_sets = {"t1": ["dev"], "t2": ["dev"]}, {"t1": ["test"], "t2": ["test"]}
    out = evaluate.resolution_search(None, None, dev_sets, test_sets, [(0, 784), (3136, 7056)], (0, 7056),
                                     log=lambda *a: None)
    assert sorted(out["dev"]) == ["0:7056", "0:784", "3136:7056"]  # the default budget is always a candidate
    assert out["chosen"] == {"t1": "0:784", "t2": "3136:7056"}
    assert out["test_searched"] == pytest.approx({"t1": 0.9, "t2": 0.9})
    assert out["test_default"] == pytest.approx({"t1": 0.4, "t2": 0.4})
    assert out["dev"]["0:784"] == pytest.approx({"t1": 0.9, "t2": 0.45})


def test_resolution_search_real_tiny_model():
    torch.manual_seed(0)
    model = MLLM(config_from_preset("tiny", **SMALL))
    tok = data.Tokenizer()
    tasks = ["vqa_color", "ocr"]
    dev, test = evaluate.build_eval_sets(tasks, "dev", 3), evaluate.build_eval_sets(tasks, "test", 3)
    out = evaluate.resolution_search(model, tok, dev, test, [(784, 784), (3136, 3136)], (784, 7056),
                                     log=lambda *a: None, max_new_tokens=4)
    for t in tasks:
        scores = {b: out["dev"][b][t] for b in out["dev"]}
        assert scores[out["chosen"][t]] >= scores["784:7056"]  # the default, or one that beat it
        assert 0 <= out["test_searched"][t] <= 1
    # a lower max_pixels really shrinks the images the model sees
    rec = dev["vqa_color"][0]
    small = data.encode(rec, tok, 784, 784, for_generation=True)
    full = data.encode(rec, tok, 784, 7056, for_generation=True)
    assert small.images[0][0].shape[0] < full.images[0][0].shape[0]


# ----------------------------------------------------------------------------- generation and the command line


def test_generation_is_batch_independent():
    """Decoding prompts together gives each the answer it gets alone (the packed KV cache is per sample)."""
    torch.manual_seed(0)
    model = MLLM(config_from_preset("tiny", **SMALL)).eval()
    tok = data.Tokenizer()
    recs = [r for t in ("vqa_count", "arithmetic", "multi_image") for r in evaluate.synthetic_eval_set(t, "dev", 2)]
    dev = torch.device("cpu")
    together, refs = evaluate.generate_answers(model, tok, recs, data.MIN_PIXELS, data.MAX_PIXELS, dev, max_new_tokens=6)
    alone = [evaluate.generate_answers(model, tok, [r], data.MIN_PIXELS, data.MAX_PIXELS, dev, max_new_tokens=6)[0][0]
             for r in recs]
    assert together == alone and len(refs) == len(recs) and all(refs)


@pytest.mark.requires("matplotlib")  # results.png
def test_command_line_average_and_evaluate(tmp_path, capsys):
    save_model(tmp_path / "a", 1)
    save_model(tmp_path / "b", 2)
    evaluate.main(["--average", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,1", "--out",
                   str(tmp_path / "avg"), "--ckpt", str(tmp_path / "a"), "--tasks", "vqa_color,grounding",
                   "--eval-n", "2", "--max-new-tokens", "4"])
    report = json.load(open(tmp_path / "avg" / "eval.json"))
    assert list(report["checkpoints"]) == ["a", "avg"]
    res = report["checkpoints"]["avg"]["results"]
    assert res["grounding"]["metric"] == "iou" and res["grounding"]["n"] == 2
    assert "| avg |" in capsys.readouterr().out
    with Image.open(tmp_path / "avg" / "results.png") as img:  # the table as a picture beside eval.json
        assert img.format == "PNG" and len(np.unique(np.asarray(img.convert("L")))) > 2


def test_data_alone_evaluates_only_that_set_and_task_typos_list_names(tmp_path, capsys):
    save_model(tmp_path / "a", 1)
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    turns = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "mine.jsonl").write_text(json.dumps({"image": "red.png", "conversations": turns}) + "\n")
    evaluate.main(["--ckpt", str(tmp_path / "a"), "--data", f"mine={tmp_path / 'mine.jsonl'}", "--image-root",
                   str(tmp_path), "--max-new-tokens", "2", "--out", str(tmp_path)])
    results = json.load(open(tmp_path / "eval.json"))["checkpoints"]["a"]["results"]
    assert list(results) == ["mine"] and results["mine"]["n"] == 1  # no synthetic task unless --tasks asks
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", str(tmp_path / "a"), "--tasks", "vqa_colour,ocr"])
    err = capsys.readouterr().err
    assert "unknown task 'vqa_colour' (did you mean 'vqa_color'?)" in err and ", ".join(SYNTHETIC_TASKS) in err


def test_evaluation_flags_are_spelled_alike_in_every_command(capsys):
    """--eval-n, --eval-dev-n, --eval-max-pixels, --resolutions and --min-pixels mean the same in train.py and
    evaluate.py (chat.py: --eval-max-pixels, --min-pixels); another command's name for a different setting
    (train.py's --max-pixels, --warmup) is refused with the name to use, and is not in --help."""
    import bench
    import chat
    import train

    def flags(parser):
        return {s for a in parser._actions if a.help != "==SUPPRESS==" for s in a.option_strings}
    shared = {"--eval-n", "--eval-dev-n", "--eval-max-pixels", "--resolutions", "--min-pixels"}
    assert shared <= flags(train.build_parser()) and shared <= flags(evaluate.build_parser())
    assert {"--eval-max-pixels", "--min-pixels"} <= flags(chat.build_parser())
    new = evaluate.build_parser().parse_args(["--ckpt", "c", "--eval-n", "3", "--eval-dev-n", "5",
                                              "--eval-max-pixels", "7056"])
    assert (new.eval_n, new.eval_dev_n, new.eval_max_pixels) == (3, 5, 7056)
    assert evaluate.build_parser().parse_args(["--ckpt", "c"]).eval_n == 128
    assert chat.build_parser().parse_args(["--ckpt", "c"]).eval_max_pixels is None
    ckpt = ["--ckpt", "c"]
    for parser, args, old, new_name in ((evaluate.build_parser(), ckpt, "--n", "--eval-n"),
                                        (evaluate.build_parser(), ckpt, "--dev-n", "--eval-dev-n"),
                                        (evaluate.build_parser(), ckpt, "--max-pixels", "--eval-max-pixels"),
                                        (chat.build_parser(), ckpt, "--max-pixels", "--eval-max-pixels"),
                                        (bench.build_parser(), [], "--warmup", "--warmup-reps")):
        with pytest.raises(SystemExit):
            parser.parse_args([*args, old, "3"])
        assert f"{old}: " in (err := capsys.readouterr().err) and new_name in err, (old, err)
    for flags_, message in ((["--eval-n", "0"], "--eval-n 0: must be >= 1"), (["--eval-dev-n", "-1"], "--eval-dev-n -1: must")):
        with pytest.raises(SystemExit):
            evaluate.main(["--ckpt", "c", *flags_])
        assert message in capsys.readouterr().err
    for parser in (evaluate.build_parser(), chat.build_parser()):
        text = parser.format_help()
        assert "--eval-max-pixels" in text and "--max-pixels" not in text.replace("--eval-max-pixels", "")
    assert " --n " not in evaluate.build_parser().format_help() and "--dev-n" not in \
        evaluate.build_parser().format_help().replace("--eval-dev-n", "")
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out  # bench's untimed calls are not train.py's warm-up steps
    assert "--warmup-reps" in text and "--warmup " not in text
