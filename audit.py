"""The recipe audited: what each MindVL element changes, with a 95% confidence interval.

    python audit.py --jobs 3                         # 3 seeds of the default recipe side by side, then the table
    python audit.py --seeds 0,1 --eval-n 32 --max-steps 100    # a quicker look; any train.py flag passes through

For every seed, train.py's recipe (stages 1 -> 2 -> 3 at each --stage3-lengths -> their average) and, for the
stage-2 comparison, stage 3 at the first length started straight from stage 1 with the same budget. Every
checkpoint is scored per sample on the same test samples, so each comparison is a paired difference, and its
interval comes from a two-level bootstrap over seeds and test samples (evaluate.bootstrap_ci). Then the
averaging study: how far the two stage-3 runs moved from stage 2 and the dev loss on the line between them.
A seed whose scores.json exists is not trained again, and a seed's stopped runs resume from their last
checkpoints, so a stopped audit continues where it stopped.

Writes OUT/seed-N/ (the runs and scores.json), OUT/audit.json, OUT/audit.md and OUT/audit.png.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

import evaluate
import train
from common import AVERAGE_DIR, checkpoint_dir, cli, read_json, read_safetensors, save_plot, stage_name, write_json
from kernels import resolve_device
from tasks import SIZES, SYNTHETIC_TASKS


NO_STAGE2 = "no-stage2"  # the compute-matched arm: stage 3 started from stage 1
# the average at the weight chosen on dev: its row and its directory
DEV_WEIGHT, DEV_AVERAGE_DIR = f"{AVERAGE_DIR} (dev weight)", f"{AVERAGE_DIR}-dev"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py "
                                "(e.g. --max-steps, --preset, --device); --seed and --stage are set per run.")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (each also draws its own test samples)")
    p.add_argument("--out", default="runs/audit", help="audit directory")
    p.add_argument("--eval-n", type=int, default=SIZES["test"], help="test samples per task (default: all)")
    p.add_argument("--tasks", default=",".join(SYNTHETIC_TASKS), help="synthetic tasks scored")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained side by side, each in its own process "
                   "with cores/jobs threads (a tiny model keeps one core busier than two: 2 on a 2-core CPU)")
    p.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: train, score, stop
    args, rest = p.parse_known_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be >= 1")
    cfg, overrides = train.parse_args(rest + ["--no-eval"])
    return args, rest, cfg, overrides


def run_seed(args, cfg, overrides, seed, log=print):
    """Train the recipe and the compute-matched no-stage-2 arm for one seed, score every checkpoint per sample
    (each stage-3 length, their equal average, the average at the weight chosen on dev, each with and without the
    resolution search), keep scores.json."""
    out = os.path.dirname(scores_path(args, seed))
    cfg = replace(cfg, seed=seed, out=out, stage="all", eval=False)
    train_to_end(cfg, overrides, log)
    length, steps = train.stage3_runs(cfg)[0]
    stage2_steps = cfg.max_steps if cfg.max_steps is not None else train.STAGES[2].steps
    train_to_end(replace(cfg, stage="3", init_from=os.path.join(out, stage_name(1)), out=os.path.join(out, NO_STAGE2),
                         packing_length=length, max_steps=steps + stage2_steps), {}, log)  # stage 2's steps added
    tasks = [t for t in args.tasks.split(",") if t]
    device = torch.device(resolve_device(cfg.device))
    tokenizer, budget = train.build_tokenizer(cfg), train.eval_budget(cfg)
    test, dev = (evaluate.build_eval_sets(tasks, split, n, seed) for split, n in (("test", args.eval_n),
                                                                                   ("dev", cfg.eval_dev_n)))
    lengths = [n for n, _ in train.stage3_runs(cfg)]
    averaging = averaging_study(out, lengths, tokenizer, dev, budget, device, log)
    runs = {stage_name(3, n): stage_name(3, n) for n in lengths} | {
        AVERAGE_DIR: AVERAGE_DIR, NO_STAGE2: os.path.join(NO_STAGE2, stage_name(3)), DEV_WEIGHT: DEV_AVERAGE_DIR}
    resolutions = [evaluate.parse_budget(r, cfg.min_pixels) for r in cfg.resolutions.split(",") if r]
    scores, chosen = {}, {}
    for name, path in runs.items():
        model = evaluate.load_model(checkpoint_dir(os.path.join(out, path)), device)
        res = evaluate.evaluate_model(model, tokenizer, test, *budget, device=device)
        scores[name] = {t: r["scores"] for t, r in res.items()}
        log(f"seed {seed} {name}: " + ", ".join(f"{t} {100 * r['score']:.1f}" for t, r in res.items()))
        if name not in (DEV_WEIGHT, NO_STAGE2):
            search = evaluate.resolution_search(model, tokenizer, dev, test, resolutions, budget, log=log,
                                                test_default=res, device=device)
            scores[f"{name} + resolution search"], chosen[name] = search["test_searched_scores"], search["chosen"]
    result = {"seed": seed, "scores": scores, "chosen": chosen, "averaging": averaging}
    write_json(result, scores_path(args, seed))
    return result


def train_to_end(cfg, overrides, log=print):
    """train.run, resuming what a stopped audit left in cfg.out; a run stopped now (Ctrl-C, SIGTERM, bad
    steps) stops the audit, and the same command continues it."""
    cfg = replace(cfg, resume=any(os.path.isdir(os.path.join(cfg.out, d)) for d in train.stage_dirs(cfg)))
    stopped = [f"{name} {r.status}" for name, r in train.run(cfg, overrides, log=log)["stages"].items()
               if r.status != "done"]
    if stopped:
        raise SystemExit(f"audit: {cfg.out}: {', '.join(stopped)}; run the same command again to continue")


ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def averaging_study(out, lengths, tokenizer, dev, budget, device, log=print):
    """What averaging the stage-3 runs does: how far the first two runs moved from their common stage-2 start and
    how aligned those moves are, and the dev reply loss (teacher forced, in the stage-3 format) along the straight
    line between them, w(alpha) = (1 - alpha) w_first + alpha w_second. The inner alpha of least dev loss is
    written as OUT/stage3-avg-dev: the average with its weight chosen on dev."""
    def weights(path):
        return read_safetensors(os.path.join(checkpoint_dir(os.path.join(out, path)),
                                                       "model.safetensors"))
    first, second = (weights(stage_name(3, n)) for n in lengths[:2])
    start = weights(stage_name(2))
    flat = lambda s: torch.cat([s[k].double().flatten() for k in sorted(s)])  # noqa: E731
    da, db = flat(first) - flat(start), flat(second) - flat(start)
    study = {"moved_first": float(da.norm() / flat(start).norm()), "moved_second": float(db.norm() / flat(start).norm()),
             "cosine": float(da @ db / (da.norm() * db.norm())), "alphas": ALPHAS, "dev_loss": []}
    ends = [checkpoint_dir(os.path.join(out, stage_name(3, n))) for n in lengths[:2]]
    records = sum(dev.values(), [])
    for alpha in ALPHAS:  # each point written as a weighted average (evaluate.average_checkpoints), then scored
        point = os.path.join(out, "interpolated")
        evaluate.average_checkpoints(ends, [1 - alpha, alpha], out=point)
        study["dev_loss"].append(evaluate.reply_loss(evaluate.load_model(point, device), tokenizer, records, *budget,
                                                     device))
        shutil.rmtree(point)
    inner = [(loss, a) for a, loss in zip(ALPHAS, study["dev_loss"]) if 0 < a < 1]
    study["dev_alpha"] = min(inner)[1]
    evaluate.average_checkpoints(ends, [1 - study["dev_alpha"], study["dev_alpha"]], out=os.path.join(out, DEV_AVERAGE_DIR),
                                 overwrite=True)
    log("averaging: " + ", ".join(f"alpha {a} loss {v:.4f}" for a, v in zip(ALPHAS, study["dev_loss"]))
        + f"; moved {study['moved_first']:.3f} / {study['moved_second']:.3f} of |w|, cosine {study['cosine']:.3f}; "
        f"dev picks alpha {study['dev_alpha']}")
    return study


def scores_path(args, seed):
    return os.path.join(args.out, f"seed-{seed}", "scores.json")


def run_seeds(args, rest, cfg, overrides, seeds, log=print):
    """Every seed's scores.json: read back if there, else trained here or, with --jobs > 1, by child processes
    side by side (each `audit.py --seeds N --jobs 1`, its output in OUT/seed-N.log)."""
    todo = [s for s in seeds if not os.path.isfile(scores_path(args, s))]
    if args.jobs == 1:
        for seed in todo:
            run_seed(args, cfg, overrides, seed, log)
    elif todo:
        os.makedirs(args.out, exist_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}

        def child(seed):
            with open(os.path.join(args.out, f"seed-{seed}.log"), "w") as f:
                return subprocess.run([sys.executable, os.path.abspath(__file__), "--seeds", str(seed), "--jobs", "1",
                                       "--out", args.out, "--eval-n", str(args.eval_n), "--tasks", args.tasks,
                                       "--seed-only", *rest], stdout=f, stderr=subprocess.STDOUT, env=env).returncode

        log(f"audit: seeds {', '.join(map(str, todo))} in child processes, {args.jobs} at a time; their output goes "
            f"to {os.path.join(args.out, 'seed-N.log')}")
        try:
            with ThreadPoolExecutor(args.jobs) as pool:  # Ctrl-C reaches the children too: each checkpoints and stops
                failed = [(s, rc) for s, rc in zip(todo, pool.map(child, todo)) if rc]
        except KeyboardInterrupt:
            raise SystemExit("audit: stopped; run the same command again to continue") from None
        if failed:
            raise SystemExit("audit: " + ", ".join(f"seed {s} exited {rc} (see {args.out}/seed-{s}.log)" for s, rc in failed)
                             + "; the same command again resumes what they had trained")
    return [read_json(scores_path(args, s)) for s in seeds]


def comparisons(seeds, lengths):
    """[(label, A, B, task)] of the recipe's elements: A is the recipe's choice, B what it is compared with, over
    every task (task None); the better single length is picked on the test scores (the average's hardest rival)."""
    means = {n: np.mean([np.mean([np.mean(v) for v in s["scores"][stage_name(3, n)].values()]) for s in seeds])
             for n in lengths}
    better = stage_name(3, max(lengths, key=means.get))
    search = " + resolution search"
    rows = [("stage 2 vs stage 3 from stage 1 given stage 2's steps too (compute-matched)",
             stage_name(3, lengths[0]), NO_STAGE2, None)]
    rows += [(f"stage 3 at {b} vs {a} tokens", stage_name(3, b), stage_name(3, a), None)
             for a, b in zip(lengths, lengths[1:])]
    rows += [(f"average vs stage 3 at {n} tokens", AVERAGE_DIR, stage_name(3, n), None) for n in lengths]
    return rows + [
        (f"average vs the better single length ({better})", AVERAGE_DIR, better, None),
        (f"average, weight chosen on dev, vs {better}", DEV_WEIGHT, better, None),
        ("resolution search on the average vs the average", AVERAGE_DIR + search, AVERAGE_DIR, None),
        (f"resolution search on {better} vs {better}", better + search, better, None),
        (f"average + search vs {better} + search (the combination)", AVERAGE_DIR + search, better + search, None)]


def audit_table(seeds, lengths):
    """Per comparison: both means, the paired difference and its 95% interval (macro-mean over tasks, in %)."""
    table = []
    for label, a, b, task in comparisons(seeds, lengths):
        tasks = [task] if task else list(seeds[0]["scores"][a])
        diffs = [{t: np.asarray(s["scores"][a][t]) - np.asarray(s["scores"][b][t]) for t in tasks} for s in seeds]
        mean = lambda name: float(np.mean([np.mean([np.mean(s["scores"][name][t]) for t in tasks])  # noqa: E731
                                           for s in seeds]))
        table.append({"comparison": label, "a": a, "b": b, "task": task, "a_mean": mean(a), "b_mean": mean(b),
                      **evaluate.bootstrap_ci(diffs)})
    return table


def task_means(seeds):
    """Markdown: each checkpoint's test score per task, the mean over seeds."""
    names, tasks = list(seeds[0]["scores"]), list(seeds[0]["scores"][AVERAGE_DIR])
    return evaluate.markdown_table({n: {t: float(np.mean([np.mean(s["scores"][n][t]) for s in seeds])) for t in tasks}
                                    for n in names}, tasks)


def markdown(table, n_seeds):
    lines = [f"| comparison ({n_seeds} seeds) | A | B | A - B (points) | 95% interval | reads as |", "|---" * 6 + "|"]
    for r in table:
        verdict = "A better" if r["lo"] > 0 else "B better" if r["hi"] < 0 else "no difference resolved"
        lines.append(f"| {r['comparison']} | {100 * r['a_mean']:.1f} | {100 * r['b_mean']:.1f} | "
                     f"{100 * r['mean']:+.1f} | [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {verdict} |")
    return "\n".join(lines)


def averaging_markdown(seeds, lengths):
    """The averaging study per seed: how far each run moved from stage 2, how aligned, the dev loss along the line
    and the weight dev picked."""
    lines = [f"| seed | moved, {lengths[0]} / {lengths[1]} (of the stage-2 weights' norm) | cosine of the two moves | "
             + " | ".join(f"dev loss at alpha {a}" for a in ALPHAS) + " | alpha dev picks |",
             "|---" * (4 + len(ALPHAS)) + "|"]
    for s in seeds:
        st = s["averaging"]
        lines.append(f"| {s['seed']} | {st['moved_first']:.3f} / {st['moved_second']:.3f} | {st['cosine']:.3f} | "
                     + " | ".join(f"{v:.4f}" for v in st["dev_loss"]) + f" | {st['dev_alpha']} |")
    return "\n".join(lines)


def plot(table, out_png):
    """The paired differences with their intervals, one row per comparison (not without matplotlib)."""
    def draw(ax):
        y = np.arange(len(table))[::-1]
        mean = np.array([100 * r["mean"] for r in table])
        err = np.array([[100 * (r["mean"] - r["lo"]) for r in table], [100 * (r["hi"] - r["mean"]) for r in table]])
        ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(yticks=y, yticklabels=[r["comparison"] for r in table], xlabel="A - B, points (95% interval)")
    return save_plot(out_png, (8, 0.5 + 0.45 * len(table)), draw)


def main(argv=None):
    args, rest, cfg, overrides = parse_args(argv)
    t0 = time.time()
    seeds = run_seeds(args, rest, cfg, overrides, [int(s) for s in args.seeds.split(",") if s])
    if args.seed_only:
        return
    lengths = [n for n, _ in train.stage3_runs(cfg)]
    table = audit_table(seeds, lengths)
    text = markdown(table, len(seeds)) + f"\n\ntest scores in %, the mean over {len(seeds)} seeds:\n\n" + task_means(seeds)
    chosen = {run: {t: sorted({s["chosen"][run][t] for s in seeds}) for t in seeds[0]["chosen"][run]}
              for run in seeds[0]["chosen"]}
    for run, picks in chosen.items():
        text += f"\n\nresolution search on {run} chose (min:max pixels per task, over seeds): " + \
            ", ".join(f"{t} {' / '.join(px)}" for t, px in picks.items())
    first, second = (stage_name(3, n) for n in lengths[:2])
    text += f"\n\naveraging, along w(alpha) = (1 - alpha) {first} + alpha {second}:\n\n" \
        + averaging_markdown(seeds, lengths)
    write_json({"table": table, "chosen": chosen, "wall_s": time.time() - t0}, os.path.join(args.out, "audit.json"))
    with open(os.path.join(args.out, "audit.md"), "w") as f:
        f.write(text + "\n")
    plot(table, os.path.join(args.out, "audit.png"))
    print(text)
    print(f"audit: {time.time() - t0:.0f}s; wrote {os.path.join(args.out, 'audit.md')} and audit.png")


if __name__ == "__main__":
    cli(main)
