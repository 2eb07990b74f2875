"""tasks.py: the synthetic curriculum is a pure function of (seed, split, index), its splits never share
content, its answers are what the pixels show, and its images fit the stage-3 budgets."""
import json

import numpy as np

import data
import train
from data import Tokenizer, encode
from tasks import COLORS, SYNTHETIC_TASKS, SyntheticTasks, content_hash


def test_synthetic_deterministic_and_splits_disjoint():
    tasks = SYNTHETIC_TASKS
    hashes = {}
    for split, n in [("train", 270), ("dev", 90), ("test", 90)]:
        ds = SyntheticTasks(tasks, split, seed=0)
        recs = [ds[i] for i in range(n)]
        again = SyntheticTasks(tasks, split, seed=0)
        for i in (0, 5, n - 1):  # pure function of (seed, split, index), in any order
            r = again.record(i)
            assert r["conversations"] == recs[i]["conversations"]
            assert [im.tobytes() for im in r["images"]] == [im.tobytes() for im in recs[i]["images"]]
        hashes[split] = {content_hash(r["images"], json.dumps(r["conversations"])) for r in recs}
        assert len(hashes[split]) > 0.9 * n
        assert {r["task"] for r in recs} == set(tasks)
    assert not hashes["train"] & hashes["dev"] and not hashes["train"] & hashes["test"]
    assert not hashes["dev"] & hashes["test"]
    other = SyntheticTasks(tasks, "train", seed=1)
    assert sum(other[i]["conversations"] == SyntheticTasks(tasks, "train", 0)[i]["conversations"]
               for i in range(45)) < 30
    # every arithmetic problem lives in exactly one split
    problems = {s: {SyntheticTasks(["arithmetic"], s)[i]["conversations"][0]["value"] for i in range(60)}
                for s in ("train", "test")}
    assert not problems["train"] & problems["test"]


def test_synthetic_formats_and_answers_match_pixels():
    tok = Tokenizer()
    pre = SyntheticTasks(split="train", style="pretrain")
    formats = {pre[i]["task"]: pre[i]["format"] for i in range(len(SYNTHETIC_TASKS))}
    assert formats["arithmetic"] == "text" and formats["multi_image"] == "interleaved" and formats["ocr"] == "caption"
    s = encode(pre[0], tok)
    assert all(lab != -100 for t, lab in zip(s.tokens, s.labels) if t < 256)
    ds = SyntheticTasks(["vqa_color", "vqa_count", "grounding", "vqa_position"], split="dev", seed=2)
    for i in range(40):
        r = ds[i]
        q, a = (t["value"] for t in r["conversations"])
        px = np.asarray(r["images"][0]).astype(int)
        masks = {c: (np.abs(px - rgb).sum(-1) < 3) for c, rgb in COLORS.items()}
        if r["task"] == "vqa_color":
            assert masks[a].sum() > 20
        elif r["task"] == "vqa_count":
            fg = sum(masks.values()) > 0  # shapes sit in distinct one-token cells
            h, cells = data.FACTOR, range(0, px.shape[0], data.FACTOR)
            assert sum(fg[y:y + h, x:x + h].any() for y in cells for x in cells) == int(a)
        elif r["task"] == "grounding":
            color = q.split()[3]
            ys, xs = np.nonzero(masks[color])
            (x1, y1), (x2, y2) = (tuple(map(int, p.strip("()").split(","))) for p in a.split("),("))
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()]) * 1000 / px.shape[0]
            assert np.abs(box - [x1, y1, x2, y2]).max() <= 1000 / px.shape[0] + 1
        else:
            c1, c2 = q.split()[4], q.split()[-2]
            (y1, x1), (y2, x2) = (np.argwhere(masks[c]).mean(0) for c in (c1, c2))
            horizontal = abs(x1 - x2) > abs(y1 - y2)
            expect = ("left" if x1 < x2 else "right") if horizontal else ("above" if y1 < y2 else "below")
            assert a == expect
        assert len(encode(r, tok).tokens) < 160


def test_synthetic_native_sizes_and_the_stage3_budgets():
    recs = [SyntheticTasks(split="test", seed=3)[i] for i in range(180)]
    sides = {im.size for r in recs if r["task"] != "ocr" for im in r["images"]}
    assert sides == {(56, 56), (84, 84)}  # scenes: 2x2 and 3x3 one-token cells
    cfg = train.TrainConfig()
    short, long = (train.StageRun.plan(train.replace(cfg, packing_length=n), 3).max_pixels for n in (512, 1024))
    # the 1,024-token run sees every image whole; the 512 one shrinks 3x3 scenes and text images
    assert all(data.smart_resize(h, w, max_pixels=long) == (h, w) for w, h in sides | {(224, 56)})
    assert data.smart_resize(84, 84, max_pixels=short) != (84, 84) and data.smart_resize(56, 56, max_pixels=short) == (56, 56)
    for r in (r for r in recs if r["task"] == "ocr"):
        img, word = r["images"][0], r["conversations"][1]["value"]
        assert img.size == (224, 56) and data.smart_resize(56, 224, max_pixels=short) != (56, 224)
        ink = np.asarray(img).astype(int).sum(-1) < 3 * 150
        cells = [bool(ink[y:y + 28, x:x + 28].any()) for y in (0, 28) for x in range(0, 224, 28)]
        assert cells == [i < len(word) for i in range(16)]  # one letter per token, in reading order
