"""Training: flags, the MindVL stage table, AdamW with per-module learning rates and a warm-up + cosine
schedule, the loop (gradient accumulation, global-norm clipping, bf16 autocast, non-finite steps skipped),
logging (loss, lr, tokens/s, MFU, memory, ETA; metrics.jsonl; loss.png), atomic checkpoints with exact
resume, and the default recipe: stages 1 -> 2 -> 3, stage 3 twice at two packing lengths, their average,
evaluation with test-time resolution search.

    python train.py                                   # the whole tiny recipe on CPU, then a results table
    python train.py --stage 2 --init-from runs/tiny/stage1 --max-steps 200 --packing-length 2048
    python train.py --stage 3 --data mine=train.jsonl:1 --image-root imgs/ --init-from runs/tiny/stage2
    torchrun --nproc-per-node 2 train.py --stage 2 --init-from runs/tiny/stage1   # data parallel, rank 0 writes
    torchrun --nproc-per-node 8 train.py --preset qwen2.5-vit-675m+qwen3-8b --fsdp --device npu --dtype bf16 ...
    python train.py --preset qwen2.5-vit-675m+deepseek-v3 --dry-run 256,512 --ep 64 --fsdp   # GiB per rank
    torchrun --nproc-per-node 4 train.py --preset tiny --cp 2 --device cpu   # 2 data-parallel x 2 context-parallel

Run directory (--out; locked by .lock while a run uses it):
    stage1/ stage2/            one directory per trained stage (stage3-<len>/ for the two stage-3 runs):
        args.json              the flags of the run that trained it
        metrics.jsonl          one JSON object per optimizer step
        loss.png               the loss curve
        step-000120/           a checkpoint: model.safetensors, config.json, train_state.pt
        latest                 the name of the newest complete checkpoint
    stage3-avg/                the averaged stage-3 checkpoint (model.safetensors, config.json)
    eval.json, results.md      evaluation of every checkpoint and the resolution search
    results.png                the results table as a picture (checkpoints x tasks)
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import data
import evaluate
import parallel
import convert
from common import AVERAGE_DIR, CHECKPOINT_PREFIX, FIRST_SAMPLES, LATEST, LOSS_PLOT, METRICS_FILE, RUN_ARGS, \
    TRAIN_STATE, accelerators, checkpoint_damage, checkpoint_dir, checkpoint_name, cli, is_our_checkpoint, \
    is_our_config, peak_flops, peak_memory_gb, read_json, replaced, save_plot, stage_checkpoints, stage_name, \
    write_checkpoint, write_json
from kernels import ATTENTION_BACKENDS, resolve_device
from model import MLLM, PRESETS, ModelConfig, PatchMerger, TextConfig, VisionConfig, VisionEncoder, compile_blocks, \
    config_from_preset, loss_tokens, model_flops, update_expert_bias
from tasks import MAX_TURNS, SYNTHETIC_TASKS, SyntheticTasks

# ----------------------------------------------------------------------------- the stage table


@dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple        # module groups that update; the others stay bit-for-bit as they were
    lr: float            # peak learning rate of the connector and decoder
    lr_mult: dict        # per module group multiplier on lr
    steps: int
    warmup: int          # linear warm-up steps, then cosine decay to MIN_LR_RATIO * peak
    packing_length: int  # tokens per packed micro-batch
    style: str           # tasks.SyntheticTasks style: "pretrain" = loss on all text, "instruct" = replies only
    mix: dict            # synthetic task -> sampling weight (ignored when --data is given)
    max_turns: int = 1   # synthetic conversations of 1..max_turns turns, cut at whole turns to the packing length
    image_share: float = 0.0  # an image's pixel budget: this share of the packing length in tokens (0: data.MAX_PIXELS)


MODULE_GROUPS = ("vision", "connector", "decoder")
MIN_LR_RATIO = 0.1
ALL_TASKS = {t: 1.0 for t in SYNTHETIC_TASKS}
# the tiny run's weak spots, upweighted: colour/shape/count, and reading (at weight 1 OCR scored 5 ANLS; docs/LOG.md)
PERCEPTION = {"vqa_color": 3.0, "vqa_shape": 3.0, "vqa_count": 3.0, "ocr": 3.0}

# MindVL's abstract (arXiv 2509.11662) names three phases: warm-up, multitask training, supervised instruction
# tuning; what each row trains, on what data, is our choice (docs/DESIGN.md). Learning rates, steps and lengths
# are sized for the tiny preset training from scratch on the synthetic curriculum on a 2-core CPU.
# Peak lrs stay at or below 3e-4: above it (3e-3..1e-2 measured, docs/LOG.md) Adam grows the connector's output
# along one shared direction until image tokens no longer differ, and answers come from the question alone.
STAGES = {
    # 1. warm-up: ViT and LLM frozen, only the randomly initialised MLP connector learns, on caption data.
    #    Over a random frozen decoder there is nothing to align to, so the rate is low enough not to collapse it.
    1: Stage("warm-up", trains=("connector",), lr=1e-4, lr_mult={"connector": 1.0}, steps=100, warmup=10,
             packing_length=512, style="pretrain", mix={"caption": 1.0}),
    # 2. multitask pre-training: all parameters, the ViT at a lower rate, pre-training formats (caption,
    #    OCR, grounding, interleaved multi-image, text-only) mixed by ratio, loss on all text
    2: Stage("multitask pre-training", trains=MODULE_GROUPS, lr=3e-4,
             lr_mult={"vision": 0.5, "connector": 1.0, "decoder": 1.0}, steps=900, warmup=50,
             packing_length=512, style="pretrain",
             mix={"caption": 2.0, **PERCEPTION, "vqa_position": 1.0, "grounding": 1.0,
                  "multi_image": 1.0, "arithmetic": 0.5}),
    # 3. supervised instruction tuning: all parameters, conversations, loss on the replies only
    3: Stage("instruction tuning", trains=MODULE_GROUPS, lr=3e-4,
             lr_mult={"vision": 0.5, "connector": 1.0, "decoder": 1.0}, steps=600, warmup=30,
             packing_length=512, style="instruct", mix=ALL_TASKS | PERCEPTION, max_turns=MAX_TURNS,
             image_share=1 / 64),
}
# MindVL's abstract: checkpoints trained with different sequence lengths, averaged. Here stage 3 runs at each
# length from the same stage-2 checkpoint with the stage's token budget (steps scale as 512 / length); the
# longer run sees whole the conversations the shorter one cuts (tasks.MAX_TURNS)
STAGE3_LENGTHS = "512,1024"
# evaluation of the default run: samples per task, the test budget (the one stage 3 trained at) and the
# resolution search's candidates, min:max pixels: fewer pixels, and small images upscaled 2x (our choice)
EVAL_N, EVAL_DEV_N, RESOLUTIONS = 64, 64, "56x56:56x56,112x112:1M"
DEV_LOSS_N = 4  # dev records per task of a stage's mix whose loss is measured at checkpoints (loss.png's dots)

# ----------------------------------------------------------------------------- flags


@dataclass
class TrainConfig:
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    stage: str = field(default="all", metadata={"help": "1, 2, 3, or all (1 -> 2 -> 3 x two lengths -> average -> eval)"})
    max_steps: typing.Optional[int] = field(default=None, metadata={"help": "optimizer steps per stage (default: the stage table's)"})
    packing_length: typing.Optional[int] = field(default=None, metadata={"help": "tokens per packed micro-batch (default: the stage table's)"})
    lr: typing.Optional[float] = field(default=None, metadata={"help": "peak lr of connector/decoder (default: the stage table's; the ViT keeps its multiplier)"})
    warmup: typing.Optional[int] = field(default=None, metadata={"help": "warm-up steps (default: the stage table's)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay on matrices"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    datasets: list = field(default_factory=list, metadata={"flag": "--data", "help": "dataset file name=path:weight (repeatable; JSONL, JSON array, OpenAI messages, Parquet or Arrow); default: the synthetic curriculum"})
    image_root: str = field(default=".", metadata={"help": "directory the data files' image paths are relative to"})
    allow_outside_image_root: bool = field(default=False, metadata={"help": "let dataset image paths leave --image-root (absolute or ../ paths)"})
    on_bad: str = field(default="raise", metadata={"help": "bad data sample: raise or skip (counted)", "choices": ["raise", "skip"]})
    max_skip_rate: float = field(default=0.1, metadata={"help": "--on-bad skip: stop when a dataset skips more than this fraction of its records"})
    data_workers: typing.Optional[int] = field(default=None, metadata={"help": "processes that read, decode and tokenize samples ahead of the step, the same batches as 0 (in the training process); default: the CPUs per local rank less 2, at most 8"})
    truncate: bool = field(default=False, metadata={"help": "cut the text of samples longer than --packing-length (else they are bad samples)"})
    min_pixels: int = field(default=data.MIN_PIXELS, metadata={"help": "image pixel floor for smart resize"})
    max_pixels: typing.Optional[int] = field(default=None, metadata={"help": "image pixel budget for smart resize (default: the stage table's: a share of the packing length in stage 3, else the processor's)"})
    tokenizer: typing.Optional[str] = field(default=None, metadata={"help": "tokenizer.json dir or .tiktoken file (default: byte-level, or the --init-from HF dir's)"})
    out: str = field(default="", metadata={"help": "run directory (default: runs/<preset>)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest checkpoints"})
    overwrite: bool = field(default=False, metadata={"help": "start over: replace the stages an earlier run left in --out (their checkpoints are deleted)"})
    init_from: typing.Optional[str] = field(default=None, metadata={"help": "start from our checkpoint/stage dir, or a whole Hugging Face Qwen2.5-VL dir"})
    init_vision_from: typing.Optional[str] = field(default=None, metadata={"help": "MindVL's start: the ViT from a Hugging Face Qwen2.5-VL dir (its visual.* weights) or our checkpoint; with --init-text-from"})
    init_text_from: typing.Optional[str] = field(default=None, metadata={"help": "MindVL's start: the LLM (and its tokenizer and chat template) from a Hugging Face causal-LM dir (qwen2, qwen3, qwen3_moe, deepseek_v3, llama, mistral) or our checkpoint; a new connector joins it to the ViT"})
    keep_vision_merger: bool = field(default=False, metadata={"help": "keep --init-vision-from's own merger as the connector (default: a new one)"})
    random_vision: bool = field(default=False, metadata={"help": "with --init-text-from and no --init-vision-from: train the preset's ViT from random weights"})
    chat_template: typing.Optional[str] = field(default=None, metadata={"help": "chat template of a Hugging Face tokenizer: a .jinja file, or chatml (the built-in format); default: the tokenizer's own"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, npu or auto", "choices": ["auto", "cpu", "cuda", "npu"]})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: fp32, or bf16 autocast (auto: bf16 on cuda/npu, fp32 on cpu)", "choices": ["auto", "fp32", "bf16"]})
    seed: int = field(default=0, metadata={"help": "seed of the weights, data order and synthetic images"})
    ckpt_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept per stage (the newest K; older ones are removed)"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many non-finite-loss steps in a row"})
    log_every: int = field(default=10, metadata={"help": "print a progress line every N steps"})
    peak_tflops: typing.Optional[float] = field(default=None, metadata={"help": "device peak TFLOP/s for MFU (default: the datasheet's for a device in common.PEAK_TFLOPS, else a measured dense matmul rate)"})
    fsdp: str = field(default="", metadata={"help": "shard the model under torchrun: 'ours' (parallel.py's FSDP; "
                                                    "bare --fsdp) or 'torch' (PyTorch's FSDP2)",
                                            "choices": ["", "ours", "torch"]})
    ep: int = field(default=1, metadata={"help": "expert parallelism under torchrun: each group of this many ranks splits the routed experts (world size a multiple; with or without --fsdp)"})
    cp: int = field(default=1, metadata={"help": "context parallelism under torchrun: each group of this many neighbouring ranks shares one packed micro-batch, split by tokens, with Ulysses all-to-alls around attention (ranks = dp x cp)"})
    dry_run: str = field(default="", metadata={"help": "print the per-rank memory plan of --preset for these world sizes (e.g. 8,64) with --ep, --cp, --fsdp, --dtype, --packing-length; train nothing"})
    stage3_lengths: str = field(default=STAGE3_LENGTHS, metadata={"help": "--stage all: stage-3 packing lengths to train and average"})
    eval: bool = field(default=True, metadata={"help": "--stage all: evaluate every checkpoint and run the resolution search"})
    eval_n: int = field(default=EVAL_N, metadata={"help": "test samples per task in the evaluation"})
    eval_dev_n: int = field(default=EVAL_DEV_N, metadata={"help": "dev samples per task for the resolution search"})
    eval_max_pixels: typing.Optional[int] = field(default=None, metadata={"help": "test-time image pixel budget of --stage all's evaluation, the resolution search's default (default: --max-pixels, the budget stage 3 trained at)"})
    resolutions: str = field(default=RESOLUTIONS, metadata={"help": "pixel budgets the resolution search tries: MAX or MIN:MAX, comma-separated ('' = none)"})
    # how the model runs, not its shape (not in config.json; free to change with --init-from and --resume)
    z_loss: float = field(default=0.0, metadata={"help": "MM1 z-loss coefficient on logsumexp^2"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward to save memory"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each ViT block and decoder layer (dynamic shapes: packed lengths do not recompile); not with --fsdp or --ep"})
    attn_backend: typing.Optional[str] = field(default=None, metadata={"help": "kernels.varlen_attention backend (default: best for the device)", "choices": list(ATTENTION_BACKENDS)})




def _base_type(tp):
    """(python type, optional) of a resolved annotation such as `int | None` or typing.Optional[float]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parser_for(tp, optional):
    """The argparse type of a model flag: "none" for an optional field, comma-separated ints for a tuple."""
    if tp is bool:
        return _parse_bool

    def parse(s):
        if optional and s.lower() == "none":
            return None
        return tuple(int(x) for x in s.split(",") if x) if tp is tuple else tp(s)
    parse.__name__ = "comma-separated int" if tp is tuple else tp.__name__  # argparse's "invalid int value: 'x'"
    return parse


