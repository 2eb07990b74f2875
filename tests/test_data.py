"""data.py: tokenizer against Hugging Face `tokenizers`, image preprocessing against transformers'
Qwen2-VL processor, chat-template labels, M-RoPE positions against Qwen2.5-VL's get_rope_index,
packing and loader resume, bad inputs."""
import base64
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import requires
from data import DataError, FileDataset, Mixture, PackedLoader, Tokenizer, collate, encode, pack, process_image, \
    smart_resize

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, they'll say; we've 12345 apples!",
          "多模态大语言模型的训练配方：视觉编码器、连接器和语言模型。中文文本测试，你好世界。",
          "Emoji time 😀🎉🚀 👩‍💻 and café naïve résumé — ünïcödé.",
          "def f(x):\n    return x  +  1\n\n\n\tindent\t\ttabs   spaces    end  \r\n",
          "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"] * 20
TEXTS = ["Hello world! It's a test, isn't it? 3.14159 and 42.",
         "训练多模态模型需要图像和文本。你好！",
         "Rockets 🚀🚀 and faces 😀😃 mixed with text 👍🏽.",
         "a  b   c    d\n\n\n  \t\tx\r\n   ",
         "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
         "<|image_pad|><|vision_end|>what?<|im_end|>\n<|endoftext|>",
         "unseen words: zyzzyva quokka Ωmega ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


# ----------------------------------------------------------------------------- tokenizer

def train_hf_tokenizer(path, specials_in_vocab):
    """A Qwen-style byte-level BPE tokenizer.json trained here with the `tokenizers` library."""
    requires("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=data.SPECIAL_TOKENS if specials_in_vocab else [],
                                  show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    if not specials_in_vocab:  # Qwen's layout: added tokens after the BPE vocabulary
        hf.add_special_tokens(data.SPECIAL_TOKENS + ["<|object_ref_start|>"])
    hf.save(str(path))
    return hf


@pytest.mark.parametrize("specials_in_vocab", [False, True])
def test_from_hf_matches_tokenizers(tmp_path, specials_in_vocab):
    hf = train_hf_tokenizer(tmp_path / "tokenizer.json", specials_in_vocab)
    tok = Tokenizer.from_hf(str(tmp_path))
    assert len(json.load(open(tmp_path / "tokenizer.json"))["model"]["merges"]) > 150  # real merges happened
    for text in TEXTS + CORPUS[:5]:
        ids = hf.encode(text).ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
    for s in data.SPECIAL_TOKENS:
        assert getattr(tok, {"<|endoftext|>": "eos_id", "<|im_start|>": "im_start_id", "<|im_end|>": "im_end_id",
                             "<|vision_start|>": "vision_start_id", "<|vision_end|>": "vision_end_id",
                             "<|image_pad|>": "image_pad_id"}[s]) == hf.token_to_id(s)
    assert tok.vocab_size == hf.get_vocab_size()
    # content encoding never produces special tokens
    assert tok.im_end_id not in tok.encode("<|im_end|>", special=False)


def test_from_hf_rejects_inconsistent_merges(tmp_path):
    train_hf_tokenizer(tmp_path / "tokenizer.json", False)
    tj = json.load(open(tmp_path / "tokenizer.json"))
    tj["model"]["merges"][3], tj["model"]["merges"][200] = tj["model"]["merges"][200], tj["model"]["merges"][3]
    json.dump(tj, open(tmp_path / "tokenizer.json", "w"))
    with pytest.raises(DataError, match="merge [0-9]+ .* not consistent with vocab ids"):
        Tokenizer.from_hf(str(tmp_path))


def test_tiktoken_file_and_default(tmp_path):
    hf = train_hf_tokenizer(tmp_path / "tokenizer.json", False)
    byte_of = {c: b for b, c in data.bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in t): i for t, i in hf.get_vocab(with_added_tokens=False).items()}
    with open(tmp_path / "tok.tiktoken", "w") as f:
        for b, i in sorted(ranks.items(), key=lambda x: x[1]):
            f.write(f"{base64.b64encode(b).decode()} {i}\n")
    tok = Tokenizer.from_tiktoken_file(str(tmp_path / "tok.tiktoken"), pat_str=QWEN_PATTERN)
    n = len(ranks)
    assert [tok.eos_id, tok.im_start_id, tok.im_end_id, tok.vision_start_id, tok.vision_end_id,
            tok.image_pad_id] == list(range(n, n + 6)) and tok.vocab_size == n + 6
    for text in TEXTS[:4]:  # no special tokens in these; NFC-stable text
        assert tok.encode(text) == hf.encode(text).ids
    default = Tokenizer()
    assert default.vocab_size == 262 and default.image_pad_id == 261 and default.eos_id == 256
    for text in TEXTS:
        assert default.decode(default.encode(text)) == text
    assert default.encode("é<|im_end|>") == list("é".encode()) + [258]


# ----------------------------------------------------------------------------- images

def reference_processor(**kw):
    requires("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(size={"shortest_edge": kw["min_pixels"], "longest_edge": kw["max_pixels"]})


@pytest.mark.parametrize("size,mode,min_pixels,max_pixels", [
    ((84, 56), "RGB", 56 * 56, 28 * 28 * 1280),  # already multiples of 28: no resize
    ((123, 45), "RGB", 56 * 56, 28 * 28 * 1280),  # rounding resize, wide
    ((37, 201), "RGBA", 56 * 56, 28 * 28 * 1280),  # tall, transparency composited on white
    ((640, 480), "RGB", 56 * 56, 28 * 28 * 64),  # downscale to max_pixels
    ((20, 30), "L", 28 * 28 * 16, 28 * 28 * 64),  # upscale to min_pixels, grayscale
])
def test_process_image_matches_qwen2vl_processor(size, mode, min_pixels, max_pixels):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    patches, grid = process_image(img, min_pixels, max_pixels)
    ref = reference_processor(min_pixels=min_pixels, max_pixels=max_pixels)(images=[img], return_tensors="np")
    assert tuple(ref["image_grid_thw"][0]) == grid
    flat = torch.from_numpy(ref["pixel_values"]).reshape(len(patches), 3, 2, 14 * 14)  # (C, T, ph*pw) per patch
    assert torch.equal(flat[:, :, 0], flat[:, :, 1])  # a still image repeats its frame over temporal_patch_size
    assert patches.shape == (grid[1] * grid[2], 588) and patches.dtype == torch.float32
    torch.testing.assert_close(patches, flat[:, :, 0].reshape(len(patches), 588), atol=1e-5, rtol=0)


def test_smart_resize_rules():
    requires("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref
    for h, w in [(1, 150), (28, 28), (1000, 333), (4000, 3000), (57, 29)]:
        assert smart_resize(h, w, 28, 3136, 200704) == ref(h, w, 28, 3136, 200704)
    with pytest.raises(DataError, match="aspect ratio"):
        smart_resize(10, 2500)


# ----------------------------------------------------------------------------- labels

def small_image(color, size=(56, 84)):
    return Image.new("RGB", size, color)


def test_conversation_labels_only_on_replies():
    tok = Tokenizer()
    rec = {"task": "t", "format": "conversation", "images": [small_image("red"), small_image("blue", (112, 56))],
           "conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "<image>\nWhat is this?"},
                             {"from": "gpt", "value": "A red card."},
                             {"from": "human", "value": "And <image> this <|im_end|>?"},
                             {"from": "gpt", "value": "Blue, 蓝色 😀."}]}
    s = encode(rec, tok)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * 6 + "<|vision_end|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
                "A red card.<|im_end|>\n<|im_start|>user\nAnd <|vision_start|>" + "<|image_pad|>" * 8
                + "<|vision_end|> this <|im_end|>?<|im_end|>\n<|im_start|>assistant\nBlue, 蓝色 😀.<|im_end|>\n")
    assert tok.decode(s.tokens) == expected
    assert s.tokens.count(tok.im_end_id) == 5  # the <|im_end|> typed in user text stayed text
    runs, cur = [], []  # contiguous labelled runs
    for t, lab in zip(s.tokens, s.labels):
        assert lab in (t, -100)
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["A red card.<|im_end|>", "Blue, 蓝色 😀.<|im_end|>"]
    image_tok = {tok.vision_start_id, tok.vision_end_id, tok.image_pad_id}
    assert all(lab == -100 for t, lab in zip(s.tokens, s.labels) if t in image_tok)
    b = collate([s, s])
    assert b.labels.tolist() == s.labels * 2 and b.input_ids.tolist() == s.tokens * 2
    g = encode(rec, tok, for_generation=True)
    assert tok.decode(g.tokens).endswith("this <|im_end|>?<|im_end|>\n<|im_start|>assistant\n")
    assert g.answer == "Blue, 蓝色 😀." and g.tokens == s.tokens[:len(g.tokens)]


def test_pretraining_formats_label_all_text():
    tok = Tokenizer()
    rec = {"task": "t", "format": "interleaved", "images": [small_image("red"), small_image("green")],
           "text": "First <image> then <image> end."}
    s = encode(rec, tok)
    assert tok.decode(s.tokens) == ("First <|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|> then "
                                    "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|> end.<|endoftext|>")
    image_tok = {tok.vision_start_id, tok.vision_end_id, tok.image_pad_id}
    assert [lab != -100 for lab in s.labels] == [t not in image_tok for t in s.tokens]
    assert s.labels[-1] == tok.eos_id
    assert len(s.images) == 2 and s.images[0][1] == (1, 6, 4)  # 56 wide, 84 high


# ----------------------------------------------------------------------------- packing

def test_mrope_positions_match_get_rope_index():
    requires("transformers")
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    tok = Tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.eos_id,
                         eos_token_id=tok.eos_id, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
        image_token_id=tok.image_pad_id, vision_start_token_id=tok.vision_start_id)
    model = Qwen2_5_VLModel(cfg)
    images = [small_image("red", (56, 112)), small_image("blue", (168, 56)), small_image("gray", (56, 56))]
    rec = {"task": "t", "format": "conversation", "images": images,
           "conversations": [{"from": "human", "value": "<image><image>\nCompare."}, {"from": "gpt", "value": "Same."},
                             {"from": "human", "value": "Now <image>?"}, {"from": "gpt", "value": "Gray."}]}
    s = encode(rec, tok)
    text = encode({"task": "t", "format": "text", "images": [], "text": "plain"}, tok)
    b = collate([text, s, text], mrope=True)
    n0, n1 = len(text.tokens), len(s.tokens)
    ids = torch.tensor([s.tokens])
    ref, _ = model.get_rope_index(ids, (ids == tok.image_pad_id).int(),
                                  image_grid_thw=torch.tensor([g for _, g in s.images]))
    assert b.position_ids.shape == (3, 2 * n0 + n1)
    assert torch.equal(b.position_ids[:, n0:n0 + n1], ref[:, 0])
    assert torch.equal(b.position_ids[:, :n0], torch.arange(n0).expand(3, -1))  # text-only: rows equal, restart
    assert torch.equal(b.position_ids[:, n0 + n1:], torch.arange(n0).expand(3, -1))
    assert torch.equal(b.image_grid, torch.tensor([[1, 8, 4], [1, 4, 12], [1, 4, 4]]))
    assert b.pixel_patches.shape == (32 + 48 + 16, 588)


