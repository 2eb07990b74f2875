"""Ask a trained model: one question, its answer streamed token by token, or an interactive conversation.

    python chat.py --ckpt runs/tiny/stage3-avg --image scene.png "What colour is the circle?"
    python chat.py --ckpt runs/8b/stage3 --temperature 0.7 --top-p 0.9      # interactive: /image, /reset, /quit
    python chat.py --ckpt /ckpt/Qwen2.5-VL-7B-Instruct --image doc.png "Read the text."   # a Hugging Face directory

The checkpoint brings its tokenizer and chat format (saved in it) and the pixel budget its run trained at
(the stage's args.json; a Hugging Face directory's preprocessor_config.json), unless --eval-max-pixels says
otherwise.
"""
import argparse
import os
import sys

import torch

import convert
import data
from evaluate import resolve_checkpoints, trained_budget
from common import cli, read_json, refuse_flag
from kernels import resolve_device
from model import MLLM

HELP = "commands: /image PATH (attach to your next message), /reset (forget the conversation), /quit"


def load(path, device, dtype):
    """(model, tokenizer, (min_pixels, max_pixels)) of our checkpoint / stage / run directory (a run: its last
    checkpoint) or a Hugging Face Qwen2.5-VL directory."""
    if convert.is_hf_dir(path):
        model = convert.load_hf(path)
        file = os.path.join(path, "preprocessor_config.json")
        pre = read_json(file) if os.path.isfile(file) else {}
        size = pre.get("size") or {}
        budget = (pre.get("min_pixels", size.get("shortest_edge", data.MIN_PIXELS)),
                  pre.get("max_pixels", size.get("longest_edge", data.MAX_PIXELS)))
        ckpt = path
    else:
        ckpt = resolve_checkpoints(path)[-1][1]
        model = MLLM.from_pretrained(ckpt)
        budget = trained_budget(ckpt)
    return model.to(device=device, dtype=dtype).eval(), data.load_tokenizer(ckpt), budget


def answer(model, tokenizer, turns, images, budget, args, out=None):
    """Stream the reply to `turns` (LLaVA layout, the last one the user's) to `out` (stdout); returns its text."""
    out = out or sys.stdout
    record = {"format": "conversation", "conversations": turns, "images": images}
    sample = data.encode(record, tokenizer, *budget, for_generation=True)
    batch = data.collate([sample], mrope=model.config.text.mrope_section is not None).to(next(model.parameters()).device)
    ids, shown = [], ""

    def stream(_, token):
        nonlocal shown
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # a character cut between tokens waits for its last byte
            out.write(text[len(shown):])
            out.flush()
            shown = text
    generator = torch.Generator(batch.input_ids.device).manual_seed(args.seed)
    reply = model.generate(batch, args.max_new_tokens, stop_ids=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size,
                           temperature=args.temperature, top_p=args.top_p, on_token=stream, generator=generator)[0]
    text = tokenizer.decode(reply)
    out.write(text[len(shown):] + "\n")
    return text


def interactive(model, tokenizer, budget, args):
    """A conversation: history kept, images attached per turn, /reset and /quit."""
    turns, images, pending = [], [], []
    print(HELP)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            turns, images, pending = [], [], []
            print("(conversation reset)")
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not os.path.isfile(path):
                print(f"no such file: {path!r}")
            else:
                pending.append(path)
                print(f"({len(pending)} image(s) attached to your next message)")
        elif line.startswith("/"):
            print(HELP)
        elif line:
            turn = {"from": "human", "value": data.IMAGE_TAG * len(pending) + line}
            try:
                reply = answer(model, tokenizer, turns + [turn], images + pending, budget, args)
            except data.DataError as e:
                print(f"error: {e}")
                continue
            turns += [turn, {"from": "gpt", "value": reply}]
            images, pending = images + pending, []


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="ask this and exit (default: an interactive conversation)")
    p.add_argument("--ckpt", required=True, help="our checkpoint, stage or run directory, or a Hugging Face dir")
    p.add_argument("--image", action="append", default=[], help="an image for the question (repeatable)")
    p.add_argument("--eval-max-pixels", type=int,
                   help="test-time image pixel budget (default: the one the run trained at)")
    refuse_flag(p, "--max-pixels", "the test-time budget is --eval-max-pixels (train.py's --max-pixels is the "
                "training budget)")
    p.add_argument("--min-pixels", type=int, help="image pixel floor (default: the one the run trained at)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                           "whose probability reaches this")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        p.error("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    missing = [i for i in args.image if not os.path.isfile(i)]
    if missing:
        p.error(f"--image {missing[0]}: no such file")
    if args.image and not args.question:
        p.error("--image goes with a question (interactive: /image PATH)")
    device = torch.device(resolve_device(args.device))
    try:
        model, tokenizer, budget = load(args.ckpt, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"--ckpt {args.ckpt}: {e}")
    budget = (args.min_pixels or budget[0], args.eval_max_pixels or budget[1])
    if budget[1] < budget[0]:
        p.error(f"--eval-max-pixels {budget[1]} is below the pixel floor {budget[0]} (--min-pixels)")
    if not args.question:
        return interactive(model, tokenizer, budget, args)
    try:
        answer(model, tokenizer, [{"from": "human", "value": data.IMAGE_TAG * len(args.image) + args.question}],
               args.image, budget, args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli(main)
