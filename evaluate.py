"""Evaluation: greedy generation over eval sets, the scorers (exact match, VQA accuracy, ANLS, IoU@0.5,
multiple-choice letter), checkpoint averaging and test-time resolution search (MindVL) and the report (markdown table + eval.json).
The command line also exports a checkpoint to Hugging Face (convert.export_hf).

    python evaluate.py --ckpt runs/tiny                        # every checkpoint of a run, synthetic test split
    python evaluate.py --ckpt runs/tiny/stage3-avg --eval-max-pixels 12544 --resolutions 56x56:56x56,112x112:1M  # as train.py
    python evaluate.py --ckpt CKPT --data docvqa=val.jsonl --image-root images/  # that set only
    python evaluate.py --average runs/tiny/stage3-512 runs/tiny/stage3-1024 --weights 1,1 --out runs/tiny/avg
    python evaluate.py --export-hf hf-out --ckpt runs/tiny/stage3-avg     # a Hugging Face Qwen2.5-VL directory

train.py calls the same functions in-process for the default run.
"""
import argparse
import difflib
import json
import os
import re
import time

import numpy as np
import torch
import data
from common import AVERAGED_FROM, EVAL_REPORT, PREDICTIONS, RESULTS_PLOT, RESULTS_TABLE, RUN_ARGS, check_output_dir, \
    checkpoint_dir, cli, is_our_checkpoint, output_dir, read_json, read_safetensors, refuse_flag, replaced, save_plot, \
    stage_checkpoints, write_checkpoint, write_json
from convert import export_hf, hf_origin
from kernels import resolve_device
from model import MLLM
from tasks import SYNTHETIC_TASKS, TASK_METRIC, SyntheticTasks