def typed_fields(config_class):
    """(field, python type, optional) of a dataclass, its annotations resolved to types (typing.get_type_hints)."""
    hints = typing.get_type_hints(config_class)
    return [(f, *_base_type(hints[f.name])) for f in fields(config_class)]


def model_fields():
    """(dotted name, type, optional) for every ModelConfig field, nested configs flattened."""
    out = []
    for f, tp, optional in typed_fields(ModelConfig):
        if f.name in ("vision", "text"):
            out += [(f"{f.name}.{g.name}", gtp, gopt) for g, gtp, gopt in typed_fields(tp)]
        else:
            out.append((f.name, tp, optional))
    return out


def model_help(dotted):
    """The --help line model.py keeps beside a (dotted) ModelConfig field."""
    section, _, name = dotted.rpartition(".")
    config = {"": ModelConfig, "vision": VisionConfig, "text": TextConfig}[section]
    return config.__dataclass_fields__[name].metadata["help"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    for f, tp, optional in typed_fields(TrainConfig):
        name, help_ = flag(f.name), f.metadata["help"]
        if tp is bool:
            p.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif tp is list:
            p.add_argument(name, dest=f.name, action="append", default=[], metavar=name[2:].upper(), help=help_)
        elif f.name == "fsdp":  # a bare --fsdp means our own FSDP
            p.add_argument(name, nargs="?", const="ours", default=f.default, choices=f.metadata["choices"], help=help_)
        else:
            p.add_argument(name, dest=f.name, type=tp, default=f.default, choices=f.metadata.get("choices"), help=help_)
    g = p.add_argument_group("model config (override the preset; ModelConfig / VisionConfig / TextConfig)")
    for name, tp, optional in model_fields():
        g.add_argument("--" + name.replace(".", "-").replace("_", "-"), dest="model." + name, default=argparse.SUPPRESS,
                       type=_parser_for(tp, optional), metavar=tp.__name__.upper(),
                       help=model_help(name) + " (default: preset)")
    return p


def flag(name):
    """The command-line spelling of a TrainConfig field (its metadata's "flag", else --the-field-name)."""
    field_ = TrainConfig.__dataclass_fields__.get(name)
    return field_.metadata.get("flag") if field_ and "flag" in field_.metadata else "--" + name.replace("_", "-")


# a numeric flag's lower bound: name -> (bound, strict); strict: the value must exceed it, else reach it
BOUNDS = {"max_steps": (1, False), "packing_length": (1, False), "grad_accum": (1, False), "log_every": (1, False),
          "keep_last": (1, False), "ep": (1, False), "cp": (1, False), "eval_n": (1, False), "eval_dev_n": (1, False),
          "min_pixels": (1, False), "max_bad_steps": (1, False), "warmup": (0, False), "ckpt_every": (0, False),
          "clip": (0, False), "weight_decay": (0, False), "data_workers": (0, False), "lr": (0, True)}


def check_config(cfg, overrides):
    """Every flag, path and the init checkpoint checked before the run directory is touched: a SystemExit that
    names the flag, so a typo costs nothing already on disk."""
    for name, (bound, strict) in BOUNDS.items():
        value = getattr(cfg, name)
        if value is not None and not (value > bound if strict else value >= bound):  # `not` also catches NaN
            raise SystemExit(f"{flag(name)} {value}: must be {'>' if strict else '>='} {bound}")
    if not 0 <= cfg.max_skip_rate <= 1 or not 0 < cfg.beta2 < 1:
        raise SystemExit(f"--max-skip-rate {cfg.max_skip_rate} must lie in [0, 1] and --beta2 {cfg.beta2} in (0, 1)")
    for name in ("max_pixels", "eval_max_pixels"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < cfg.min_pixels:
            raise SystemExit(f"{flag(name)} {getattr(cfg, name)} is below --min-pixels {cfg.min_pixels}")
    sharded = "--fsdp" if cfg.fsdp else "--ep" if cfg.ep > 1 else "--cp" if cfg.cp > 1 else None
    if cfg.compile and sharded:  # their hooks gather weights or exchange tokens around each block
        raise SystemExit(f"--compile with {sharded}: not supported (the sharded blocks' hooks gather weights or "
                         "exchange tokens, which the compiled graphs would have to trace); drop --compile")
    data_specs(cfg)
    if cfg.datasets and not os.path.isdir(cfg.image_root):
        raise SystemExit(f"--image-root {cfg.image_root}: no such directory")
    fixed = [k for k in overrides if not (cfg.random_vision and k.startswith("vision."))]
    start = cfg.init_from or cfg.init_text_from
    if start and fixed:
        raise SystemExit(f"{'--init-from' if cfg.init_from else '--init-text-from'} {start} fixes the model shape; "
                         f"drop the flags for {sorted(fixed)}")
    check_sources(cfg)
    if cfg.init_from:
        check_init(cfg)
    # a stage killed before its first checkpoint left its directory: resuming starts it at step 0 (a requeued job)
    if cfg.resume and not any(os.path.isdir(os.path.join(cfg.out, d)) for d in stage_dirs(cfg)):
        raise SystemExit(f"--resume: no run to resume in {cfg.out} (none of {', '.join(stage_dirs(cfg))} there); "
                         "drop --resume to start a new run")


def check_fresh_start(cfg):
    """Without --resume, the stages of an earlier run in --out are replaced only when --overwrite says so."""
    existing = [d for d in stage_dirs(cfg) if os.path.isdir(os.path.join(cfg.out, d))]
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if existing and not cfg.resume and not cfg.overwrite:
        raise SystemExit(f"--out {cfg.out} holds a run ({', '.join(existing)}): --resume continues it, --overwrite "
                         "starts over and deletes those stages, or choose another --out")


def check_init(cfg):
    """--init-from names a checkpoint: ours or a whole Qwen2.5-VL (an LLM alone would leave the ViT random)."""
    kind, _ = source_config(source_dir(cfg.init_from, "--init-from"), "--init-from")
    if kind not in ("ours", "qwen2_5_vl"):
        raise SystemExit(f"--init-from {cfg.init_from} holds a language model only (model_type "
                         f"{kind!r}): start MindVL's way with --init-text-from "
                         f"{cfg.init_from} --init-vision-from VDIR (a Qwen2.5-VL directory), or add --random-vision "
                         "instead of --init-vision-from to train a random ViT")


def check_sources(cfg):
    """The start's flags go together, and every source directory is one its flag can read, lies outside the
    stage directories this run rewrites, and fits the others (connector widths), all before --out changes."""
    vision, text = cfg.init_vision_from, cfg.init_text_from
    if cfg.init_from and (vision or text or cfg.random_vision):
        raise SystemExit("--init-from continues one checkpoint; --init-vision-from / --init-text-from / "
                         "--random-vision start from separate sources: give one or the other")
    if (vision or cfg.random_vision) and not text:
        raise SystemExit(f"{'--init-vision-from ' + vision if vision else '--random-vision'} needs --init-text-from "
                         "LDIR: the LLM the ViT is joined to")
    if vision and cfg.random_vision:
        raise SystemExit(f"--random-vision and --init-vision-from {vision}: choose one ViT")
    if text and not vision and not cfg.random_vision:
        raise SystemExit(f"--init-text-from {text} gives the LLM only: give the ViT with --init-vision-from VDIR (a "
                         "Qwen2.5-VL directory or one of our checkpoints), or --random-vision to train the preset's "
                         "ViT from random weights")
    if cfg.keep_vision_merger and not vision:
        raise SystemExit("--keep-vision-merger keeps the merger of --init-vision-from, which is not given")
    for flag_, path in (("--init-from", cfg.init_from), ("--init-vision-from", vision), ("--init-text-from", text)):
        for d in stage_dirs(cfg) if path else ():
            stage_dir = os.path.realpath(os.path.join(cfg.out, d))
            if os.path.commonpath([stage_dir, os.path.realpath(path)]) == stage_dir:
                raise SystemExit(f"{flag_} {path} lies inside {os.path.join(cfg.out, d)}, which this run "
                                 "overwrites; copy the checkpoint elsewhere or choose another --out")
    if text:
        hidden = text_source_config(text).hidden_size
        out_dim = vision_source_config(vision)[1] if vision else None
        if cfg.keep_vision_merger and out_dim != hidden:
            raise SystemExit(f"--keep-vision-merger: the merger of --init-vision-from {vision} outputs {out_dim} "
                             f"features, the LLM of --init-text-from {text} is {hidden} wide; drop the flag for a "
                             "new connector")
        if cfg.tokenizer is None and not os.path.isfile(os.path.join(source_dir(text, "--init-text-from"),
                                                                     "tokenizer.json")) \
                and not is_our_checkpoint(source_dir(text, "--init-text-from")):
            raise SystemExit(f"--init-text-from {text}: no tokenizer.json; give the LLM's tokenizer with --tokenizer DIR")


def source_dir(path, flag_):
    """The checkpoint directory a start flag names (a stage directory: its latest checkpoint), with its files."""
    try:
        ckpt = checkpoint_dir(path)
    except FileNotFoundError as e:
        raise SystemExit(f"{flag_} {e}") from None
    if not any(os.path.isfile(os.path.join(ckpt, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise SystemExit(f"{flag_} {path}: no model.safetensors or model.safetensors.index.json in {ckpt}")
    return ckpt


def source_config(path, flag_):
    """(model_type, config.json dict) of a source checkpoint directory; model_type "ours" for our checkpoints."""
    try:
        config = read_json(os.path.join(path, "config.json"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag_} {path}: unreadable config.json ({e})") from None
    return "ours" if is_our_config(config) else config.get("model_type"), config


def text_source_config(path):
    """TextConfig of --init-text-from: our checkpoint's decoder, or a Hugging Face causal LM's."""
    kind, config = source_config(source_dir(path, "--init-text-from"), "--init-text-from")
    if kind == "qwen2_5_vl":
        raise SystemExit(f"--init-text-from {path} is a whole Qwen2.5-VL: continue it with --init-from, or take its "
                         "ViT with --init-vision-from")
    try:
        return ModelConfig.from_dict(config).text if kind == "ours" else convert.text_config_from_hf(config)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--init-text-from {path}: {e}") from None


def vision_source_config(path):
    """(VisionConfig, merger output width) of --init-vision-from: our checkpoint's, or a Qwen2.5-VL's ViT."""
    kind, config = source_config(source_dir(path, "--init-vision-from"), "--init-vision-from")
    if kind not in ("ours", "qwen2_5_vl"):
        raise SystemExit(f"--init-vision-from {path}: model_type {kind!r} has no Qwen2.5-ViT; give a Qwen2.5-VL "
                         "directory or one of our checkpoints")
    try:
        if kind == "ours":
            mc = ModelConfig.from_dict(config)
            return mc.vision, mc.text.hidden_size
        return convert.vision_config_from_hf(config["vision_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--init-vision-from {path}: {e}") from None


def stage_dirs(cfg):
    """The directories under --out that this run writes."""
    if cfg.stage != "all":
        return [stage_name(cfg.stage)]
    runs = stage3_runs(cfg)
    return [stage_name(1), stage_name(2)] + ([stage_name(3, n) for n, _ in runs] + [AVERAGE_DIR] if len(runs) > 1
                                             else [stage_name(3)])


def data_specs(cfg):
    """[(name, path, weight)] of the --data flags: names unique, files present."""
    try:
        specs = [data.parse_data_flag(s) for s in cfg.datasets]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = [name for name, _, _ in specs]
    for name, path, _ in specs:
        if names.count(name) > 1:
            raise SystemExit(f"--data: the name {name!r} is given {names.count(name)} times; names must differ")
        if not os.path.isfile(path):
            raise SystemExit(f"--data {name}={path}: no such file")
    if specs and not any(w > 0 for _, _, w in specs):
        raise SystemExit(f"--data: every weight is 0 ({', '.join(cfg.datasets)}); give at least one dataset a weight > 0")
    return specs


def parse_args(argv=None):
    """(TrainConfig, {dotted model field: value} of the model flags given)."""
    ns = vars(build_parser().parse_args(argv))
    overrides = {k[len("model."):]: v for k, v in ns.items() if k.startswith("model.")}  # only flags given
    cfg = TrainConfig(**{k: v for k, v in ns.items() if not k.startswith("model.")})
    if cfg.stage not in ("1", "2", "3", "all"):
        raise SystemExit(f"--stage {cfg.stage!r}: choose 1, 2, 3 or all")
    cfg.out = cfg.out or os.path.join("runs", cfg.preset)
    return cfg, overrides


# ----------------------------------------------------------------------------- model, tokenizer, data


def build_model(preset, init, overrides, seed, **runtime):
    """The model of a stage: the preset (+ overrides) with seeded random weights when `init` is None, else our
    checkpoint (a checkpoint or stage dir) or a whole Hugging Face Qwen2.5-VL. runtime: MLLM's z_loss,
    activation_checkpointing, attn_backend."""
    torch.manual_seed(seed)
    if init is None:
        return MLLM(config_from_preset(preset, **overrides), **runtime)
    path = checkpoint_dir(init)
    if is_our_checkpoint(path):
        return MLLM.from_pretrained(path, **runtime)
    return convert.load_hf(path, **runtime)


def compose_model(cfg, tokenizer, overrides, **runtime):
    """MindVL's start: the ViT of --init-vision-from (or the preset's, random: --random-vision) and the LLM of
    --init-text-from, joined by a new 2-layer MLP connector (PatchMerger: RMSNorm, Linear-GELU-Linear from the
    ViT's merged width to the LLM's width; weights N(0, 0.02), biases 0, seeded by --seed) unless
    --keep-vision-merger keeps the ViT's own. The LLM's vocabulary grows by the image tokens its tokenizer
    lacked, their rows the mean of the others (Decoder.grow_vocab). runtime: MLLM's arguments."""
    flags = dict(attn_backend=runtime.get("attn_backend"),
                 activation_checkpointing=runtime.get("activation_checkpointing", False))
    torch.manual_seed(cfg.seed)
    decoder = _load_source(cfg.init_text_from, "decoder", flags, "--init-text-from")
    if cfg.init_vision_from:
        vision, merger = _load_source(cfg.init_vision_from, "vision", flags, "--init-vision-from")
    else:
        vision, merger = VisionEncoder(config_from_preset(cfg.preset, **overrides).vision, **flags), None
    if tokenizer.source_vocab_size > decoder.config.vocab_size:
        raise SystemExit(f"the tokenizer ({tokenizer_source(cfg)}) has {tokenizer.source_vocab_size} ids, the LLM of "
                         f"--init-text-from {cfg.init_text_from} {decoder.config.vocab_size} rows: not its tokenizer")
    decoder.grow_vocab(tokenizer.vocab_size, [tokenizer.special_tokens[s] for s in tokenizer.added])
    config = ModelConfig(vision=vision.config, text=decoder.config, image_pad_id=tokenizer.image_pad_id)
    with torch.device("meta"):
        model = MLLM(config, **runtime)
    model.vision, model.decoder = vision, decoder
    model.connector = merger if cfg.keep_vision_merger else PatchMerger(config.vision, config.text.hidden_size)
    return model


def _load_source(path, part, flags, flag_):
    """The `part` ("decoder", or "vision": (VisionEncoder, PatchMerger)) of our checkpoint or a Hugging Face
    directory; a missing or misshapen tensor stops the run in one line naming the flag."""
    ckpt = checkpoint_dir(path)
    try:
        if is_our_checkpoint(ckpt):
            model = MLLM.from_pretrained(ckpt, **flags)
            return model.decoder if part == "decoder" else (model.vision, model.connector)
        return convert.load_hf_decoder(ckpt, **flags) if part == "decoder" else convert.load_hf_vision(ckpt, **flags)
    except (KeyError, ValueError, OSError) as e:
        raise SystemExit(f"{flag_} {path}: {e.args[0] if e.args else e}") from None


def runtime_of(cfg):
    """MLLM's run-time arguments from the flags."""
    return dict(z_loss=cfg.z_loss, activation_checkpointing=cfg.activation_checkpointing, attn_backend=cfg.attn_backend)


def tokenizer_source(cfg):
    """Where the run's tokenizer comes from: --tokenizer, else the checkpoint or directory the weights start
    from (--init-from, else --init-text-from), else (--resume) the run's own checkpoints; a checkpoint without
    tokenizer files, or None, means byte-level."""
    start = cfg.init_from or cfg.init_text_from
    if cfg.tokenizer or start:
        return cfg.tokenizer or checkpoint_dir(start)
    for d in stage_dirs(cfg) if cfg.resume else ():  # the run's own checkpoints keep its tokenizer
        if os.path.isfile(os.path.join(cfg.out, d, LATEST)):
            try:
                return checkpoint_dir(os.path.join(cfg.out, d))
            except FileNotFoundError:
                continue
    return None


def build_tokenizer(cfg, model_config=None):
    """The run's tokenizer and chat format; with a model config, checked to fit it (vocabulary, <|image_pad|> id).
    A Hugging Face tokenizer needs a chat template (its own, or --chat-template)."""
    path = tokenizer_source(cfg)
    try:
        tok = data.load_tokenizer(path, cfg.chat_template)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tokenizer {path}: {e}") from None
    if cfg.chat_template and "tokenizer.json" not in tok.files:
        raise SystemExit(f"--chat-template {cfg.chat_template}: applies to a Hugging Face tokenizer (tokenizer.json: "
                         f"--tokenizer or --init-text-from), not {path or 'the byte-level one'}")
    if "tokenizer.json" in tok.files and tok.chat is None:
        raise SystemExit(f"tokenizer {path}: no chat template (chat_template.jinja or tokenizer_config.json's "
                         "chat_template); give one with --chat-template FILE.jinja, or --chat-template chatml for "
                         "the built-in <|im_start|>role ... <|im_end|> format")
    if model_config is None:
        return tok
    if tok.vocab_size > model_config.text.vocab_size or tok.image_pad_id != model_config.image_pad_id:
        raise SystemExit(f"tokenizer {path or 'byte-level'} (vocab {tok.vocab_size}, <|image_pad|> {tok.image_pad_id}) "
                         f"does not fit the model (vocab {model_config.text.vocab_size}, image_pad_id "
                         f"{model_config.image_pad_id}); see --tokenizer / --text-vocab-size / --image-pad-id")
    return tok


def build_source(cfg, stage_num, stage):
    """What a stage reads: the --data files mixed by their weights, else the synthetic tasks of the
    stage's mix. Each stage draws its own instances (seed offset by the stage number)."""
    seed = cfg.seed + 1000 * stage_num
    if cfg.datasets:
        sources, weights = {}, {}
        for name, path, weight in data_specs(cfg):
            sources[name] = data.FileDataset(path, cfg.image_root, allow_outside_root=cfg.allow_outside_image_root)
            weights[name] = weight
            if len(sources[name]) == 0:
                raise SystemExit(f"--data {name}={path}: the file holds no records")
        return data.Mixture(sources, weights, seed)
    sources = {t: SyntheticTasks([t], "train", seed, style=stage.style, max_turns=stage.max_turns)
               for t in stage.mix}
    return data.Mixture(sources, dict(stage.mix), seed)


# ----------------------------------------------------------------------------- optimizer and schedule


def module_group(name):
    return name.split(".", 1)[0]


def set_trainable(model, stage):
    """Freeze what the stage does not train (requires_grad off: no gradient, no optimizer state)."""
    for name, p in model.named_parameters():
        p.requires_grad_(module_group(name) in stage.trains)


def build_optimizer(model, stage, lr, cfg, device_type):
    """AdamW over the trainable parameters: one group per (module group, decay) with its own peak lr in
    `base_lr`; weight decay on matrices only, not on norms and biases (nanoGPT / GPT-3 practice)."""
    groups = []
    # parallel.py's flat shards carry the (module group, decay) they were built from in `fsdp_group`
    key = lambda n, p: getattr(p, "fsdp_group", None) or (module_group(n), p.dim() >= 2)  # noqa: E731
    for g in stage.trains:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and key(n, p)[0] == g]
        for decay in (True, False):
            ps = [p for n, p in params if key(n, p)[1] == decay]
            if ps:
                groups.append({"params": ps, "base_lr": lr * stage.lr_mult[g], "lr": 0.0, "module": g,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    fused = device_type in ("cuda", "cpu") and not cfg.fsdp  # fused CPU/CUDA kernels; NPU and sharded use foreach
    return torch.optim.AdamW(groups, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused)


def lr_factor(step, total, warmup, min_ratio=MIN_LR_RATIO):
    """Multiplier on the peak lr for 0-based optimizer step `step`: linear warm-up over `warmup` steps, then
    cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- FLOPs, MFU, memory


def compute_dtype(cfg):
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def resolve_dtype(name, device_type):
    """--dtype auto: bf16 autocast on an accelerator (tensor cores, half the activation memory), fp32 on cpu."""
    return name if name != "auto" else "fp32" if device_type == "cpu" else "bf16"


def activation_bytes(config, tokens, compute_bytes, checkpointing=False):
    """A rough size of the decoder activations one micro-batch of `tokens` packed tokens keeps for backward:
    per layer and token the residual stream and norm inputs (4h), q, k, v and the attention output, the MLP's
    input, gate, up and product (h + 3I; an MoE layer's I counts its k routed and shared experts, plus the
    routed rows copied out and back), and fp32 logits with their gradient. With activation checkpointing each
    layer keeps only its input (h), and one layer is recomputed at a time. The ViT is left out."""
    t = config.text
    if t.attention == "mla":
        attn = t.num_heads * (2 * (t.qk_nope_head_dim + t.qk_rope_head_dim) + 2 * t.v_head_dim)
    else:
        attn = 2 * t.num_heads * t.head_dim + 2 * t.num_kv_heads * t.head_dim
    per_layer = []
    for i in range(t.num_layers):
        moe = t.n_routed_experts and i >= t.first_k_dense
        inner = (t.num_experts_per_tok + t.n_shared_experts) * t.moe_intermediate_size if moe else t.intermediate_size
        routed_copies = 2 * t.num_experts_per_tok * t.hidden_size if moe else 0
        per_layer.append(5 * t.hidden_size + attn + 3 * inner + routed_copies)
    kept = t.num_layers * t.hidden_size + max(per_layer) if checkpointing else sum(per_layer)
    return tokens * (kept * compute_bytes + 2 * 4 * t.vocab_size)


def print_memory_plan(cfg, overrides, log=print):
    """--dry-run: per-rank GiB of each world size in cfg.dry_run for the preset, --ep, --cp and --fsdp."""
    config = config_from_preset(cfg.preset, **overrides)
    if cfg.cp > 1 and parallel.check_context_parallel(config, cfg.cp):
        raise SystemExit(f"--cp {cfg.cp}: {parallel.check_context_parallel(config, cfg.cp)}")
    with torch.device("meta"):
        model = MLLM(config)
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, "cuda"))  # a plan for accelerators
    compute_bytes = 2 if cfg.dtype == "bf16" else 4
    tokens = cfg.packing_length or STAGES[2].packing_length
    # context parallelism: a rank keeps activations of its tokens only (in attention: all tokens, 1/cp of the heads)
    act = activation_bytes(config, -(-tokens // cfg.cp), compute_bytes, cfg.activation_checkpointing)
    gib = lambda b: f"{b / 2 ** 30:,.1f}"  # noqa: E731
    layout = (("FSDP" if cfg.fsdp else "data parallel") + (f" x EP {cfg.ep}" if cfg.ep > 1 else "")
              + (f" x CP {cfg.cp}" if cfg.cp > 1 else ""))
    log(f"{cfg.preset}: {sum(p.numel() for p in model.parameters()):,} parameters; {layout}; {cfg.dtype} compute; "
        f"{tokens} tokens per micro-batch ({-(-tokens // cfg.cp)} per rank); activation checkpointing "
        f"{cfg.activation_checkpointing}")
    log("| ranks | parameters | gradients | AdamW | gathered | activations | total (GiB per rank) |")
    log("|---|---|---|---|---|---|---|")
    for world in (int(w) for w in cfg.dry_run.split(",")):
        if world % cfg.cp:
            raise SystemExit(f"--dry-run {world}: not a multiple of --cp {cfg.cp}")
        if world % cfg.ep or config.text.n_routed_experts % cfg.ep:
            raise SystemExit(f"--dry-run {world}: --ep {cfg.ep} needs a world size and an expert count "
                             f"({config.text.n_routed_experts}) that it divides")
        plan = parallel.memory_plan(model, world, cfg.ep, bool(cfg.fsdp), compute_bytes)
        log(f"| {world} | " + " | ".join(gib(plan[k]) for k in ("parameters", "gradients", "optimizer", "gathered"))
            + f" | {gib(act)} | {gib(sum(plan.values()) + act)} |")


# ----------------------------------------------------------------------------- checkpoints


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None, "npu": None}
    state.update({name: mod.get_rng_state_all() for name, mod in accelerators().items()})
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    for name, mod in accelerators().items():
        if state.get(name) is not None:
            mod.set_rng_state_all(state[name])


def save_checkpoint(stage_dir, model, optimizer, dist, keep_last, state, tokenizer):
    """stage_dir/step-NNNNNN/ {model.safetensors, config.json, train_state.pt, the tokenizer's files} written
    under a temp name and renamed, then `latest` is switched to it (also by rename) and all but the newest
    `keep_last` checkpoints are removed, so a crash at any moment leaves a complete checkpoint behind."""
    name = checkpoint_name(state["step"])
    final, tmp = os.path.join(stage_dir, name), os.path.join(stage_dir, f".tmp-{name}")
    sharded = parallel.is_sharded(model)  # else every rank holds the same weights and optimizer: rank 0 writes
    with replaced(final, tmp) if dist.is_main else contextlib.nullcontext(tmp):
        if dist.is_main:
            os.makedirs(tmp)
        parallel.barrier(dist)
        if sharded:
            full = parallel.gather_full_state_dict(model, dist)
            parallel.save_sharded(model, optimizer, dist, tmp, extra=state)  # exact resume at this world size
            if dist.is_main:
                write_checkpoint(tmp, full, model.config.to_dict())
            parallel.barrier(dist)
        elif dist.is_main:
            model.save_pretrained(tmp)
        if dist.is_main:  # through a Python file: a full disk is OSError 28, not a C++ stream error
            tokenizer.save(tmp)  # the run's tokenizer and chat format travel with every checkpoint
            with open(os.path.join(tmp, TRAIN_STATE), "wb") as f:
                torch.save({**state, "optimizer": None if sharded else optimizer.state_dict()}, f)
    if dist.is_main:
        with replaced(os.path.join(stage_dir, LATEST)) as latest, open(latest, "w") as f:
            f.write(name)
        for old in sorted(d for d in os.listdir(stage_dir) if d.startswith(CHECKPOINT_PREFIX))[:-keep_last]:
            if old != name:
                shutil.rmtree(os.path.join(stage_dir, old))
    parallel.barrier(dist)
    return final


def resume_optimizer_and_data(model, optimizer, loader, state, ckpt, dist, log=print):
    """Restore the optimizer and this rank's data position from a checkpoint (the weights come from its
    model.safetensors). On another world size a replicated optimizer (one process, plain data parallel) loads
    as it is and our FSDP's shards are re-cut (--ep and --fsdp torch shards need the same world size); the
    ranks' read positions are re-dealt over the new data-parallel ranks (ranks / --cp, `loader`'s world)."""
    loaders = state["loader"] if isinstance(state["loader"], list) else [state["loader"]]  # per data-parallel rank
    saved_world = len(loaders) * state["train_config"].get("cp", 1)
    sharded, saved_sharded = parallel.is_sharded(model), state["optimizer"] is None
    resharding = sharded and saved_world != dist.world_size
    if sharded != saved_sharded or (resharding and not parallel.reshardable(model)):
        how = lambda shards, n: f"{n} rank(s) with " + (  # noqa: E731
            "per-rank optimizer shards (--fsdp/--ep)" if shards else "a replicated optimizer")
        raise SystemExit(f"--resume: {ckpt} was written by {how(saved_sharded, saved_world)}, this run has "
                         f"{how(sharded, dist.world_size)}: resume with the flags it was written with (and, for "
                         f"--ep or --fsdp torch, its world size), or start from its weights with --init-from "
                         f"{ckpt} (new optimizer and schedule)")
    if resharding:
        parallel.load_resharded(model, optimizer, dist, ckpt, saved_world)
    elif sharded:
        parallel.load_sharded(model, optimizer, dist, ckpt)
    else:
        optimizer.load_state_dict(state["optimizer"])
    if len(loaders) != loader.world_size:
        log(f"--resume: {ckpt} was written by {saved_world} rank(s), this run has {dist.world_size}: the "
            f"samples its {len(loaders)} data-parallel rank(s) had not trained on are dealt to the "
            f"{loader.world_size} new one(s)")
        loaders = data.reshard_loader_states(loaders, loader.world_size)
    loader.load_state_dict(loaders[loader.rank])


def load_train_state(ckpt):
    """train_state.pt (our own file: optimizer tensors plus Python RNG state and loader positions); a truncated
    or corrupt one is a ValueError naming it."""
    file = os.path.join(ckpt, TRAIN_STATE)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{file}: cannot read the training state ({' '.join(str(e).split()[:12])}); the file "
                         "may be truncated") from None


def resume_point(stage_dir, log=print):
    """(checkpoint, train state) a stage resumes from: the one `latest` names or, when `latest` is missing or
    names a missing or damaged checkpoint, the newest complete one (a line says which and why); (None, None)
    for a stage killed before its first checkpoint (it restarts at step 0). All damaged: refused, named."""
    candidates, problems = stage_checkpoints(stage_dir), []
    if candidates and not os.path.isfile(os.path.join(stage_dir, LATEST)):
        problems.append(f"{stage_dir} has no `latest` file")
    for ckpt in candidates:
        why = checkpoint_damage(ckpt, ("config.json", "model.safetensors", TRAIN_STATE))
        try:
            state = load_train_state(ckpt) if why is None else None
        except ValueError as e:
            why = str(e)
        if why is None:
            if problems:
                log(f"--resume: {'; '.join(problems)}; resuming from {ckpt}, the newest complete checkpoint")
            return ckpt, state
        problems.append(f"{ckpt}: {why}")
    if candidates:
        raise SystemExit(f"--resume: {stage_dir} has no complete checkpoint ({'; '.join(problems)}); start over "
                         "with --overwrite")
    return None, None


def check_resume_flags(cfg, overrides, saved, ckpt, log=print):
    """--resume keeps the checkpoint's model: changed model flags or preset are refused, naming them; other
    changed flags are taken, and a line names them. Returns the model flags of the run (as first given)."""
    then = saved["train_config"]
    then_overrides = saved.get("model_overrides")
    if then_overrides is None:  # checkpoints written before train_state.pt kept them: the stage's args.json
        then_overrides = read_json(os.path.join(os.path.dirname(ckpt), RUN_ARGS))["model_overrides"]
    same = lambda a, b: json.dumps(a, default=str) == json.dumps(b, default=str)  # noqa: E731 (tuples = lists)
    model_flags = [f"--preset {cfg.preset} (was {then['preset']})"] if cfg.preset != then["preset"] else []
    model_flags += [f"{flag(k.replace('.', '_'))} {v} (was {then_overrides.get(k, 'the preset')})"
                    for k, v in overrides.items() if not same(v, then_overrides.get(k))]
    if model_flags:
        raise SystemExit(f"--resume: {ckpt} fixes the model; this command changes {', '.join(model_flags)}: drop "
                         "those flags, or train the new model in another --out")
    now = asdict(cfg)
    taken = [f"{flag(k)} {now[k]} (was {'the default' if then[k] is None else then[k]})" for k in now
             if k in then and k not in ("resume", "overwrite", "out", "init_from", "init_vision_from", "init_text_from",
                                        "random_vision", "keep_vision_merger") and not same(now[k], then[k])]
    if taken:
        log(f"--resume: taking the changed flags {', '.join(taken)}")
    return then_overrides


def keep_metrics_until(path, step, log=print):
    """Drop metrics rows logged after `step` (by the interrupted run, past its last checkpoint) and any torn
    line (a kill in the middle of a write), with a warning naming the file; rewritten by temp file + rename."""
    if not os.path.isfile(path):
        return
    rows, torn = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn.append(lineno)
                continue
            if row["step"] <= step:
                rows.append(line)
    if torn:
        log(f"warning: {path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
            "a write cut short by a kill)")
    with replaced(path) as tmp, open(tmp, "w") as f:
        f.writelines(rows)


def plot_loss(metrics_path, out_png):
    """loss.png from metrics.jsonl: the raw loss, its exponential moving average over it (what a reader follows),
    the dev loss where it was measured and the learning rate on a second axis; False when matplotlib (in
    requirements.txt) is missing."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    ok = [r for r in rows if r["loss"] is not None]
    steps, losses, smooth = [r["step"] for r in ok], [r["loss"] for r in ok], []
    for x in losses:  # debiased EMA (as in Adam): the first points are not pulled towards zero
        smooth.append(0.9 * (smooth[-1] if smooth else 0.0) + 0.1 * x)
    smooth = [s / (1 - 0.9 ** (k + 1)) for k, s in enumerate(smooth)]

    def draw(ax):
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="loss, EMA 0.9")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=os.path.basename(os.path.dirname(metrics_path)))
        dev = [r for r in rows if r.get("dev_loss") is not None]
        ax.scatter([r["step"] for r in dev], [r["dev_loss"] for r in dev], color="tab:red", zorder=3, s=18,
                   label="dev loss")
        lr = ax.twinx()
        lr.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", lw=1, label="lr")
        lr.set_ylabel("learning rate", color="tab:orange")
        ax.legend(loc="upper right", fontsize=8)
    return save_plot(out_png, (6, 3.5), draw)


# ----------------------------------------------------------------------------- the training loop


class StopRequested:
    """SIGINT (Ctrl-C) or SIGTERM (what Slurm and Kubernetes send before killing a job) on any rank asks the
    loop to stop: train_step sums the flag over ranks once per step, so every rank stops after the same step
    and they write one checkpoint together. A second Ctrl-C at least AGAIN_S after the first aborts at once;
    copies arriving together (the terminal's and the one torchrun forwards) count once, and SIGTERM never
    aborts (the scheduler's SIGKILL follows its grace period)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    AGAIN_S = 2.0

    def __init__(self):
        self.requested, self.since = False, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def _handler(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self.since >= self.AGAIN_S:
                raise KeyboardInterrupt
            return
        self.requested, self.since = True, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step on every rank and writing a checkpoint "
              "(Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class RunContext:
    """What every stage of a run shares: the tokenizer, the process group (one process: world size 1) and
    its device, the model flags given, and the log (a no-op on ranks other than 0)."""
    tokenizer: data.Tokenizer
    dist: parallel.Dist
    overrides: dict
    log: typing.Callable = print


@dataclass
class StageRun:
    """One stage's run: its plan (steps, packing length, warm-up, peak lr, image pixel budget: the stage table's
    unless a flag overrides them), what the loop changes and a checkpoint keeps (weights, optimizer, data
    position, counters), and how it ended. train_stage returns it with model, optimizer and loader released."""
    num: int             # the row of STAGES
    dir: str             # the stage directory under --out
    total: int
    length: int
    warmup: int
    peak_lr: float
    max_pixels: int
    model: typing.Optional[torch.nn.Module] = None
    optimizer: typing.Optional[torch.optim.Optimizer] = None
    loader: typing.Optional[data.PackedLoader] = None
    step: int = 0
    bad_steps: int = 0   # non-finite-loss steps skipped in all
    bad_run: int = 0     # ... in a row (--max-bad-steps)
    empty_steps: int = 0  # steps without a loss token, skipped
    status: str = "done"  # "done", "interrupted" or "stopped: ..."
    checkpoint: typing.Optional[str] = None  # the stage's last checkpoint
    wall_s: float = 0.0

    @property
    def stage(self):
        return STAGES[self.num]

    @staticmethod
    def plan(cfg, num, stage_dir=""):
        """The run of stage `num` the flags ask for, nothing built yet. The pixel budget grows with the packing
        length where the stage says so (image_share): as a real run sizes its images to its sequence length, a
        shorter run sees images shrunk that a longer one sees whole."""
        stage = STAGES[num]
        total = cfg.max_steps if cfg.max_steps is not None else stage.steps
        length = cfg.packing_length or stage.packing_length
        budget = max(cfg.min_pixels, int(length * stage.image_share) * data.FACTOR ** 2) if stage.image_share else \
            data.MAX_PIXELS
        warmup = min(cfg.warmup if cfg.warmup is not None else stage.warmup, total)
        return StageRun(num, stage_dir, total, length, warmup, cfg.lr if cfg.lr is not None else stage.lr,
                        cfg.max_pixels or budget)


def train_stage(cfg, ctx, num, stage_dir, init):
    """Train stage `num` into stage_dir, starting from `init` (checkpoint dir, or None for the preset's random
    weights), or resuming from stage_dir's latest checkpoint when there is one and cfg.resume is set."""
    run, overrides, resumed = open_stage(cfg, ctx, num, stage_dir, init)
    if run.step >= run.total:  # a finished stage, resumed
        return release(run)
    run.loader.fill()  # the first samples are read (a bad record or a too-short --packing-length found) ...
    if run.loader.skipped and not resumed:
        ctx.log(f"stage {num}: warning: skipped {run.loader.skipped} samples at start ({run.loader.skip_summary()})")
    if ctx.dist.is_main:  # ... before anything on disk changes
        prepare_stage_dir(stage_dir, fresh=not resumed, args={"train_config": asdict(cfg), "model_overrides": overrides,
                                                              "pixels": [cfg.min_pixels, run.max_pixels]}, log=ctx.log)
        write_first_samples(run.loader, ctx.tokenizer, stage_dir, ctx.log)
    meter = StageLog(cfg, run, ctx)

    def save(loader_state):
        return save_checkpoint(stage_dir, run.model, run.optimizer, ctx.dist, cfg.keep_last,
                               train_state(cfg, overrides, run, loader_state), ctx.tokenizer)

    with StopRequested() as stop, contextlib.closing(run.loader):  # its data workers end with the stage
        run.status = run_steps(cfg, ctx.dist, run, meter, save, stop)
        run.checkpoint = save(gather_loader(run.loader, ctx.dist, cfg.cp))
    meter.finish(run)
    return release(run)


def open_stage(cfg, ctx, num, stage_dir, init):
    """(StageRun built, the model flags of the run, resumed checkpoint or None): weights from `init`, or with
    --resume the stage's latest checkpoint with its optimizer, data position, RNG and counters."""
    ckpt, saved = resume_point(stage_dir, ctx.log) if cfg.resume else (None, None)
    overrides = check_resume_flags(cfg, ctx.overrides, saved, ckpt, ctx.log) if ckpt else ctx.overrides
    run = StageRun.plan(cfg, num, stage_dir)
    run.model, run.optimizer, run.loader = build_stage(cfg, ctx, run, ckpt or init)
    if ckpt:
        resume_stage(run, ckpt, saved, ctx)
        run.checkpoint = ckpt
        if run.step < run.total and ctx.dist.is_main:
            keep_metrics_until(os.path.join(stage_dir, METRICS_FILE), run.step, ctx.log)
    return run, overrides, ckpt


def release(run):
    """The run without its model, optimizer and loader: what the stage leaves is its checkpoint."""
    run.model = run.optimizer = run.loader = None
    return run


def run_steps(cfg, dist, run, meter, save, stop):
    """The steps to the stage's last, a stop signal (`stop`, a StopRequested) or too many bad steps in a row, with
    a checkpoint every --ckpt-every steps (save(loader state)). Returns the status."""
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    saved = run.step
    while run.step < run.total:
        t0, before = time.perf_counter(), run.loader.state_dict()
        try:
            batches = [next(run.loader) for _ in range(cfg.grad_accum)]
            data_wait = time.perf_counter() - t0
        except data.DataError:  # a bad record met mid-stage (--on-bad raise): keep the steps done so far
            if dist.world_size == 1 and run.step > saved:  # (other ranks would wait in a collective)
                meter.log(f"stage {run.num}: bad data at step {run.step + 1}; wrote {save(before)} (--resume after "
                          "fixing it)")
            raise
        s = train_step(run.model, params, batches, cfg, dist, stop, run.loader.skipped)
        lr_mult = optimizer_step(run, s["finite"], dist, s["empty"])
        status = meter.record(run, s, batches, lr_mult, time.perf_counter() - t0, data_wait)
        if status != "done":
            return status
        if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < run.total:
            save(gather_loader(run.loader, dist, cfg.cp))
            saved = run.step
    return "done"


def train_state(cfg, overrides, run, loader_state):
    """train_state.pt's contents besides the optimizer: counters, RNG state, data position(s) and the flags."""
    return {"stage": run.num, "step": run.step, "total_steps": run.total, "bad_steps": run.bad_steps,
            "bad_run": run.bad_run, "empty_steps": run.empty_steps, "rng": rng_state(), "loader": loader_state,
            "train_config": asdict(cfg), "model_overrides": overrides}


def resume_stage(run, ckpt, saved, ctx):
    """Optimizer, data position, RNG and counters from the checkpoint the weights were loaded from (a changed
    --max-steps is taken: the schedule runs over the new total)."""
    if saved["stage"] != run.num:
        raise SystemExit(f"--resume: {ckpt} is stage {saved['stage']}, this run is stage {run.num}")
    resume_optimizer_and_data(run.model, run.optimizer, run.loader, saved, ckpt, ctx.dist, ctx.log)
    set_rng_state(saved["rng"])
    run.step, run.bad_steps, run.bad_run = saved["step"], saved["bad_steps"], saved["bad_run"]
    run.empty_steps = saved.get("empty_steps", 0)
    ctx.log(f"stage {run.num}: resumed from {ckpt} at step {run.step}")


def train_step(model, params, batches, cfg, dist, stop, skipped):
    """Forward and backward over a step's micro-batches, gradient reduction and clipping, and the one all-reduce
    that makes every rank agree on the loss, skipping and stopping. Returns {"loss", "norm", "finite", "tokens",
    "loss_tokens", "skipped", "stopping"} (global over ranks); the optimizer step is the caller's. The stop
    flag is read after the backward, so a signal during this step stops the run after it."""
    device = dist.device
    # the cp ranks of a context-parallel group hold the same micro-batches (each runs its share of the tokens)
    n_loss = parallel.all_reduce_sum(torch.tensor(float(sum(loss_tokens(b) for b in batches)), device=device),
                                     dist) / cfg.cp
    # the loss is a sum over loss tokens divided by their global count: every token weighs the same
    # however they fall into micro-batches and ranks (parallel.py averages gradients over ranks)
    divisor = float(n_loss) / dist.world_size
    # no loss token in the whole step (on any rank): nothing to learn and nothing to divide by; every rank skips
    # the forwards and the update alike, and it is counted (a micro-batch without one in a step with some adds 0)
    empty, loss_sum, n_model_tokens = float(n_loss) == 0, 0.0, 0
    for b in batches:
        if empty:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss, stats = model(b.to(device), loss_divisor=divisor)
        loss.backward()
        loss_sum += loss.item()
        n_model_tokens += stats["n_loss_tokens"]
    if dist.world_size > 1 and not cfg.fsdp and not empty:  # data parallel: mean gradient (experts: see shard_experts)
        parallel.all_reduce_grads(model, dist)
    norm = 0.0 if empty else \
        parallel.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"), dist, replicated=not cfg.fsdp)
    finite = math.isfinite(loss_sum) and math.isfinite(float(norm))
    tokens, stopping = sum(int(b.input_ids.shape[0]) for b in batches), stop.requested
    if dist.world_size > 1:  # one all-reduce: the global loss, tokens and skips; skip, step and stop on every
        # rank alike (a rank stepping alone diverges, one stopping alone leaves the others in a collective)
        agreed = parallel.all_reduce_sum(torch.tensor(
            [loss_sum, float(not finite), float(stopping), tokens, skipped, n_model_tokens], device=device), dist)
        loss_sum, finite, stopping = float(agreed[0]) / dist.world_size, bool(agreed[1] == 0), bool(agreed[2])
        tokens, skipped, n_model_tokens = int(agreed[3]) // cfg.cp, int(agreed[4]) // cfg.cp, int(agreed[5])
    if n_model_tokens != int(n_loss):
        raise RuntimeError(f"the forwards counted {n_model_tokens} loss tokens, the step's micro-batches hold "
                           f"{int(n_loss)}: the context-parallel ranks' shares of the tokens do not add up")
    return {"loss": loss_sum, "norm": float(norm), "finite": finite, "tokens": tokens, "loss_tokens": int(n_loss),
            "skipped": skipped, "stopping": stopping, "empty": empty}


def optimizer_step(run, finite, dist, empty=False):
    """The update at the schedule's lr, or (a non-finite loss or norm; no loss token) none, weights and optimizer
    state kept; then the MoE routing biases and the step count. Returns the lr multiplier of this step."""
    lr_mult = lr_factor(run.step, run.total, run.warmup)
    if empty:
        run.empty_steps += 1
    elif finite:
        for g in run.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        run.optimizer.step()
        run.bad_run = 0
    else:
        run.bad_steps, run.bad_run = run.bad_steps + 1, run.bad_run + 1
    # DeepSeek-V3 §2.1.2: MoE routing biases follow the step's expert loads (a frozen decoder keeps them)
    update_expert_bias(run.model, run.model.config.text.bias_update_speed if finite and not empty and "decoder" in
                       run.stage.trains else 0.0, lambda t: parallel.all_reduce_sum(t, dist))
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr_mult


class StageLog:
    """A stage's metrics.jsonl (one row per step, written by rank 0), progress lines, the stop conditions
    (non-finite steps in a row, a stop signal) and the closing summary with loss.png."""

    def __init__(self, cfg, run, ctx):
        self.cfg, self.dist, self.log, self.tokenizer = cfg, ctx.dist, ctx.log, ctx.tokenizer
        self.peak, source = peak_flops(self.dist.device, compute_dtype(cfg), cfg.peak_tflops)
        self.log(f"stage {run.num}: MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({source})")
        self.metrics = os.open(os.path.join(run.dir, METRICS_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND) \
            if self.dist.is_main else None
        self.t_start, self.dt_avg, stage = time.time(), None, run.stage
        # dev loss in the stage's own format: synthetic runs in one process
        self.dev = [] if cfg.datasets or self.dist.world_size > 1 else [
            r for t in stage.mix for r in evaluate.synthetic_eval_set(t, "dev", DEV_LOSS_N, cfg.seed, stage.max_turns,
                                                                     stage.style)]
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        self.log(f"stage {run.num} ({stage.name}): trains {', '.join(stage.trains)}; {run.total} steps x "
                 f"{cfg.grad_accum} x {run.length} tokens; peak lr {run.peak_lr:g} (x{stage.lr_mult}); "
                 f"{sum(p.numel() for p in params):,} trainable / {sum(p.numel() for p in run.model.parameters()):,} "
                 f"parameters; {cfg.dtype} compute on {self.dist.device}")

    def record(self, run, s, batches, lr_mult, dt, data_wait=0.0):
        """Log the step just taken (data_wait: seconds of dt spent waiting for its batches); returns "done" to
        go on, else why the stage stops."""
        cfg, step, total, finite = self.cfg, run.step, run.total, s["finite"] and not s["empty"]
        if cfg.compile and self.dt_avg is None:
            self.log(f"--compile: the first step took {dt:.1f}s, compiling included (once: later lengths reuse it)")
        self.dt_avg = dt if self.dt_avg is None else 0.9 * self.dt_avg + 0.1 * dt
        flops = sum(sum(model_flops(run.model.config, b, run.stage.trains).values()) for b in batches)
        mfu = flops * self.dist.world_size / self.cfg.cp / dt / self.peak  # a context-parallel group shares them
        lr = run.peak_lr * lr_mult
        row = {"stage": run.num, "step": step, "loss": s["loss"] if finite else None, "lr": lr,
               "grad_norm": s["norm"] if finite else None, "tokens": s["tokens"], "loss_tokens": s["loss_tokens"],
               "tokens_per_s": s["tokens"] / dt, "mfu": mfu, "mem_gb": peak_memory_gb(self.dist.device),
               "skipped": not finite, "bad_steps": run.bad_steps, "empty_steps": run.empty_steps,
               "skipped_samples": s["skipped"],
               "packing_efficiency": run.loader.efficiency, "data_wait": data_wait / dt,
               "time_s": time.time() - self.t_start,
               **sequence_stats(batches, run.model.config.image_pad_id), "truncated_samples": run.loader.truncated}
        if self.dev and (step == total or cfg.ckpt_every and step % cfg.ckpt_every == 0):
            row["dev_loss"] = evaluate.reply_loss(run.model, self.tokenizer, self.dev, cfg.min_pixels,
                                                  run.max_pixels)
        if self.metrics is not None:
            os.write(self.metrics, (json.dumps(row) + "\n").encode())  # one write per whole line: rows never tear
        if s["empty"]:
            self.log(f"stage {run.num} step {step}: no loss tokens in the step's batches (replies cut away "
                     f"by --truncate?); update skipped ({run.empty_steps} such steps)")
        elif not finite:
            self.log(f"stage {run.num} step {step}: non-finite loss ({s['loss']}) or grad norm ({s['norm']}); "
                     f"update skipped ({run.bad_run} in a row, {run.bad_steps} in all)")
        if step % cfg.log_every == 0 or step == total or step == 1:
            self.log(f"stage {run.num} step {step:5d}/{total} | loss {s['loss']:.4f} | lr {lr:.2e} | "
                     f"{s['tokens'] / dt:,.0f} tok/s | MFU {100 * mfu:.1f}% | data {100 * data_wait / dt:.0f}% | "
                     f"mem {row['mem_gb']:.2f} GB | "
                     f"ETA {self.dt_avg * (total - step):.0f}s"
                     + (f" | skipped {s['skipped']} samples" if s["skipped"] else ""))
        if run.bad_run >= cfg.max_bad_steps:
            status = f"stopped: {run.bad_run} non-finite-loss steps in a row (--max-bad-steps {cfg.max_bad_steps})"
            self.log(f"stage {run.num}: {status}")
            return status
        return "interrupted" if s["stopping"] and step < total else "done"

    def finish(self, run):
        """Close metrics.jsonl, draw loss.png, log the stage's end; sets run.wall_s."""
        loader = run.loader
        run.wall_s = wall = time.time() - self.t_start
        if loader.skipped:
            self.log(f"stage {run.num}: skipped {loader.skipped} samples"
                     f"{' on rank 0' if self.dist.world_size > 1 else ''} ({loader.skip_summary()}; last: "
                     f"{loader.last_error}); see {METRICS_FILE} 'skipped_samples'")
        if self.metrics is not None:
            os.close(self.metrics)
            png = os.path.join(run.dir, LOSS_PLOT)
            if plot_loss(os.path.join(run.dir, METRICS_FILE), png):
                self.log(f"wrote {png}")
        self.log(f"stage {run.num}: {run.status} at step {run.step} in {wall:.0f}s ({run.bad_steps} skipped "
                 f"steps{f', {run.empty_steps} without loss tokens' if run.empty_steps else ''}); checkpoint "
                 f"{run.checkpoint}")


def write_first_samples(loader, tokenizer, stage_dir, log):
    """Print the first sample of each data source with its loss-carrying tokens marked, and write them to
    first_samples.jsonl ({"source", "input_ids", "labels"}; labels -100 where no loss): what the stage trains on."""
    samples = data.first_samples(loader.source, tokenizer, loader.min_pixels, loader.max_pixels)
    rows = [{"source": name, "id": s.id, "input_ids": s.tokens, "labels": s.labels} for name, s in samples.items()]
    with replaced(os.path.join(stage_dir, FIRST_SAMPLES)) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for name, s in samples.items():
        n_loss = sum(label != data.IGNORE for label in s.labels)
        text = repr(data.show_sample(s, tokenizer))
        cut = f"... ({len(text) - 1500:,} more characters in {FIRST_SAMPLES})" if len(text) > 1600 else ""
        log(f"first sample of {name} ({s.id}): {len(s.tokens)} tokens, {n_loss} with loss [[marked]]:\n"
            f"  {text[:1500] if cut else text}{cut}")


def sequence_stats(batches, image_pad_id):
    """What a step's micro-batches held: the longest sample (tokens) and the share of tokens that are image tokens."""
    tokens = sum(b.input_ids.numel() for b in batches)
    return {"longest_sample": max(int((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).max()) for b in batches),
            "image_token_share": sum(int((b.input_ids == image_pad_id).sum()) for b in batches) / max(tokens, 1)}


def prepare_stage_dir(stage_dir, fresh, args, log):
    """The stage directory with this run's args.json; a fresh start (--overwrite, or --resume of a stage that
    had no checkpoint yet) replaces an earlier run's directory."""
    if fresh and os.path.isdir(stage_dir):
        log(f"starting over in {stage_dir}: its old contents are removed")
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir, exist_ok=True)
    write_json(args, os.path.join(stage_dir, RUN_ARGS))


def build_stage(cfg, ctx, run, init):
    """(model, optimizer, loader) of a stage's run: weights from `init`, frozen groups set, sharded as the flags say."""
    stage, dist, device = run.stage, ctx.dist, ctx.dist.device
    if init is None and cfg.init_text_from:
        model = compose_model(cfg, ctx.tokenizer, ctx.overrides, **runtime_of(cfg)).to(device)
    else:
        model = build_model(cfg.preset, init, ctx.overrides, cfg.seed, **runtime_of(cfg)).to(device)
    build_tokenizer(cfg, model.config)
    set_trainable(model, stage)
    if cfg.cp > 1:  # each group of cp ranks splits one micro-batch's tokens (Ulysses all-to-all around attention)
        error = parallel.check_context_parallel(model.config, cfg.cp)
        if error:
            raise SystemExit(f"--cp {cfg.cp}: {error}")
        model = parallel.shard_context(model, dist, cfg.cp)
    if cfg.compile:
        compile_blocks(model)
    if cfg.ep > 1:  # each group of ep ranks splits every MoE layer's routed experts; tokens reach them by all_to_all
        if model.config.text.n_routed_experts % cfg.ep:
            raise SystemExit(f"--ep {cfg.ep}: the model's {model.config.text.n_routed_experts} routed experts do "
                             f"not split over {cfg.ep} ranks")
        model = parallel.shard_experts(model, dist, cfg.ep)
    if cfg.fsdp:  # after EP: expert slices are sharded over their replicas, the rest over all ranks
        model = parallel.shard_model(model, dist, mode=cfg.fsdp, compute_dtype=compute_dtype(cfg),
                                     group_of=lambda n, p: (module_group(n), p.dim() >= 2))
    model.train()
    optimizer = build_optimizer(model, stage, run.peak_lr, cfg, device.type)
    loader = data.PackedLoader(build_source(cfg, run.num, stage), ctx.tokenizer, run.length,
                               seed=cfg.seed + run.num, rank=dist.rank // cfg.cp,
                               world_size=dist.world_size // cfg.cp,
                               min_pixels=cfg.min_pixels, max_pixels=run.max_pixels,
                               mrope=model.config.text.mrope_section is not None,
                               truncate=cfg.truncate or (not cfg.datasets and stage.max_turns > 1),
                               on_bad=cfg.on_bad, max_skip_rate=cfg.max_skip_rate,
                               workers=data_workers(cfg.data_workers))
    return model, optimizer, loader


def data_workers(n):
    """--data-workers, or by default the CPUs this process may use per local rank (torchrun's LOCAL_WORLD_SIZE),
    less one for the training process and one for the system, at most 8 (beyond that a loader waits on I/O)."""
    if n is not None:
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 2))


def gather_loader(loader, dist, cp):
    """The data-iterator state to checkpoint: this process's, or every data-parallel rank's (rank 0 writes the
    file; the cp ranks of a context-parallel group read the same micro-batches)."""
    if dist.world_size == 1:
        return loader.state_dict()
    return parallel.all_gather_object(loader.state_dict(), dist)[::cp]


# ----------------------------------------------------------------------------- the recipe


def stage3_runs(cfg):
    """(packing length, steps) of the stage-3 runs that --stage all averages; same token budget each."""
    lengths = [int(x) for x in cfg.stage3_lengths.split(",") if x]
    base = STAGES[3]
    steps = cfg.max_steps if cfg.max_steps is not None else base.steps
    return [(n, max(1, round(steps * base.packing_length / n))) for n in lengths]


def run(cfg, overrides, log=print):
    """Train what --stage asks; for `all` the whole recipe including evaluation. Returns a summary dict.
    Flags and paths are checked first, then --out is locked for the run's duration."""
    check_config(cfg, overrides)
    device_type = resolve_device(cfg.device)
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, device_type))
    # under torchrun every process joins the group: data parallel by default, sharded with --fsdp / --ep
    dist = parallel.init_distributed(device_type)
    if (cfg.fsdp or cfg.ep > 1 or cfg.cp > 1) and dist.world_size == 1 and "WORLD_SIZE" not in os.environ:
        what = f"--fsdp {cfg.fsdp}" if cfg.fsdp else f"--ep {cfg.ep}" if cfg.ep > 1 else f"--cp {cfg.cp}"
        raise SystemExit(f"{what} splits the work over processes: run under torchrun (torchrun --nproc-per-node N train.py ...)")
    if dist.world_size % cfg.cp:
        raise SystemExit(f"--cp {cfg.cp}: run under torchrun with a multiple of {cfg.cp} processes (world size now "
                         f"{dist.world_size}): each group of {cfg.cp} ranks shares one packed micro-batch")
    if cfg.ep > 1 and dist.world_size % cfg.ep:
        raise SystemExit(f"--ep {cfg.ep}: run under torchrun with a multiple of {cfg.ep} processes (world size "
                         f"now {dist.world_size}): each group of {cfg.ep} ranks splits the routed experts")
    if cfg.ep > 1 and cfg.fsdp == "torch":
        raise SystemExit(f"--ep {cfg.ep} composes with our FSDP (--fsdp / --fsdp ours), not --fsdp torch")
    ctx = RunContext(build_tokenizer(cfg), dist, overrides or {}, log if dist.is_main else (lambda *a, **k: None))
    check_fresh_start(cfg)
    if dist.world_size > 1:
        ctx.log(f"{dist.world_size} ranks = data parallel {dist.world_size // cfg.cp} x context parallel {cfg.cp}"
                + (f"; expert groups of {cfg.ep}" if cfg.ep > 1 else "") + (f"; --fsdp {cfg.fsdp}" if cfg.fsdp else ""))
    with run_lock(cfg.out) if dist.is_main else contextlib.nullcontext():
        try:
            return train_recipe(cfg, ctx)
        except OSError as e:  # a full disk, a directory gone read-only: say what is kept
            e.add_note(kept_checkpoints(cfg))
            raise


