"""What every script shares and none of it is about the model: files written whole (write-then-rename), JSON and
safetensors files that name themselves in their errors, checkpoint and output directories, a command's one-line
errors, devices (names, peak FLOP/s for MFU, memory; kernels.py detects them) and plots. It imports nothing of ours.
"""
import argparse
import contextlib
import errno
import json
import os
import platform
import resource
import shutil
import sys
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def replaced(path, tmp=None):
    """Yields a temporary path (default: path + ".tmp") to write a file or a directory to; once that is done it
    replaces `path` by a rename, so no reader and no crash meets half of it (a file: the old or the new one; a
    directory, removed just before the rename: the old one, the new one or the complete temporary one). A write
    that fails (disk full) removes its temporary path and leaves `path` as it was."""
    tmp = tmp or path.rstrip("/") + ".tmp"
    _remove(tmp)  # a crash's leftover
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isdir(path):  # a rename does not replace a non-empty directory
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_json(obj, path):
    with replaced(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def read_json(path, missing_ok=False):
    """A JSON file's contents; a missing file is an error naming it (with missing_ok: None), and so is a file
    that is not JSON (json's own message names no file)."""
    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except ValueError as e:  # JSON syntax or encoding
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def save_safetensors(tensors, file, metadata=None):
    """safetensors' save_file, its I/O errors as OSError naming the file (errno 28 when the disk is full)."""
    try:
        save_file(tensors, file, metadata=metadata)
    except SafetensorError as e:
        if "os error 28" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file) from None
        raise OSError(f"{file}: cannot write ({e})") from None


def read_safetensors(file, keep=lambda name: True):
    """{name: tensor} of a safetensors file (only the names `keep` accepts); a missing, truncated or corrupt
    file is an error naming it (safetensors' own message names no path)."""
    try:
        with safe_open(file, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint weights ({e}); the file may be truncated or "
                         "still being written") from e


# ----------------------------------------------------------------------------- a run directory's names

# one name per artifact a run writes under --out (docs/DESIGN.md#checkpoints shows the tree)
AVERAGE_DIR = "stage3-avg"  # the average of the stage-3 runs
RUN_ARGS = "args.json"  # train.py's flags and pixel budget, beside a stage's checkpoints
METRICS_FILE, LOSS_PLOT, FIRST_SAMPLES = "metrics.jsonl", "loss.png", "first_samples.jsonl"  # in each stage dir
EVAL_REPORT, RESULTS_TABLE, RESULTS_PLOT, PREDICTIONS = "eval.json", "results.md", "results.png", "predictions.jsonl"
AVERAGED_FROM = "averaged_from.json"  # an average's sources and weights
LATEST = "latest"  # in a stage dir: names its newest complete checkpoint
TRAIN_STATE = "train_state.pt"  # in a training checkpoint: optimizer, RNG and data position, counters, flags
CHECKPOINT_PREFIX = "step-"  # a training checkpoint's directory: step-NNNNNN (checkpoint_name)


def stage_name(num, length=None):
    """A stage's directory under --out: stage1, stage2, stage3, or stage3-<packing length> for each stage-3 run of
    --stage all."""
    return f"stage{num}" + (f"-{length}" if length else "")


def checkpoint_name(step):
    """A training checkpoint's directory in its stage dir: step-NNNNNN (names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


# ----------------------------------------------------------------------------- checkpoint directories


def write_checkpoint(path, tensors, config):
    """Our checkpoint in directory `path`: `model.safetensors` ({our name: tensor}) + `config.json` (a dict)."""
    os.makedirs(path, exist_ok=True)
    with replaced(os.path.join(path, "model.safetensors")) as tmp:
        save_safetensors({n: t.detach().contiguous() for n, t in tensors.items()}, tmp)
    write_json(config, os.path.join(path, "config.json"))


def is_our_config(config):
    """Our config.json's dict: it has `vision` and `text` (a Hugging Face one does not)."""
    return {"vision", "text"} <= config.keys()


def is_our_checkpoint(path):
    """A directory with our config.json."""
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and is_our_config(read_json(config))