# ----------------------------------------------------------------------------- scorers


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(s):
    """The VQA evaluation's answer normalisation (Antol et al. 2015, official eval script), compactly:
    lowercase, punctuation dropped (kept inside numbers such as 1.5), number words to digits, articles
    removed, whitespace collapsed."""
    s = s.lower().strip()
    s = re.sub(r"(?<!\d)[.,](?!\d)|[;:!?'\"()\[\]{}<>/\\*`~@#$%^&_=+|-]", " ", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(pred, ref):
    """1 if the prediction equals the reference up to case and surrounding/repeated whitespace."""
    return float(" ".join(pred.split()).casefold() == " ".join(ref.split()).casefold())


def vqa_accuracy(pred, refs):
    """VQA accuracy (Antol et al. 2015): min(#annotators who gave the answer / 3, 1), averaged over the
    10 leave-one-annotator-out subsets. With one reference (our data) the formula degenerates: a single
    annotator would cap a correct answer at 1/3, so the one reference is taken as unanimous and the score
    is exact match of the normalised answers."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = normalize_answer(pred)
    hits = [normalize_answer(r) == p for r in refs]
    if len(refs) == 1:
        return float(hits[0])
    return sum(min((sum(hits) - h) / 3, 1.0) for h in hits) / len(refs)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred, refs, threshold=0.5):
    """Average Normalized Levenshtein Similarity for one question (Biten et al. 2019, ST-VQA): the best
    over references of 1 - NL, where NL = edit distance / max length (case-insensitive, stripped), and 0
    when NL >= threshold (0.5), so an answer that is mostly wrong earns nothing."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = " ".join(pred.split()).lower()
    best = 0.0
    for r in refs:
        r = " ".join(r.split()).lower()
        nl = levenshtein(p, r) / max(len(p), len(r), 1)
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")


def parse_box(text):
    """The first box written `(x1,y1),(x2,y2)` in text as (x1, y1, x2, y2) floats, or None."""
    m = _BOX.search(text)
    return tuple(float(v) for v in m.groups()) if m else None


def box_iou(a, b):
    """Intersection over union of two (x1, y1, x2, y2) boxes (corners in any order)."""
    ax1, ax2, ay1, ay2 = min(a[0], a[2]), max(a[0], a[2]), min(a[1], a[3]), max(a[1], a[3])
    bx1, bx2, by1, by2 = min(b[0], b[2]), max(b[0], b[2]), min(b[1], b[3]), max(b[1], b[3])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def iou_at_05(pred, ref):
    """1 if the first box in the prediction overlaps the reference box with IoU >= 0.5 (the usual
    referring-expression grounding criterion), else 0; no parsable box scores 0."""
    p, r = parse_box(pred), parse_box(ref)
    if r is None:
        raise ValueError(f"reference {ref!r} has no box (x1,y1),(x2,y2)")
    return float(p is not None and box_iou(p, r) >= 0.5)


def choice_letter(text):
    """The option letter a multiple-choice answer picks: the first standalone capital A-H ("B", "(B)",
    "B.", "Answer: B"), or None."""
    m = re.search(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", text)
    return m.group(1) if m else None


def choice_match(pred, ref):
    letter = choice_letter(ref)
    if letter is None:
        raise ValueError(f"reference {ref!r} names no option letter A-H")
    return float(choice_letter(pred) == letter)


SCORERS = {"exact": exact_match, "vqa": vqa_accuracy, "anls": anls, "iou": iou_at_05, "choice": choice_match}
DEFAULT_METRIC = "vqa"  # a --data eval set whose task tasks.TASK_METRIC does not know


# ----------------------------------------------------------------------------- eval sets


def synthetic_eval_set(task, split, n, seed=0, max_turns=1, style="instruct"):
    """The first n records of one synthetic task in the dev or test split: conversations of 1..max_turns turns
    (the last reply the one to generate), or pre-training records (style "pretrain": for a reply loss only)."""
    source = SyntheticTasks([task], split=split, seed=seed, style=style, max_turns=max_turns)
    if n > len(source):
        raise ValueError(f"{task}: {n} eval samples asked, the {split} split has {len(source)}")
    return [source[i] for i in range(n)]


def file_eval_set(path, image_root):
    """Every record of a data file (any format data.FileDataset reads): conversations ending with the question
    (answered, not scored) or with its reference reply (answered and scored); a bad record is an error."""
    ds = data.FileDataset(path, image_root, need_reply=False)
    records = [ds[i] for i in range(len(ds))]
    if not records:
        raise ValueError(f"--data {path}: the file holds no records")
    bad = [r["id"] for r in records if r["format"] != "conversation"]
    if bad:
        raise ValueError(f"{path}: eval records must be conversations (a question, and its reply if there is a "
                         f"reference); not: {bad[:3]}")
    return records


def metric_of(task):
    return TASK_METRIC.get(task, DEFAULT_METRIC)


def build_eval_sets(tasks, split, n, seed=0, files=(), image_root=".", max_turns=1):
    """{name: records}: each synthetic task's `split` slice of n, then each data file's eval set (name, path)
    in full; the dev/test distinction for data files is made by resolution_search (halves)."""
    sets = {t: synthetic_eval_set(t, split, n, seed, max_turns) for t in tasks}
    for name, path in files:
        sets[name] = file_eval_set(path, image_root)
    return sets


# ----------------------------------------------------------------------------- generation and scoring


@torch.no_grad()
def generate_answers(model, tokenizer, records, min_pixels, max_pixels, device, batch_size=64,
                     max_new_tokens=48, dtype=torch.float32):
    """Greedy replies to the records' last human turn, all prompts of a batch decoded together."""
    mrope = model.config.text.mrope_section is not None
    samples = [data.encode(r, tokenizer, min(min_pixels, max_pixels), max_pixels, for_generation=True)
               for r in records]
    answers = []
    for i in range(0, len(samples), batch_size):
        batch = data.collate(samples[i:i + batch_size], mrope=mrope).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model.generate(batch, max_new_tokens, stop_ids=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size)
        answers.extend(tokenizer.decode(ids).strip() for ids in out)
    return answers, [s.answer for s in samples]


def evaluate_model(model, tokenizer, eval_sets, min_pixels=data.MIN_PIXELS, max_pixels=data.MAX_PIXELS,
                   device=None, batch_size=64, max_new_tokens=48, dtype=torch.float32):
    """{name: {"score", "scores", "metric", "n", "predictions"}}: score is the mean of the per-sample scores (0..1)
    of the records that have a reference reply (None when none has: predictions only); predictions are
    {"id", "prompt", "prediction", "reference", "score"} per record."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    for name, records in eval_sets.items():
        preds, refs = generate_answers(model, tokenizer, records, min_pixels, max_pixels, device, batch_size,
                                       max_new_tokens, dtype)
        metric = metric_of(records[0]["task"] if name not in TASK_METRIC else name)
        each = [SCORERS[metric](p, r) if r is not None else None for p, r in zip(preds, refs)]
        scores = [s for s in each if s is not None]
        results[name] = {"score": sum(scores) / len(scores) if scores else None, "scores": scores, "metric": metric,
                         "n": len(scores), "predictions": [
                             {"id": rec.get("id", ""), "prompt": prompt_of(rec), "prediction": p, "reference": r,
                              "score": s} for rec, p, r, s in zip(records, preds, refs, each)]}
    model.train(was_training)
    return results


def prompt_of(record):
    """The question a record asks: its last user turn (before the reply, if there is one)."""
    turns = record["conversations"]
    return next(t["value"] for t in reversed(turns[:-1] if turns[-1]["from"] == "gpt" else turns)
                if t["from"] == "human")


def reply_loss(model, tokenizer, records, min_pixels=data.MIN_PIXELS, max_pixels=data.MAX_PIXELS, device=None,
               packing_length=2048):
    """Teacher-forced cross-entropy per loss token (no z-loss) over the records, packed as in training."""
    device = device or next(model.parameters()).device
    samples = [data.encode(r, tokenizer, min_pixels, max_pixels) for r in records]
    ce, n = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in data.pack(samples, packing_length, mrope=model.config.text.mrope_section is not None):
            _, stats = model(batch.to(device), loss_divisor=1.0)
            ce, n = ce + stats["ce"], n + stats["n_loss_tokens"]
    model.train(was_training)
    return ce / max(n, 1)


def scores_of(results):
    """{set: score} of the sets that have references."""
    return {name: r["score"] for name, r in results.items() if r["score"] is not None}


# ----------------------------------------------------------------------------- checkpoint averaging


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def config_diff(a, b):
    """Dotted names of the config fields in which two config dicts differ."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<missing>") != fb.get(k, "<missing>"))