class LongTail:
    """Text records with long-tailed (log-normal) lengths; each text names its position."""

    def __init__(self, n, seed=0):
        self.lengths = np.clip(np.random.default_rng(seed).lognormal(np.log(250), 1.0, n), 12, 4000).astype(int)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        head = f"#{i}:"
        return {"task": "text", "format": "text", "images": [], "text": head + "x" * (self.lengths[i] - len(head)),
                "id": f"longtail/{i}"}


def sample_ids(batch, tok):
    """The #i heads of the samples in a batch, checking cu_seqlens and position_ids on the way."""
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == len(batch.input_ids)
    assert batch.max_seqlen == max(np.diff(cu))
    heads = []
    for a, b in zip(cu[:-1], cu[1:]):
        assert torch.equal(batch.position_ids[a:b], torch.arange(b - a))
        text = tok.decode(batch.input_ids[a:b].tolist())
        assert text.startswith("#") and text.endswith("x<|endoftext|>")  # whole sample: head to eos
        assert batch.labels[b - 1] == tok.eos_id  # pre-training text: every text token carries loss
        heads.append(int(text[1:text.index(":")]))
    return heads


def test_pack_best_fit_decreasing():
    tok = Tokenizer()
    src = LongTail(600)
    samples = [encode(src[i], tok) for i in range(len(src))]
    batches = pack(samples, 4096)
    seen = sorted(h for b in batches for h in sample_ids(b, tok))
    assert seen == list(range(len(src)))
    assert all(len(b.input_ids) <= 4096 for b in batches)
    total = sum(len(s.tokens) for s in samples)
    assert total / (len(batches) * 4096) >= 0.97


