"""The synthetic world: the built-in curriculum `python train.py` trains and evaluates on, offline.

A scene is a 2x2 or 3x3 grid of one-token cells (FACTOR px: a 2x2 group of 14-px patches, one LLM token after
the merge) with coloured circles, squares and triangles drawn into distinct cells; a text image writes a word
of capital letters one per cell. Nine tasks ask about them (SYNTHETIC_TASKS: caption, colour, shape, count,
relative position, OCR, grounding, two images, and text-only arithmetic), each scored by its TASK_METRIC.
Every record is a pure function of (seed, split, index), and a hash of what it shows puts each possible
instance in exactly one of the train/dev/test splits, so no test question is ever trained on.
"""
import hashlib
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data import FACTOR

TASK_METRIC = {"caption": "anls", "vqa_color": "vqa", "vqa_shape": "vqa", "vqa_count": "vqa",
               "vqa_position": "vqa", "ocr": "anls", "grounding": "iou", "multi_image": "choice",
               "arithmetic": "exact"}
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (225, 195, 30),
          "purple": (140, 60, 180)}
SHAPES = ["circle", "square", "triangle"]
SPLITS = {"train": 0, "dev": 1, "test": 2}
SIZES = {"train": 1_000_000, "dev": 256, "test": 256}
# stage 3's conversations have 1..MAX_TURNS turns (60-1,000 tokens): about a fifth outgrow 512 tokens, so a run
# at 512 trains on their first turns only (fit) while one at 1,024 sees them whole
MAX_TURNS = 10
SCENE_GRIDS = (2, 3)  # a scene is a 2x2 or 3x3 grid of one-token (FACTOR-px) cells: 56 or 84 px, 4 or 9 tokens
# eight letters of distinct outline in 3-6 letter words: with all 26 letters and words of 4-10, OCR stays at 0
# after 300 steps of the tiny model (docs/LOG.md)
OCR_LETTERS = "AEHKOSTX"
OCR_GRID = (8, 2)  # a text image is 8x2 one-letter cells, 224x56 px: more pixels than the default test budget
_FONT = ImageFont.load_default_imagefont()  # Pillow's built-in bitmap font: offline, same everywhere


# ----------------------------------------------------------------------------- drawing

def _background(rng, w, h):
    return Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))


def _draw_shape(draw, shape, color, box):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=COLORS[color])