# what `evaluate.py --average --out DIR` writes in DIR: the average, then its evaluation (evaluate_run)
AVERAGE_FILES = ("model.safetensors", "config.json", AVERAGED_FROM, EVAL_REPORT, RESULTS_TABLE, RESULTS_PLOT,
                 *data.TOKENIZER_FILES)


def average_checkpoints(ckpts, weights=None, out=None, overwrite=False):
    """Model weight averaging (MindVL's abstract: of checkpoints trained at different sequence lengths; the
    element-wise weighted mean is our reading): the mean of the checkpoints' weights (weights are
    normalised to sum to 1; default equal). All configs must match exactly (an error names the differing
    fields). Writes model.safetensors + config.json to `out` (temp dir, then rename; only over a directory that
    is new, empty or an earlier average, or with overwrite beside other files) and returns the state."""
    if len(ckpts) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(ckpts)}")
    if out is not None:
        others = check_output_dir(out, "--out", AVERAGED_FROM, AVERAGE_FILES.__contains__, ckpts, overwrite)
    weights = [1.0] * len(ckpts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(ckpts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights {weights}: need {len(ckpts)} non-negative weights with a positive sum")
    configs = [read_json(os.path.join(c, "config.json")) for c in ckpts]
    for c, cfg in zip(ckpts[1:], configs[1:]):
        diff = config_diff(configs[0], cfg)
        if diff:
            raise ValueError(f"cannot average {ckpts[0]} and {c}: configs differ in {', '.join(diff)}")
    states = [read_safetensors(os.path.join(c, "model.safetensors")) for c in ckpts]
    for c, s in zip(ckpts[1:], states[1:]):
        if s.keys() != states[0].keys():
            raise ValueError(f"cannot average {ckpts[0]} and {c}: weight names differ "
                             f"({sorted(s.keys() ^ states[0].keys())[:5]})")
    total = sum(weights)
    avg = {}
    for name, t0 in states[0].items():
        acc = torch.zeros(t0.shape, dtype=torch.float64)
        for w, s in zip(weights, states):
            acc += (w / total) * s[name].double()
        avg[name] = acc.to(t0.dtype)
    if out is not None:
        with output_dir(out, AVERAGE_FILES.__contains__, keep_others=bool(others)) as tmp:
            write_checkpoint(tmp, avg, configs[0])
            data.load_tokenizer(ckpts[0]).save(tmp)  # the runs' tokenizer and chat format
            write_json({"checkpoints": list(ckpts), "weights": weights}, os.path.join(tmp, AVERAGED_FROM))
    return avg


# ----------------------------------------------------------------------------- test-time resolution search


def parse_resolution(s):
    """A pixel budget: '0.4M', '200K', '3136' or '56x56' -> pixels (int)."""
    t = s.strip().upper()
    m = re.fullmatch(r"(\d+)X(\d+)", t)
    if m:
        return int(m.group(1)) * int(m.group(2))
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([KM]?)", t)
    if not m:
        raise ValueError(f"resolution {s!r}: expected e.g. 0.4M, 200K, 3136 or 56x56")
    pixels = round(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6}[m.group(2)])
    if pixels < data.FACTOR ** 2:
        raise ValueError(f"resolution {s!r} = {pixels} pixels is below one merged patch ({data.FACTOR ** 2})")
    return pixels


def select_resolutions(dev_scores, default, level=0.95):
    """Per task, the default budget unless another beats it on dev beyond noise: the lower end of the
    paired bootstrap interval of (candidate - default) over the dev samples lies above zero. Among those,
    the best dev mean wins (ties: the smaller, cheaper one). dev_scores: {budget: {task: [per sample]}}.
    A one-sample dev difference is a coin toss, not a finding: it never moves the choice."""
    chosen = {}
    for task in dev_scores[default]:
        base = np.asarray(dev_scores[default][task], dtype=np.float64)
        better = [(-np.mean(s[task]), px) for px, s in dev_scores.items() if px != default
                  and bootstrap_ci([{task: np.asarray(s[task], dtype=np.float64) - base}], level=level)["lo"] > 0]
        chosen[task] = min(better)[1] if better else default
    return chosen


def bootstrap_ci(diffs, n_boot=2000, level=0.95, seed=0):
    """{"mean", "lo", "hi"} of a paired difference and its percentile bootstrap interval. diffs: one dict per
    training seed, {task: per-sample differences on the same test samples}. The statistic is the mean over
    seeds of the mean over tasks (each task weighs the same) of the mean over samples; the bootstrap
    resamples seeds, then samples within each drawn (seed, task) independently (a two-level bootstrap:
    Davison & Hinkley 1997, §3.8), so the interval holds both training-seed and test-sample noise."""
    rng = np.random.default_rng(seed)
    k = len(diffs)
    # inner[s][b, j]: task-mean of an independent resample of seed s's samples, for draw j of replicate b
    inner = [np.mean([rng.choice(np.asarray(d[t]), (n_boot, k, len(d[t]))).mean(-1) for t in d], axis=0)
             for d in diffs]
    drawn = rng.integers(0, k, (n_boot, k))
    stats = np.stack(inner)[drawn, np.arange(n_boot)[:, None], np.arange(k)[None, :]].mean(1)
    mean = float(np.mean([np.mean([np.mean(d[t]) for t in d]) for d in diffs]))
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi)}