def test_loader_efficiency_determinism_resume_and_shards():
    tok = Tokenizer()
    src = LongTail(3000)
    loader = PackedLoader(src, tok, 4096, seed=3)
    batches = [next(loader) for _ in range(60)]
    assert loader.efficiency >= 0.97, loader.efficiency
    heads = [h for b in batches for h in sample_ids(b, tok)]
    assert len(heads) == len(set(heads))  # no sample twice (within the first epoch), none split
    again = PackedLoader(src, tok, 4096, seed=3)
    for b in batches[:20]:
        assert torch.equal(next(again).input_ids, b.input_ids)
    state = again.state_dict()
    resumed = PackedLoader(src, tok, 4096, seed=3)
    resumed.load_state_dict(state)
    for b in batches[20:]:
        nb = next(resumed)
        assert torch.equal(nb.input_ids, b.input_ids) and torch.equal(nb.labels, b.labels)
    assert resumed.efficiency == loader.efficiency
    other = PackedLoader(src, tok, 4096, seed=4)
    assert not torch.equal(next(other).input_ids, batches[0].input_ids)
    ranks = [PackedLoader(src, tok, 4096, seed=3, rank=r, world_size=2) for r in range(2)]
    per_rank = [{h for _ in range(10) for h in sample_ids(next(ld), tok)} for ld in ranks]
    assert not per_rank[0] & per_rank[1]
    order = [Mixture({"data": src}, {"data": 1.0}, 3)[j]["id"] for j in range(2 * ranks[0].reads)]
    assert {f"longtail/{h}" for h in per_rank[0]} <= set(order[0::2])