def checkpoint_dir(path, log=print):
    """A checkpoint directory: `path` itself, or in a stage directory the one its `latest` file names; when
    `latest` is missing or names a missing or damaged checkpoint, the newest complete one, with a line saying so."""
    has_latest = os.path.isfile(os.path.join(path, LATEST))
    if not has_latest and os.path.isfile(os.path.join(path, "config.json")):
        return path
    candidates = stage_checkpoints(path)
    good = next((c for c in candidates if checkpoint_damage(c) is None), None)
    if good is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint ({latest_problem(path)})" if candidates else
                                f"{path}: no checkpoint (neither config.json nor a `latest` file)")
    if not has_latest or good != candidates[0]:
        log(f"warning: {latest_problem(path)}; using the newest complete checkpoint {good}")
    return good


def stage_checkpoints(stage_dir):
    """The checkpoints a stage directory may hold, newest first: the one `latest` names (present or not), then
    every step-NNNNNN directory."""
    latest, named = os.path.join(stage_dir, LATEST), []
    if os.path.isfile(latest):
        with open(latest) as f:
            named = [os.path.join(stage_dir, f.read().strip())]
    steps = sorted((d for d in os.listdir(stage_dir) if d.startswith(CHECKPOINT_PREFIX)), reverse=True) \
        if os.path.isdir(stage_dir) else []
    return named + [os.path.join(stage_dir, d) for d in steps if os.path.join(stage_dir, d) not in named]


def latest_problem(stage_dir):
    """Why a stage directory's `latest` does not lead to a complete checkpoint (a phrase)."""
    named = stage_checkpoints(stage_dir)
    if not os.path.isfile(os.path.join(stage_dir, LATEST)):
        return f"{stage_dir} has no `latest` file"
    return f"{os.path.join(stage_dir, LATEST)} names {named[0]}: {checkpoint_damage(named[0])}"


def checkpoint_damage(ckpt, files=("config.json", "model.safetensors")):
    """None for a complete checkpoint, else what is wrong with it: a missing file, an unreadable config.json,
    a safetensors header that does not cover the file (truncated)."""
    if not os.path.isdir(ckpt):
        return "no such directory"
    for name in files:
        if not os.path.isfile(os.path.join(ckpt, name)):
            return f"no {name}"
    try:
        read_json(os.path.join(ckpt, "config.json"))
        with safe_open(os.path.join(ckpt, "model.safetensors"), "pt"):
            pass
    except (ValueError, SafetensorError, OSError) as e:
        return f"damaged ({e})"
    return None


# ----------------------------------------------------------------------------- output directories


def check_output_dir(out, flag, marker, ours, inputs=(), overwrite=False):
    """Before a command writes its output directory `out`: `out` is new, empty, or this command's own earlier
    output (it holds `marker` and only names `ours(name)` accepts), or with `overwrite` holds other files too
    (kept; see output_dir); never an input nor a directory holding one, so nothing the command did not write is
    deleted. Returns the names in `out` that are not the command's; an error names the flag and what is there."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{flag} {out}: is a file, not a directory; not overwriting it")
    real = os.path.realpath(out)
    for p in inputs:
        if os.path.commonpath([real, os.path.realpath(p)]) in (real, os.path.realpath(p)):
            raise ValueError(f"{flag} {out}: overlaps the input {p}; write to another directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    others = [e for e in entries if not ours(e)]
    if entries and (others or marker not in entries) and not overwrite:
        shown = others or entries
        raise FileExistsError(f"{flag} {out}: holds what this command did not write ({', '.join(shown[:5])}"
                              f"{', ...' if len(shown) > 5 else ''}); not overwriting it: choose a new or empty "
                              "directory, or --overwrite to replace only the files this command writes")
    return others


@contextlib.contextmanager
def output_dir(out, ours, keep_others=False):
    """Yields a temporary directory to write a command's output to, which then becomes `out` by a rename
    (see replaced); with keep_others, the files `ours(name)` accepts are replaced in `out` and the others kept."""
    if not keep_others:
        with replaced(out) as tmp:
            yield tmp
        return
    tmp = out.rstrip("/") + ".tmp"
    _remove(tmp)
    try:
        yield tmp
        for name in os.listdir(out):  # the command's earlier files (e.g. other shards) go, the others stay
            if ours(name):
                _remove(os.path.join(out, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        _remove(tmp)


# ----------------------------------------------------------------------------- command lines


def refuse_flag(parser, flag, instead):
    """`flag` is another command's name for a different setting: refused with the name this command uses,
    rather than read as something it does not mean here (and kept out of --help)."""
    class Refuse(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            p.error(f"{flag}: {instead}")
    parser.add_argument(flag, action=Refuse, help=argparse.SUPPRESS)


def cli(main, argv=None):
    """A script's main(argv) as a command: an error the user can cause (a file, a path, a record, a full disk,
    memory) ends it with one line `error: ...` and exit status 1, not a traceback; `--debug` (anywhere in argv)
    or NANOMINDVL_DEBUG=1 shows the traceback. Usage errors and other one-line exits are SystemExit already."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("NANOMINDVL_DEBUG") == "1"
    try:
        return main([a for a in argv if a != "--debug"])
    except (OSError, ValueError, KeyError, torch.OutOfMemoryError) as e:
        if debug:
            raise
        raise SystemExit(f"error: {error_line(e)} (--debug shows the traceback)") from None