def kept_checkpoints(cfg):
    """What a run stopped by a failed write keeps: each stage's newest complete checkpoint (a phrase)."""
    kept = [next((c for c in stage_checkpoints(os.path.join(cfg.out, d)) if checkpoint_damage(c) is None), None)
            for d in stage_dirs(cfg)]
    kept = [c for c in kept if c]
    return (f"kept: {', '.join(kept)} (complete; --resume continues from there)" if kept else
            f"kept: no checkpoint of this run in {cfg.out} yet")


def run_lock(out):
    """An exclusive lock on out/.lock held while a run uses the directory (flock: the OS drops it when the
    process dies, even on kill -9), so a second run on the same --out stops at once, naming the holder."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:  # read-only, no permission
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"--out {out} is in use by a running training ({holder}); wait for it to finish or "
                         "choose another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f  # closing the file (leaving the `with`) releases the lock


def train_recipe(cfg, ctx):
    """The stages of --stage in order, the stage-3 average and evaluation for `all`."""
    t0, dist, log = time.time(), ctx.dist, ctx.log
    stage_nums = [1, 2, 3] if cfg.stage == "all" else [int(cfg.stage)]
    init, results = cfg.init_from, {}
    for n in stage_nums:
        if n == 3 and cfg.stage == "all" and len(stage3_runs(cfg)) > 1:
            break
        name = stage_name(n)
        results[name] = train_stage(cfg, ctx, n, os.path.join(cfg.out, name), init)
        if results[name].status != "done":
            return {"stages": results, "wall_s": time.time() - t0}
        init = results[name].checkpoint
    if cfg.stage == "all" and len(stage3_runs(cfg)) > 1:
        for length, steps in stage3_runs(cfg):
            name = stage_name(3, length)
            run_cfg = replace(cfg, packing_length=length, max_steps=steps)
            results[name] = train_stage(run_cfg, ctx, 3, os.path.join(cfg.out, name), init)
            if results[name].status != "done":
                return {"stages": results, "wall_s": time.time() - t0}
        if dist.is_main:
            evaluate.average_checkpoints([results[stage_name(3, n)].checkpoint for n, _ in stage3_runs(cfg)],
                                         out=os.path.join(cfg.out, AVERAGE_DIR))
            log(f"averaged the stage-3 runs into {os.path.join(cfg.out, AVERAGE_DIR)}")
    train_wall = time.time() - t0
    summary = {"stages": results, "train_wall_s": train_wall}
    if cfg.stage == "all" and cfg.eval and dist.is_main:
        summary["eval"] = evaluate_recipe(cfg, ctx.tokenizer, dist.device, log)
    summary["wall_s"] = time.time() - t0
    if dist.is_main:
        log(f"total wall time {summary['wall_s']:.0f}s (training {train_wall:.0f}s)")
    return summary


def eval_budget(cfg):
    """(min_pixels, max_pixels) of the default run's evaluation: the budget of the longest stage-3 run (the largest
    the averaged runs trained at; the shorter runs' budgets are search candidates) unless --eval-max-pixels."""
    longest = max(n for n, _ in stage3_runs(cfg))
    return cfg.min_pixels, cfg.eval_max_pixels or StageRun.plan(replace(cfg, packing_length=longest), 3).max_pixels