def test_mixture_ratio_epochs_and_determinism():
    a, b = LongTail(50, seed=1), LongTail(7, seed=2)
    mix = Mixture({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, seed=0)
    locs = [mix.locate(n) for n in range(8000)]
    frac_a = sum(k == 0 for k, _ in locs) / len(locs)
    assert abs(frac_a - 0.75) < 0.02
    b_idx = [i for k, i in locs if k == 1]
    assert all(sorted(b_idx[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(len(b_idx) // 7))  # epochs
    assert b_idx[:7] != b_idx[7:14]  # reshuffled per epoch
    fresh = Mixture({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, seed=0)
    assert [fresh.locate(n) for n in (7999, 12, 5000)] == [locs[7999], locs[12], locs[5000]]  # random access


# ----------------------------------------------------------------------------- bad inputs

def write_jsonl(tmp_path, lines):
    Image.new("RGB", (60, 40), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                        {"from": "gpt", "value": "red"}]})


def test_jsonl_reads_llava_records(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, json.dumps({"text": "just text"}), "  \t",
                                  json.dumps({"images": ["ok.png", "ok.png"], "text": "two <image> and <image>"}),
                                  json.dumps({"image": "ok.png", "text": "a caption"})])
    ds = FileDataset(path, str(tmp_path))
    assert len(ds) == 4 and ds.format == "jsonl"  # the blank line is no record
    assert [ds[i]["format"] for i in range(4)] == ["conversation", "text", "interleaved", "caption"]
    assert ds[3]["text"] == "<image>a caption" and ds[0]["id"] == f"{path}:1" and ds[3]["id"] == f"{path}:5"
    assert encode(ds[0], Tokenizer()).images[0][1] == (1, 4, 6)  # 60x40 scaled up to min_pixels


@pytest.mark.parametrize("line,message", [
    ('{"image": "ok.png", "conversations": [', "malformed JSON"),
    (json.dumps({"image": "nope.png", "conversations": [{"from": "human", "value": "<image>"},
                                                        {"from": "gpt", "value": "x"}]}), "missing image"),
    (json.dumps({"image": "ok.png", "conversations": [{"from": "human", "value": "no tag"},
                                                      {"from": "gpt", "value": "x"}]}), "0 <image> tags for 1"),
    (json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}), "empty reply"),
])
def test_jsonl_bad_record_raises_when_read_or_is_skipped(tmp_path, line, message):
    path = write_jsonl(tmp_path, [GOOD, line, GOOD])
    ds = FileDataset(path, str(tmp_path))  # indexing reads no record: bad ones surface when read
    assert len(ds) == 3 and [ds[i]["id"] for i in (0, 2)] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match=f"d.jsonl:2: {message}"):
        ds[1]
    assert_loader_raises_or_skips(ds, f"{path}:2: {message}")