def error_line(e):
    """An exception as one line: a full disk said plainly, an OSError's file named, notes (what is kept) after."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        msg = "no space left on device" + (f" (writing {e.filename})" if e.filename else "")
    elif isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    else:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
    return " ".join("; ".join([msg, *getattr(e, "__notes__", [])]).split())


# ----------------------------------------------------------------------------- devices


def accelerators():
    """The accelerator modules present, {"cuda": torch.cuda, ...} (torch.npu exists once torch_npu is imported)."""
    return {name: getattr(torch, name) for name in ("cuda", "npu")
            if hasattr(torch, name) and getattr(torch, name).is_available()}


def synchronize(device):
    """Waits for the device's queued work (a device type or torch.device; nothing to wait for on cpu)."""
    kind = getattr(device, "type", device)
    if kind != "cpu":
        getattr(torch, kind).synchronize()


def device_name(device):
    """What the device is (a device type or torch.device): the accelerator's name, or the cpu model with its
    cores and torch's threads."""
    kind = getattr(device, "type", device)
    if kind == "cpu":
        model = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return getattr(torch, kind).get_device_name()


def peak_memory_gb(device):
    """The most memory allocated at once so far: the allocator's on an accelerator, the process's RSS on cpu."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


MATMUL_N = {"cpu": 1024}  # the probe's matrix side (else 8192): long enough to time, short on a laptop
# dense bf16 peak per device, from the vendors' datasheets (NVIDIA H100/H200 SXM: 989 TFLOP/s, H100 PCIe:
# 756, A100: 312); Ascend 910B: ~313 as commonly quoted (Huawei publishes 256 fp16 for the first Ascend 910,
# Hot Chips 2019, and no per-chip datasheet figure for the 910B) -- pass --peak-tflops for another figure.
# The first name contained in the device's name wins, so "H100 PCIe" comes before "H100".
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("910B", 313.0))


def matmul_flops(device, dtype, clock=time.perf_counter):
    """A dense matmul's FLOP rate on this device and dtype: a reachable peak for devices PEAK_TFLOPS lacks."""
    n = MATMUL_N.get(device.type, 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4):  # the best of a few short trials: a busy machine only ever slows a trial down
        synchronize(device)
        t0 = clock()
        a @ a
        synchronize(device)
        best = max(best, 2 * n ** 3 / (clock() - t0))
    del a
    if device.type != "cpu":  # the probe's matrices are not training's: peak memory counts from here on
        getattr(torch, device.type).reset_peak_memory_stats(device)
    return best


def peak_flops(device, dtype, peak_tflops=None, clock=time.perf_counter):
    """(FLOP/s, where the figure comes from): the denominator of MFU = model FLOPs per second / this (PaLM,
    Chowdhery et al. 2022, App. B). `peak_tflops` (the --peak-tflops flag) when given, else the datasheet's for a
    device in PEAK_TFLOPS, else the measured rate of a dense `dtype` matmul (matmul_flops, timed by `clock`)."""
    if peak_tflops:
        return peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}"
    name = device_name(device)
    if getattr(device, "type", device) != "cpu":
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"datasheet: {key} dense bf16 {tflops:g} TFLOP/s"
    device = torch.device(device)
    n = MATMUL_N.get(device.type, 8192)
    return (matmul_flops(device, dtype, clock),
            f"measured: {str(dtype).removeprefix('torch.')} {n}^3 matmul on {name}, best of 4")


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_plot(out_png, figsize, draw):
    """Draws `draw(ax)` on one figure of `figsize` inches and writes it to `out_png`; returns whether it was
    written (False without matplotlib, which requirements.txt lists but a minimal install may lack)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(out_png, dpi=100)
    finally:
        plt.close(fig)
    return True