def _scene(rng, objects, grid, cells=None):
    """Draw (color, shape) objects into distinct cells of a grid x grid grid of FACTOR-px cells (so they never
    overlap); returns the image and the objects' pixel boxes. Cells are numbered in reading order."""
    img = _background(rng, grid * FACTOR, grid * FACTOR)
    draw = ImageDraw.Draw(img)
    cells = list(rng.permutation(grid * grid)[:len(objects)]) if cells is None else cells
    boxes = []
    for (color, shape), c in zip(objects, cells):
        # a cell is one LLM token (2x2 patches) and the object fills 70-95% of it (19-26 px), so each object's
        # shape is one token's content: spread over several tokens, shape is not learnt at this model size
        # (docs/LOG.md, 2026-11-29: what made shape learnable)
        s = int(rng.integers(FACTOR * 7 // 10, FACTOR * 19 // 20 + 1))
        x = (c % grid) * FACTOR + int(rng.integers(1, FACTOR - s))
        y = (c // grid) * FACTOR + int(rng.integers(1, FACTOR - s))
        box = (x, y, x + s - 1, y + s - 1)
        _draw_shape(draw, shape, color, box)
        boxes.append(box)
    return img, boxes


def _text_image(rng, word):
    """The word written from the top-left of an OCR_GRID canvas in reading order, one letter per FACTOR-px cell
    (one LLM token) as a scene holds one object per token; drawn at half size with the bitmap font, upscaled 2x.
    It starts in the same cell every time: the tiny decoder (1D rotary) finds no start in a word placed anywhere,
    and OCR then stays at chance (docs/LOG.md)."""
    cols, rows = OCR_GRID
    half = FACTOR // 2
    small = _background(rng, cols * half, rows * half)
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    draw = ImageDraw.Draw(small)
    for i, ch in enumerate(word):
        draw.text(((i % cols) * half + 4, (i // cols) * half + 1), ch, fill=ink, font=_FONT)  # 6x11 glyph, 14x14 cell
    return small.resize((cols * FACTOR, rows * FACTOR), Image.NEAREST)


def _objects(rng, n, distinct="both"):
    """n (color, shape) pairs; distinct="color"/"shape"/"both" keeps that attribute unique."""
    colors, shapes = list(COLORS), SHAPES
    c = rng.permutation(len(colors))[:n] if distinct in ("color", "both") else rng.integers(0, len(colors), n)
    s = rng.permutation(len(shapes))[:n] if distinct in ("shape", "both") else rng.integers(0, len(shapes), n)
    return [(colors[i], shapes[j]) for i, j in zip(c, s)]


def _phrase(objs):
    names = [f"a {c} {s}" for c, s in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------------------- tasks
# each takes (rng, g), g the scene's grid side, and returns (images, question, answer, statement)

def _caption(rng, g):
    objs = _objects(rng, int(rng.integers(1, 4)), "both")
    img, _ = _scene(rng, objs, g, sorted(rng.permutation(g * g)[:len(objs)].tolist()))
    text = _phrase(objs)
    return [img], "<image>\nDescribe the image.", text, f"<image>{text}."


def _vqa_color(rng, g):
    objs = _objects(rng, int(rng.integers(1, 3)), "shape")
    img, _ = _scene(rng, objs, g)
    c, s = objs[int(rng.integers(len(objs)))]
    return [img], f"<image>\nWhat color is the {s}?", c, f"<image>The {s} is {c}."


def _vqa_shape(rng, g):
    objs = _objects(rng, int(rng.integers(1, 3)), "color")
    img, _ = _scene(rng, objs, g)
    c, s = objs[int(rng.integers(len(objs)))]
    return [img], f"<image>\nWhat shape is the {c} object?", s, f"<image>The {c} object is a {s}."


def _vqa_count(rng, g):
    n = int(rng.integers(1, 5))
    img, _ = _scene(rng, _objects(rng, n, "none"), g)
    return [img], "<image>\nHow many shapes are there?", str(n), f"<image>There are {n} shapes."


def _vqa_position(rng, g):
    objs = _objects(rng, 2, "both")
    line, (i, j) = int(rng.integers(g)), rng.permutation(g)[:2].tolist()  # two cells of a row or column
    a, b = (line * g + i, line * g + j) if rng.integers(2) else (i * g + line, j * g + line)
    img, _ = _scene(rng, objs, g, [a, b])
    rel = ("left" if a < b else "right") if a // g == b // g else ("above" if a < b else "below")
    (c1, s1), (c2, s2) = objs
    return ([img], f"<image>\nWhere is the {c1} {s1} relative to the {c2} {s2}?", rel,
            f"<image>The {c1} {s1} is {rel} the {c2} {s2}." if rel in ("above", "below")
            else f"<image>The {c1} {s1} is {rel} of the {c2} {s2}.")


def _ocr(rng, g):
    word = "".join(OCR_LETTERS[int(i)] for i in rng.integers(0, len(OCR_LETTERS), int(rng.integers(3, 7))))
    return [_text_image(rng, word)], "<image>\nWhat word is written in the image?", word, f"<image>The word is {word}."


def _grounding(rng, g):
    objs = _objects(rng, int(rng.integers(1, 3)), "both")
    img, boxes = _scene(rng, objs, g)
    k = int(rng.integers(len(objs)))
    x1, y1, x2, y2 = (round(v * 1000 / (g * FACTOR)) for v in boxes[k])  # Qwen2-VL's 0-1000 coordinates
    c, s = objs[k]
    box = f"({x1},{y1}),({x2},{y2})"
    return [img], f"<image>\nLocate the {c} {s}.", box, f"<image>The {c} {s} is at {box}."


def _multi_image(rng, g):
    objs = _objects(rng, 2, "both")
    imgs = [_scene(rng, [o], 2)[0] for o in objs]
    k = int(rng.integers(2))
    c, s = objs[k]
    letter = "AB"[k]
    return (imgs, f"Image A: <image>\nImage B: <image>\nWhich image shows a {c} {s}? Answer A or B.", letter,
            f"Image A: <image>\nImage B: <image>\nThe {c} {s} is in image {letter}.")


def _arithmetic(rng, g):
    a, b = (int(v) for v in rng.integers(0, 20, 2))
    return [], f"What is {a}+{b}?", str(a + b), f"{a}+{b}={a + b}"


MAKERS = {"caption": _caption, "vqa_color": _vqa_color, "vqa_shape": _vqa_shape, "vqa_count": _vqa_count,
          "vqa_position": _vqa_position, "ocr": _ocr, "grounding": _grounding, "multi_image": _multi_image,
          "arithmetic": _arithmetic}
SYNTHETIC_TASKS = list(MAKERS)


def _make(task, rng):
    """One task instance: (images, question, answer, statement), independent of style.
    `statement` is the pre-training sentence (with <image> tags); question holds the tags too."""
    if task not in MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}")
    # drawn first for every task, with a scene or not: each instance is the sequence of draws from its seed, so
    # the data sets (and the figures in docs/LOG.md) stay as they are only while the order of draws does
    g = int(rng.choice(SCENE_GRIDS))
    return MAKERS[task](rng, g)


# ----------------------------------------------------------------------------- splits and records

def content_hash(images, text):
    """Hash of what a record shows (image pixels and a style-independent text)."""
    h = hashlib.blake2b(text.encode(), digest_size=16)
    for img in images:
        h.update(img.tobytes())
    return h.hexdigest()


def _split_of(digest):
    """Content decides the split (80/10/10), so no content is ever in two splits."""
    bucket = int(digest[:8], 16) % 10
    return "train" if bucket < 8 else "dev" if bucket == 8 else "test"


class SyntheticTasks:
    """The built-in curriculum as a dataset. record(index) is a pure function of (seed, split, index): index i
    is task tasks[i % len(tasks)], record i // len(tasks).
    style="pretrain" gives caption/interleaved/text records (loss on all text, stage 2);
    style="instruct" gives conversations (loss on the replies only) of 1 to max_turns turns, each turn a
    question about images of its own (so a longer conversation holds more images and more tokens).
    A content hash assigns every possible instance to exactly one split (drawn by rejection)."""

    def __init__(self, tasks=SYNTHETIC_TASKS, split="train", seed=0, style="instruct", size=None, max_turns=1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if style not in ("pretrain", "instruct"):
            raise ValueError(f"style must be 'pretrain' or 'instruct', got {style!r}")
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown synthetic tasks {unknown}; known: {SYNTHETIC_TASKS}")
        if max_turns < 1:
            raise ValueError(f"max_turns {max_turns}: must be >= 1")
        self.tasks, self.split, self.seed, self.style = list(tasks), split, seed, style
        self.size, self.max_turns = SIZES[split] if size is None else size, max_turns

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.record(index)

    def instance(self, task, n):
        """(images, question, answer, statement) of the task's n-th instance in this split."""
        for attempt in range(1000):
            rng = np.random.default_rng([self.seed, SPLITS[self.split], zlib.crc32(task.encode()), n, attempt])
            images, question, answer, statement = _make(task, rng)
            if _split_of(content_hash(images, task + "|" + question + "|" + answer)) == self.split:
                return images, question, answer, statement
        raise RuntimeError(f"synthetic {task}: no {self.split} instance in 1000 draws")  # each split >= 10%

    def record(self, index):
        task, n = self.tasks[index % len(self.tasks)], index // len(self.tasks)
        rec = {"task": task, "id": f"synthetic/{self.split}/{self.seed}/{index}"}
        if self.style == "pretrain":
            images, _, _, statement = self.instance(task, n)
            return rec | {"images": images, "text": statement,
                          "format": "text" if not images else "caption" if len(images) == 1 else "interleaved"}
        turns = 1 + int(np.random.default_rng([self.seed, SPLITS[self.split], zlib.crc32(task.encode()), n, 1000])
                        .integers(self.max_turns))
        rec |= {"format": "conversation", "images": [], "conversations": []}
        for j in range(turns):  # instance numbers never shared between records
            images, question, answer, _ = self.instance(task, n * self.max_turns + j)
            rec["images"] += images
            rec["conversations"] += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return rec