def assert_loader_raises_or_skips(ds, error):
    """PackedLoader stops at the bad record with on_bad="raise" and counts it with on_bad="skip"."""
    loader = PackedLoader(ds, Tokenizer(), 512, buffer_size=3)
    with pytest.raises(DataError, match=re.escape(error)):
        for _ in range(len(ds)):  # each batch takes at least one sample: every record is read
            next(loader)
    loader = PackedLoader(ds, Tokenizer(), 512, on_bad="skip", buffer_size=3)
    batches = [next(loader) for _ in range(len(ds))]
    assert loader.skipped >= 1 and loader.last_error.startswith(error)
    assert all(len(b.cu_seqlens) > 1 for b in batches)


def write_records(tmp_path, fmt, replies):
    """One record per reply (" " makes a bad one: an empty reply) asking for the colour of a 56x84 red
    picture, in format `fmt`: LLaVA JSONL or JSON array, OpenAI messages in JSONL (image_url parts) or in a
    JSON array (bare image parts + "images", Hugging Face's layout), or Parquet / Arrow with the PNG bytes in a
    column (the_cauldron's images/texts, two rows per row group or batch). Returns the path and each record's
    place."""
    small_image("red").save(tmp_path / "red.png")
    if fmt in ("parquet", "arrow"):
        requires("pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq
        png = (tmp_path / "red.png").read_bytes()
        table = pa.table({"images": [[{"bytes": png, "path": None}] for _ in replies],
                          "texts": [[{"user": "Color?", "assistant": r, "source": "test"}] for r in replies]})
        if fmt == "parquet":
            pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
        else:  # an Arrow IPC stream, as datasets' save_to_disk writes
            with pa.ipc.new_stream(str(tmp_path / "d.arrow"), table.schema) as writer:
                writer.write_table(table, max_chunksize=2)
        return str(tmp_path / f"d.{fmt}"), [f"row {i}" for i in range(len(replies))]
    if fmt in ("jsonl", "json"):
        recs = [{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                       {"from": "gpt", "value": r}]} for r in replies]
    elif fmt == "messages.jsonl":
        recs = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                                           {"type": "text", "text": "\nColor?"}]},
                              {"role": "assistant", "content": r}]} for r in replies]
    else:
        recs = [{"images": ["red.png"], "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": r}]}]} for r in replies]
    path = tmp_path / (fmt if "." in fmt else f"d.{fmt}")  # distinct names: every format can share a folder
    if fmt.endswith("jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(path), [str(i + 1) for i in range(len(recs))]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")  # element k on line k + 2
    return str(path), [f"{i + 2} (element {i})" for i in range(len(recs))]


FORMATS = ["jsonl", "json", "messages.jsonl", "messages.json", "parquet", "arrow"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_records_and_names_bad_ones(tmp_path, fmt):
    path, places = write_records(tmp_path, fmt, ["red", " ", "red", "red", "red"])
    ds = FileDataset(path, str(tmp_path))
    assert ds.format == fmt.split(".")[-1] and len(ds) == 5
    tok = Tokenizer()
    task = os.path.basename(path).split(".")[0]
    want = encode({"task": task, "format": "conversation", "images": [str(tmp_path / "red.png")],
                   "conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]},
                  tok)
    for i in (0, 4):  # row 4 is in Parquet's third row group
        got = encode(ds[i], tok)
        assert ds[i]["id"] == f"{path}:{places[i]}" and ds[i]["task"] == task
        if fmt != "messages.json":  # that one adds a system turn
            assert got.tokens == want.tokens and got.labels == want.labels
        assert torch.equal(got.images[0][0], want.images[0][0])
    with pytest.raises(DataError, match=re.escape(f"{path}:{places[1]}: empty reply")):
        ds[1]
    assert_loader_raises_or_skips(ds, f"{path}:{places[1]}: empty reply")


def test_parquet_keeps_decoded_row_groups_up_to_the_cache_size(tmp_path, monkeypatch):
    path, _ = write_records(tmp_path, "parquet", ["red", "blue", "red", "green", "red"])  # row groups of 2
    ds = FileDataset(path, str(tmp_path))
    assert [ds[i]["conversations"][1]["value"] for i in (4, 1, 3)] == ["red", "blue", "green"]
    assert list(ds.groups) == [2, 0, 1]  # least recently read first
    monkeypatch.setattr(data, "PARQUET_CACHE_BYTES", 1)  # room for one group: each new one evicts the last
    small = FileDataset(path, str(tmp_path))
    assert [small[i]["conversations"][1]["value"] for i in (4, 1)] == ["red", "blue"] and list(small.groups) == [0]


def test_messages_images_as_data_and_file_urls(tmp_path):
    small_image("red").save(tmp_path / "red.png")
    b64 = base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    msgs = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url},
                                                       {"type": "text", "text": "Color?"}]},
                          {"role": "assistant", "content": "red"}]}
            for url in (f"data:image/png;base64,{b64}", f"file://{tmp_path / 'red.png'}", "red.png")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    ds = FileDataset(str(tmp_path / "m.jsonl"), str(tmp_path))
    assert isinstance(ds[0]["images"][0], bytes)
    assert ds[1]["images"][0] == ds[2]["images"][0] == str(tmp_path / "red.png")  # file:// inside the root
    samples = [encode(ds[i], Tokenizer()) for i in range(3)]
    assert samples[0].tokens == samples[1].tokens == samples[2].tokens
    assert all(torch.equal(s.images[0][0], samples[2].images[0][0]) for s in samples)