def resolution_search(model, tokenizer, dev_sets, test_sets, budgets, default, log=print, test_default=None,
                      **eval_kwargs):
    """Test-time resolution search (MindVL's abstract names it; the procedure here is ours): score every pixel
    budget (min_pixels, max_pixels) in `budgets` (plus the default) on the dev sets, keep per task the one that
    beats the default beyond noise (select_resolutions), then score the test sets at the chosen budget beside
    the default one (`test_default`: evaluate_model's results at the default when already computed). A min_pixels
    above an image's size upscales it. Returns {"dev": {budget: {task: score}}, "chosen": {task: budget},
    "test_default", "test_searched": {task: score}, "test_searched_scores": {task: per-sample scores}}, budgets
    written "min:max"."""
    candidates = sorted(set(budgets) | {default})
    dev, dev_samples = {}, {}
    for b in candidates:
        res = evaluate_model(model, tokenizer, dev_sets, *b, **eval_kwargs)
        dev[budget_label(b)] = scores_of(res)
        dev_samples[b] = {t: r["scores"] for t, r in res.items() if r["score"] is not None}
        log(f"resolution search: dev at {budget_label(b)} pixels: "
            + ", ".join(f"{t} {s:.3f}" for t, s in dev[budget_label(b)].items()))
    chosen = select_resolutions(dev_samples, default)
    if test_default is None:  # the caller may already have the test scores at the default resolution
        test_default = evaluate_model(model, tokenizer, test_sets, *default, **eval_kwargs)
    searched = {}
    for b in sorted(set(chosen.values()) - {default}):
        tasks = {t: test_sets[t] for t, p in chosen.items() if p == b}
        searched.update(evaluate_model(model, tokenizer, tasks, *b, **eval_kwargs))
    searched = {t: searched.get(t, test_default[t]) for t in test_default}
    return {"dev": dev, "chosen": {t: budget_label(b) for t, b in chosen.items()},
            "test_default": scores_of(test_default), "test_searched": scores_of(searched),
            "test_searched_scores": {t: r["scores"] for t, r in searched.items()}}