def evaluate_recipe(cfg, tokenizer, device, log=print):
    """The stage-3 checkpoints of the run (each length and their average) on the synthetic test split, then the
    resolution search on the average; the table is logged and written to eval.json, results.md and results.png
    in --out. Stages 1 and 2 trained on pre-training text and never saw an instruction prompt, so they are not
    scored on replies: their teacher-forced loss on the dev conversations is reported instead."""
    tasks, budget = SYNTHETIC_TASKS, eval_budget(cfg)
    dev = evaluate.build_eval_sets(tasks, "dev", cfg.eval_dev_n, cfg.seed)
    test_sets = evaluate.build_eval_sets(tasks, "test", cfg.eval_n, cfg.seed)
    resolutions = [evaluate.parse_budget(r, cfg.min_pixels) for r in cfg.resolutions.split(",") if r]
    ckpts = evaluate.resolve_checkpoints(cfg.out)
    earlier = {name: evaluate.reply_loss(evaluate.load_model(ckpt, device), tokenizer, sum(dev.values(), []), *budget,
                                         device=device) for name, ckpt in ckpts if not name.startswith(stage_name(3))}
    if earlier:
        log("not scored on replies (trained on pre-training text only); dev reply loss: "
            + ", ".join(f"{name} {loss:.3f}" for name, loss in earlier.items()))
    return evaluate.evaluate_run([c for c in ckpts if c[0].startswith(stage_name(3))], tokenizer, test_sets, cfg.out,
                                 *budget, (dev, test_sets, resolutions) if resolutions else None,
                                 report={"dev_reply_loss_not_scored": earlier}, log=log, device=device,
                                 dtype=compute_dtype(cfg))


def main(argv=None):
    cfg, overrides = parse_args(argv)
    if cfg.dry_run:
        return print_memory_plan(cfg, overrides)
    summary = run(cfg, overrides)  # a bad record stops it naming file and line; the last checkpoint is kept
    parallel.close_distributed()
    # a run stopped by SIGINT / SIGTERM exits 0: its checkpoint is complete and --resume continues it
    failed = [f"{k}: {r.status}" for k, r in summary["stages"].items() if r.status not in ("done", "interrupted")]
    if failed:
        print("; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