def test_format_specific_errors(tmp_path):
    path, _ = write_records(tmp_path, "json", ["red", "red"])
    text = open(path).read()
    open(path, "w").write(text.replace('"red"}]}', '"red"}]', 1))  # a syntax error inside the array
    with pytest.raises(DataError, match=r"d.json:3: malformed JSON .*cannot be read past it"):  # where json notices
        FileDataset(path, str(tmp_path))
    msgs = [{"images": ["red.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                                                 {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x.org/a.png"}]},
                          {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "robot", "content": "hi"}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@"}]},
                          {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    ds = FileDataset(str(tmp_path / "m.jsonl"), str(tmp_path))
    for i, message in enumerate(["more image parts than images", "remote images are not fetched",
                                 "role system|user|assistant", "bad base64", "need type text"]):
        with pytest.raises(DataError, match=f"m.jsonl:{i + 1}: .*{message}"):
            ds[i]


def test_corrupt_image_bytes(tmp_path):
    bad = json.dumps({"image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                {"from": "gpt", "value": "x"}]})
    path = write_jsonl(tmp_path, [GOOD, bad, GOOD])
    ds = FileDataset(path, str(tmp_path))  # the file exists; its bytes are only read at encode time
    with pytest.raises(DataError, match=f"d.jsonl:2: cannot read image .*corrupt.png"):
        encode(ds[1], Tokenizer())
    with pytest.raises(DataError, match="corrupt.png"):
        next(PackedLoader(ds, Tokenizer(), 512, buffer_size=3))
    loader = PackedLoader(ds, Tokenizer(), 512, on_bad="skip", buffer_size=3)
    next(loader)
    assert loader.skipped >= 1 and "corrupt.png" in loader.last_error


def test_too_long_sample():
    tok = Tokenizer()
    rec = {"task": "t", "format": "caption", "images": [small_image("red", (112, 112))], "text": "<image>" + "y" * 100,
           "id": "rec/7"}
    s = encode(rec, tok)  # 18 image tokens + 100 text + eos
    with pytest.raises(DataError, match=r"sample rec/7 \(t\) has 119 tokens > the packing length 64 \(raise --packing-length"):
        pack([s], 64)
    (b,) = pack([s], 64, truncate=True)
    assert len(b.input_ids) == 64 and b.image_grid.tolist() == [[1, 8, 8]]
    assert (b.input_ids == tok.image_pad_id).sum() == 16
    with pytest.raises(DataError, match="images alone"):
        pack([s], 12, truncate=True)
    src = [rec] * 3 + [{"task": "t", "format": "text", "images": [], "text": "short"}] * 3
    loader = PackedLoader(src, tok, 64, on_bad="skip", buffer_size=2)
    b = next(loader)
    assert loader.skipped >= 1 and "rec/7" in loader.last_error and len(b.input_ids) <= 64


def test_from_hf_chained_splits_match_tokenizers(tmp_path):
    """DeepSeek-V3's layout: three Split pre-tokenizers (digits, CJK runs, words) before ByteLevel."""
    requires("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(data.SPECIAL_TOKENS)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf(str(tmp_path))
    assert len(tok.pre_split) == 2
    for text in TEXTS + CORPUS[:5] + ["1234567 apples and 89 pears: 三个苹果ありがとう"]:
        assert tok.encode(text) == hf.encode(text).ids, text