def parse_budget(s, min_pixels):
    """A pixel budget (min_pixels, max_pixels): 'MIN:MAX' (e.g. 112x112:1M, which upscales smaller images), or
    'MAX' with the given min_pixels; each side as parse_resolution reads it."""
    lo, sep, hi = s.partition(":")
    budget = (parse_resolution(lo), parse_resolution(hi)) if sep else (min_pixels, parse_resolution(s))
    if budget[0] > budget[1]:
        raise ValueError(f"resolution {s!r}: min_pixels {budget[0]} above max_pixels {budget[1]}")
    return budget


def budget_label(budget):
    return f"{budget[0]}:{budget[1]}"


def split_halves(sets):
    """Data-file eval sets have no dev split: even-indexed records serve as dev, odd-indexed as test."""
    return {k: v[0::2] for k, v in sets.items()}, {k: v[1::2] for k, v in sets.items()}


# ----------------------------------------------------------------------------- report


def markdown_table(rows, tasks=None):
    """Rows {name: {task: score}} -> markdown with one column per task plus their mean (scores in %)."""
    tasks = tasks or list(next(iter(rows.values())))
    lines = ["| checkpoint | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, scores in rows.items():
        vals = [scores[t] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in vals)
                     + f" | {100 * sum(vals) / len(vals):.1f} |")
    return "\n".join(lines)


def plot_results(rows, out_png, tasks=None):
    """The markdown table as a picture: checkpoints x tasks (and their mean), scores in % in each cell. Returns
    whether it was written (not without matplotlib)."""
    tasks = tasks or list(next(iter(rows.values())))
    scores = [[100 * s[t] for t in tasks] for s in rows.values()]
    scores = [r + [sum(r) / len(r)] for r in scores]

    def draw(ax):
        ax.imshow(scores, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean"], rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), list(rows))
        for i, r in enumerate(scores):
            for j, v in enumerate(r):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
        ax.set_title("score (%)")
    return save_plot(out_png, (1.2 + 0.9 * (len(tasks) + 1), 1.0 + 0.45 * len(rows)), draw)


def resolve_checkpoints(path):
    """[(name, checkpoint dir)]: a checkpoint dir itself, a stage dir (its newest complete checkpoint:
    common.checkpoint_dir), or a run dir (every stage in it, in training order)."""
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [(name, path)]
    if stage_checkpoints(path):
        return [(name, checkpoint_dir(path))]
    # a run dir: its stage dirs and checkpoints (not a write's .tmp, not an export to Hugging Face inside it)
    stages = [os.path.join(path, d) for d in sorted(os.listdir(path)) if not d.endswith(".tmp")] \
        if os.path.isdir(path) else []
    found = [c for d in stages if is_our_checkpoint(d) or stage_checkpoints(d) for c in resolve_checkpoints(d)]
    if not found:
        raise FileNotFoundError(f"--ckpt {path}: not a checkpoint, stage directory or run directory")
    return found


def load_model(ckpt, device):
    return MLLM.from_pretrained(ckpt).to(device).eval()


def evaluate_run(ckpts, tokenizer, test_sets, out, min_pixels, max_pixels, search=None, report=None, log=print,
                 **kw):
    """Score every (name, checkpoint) on the test sets, then (search = (dev sets, test sets, max_pixels
    candidates)) the test-time resolution search on the last one; log the table and write out/eval.json,
    results.md and results.png. Search test sets other than `test_sets` (data files' halves) are scored at the
    default resolution anew, in a row of their own. kw: evaluate_model's device, dtype, ... Returns the report."""
    t0 = time.time()
    report = {**(report or {}), "checkpoints": {}}
    predictions = []
    for name, ckpt in ckpts:
        res = evaluate_model(load_model(ckpt, kw["device"]), tokenizer, test_sets, min_pixels, max_pixels, **kw)
        predictions += [{"checkpoint": name, "set": t, **p} for t, r in res.items() for p in r.pop("predictions")]
        report["checkpoints"][name] = {"path": ckpt, "results": res}
        log(f"eval {name}: " + ", ".join(f"{t} {100 * r['score']:.1f}" if r["score"] is not None else
                                         f"{t} ({len(test_sets[t])} predictions, no references)"
                                         for t, r in res.items()))
    with replaced(os.path.join(out, PREDICTIONS)) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    rows = {name: scores_of(r["results"]) for name, r in report["checkpoints"].items()}
    if not any(rows.values()):  # predictions only: nothing to tabulate or search
        write_json(report | {"wall_s": time.time() - t0}, os.path.join(out, EVAL_REPORT))
        log(f"no references to score: wrote the predictions to {os.path.join(out, PREDICTIONS)}")
        return report
    if search:
        (name, ckpt), (dev_sets, search_sets, resolutions) = ckpts[-1], search
        same = search_sets is test_sets  # then the default resolution's scores are those just computed
        found = resolution_search(load_model(ckpt, kw["device"]), tokenizer, dev_sets, search_sets, resolutions,
                                  (min_pixels, max_pixels), log=log,
                                  test_default=report["checkpoints"][name]["results"] if same else None, **kw)
        report["resolution_search"] = {"checkpoint": ckpt, **found}
        if not same:
            rows[f"{name} (default res, search test set)"] = found["test_default"]
        rows[f"{name} + resolution search"] = found["test_searched"]
    table = markdown_table(rows)
    report["table"], report["wall_s"] = table, time.time() - t0
    write_json(report, os.path.join(out, EVAL_REPORT))
    with open(os.path.join(out, RESULTS_TABLE), "w") as f:
        f.write(table + "\n")
    plot_results(rows, os.path.join(out, RESULTS_PLOT))
    log("\n" + table)
    if search:
        log("resolution search picked (min:max pixels) per task: "
            + ", ".join(f"{t} {px}" for t, px in report["resolution_search"]["chosen"].items()))
    log(f"evaluation: {time.time() - t0:.0f}s; wrote {os.path.join(out, EVAL_REPORT)}")
    return report


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=[], help="checkpoint, stage or run directories to evaluate")
    p.add_argument("--tasks", default=None, help="comma-separated synthetic tasks to evaluate ('' for none; "
                   f"default: all of {','.join(SYNTHETIC_TASKS)}, or none when --data is given)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="an eval set file: JSONL, JSON array, OpenAI messages, Parquet or Arrow (conversations; "
                        "scored by tasks.TASK_METRIC of its task, else VQA accuracy)")
    p.add_argument("--image-root", default=".", help="directory the data files' image paths are relative to")
    p.add_argument("--split", default="test", choices=["dev", "test"], help="synthetic split to score")
    p.add_argument("--eval-n", type=int, default=128, help="test samples per task")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (must match training's to keep splits)")
    p.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="image pixel floor (smart resize)")
    p.add_argument("--eval-max-pixels", type=int, default=data.MAX_PIXELS,
                   help="test-time image pixel budget: the default resolution")
    p.add_argument("--resolutions", default="", help="test-time resolution search over these pixel budgets, "
                   "MAX or MIN:MAX (a MIN above an image's size upscales it), e.g. 56x56:56x56,112x112:1M")
    p.add_argument("--eval-dev-n", type=int, default=64, help="dev samples per task for the resolution search")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per answer")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="autocast dtype for generation; with --export-hf, the weights' dtype (fp32: as trained)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json dir/file or .tiktoken file (default: byte-level); "
                   "--export-hf copies a Hugging Face dir's tokenizer files (default: the run's --init-from dir's)")
    p.add_argument("--average", nargs="+", default=None, metavar="CKPT", help="average these checkpoints into --out")
    p.add_argument("--weights", default=None, help="comma-separated averaging weights (default equal)")
    p.add_argument("--out", default=None, help="output dir: the averaged checkpoint, or where eval.json goes")
    p.add_argument("--export-hf", default=None, metavar="OUT",
                   help="write --ckpt as a Hugging Face Qwen2.5-VL directory (transformers' from_pretrained loads it) "
                        "and stop")
    p.add_argument("--decoder-only", action="store_true",
                   help="--export-hf: the decoder alone, as a Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 causal LM")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--export-hf: safetensors shard size limit")
    p.add_argument("--overwrite", action="store_true", help="--average / --export-hf into a directory holding other "
                   "files: replace only the files this command writes, keep the others")
    refuse_flag(p, "--n", "test samples per task are --eval-n, as in train.py and audit.py")
    refuse_flag(p, "--dev-n", "dev samples per task are --eval-dev-n, as in train.py and audit.py")
    refuse_flag(p, "--max-pixels", "the test-time budget is --eval-max-pixels (train.py's --max-pixels is the "
                "training budget)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, n in (("--eval-n", args.eval_n), ("--eval-dev-n", args.eval_dev_n)):
        if n < 1:  # as train.py says it
            p.error(f"{flag} {n}: must be >= 1")
    if args.export_hf:
        return export_main(p, args)
    if args.average:
        average_main(p, args)
        if not args.ckpt:
            return
        args.ckpt.append(args.out)  # then the average is evaluated beside the given checkpoints
    evaluate_main(p, args)


def average_main(p, args):
    """--average: the weighted average of the checkpoints written to --out (average_checkpoints)."""
    if not args.out:
        p.error("--average needs --out DIR")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        p.error(f"--weights {args.weights}: expected comma-separated numbers")
    ckpts = [one_checkpoint(p, path, "--average") for path in args.average]
    average_checkpoints(ckpts, weights, args.out, args.overwrite)
    print(f"wrote the average of {', '.join(ckpts)} to {args.out}")


def evaluate_main(p, args):
    """--ckpt: score the checkpoints (and the resolution search) into --out's eval.json, results.md/png."""
    if not args.ckpt:
        p.error("give --ckpt (or --average ... --out)")
    out = args.out or (args.ckpt[0] if os.path.isdir(args.ckpt[0]) else ".")
    if os.path.lexists(out) and not os.path.isdir(out):
        p.error(f"--out {out}: is a file, not a directory")
    os.makedirs(out, exist_ok=True)  # made before the evaluation, so a missing --out costs no work
    ckpts = [c for path in args.ckpt for c in resolve_checkpoints(path)]
    tasks = parse_tasks(p, args.tasks, bool(args.data))
    if not tasks and not args.data:
        p.error("nothing to evaluate: --tasks '' and no --data")
    files = [data.parse_data_flag(s)[:2] for s in args.data]
    test_sets = build_eval_sets(tasks, args.split, args.eval_n, args.seed, files, args.image_root)
    search = None
    if args.resolutions:
        dev, search_test = resolution_eval_sets(tasks, args.eval_dev_n, args.eval_n, args.seed, files, args.image_root)
        same = not files and args.split == "test"  # then the search's test sets are the ones just built
        search = (dev, test_sets if same else search_test,
                  [parse_budget(r, args.min_pixels) for r in args.resolutions.split(",")])
    device = torch.device(resolve_device(args.device))
    tokenizer = data.load_tokenizer(args.tokenizer or ckpts[0][1])  # default: the run's own (saved in it)
    evaluate_run(ckpts, tokenizer, test_sets, out, args.min_pixels, args.eval_max_pixels,
                 search, report={"settings": vars(args)}, device=device, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens,
                 dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)


def parse_tasks(p, spec, have_data):
    """--tasks -> synthetic task names: all by default, none by default beside --data; a typo is a usage
    error that lists the valid names."""
    if spec is None:
        return [] if have_data else list(SYNTHETIC_TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for t in tasks:
        if t not in SYNTHETIC_TASKS:
            close = difflib.get_close_matches(t, SYNTHETIC_TASKS, n=1)
            p.error(f"--tasks: unknown task {t!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                    f"valid: {', '.join(SYNTHETIC_TASKS)}")
    return tasks


def export_main(p, args):
    """--export-hf: one checkpoint out; tokenizer files from --tokenizer (a directory) or the HF origin."""
    if len(args.ckpt) != 1:
        p.error(f"--export-hf takes one checkpoint; --ckpt gives {args.ckpt or 'none'}")
    ckpts = [one_checkpoint(p, args.ckpt[0], "--ckpt")]
    source = args.tokenizer if args.tokenizer and os.path.isdir(args.tokenizer) else hf_origin(ckpts[0])
    own = data.load_tokenizer(ckpts[0])  # the tokenizer the run trained with, saved in its checkpoints
    tokenizer = data.load_tokenizer(args.tokenizer) if args.tokenizer else own if own.files else data.load_tokenizer(
        source if source and os.path.isfile(os.path.join(source, "tokenizer.json")) else None)
    copied = export_hf(ckpts[0], args.export_hf, tokenizer, args.decoder_only, source,
                       torch.bfloat16 if args.dtype == "bf16" else None, int(args.max_shard_gb * 2 ** 30),
                       pixels=searched_budget(ckpts[0]) or trained_budget(ckpts[0]), overwrite=args.overwrite)
    print(f"wrote {args.export_hf} from {ckpts[0]}" + (f" with {', '.join(copied)}" if copied else ""))


def trained_budget(ckpt):
    """(min_pixels, max_pixels) the checkpoint's stage trained at, from the args.json beside it (an averaged
    checkpoint: its first source's; the processor's defaults when none is found)."""
    for d in (os.path.dirname(os.path.abspath(ckpt)), os.path.abspath(ckpt)):
        args = os.path.join(d, RUN_ARGS)
        if os.path.isfile(args):  # the budget it trained at (older runs: their flags)
            saved = read_json(args)
            return tuple(saved.get("pixels") or (saved["train_config"]["min_pixels"],
                                                 saved["train_config"]["max_pixels"] or data.MAX_PIXELS))
    sources = os.path.join(ckpt, AVERAGED_FROM)
    if os.path.isfile(sources):
        return trained_budget(read_json(sources)["checkpoints"][0])
    return data.MIN_PIXELS, data.MAX_PIXELS


def searched_budget(ckpt):
    """(min_pixels, max_pixels) the resolution search picked for the checkpoint (the eval.json of its run:
    the budget most tasks chose), or None when no search ran on it."""
    for d in (os.path.dirname(os.path.abspath(ckpt)), os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))):
        report = os.path.join(d, EVAL_REPORT)
        search = read_json(report).get("resolution_search") if os.path.isfile(report) else None
        if search and os.path.abspath(search["checkpoint"]) == os.path.abspath(ckpt):
            picks = list(search["chosen"].values())
            return tuple(int(x) for x in max(set(picks), key=picks.count).split(":"))
    return None


def one_checkpoint(p, path, flag):
    """The one checkpoint a checkpoint or stage directory names (a run directory holds several: a usage error)."""
    found = resolve_checkpoints(path)
    if len(found) != 1:
        p.error(f"{flag} {path}: a run directory of {len(found)} stages ({', '.join(n for n, _ in found)}); "
                "name a stage or checkpoint directory")
    return found[0][1]


def resolution_eval_sets(tasks, dev_n, test_n, seed, files=(), image_root="."):
    """(dev sets, test sets) for the resolution search: synthetic dev/test splits, data-file sets halved."""
    dev = build_eval_sets(tasks, "dev", dev_n, seed)
    test = build_eval_sets(tasks, "test", test_n, seed)
    if files:
        jdev, jtest = split_halves(build_eval_sets([], "test", 0, seed, files, image_root))
        dev.update(jdev)
        test.update(jtest)
    return dev, test


if __name__ == "__main__":
    cli(main)
