"""Data: tokenizer, chat template, image preprocessing, sample formats and their labels, data files (JSONL,
JSON array, Parquet, Arrow), mixing by ratio, packing into PackedBatch (flat token stream, no padding), and
the loader with its worker processes. The synthetic curriculum the default run trains on is tasks.py.

Every sample's labels are built by label_pieces, whose docstring states their convention (Hugging Face's).

Data problems (unreadable image, bad record, too-long sample) raise `DataError` (a ValueError)
naming the file:line / sample; loaders skip and count them instead when on_bad="skip".
"""
import array
import atexit
import base64
import binascii
import bisect
import collections
import ctypes
import dataclasses
import datetime
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import queue
import re
import signal
import traceback
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import regex  # tiktoken's own dependency: the Unicode classes (\p{L}) tokenizer patterns are written in
import tiktoken
import torch
from PIL import Image

from common import read_json


# the processor cuts images into the ViT's patches and groups them as its PatchMerger does (Qwen2.5-ViT's sizes).
# They are the image processor's, as Qwen2-VL's preprocessor_config.json keeps them apart from the model config,
# and data.py imports nothing of the model: a VisionConfig with another patch_size / spatial_merge_size needs these too
PATCH, MERGE = 14, 2
FACTOR = PATCH * MERGE
MIN_PIXELS = 56 * 56  # Qwen2-VL processor defaults
MAX_PIXELS = 28 * 28 * 1280
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IGNORE = -100
IMAGE_TAG = "<image>"
UTF8_BOM = b"\xef\xbb\xbf"
# a sample --truncate left without a loss token trains nothing: the loader drops and counts it, never raises
REPLY_CUT = "reply cut away by --truncate"


class DataError(ValueError):
    """A problem with the data (not the code): names the file:line, path or sample. `reason` is a short
    category (e.g. "missing image") under which loaders count the samples they skip."""

    def __init__(self, message, reason="bad record"):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>"]
IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")  # Qwen2-VL's, as an image is written
# cl100k's split pattern, the default for .tiktoken rank files (which do not store one)
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's pattern, used by ByteLevel pre-tokenizers with use_regex=true
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's byte-level BPE alphabet: printable bytes map to themselves, the rest to chr(256+n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


class Tokenizer:
    """A tiktoken Encoding plus the tokens the recipe needs. With no arguments: byte-level (ids 0..255 are the
    bytes, then SPECIAL_TOKENS as 256..261) and the built-in ChatML format (`encode`). With a Hugging Face
    tokenizer (from_hf) and its chat template (`chat`), conversations are the template's rendering and only
    the image tokens it lacks are added. `added` lists the tokens appended past the source's ids."""

    def __init__(self, mergeable_ranks=None, special_tokens=None, pat_str=r"\s+|\S+", normalization=None,
                 name="bytes", chat=None, pre_split=()):
        if mergeable_ranks is None:
            mergeable_ranks = {bytes([b]): b for b in range(256)}
        special_tokens = dict(special_tokens or {})
        next_id = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
        self.source_vocab_size, self.added = next_id, []
        for s in IMAGE_TOKENS + chat.required if chat else SPECIAL_TOKENS:  # add those the vocabulary lacks
            if s not in special_tokens:
                special_tokens[s] = next_id
                self.added.append(s)
                next_id += 1
        self.normalization, self.chat = normalization, chat
        self.pre_split = [regex.compile(p) for p in pre_split]  # applied before tiktoken's (DeepSeek-V3 has 3)
        self.special_split = re.compile("(" + "|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True)))
                                        + ")")
        self.files = {}  # {file name: bytes} that `save` writes: the tokenizer as the run uses it (none: byte-level)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self.vocab_size = next_id
        self.vision_start_id, self.image_pad_id, self.vision_end_id = (special_tokens[s] for s in IMAGE_TOKENS)
        self.im_start_id, self.im_end_id = special_tokens.get("<|im_start|>"), special_tokens.get("<|im_end|>")
        self.bos_id = None  # put before pre-training text: what a Hugging Face post-processor adds (from_hf)
        if chat is None:
            self.eos_id = special_tokens["<|endoftext|>"]
            self.stop_ids = (self.im_end_id, self.eos_id)
        else:
            eot = special_tokens.get(chat.end_of_turn)  # without an eos_token in tokenizer_config.json: ChatML's
            self.eos_id = special_tokens.get(chat.tokens.get("eos_token"), special_tokens.get("<|endoftext|>", eot))
            if self.eos_id is None:
                raise DataError(f"tokenizer {name}: no eos_token (tokenizer_config.json) and no end-of-turn token")
            self.stop_ids = tuple(dict.fromkeys(i for i in (eot, self.eos_id, *chat.stop_ids) if i is not None
                                                and i < next_id))

    def encode(self, text, special=True):
        """Token ids of `text`. special=True parses special-token strings in the text (as Hugging Face
        tokenizers do); special=False encodes them as plain text (used for data content)."""
        text = self.normalize(text)
        if not self.pre_split:
            return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)
        ids = []
        for k, part in enumerate(self.special_split.split(text) if special else [text]):
            if k % 2:  # a special token (split keeps the separators at odd places)
                ids.append(self.special_tokens[part])
            else:
                ids += [i for piece in _isolated_splits(part, self.pre_split) for i in self.enc.encode_ordinary(piece)]
        return ids

    def normalize(self, text):
        return unicodedata.normalize(self.normalization, text) if self.normalization else text

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    @classmethod
    def from_tiktoken_file(cls, path, pat_str=CL100K_PATTERN):
        """A standard .tiktoken file (`base64(token) rank` per line); specials follow the last rank."""
        ranks = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise DataError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}")
                ranks[base64.b64decode(parts[0])] = int(parts[1])
        tok = cls(ranks, pat_str=pat_str, name=os.path.basename(path))
        tok.files = {TIKTOKEN_FILE: open(path, "rb").read()}
        return tok

    @classmethod
    def from_hf(cls, path, chat_template=None):
        """Convert a Hugging Face byte-level BPE tokenizer.json (Qwen2/Qwen3, Llama-3 style) to tiktoken ranks,
        keeping the Hugging Face ids (rank = id) so checkpoints keep their embedding rows. A directory's chat
        template (chat_template.jinja or tokenizer_config.json), or `chat_template` (a template, or "chatml"),
        gives the chat format; without one, the built-in ChatML format."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        with open(file, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        if model.get("type") != "BPE":
            raise DataError(f"{file}: model type {model.get('type')!r} is not BPE")
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        ranks = _hf_byte_ranks(model, added, file)
        chat = ChatFormat.of(os.path.dirname(os.path.abspath(file)), chat_template, added)
        *pre_split, pattern = _hf_patterns(tj, file)
        tok = cls(ranks, added, pat_str=pattern, normalization=_hf_normalization(tj, file),
                  name=os.path.basename(os.path.dirname(os.path.abspath(file))), chat=chat, pre_split=pre_split)
        tok.files = _hf_tokenizer_files(os.path.dirname(os.path.abspath(file)), tj, tok, chat)
        tok.bos_id = tok.special_tokens.get(_hf_prefix_token(tj))
        return tok

    def save(self, directory):
        """Write the tokenizer files (added tokens and chat template included) into `directory`, where
        load_tokenizer (and transformers' AutoTokenizer) read them back."""
        for name, content in self.files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)


def _hf_byte_ranks(model, added, file):
    """{token bytes: id} of a byte-level BPE vocabulary, checked to be one tiktoken can reproduce."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for tok, i in model["vocab"].items():
        if tok in added:
            continue
        try:
            ranks[bytes(byte_of[c] for c in tok)] = i
        except KeyError:
            raise DataError(f"{file}: vocab entry {tok!r} is not byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{file}: byte-level vocab lacks {len(missing)} single bytes, e.g. {missing[:5]}")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; this equals
    # Hugging Face's merge-priority order only if each merge's result has a higher id than
    # both parts and ids increase with merge order.
    made, last = set(), -1
    for k, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ia, ib, iab = model["vocab"].get(a), model["vocab"].get(b), model["vocab"].get(a + b)
        if iab is None or ia is None or ib is None or not (iab > max(ia, ib) and iab > last):
            raise DataError(f"{file}: merge {k} {a!r}+{b!r} is not consistent with vocab ids")
        last = iab
        made.add(a + b)
    stray = [t for t, i in model["vocab"].items() if len(t) > 1 and t not in made and t not in added]
    if stray:
        raise DataError(f"{file}: {len(stray)} vocab entries are neither bytes nor merges, e.g. {stray[:3]}")
    return ranks


def _hf_prefix_token(tj):
    """The special token tokenizer.json's post-processor puts before a text (Llama-3's <|begin_of_text|>), or None."""
    post = tj.get("post_processor") or {}
    for p in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        single = p.get("single") or [{}] if p.get("type") == "TemplateProcessing" else [{}]
        if "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def _hf_tokenizer_files(directory, tj, tok, chat):
    """The files that reproduce `tok` in transformers: tokenizer.json and tokenizer_config.json with the
    added image tokens, the chat template as chat_template.jinja, and the special-token and generation files."""
    new = [{"id": tok.special_tokens[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True} for s in tok.added]
    files = {"tokenizer.json": json.dumps(tj | {"added_tokens": tj.get("added_tokens", []) + new},
                                          ensure_ascii=False, indent=2).encode()}
    config = read_json(os.path.join(directory, "tokenizer_config.json"), missing_ok=True) or {}
    config.pop("chat_template", None)
    decoder = config.get("added_tokens_decoder", {})
    config["added_tokens_decoder"] = decoder | {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in new}
    files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2).encode()
    if chat is not None:
        files["chat_template.jinja"] = chat.template.encode()
    for name in ("special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(directory, name)):
            files[name] = open(os.path.join(directory, name), "rb").read()
    return files


TIKTOKEN_FILE = "tokenizer.tiktoken"  # a run's .tiktoken rank file, as its checkpoints keep it
# every file Tokenizer.save may write (what a directory holding a run's tokenizer may hold of it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", TIKTOKEN_FILE)


def load_tokenizer(path, chat_template=None):
    """A Tokenizer: byte-level for None, a .tiktoken file, a Hugging Face tokenizer.json, or a directory holding
    one of them (a Hugging Face model, or one of our checkpoints: byte-level when it holds no tokenizer files)."""
    if path is None:
        return Tokenizer()
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, TIKTOKEN_FILE)):
        return Tokenizer.from_tiktoken_file(os.path.join(path, TIKTOKEN_FILE))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return Tokenizer()
    if path.endswith(".tiktoken"):
        return Tokenizer.from_tiktoken_file(path)
    return Tokenizer.from_hf(path, chat_template)


# ChatML as the built-in format writes it, for a tokenizer without a template of its own (--chat-template chatml)
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the special-token strings transformers hands a template (its special_tokens_map)
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class ChatFormat:
    """A Hugging Face chat template (Jinja) with what it is rendered with: the special-token strings of
    tokenizer_config.json, the ids generation stops at (generation_config.json's eos_token_id), the tokens the
    template writes that a tokenizer may lack (ChatML's), and the token that ends a reply (found by rendering)."""
    template: str
    tokens: dict
    stop_ids: tuple = ()
    required: tuple = ()
    end_of_turn: str = None

    @staticmethod
    def of(directory, chat_template, added):
        """The format of a tokenizer directory: `chat_template` ("chatml", a .jinja file or the template text),
        else the directory's chat_template.jinja, tokenizer_config.json's or chat_template.json's; None if none."""
        config = read_json(os.path.join(directory, "tokenizer_config.json"), missing_ok=True) or {}
        template, required = chat_template, ()
        if template == "chatml":
            template, required = CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")
        elif template is not None and os.path.isfile(template):
            template = open(template, encoding="utf-8").read()
        elif template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
            template = open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8").read()
        elif template is None:  # tokenizer_config.json's, else a processor's chat_template.json (Qwen2.5-VL's)
            template = config.get("chat_template") or (
                read_json(os.path.join(directory, "chat_template.json"), missing_ok=True) or {}).get("chat_template")
            if isinstance(template, list):  # [{"name", "template"}]: the default one
                template = {t.get("name"): t.get("template") for t in template}.get("default")
        if template is None:
            return None
        tokens = {k: v.get("content") if isinstance(v, dict) else v for k in TEMPLATE_TOKENS
                  if (v := config.get(k)) is not None}
        eos = (read_json(os.path.join(directory, "generation_config.json"), missing_ok=True) or {}).get("eos_token_id")
        chat = ChatFormat(template, tokens, tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                          required)
        chat.end_of_turn = chat.token_after_reply([*added, *required])
        return chat

    def render(self, messages, add_generation_prompt=False):
        """The template's text for `messages`, rendered as transformers' apply_chat_template renders it."""
        try:
            return _compile_template(self.template).render(messages=messages, tools=None, documents=None,
                                                           add_generation_prompt=add_generation_prompt, **self.tokens)
        except Exception as e:  # a template's raise_exception, or an error in the template itself
            raise DataError(f"chat template: {type(e).__name__}: {e}", reason="chat template") from e

    def token_after_reply(self, specials):
        """The special token a reply ends with (<|im_end|>, <|eot_id|>, ...): the one the template writes right
        after a reply's text, or None."""
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": REPLY_MARK}])
        except DataError:
            return None
        after = text[text.find(REPLY_MARK) + len(REPLY_MARK):] if REPLY_MARK in text else ""
        return max((s for s in specials if after.startswith(s)), key=len, default=None)


REPLY_MARK = "\ue000reply\ue001"  # private-use characters: stand in for a reply to find where the template puts it


@functools.lru_cache(maxsize=8)
def _compile_template(template):
    """Jinja as transformers sets it up for chat templates: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, tojson without HTML escaping, raise_exception and strftime_now; {% generation %} blocks render
    their body."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals |= {"raise_exception": raise_exception,
                    "strftime_now": lambda fmt: datetime.datetime.now().strftime(fmt)}
    return env.from_string(template)


def _hf_patterns(tj, file):
    """The split regexes of a tokenizer.json pre-tokenizer in the order it applies them (each Split, then
    ByteLevel's own when use_regex): tiktoken applies the last, Tokenizer.encode the others before it."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = []
    for s in steps:
        if s.get("type") == "Split":
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise DataError(f"{file}: only Split(behavior=Isolated, invert=false) is supported")
            if s["pattern"].get("Regex") is None:
                raise DataError(f"{file}: Split pattern must be a Regex")
            patterns.append(s["pattern"]["Regex"])
        elif s.get("type") == "ByteLevel":
            if s.get("add_prefix_space"):
                raise DataError(f"{file}: ByteLevel add_prefix_space=true is not supported")
            if s.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        else:
            raise DataError(f"{file}: unsupported pre-tokenizer {s.get('type')!r}")
    if not patterns:
        raise DataError(f"{file}: no split pattern in pre_tokenizer")
    return patterns


def _isolated_splits(text, patterns):
    """`text` cut as a chain of Split(behavior=Isolated) pre-tokenizers cuts it: each pattern's matches become
    pieces of their own, in every piece the one before left."""
    pieces = [text]
    for p in patterns:
        cut = []
        for piece in pieces:
            last = 0
            for m in p.finditer(piece):
                cut += [x for x in (piece[last:m.start()], m.group()) if x]
                last = m.end()
            cut += [piece[last:]] if last < len(piece) else []
        pieces = cut
    return pieces


def _hf_normalization(tj, file):
    norm = tj.get("normalizer")
    if norm is None:
        return None
    if norm.get("type") in ("NFC", "NFD", "NFKC", "NFKD"):
        return norm["type"]
    raise DataError(f"{file}: unsupported normalizer {norm.get('type')!r}")


# ----------------------------------------------------------------------------- images

def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Qwen2-VL's rule: sides multiples of `factor`, aspect kept, pixel count in [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"aspect ratio {max(height, width) / min(height, width):.1f} > 200 ({width}x{height})")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps at least this many times the resized
# side, so the bicubic resize that follows still averages over >= 2 source pixels per output pixel (as PIL's
# thumbnail does): pixels within DRAFT_TOLERANCE of the full decode's, at a fraction of the decode time
DRAFT_GAP = 2
DRAFT_TOLERANCE = (1.0, 32)  # mean and max absolute pixel difference, 0..255 scale (tests/test_workers.py measures it)


def load_image(path, budget=None):
    """Open and decode an image file; any failure is a DataError naming the path. Images over PIL's
    decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP) are refused before they are decoded.
    budget=(min_pixels, max_pixels): a JPEG that smart_resize will shrink by DRAFT_GAP or more is decoded at
    a reduced scale; info["full_size"] and info["draft_box"] tell process_image what it was."""
    try:
        with Image.open(path) as img:
            full = img.size
            if budget and img.format == "JPEG" and min(full) > 0 and max(full) / min(full) <= 200:
                h, w = smart_resize(full[1], full[0], FACTOR, *budget)
                box = img.draft(None, (w * DRAFT_GAP, h * DRAFT_GAP))
                if box is not None and img.size != full:
                    img.info.update(full_size=full, draft_box=box[1])
            img.load()
            return img.copy()
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot read image {path}: {e}", reason="image too large") from e
    except (OSError, ValueError, SyntaxError) as e:  # missing file, unknown format, truncated or corrupt bytes
        raise DataError(f"cannot read image {path}: {e}", reason="unreadable image") from e


# full scale of the high-bit-depth PIL modes: a pixel value v becomes 255 * v / full scale
WIDE_MODE_RANGE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8bit(img):
    """16-bit, 32-bit integer and float images rescaled by their mode's full scale to 8-bit "L" (PIL's own
    convert clips them at 255 instead, turning a 16-bit image into black and white). Mode "I" is what PIL
    gives 16-bit PNGs too, so it is read as 16-bit; a float image is read as 0..1."""
    full = WIDE_MODE_RANGE.get(img.mode)
    if full is None:
        return img
    x = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(x * (255 / full)), 0, 255).astype(np.uint8), "L")


def load_image_bytes(encoded, budget=None):
    """Decode an image kept as bytes (a Parquet column, a data URL); a failure is a DataError saying so."""
    try:
        return load_image(io.BytesIO(encoded), budget)
    except DataError as e:
        raise DataError(f"cannot read image bytes ({len(encoded)} bytes): {e.__cause__}", reason=e.reason) from e


def to_rgb(img):
    """RGB; transparency is composited onto white (as the Hugging Face processors do)."""
    img = to_8bit(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def process_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """PIL image -> (pixel_patches [P, 3*14*14] float32, grid (1, h, w) in patches), patches in
    Qwen2-VL order: each 2x2 merge window's four patches are contiguous, windows row-major. An image
    load_image decoded at reduced scale is sized by its full size, resampled from its draft box."""
    (width, height), box = img.info.get("full_size", img.size), img.info.get("draft_box")
    img = to_rgb(img)
    h, w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC, box=box)
    x = (np.asarray(img, dtype=np.float32) / np.float32(255) - CLIP_MEAN) / CLIP_STD  # [H, W, 3]
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (win_row, win_col, row_in_win, col_in_win, C, py, px)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * PATCH * PATCH)), (1, gh, gw)


# ----------------------------------------------------------------------------- samples

@dataclass
class Sample:
    tokens: list
    labels: list  # label_pieces' labels of the tokens
    images: list  # [(patches [P, 588], (1, h, w))] in the order of their <|image_pad|> runs
    task: str
    answer: str = None  # reference reply (for_generation=True)
    id: str = ""  # where the sample came from (file:line or synthetic/split/seed/index), for errors
    image_starts: list = field(default_factory=list)  # token index of each image's first pad
    turn_ends: list = field(default_factory=list)  # token index just past each reply (and its end-of-turn token)
    cut_from: int = 0  # the token count before fit() cut the sample (0: not cut)


def check_record(record, need_reply=True):
    """Why a record cannot be encoded, or None (a conversation without a reply is one to generate for when
    not need_reply). Image files are checked when read."""
    images = record.get("images", [])
    fmt = record.get("format")
    if fmt == "conversation":
        turns = record.get("conversations")
        if not turns or not isinstance(turns, list):
            return "no conversations"
        if any(not isinstance(t, dict) or t.get("from") not in ("system", "human", "gpt")
               or not isinstance(t.get("value"), str) for t in turns):
            return "turns need from=system|human|gpt and a string value"
        if need_reply and not any(t["from"] == "gpt" for t in turns):
            return "no gpt reply"
        if any(t["from"] == "gpt" and not t["value"].strip() for t in turns):
            return "empty reply"
        tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    elif fmt in ("caption", "interleaved", "text"):
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            return "empty text"
        tags = record["text"].count(IMAGE_TAG)
    else:
        return f"unknown format {fmt!r}"
    if tags != len(images):
        return f"{tags} {IMAGE_TAG} tags for {len(images)} images"
    return None


def label_pieces(pieces):
    """(tokens, labels) of a sample written as (ids, has_loss) pieces. Labels follow Hugging Face's convention
    throughout the recipe: aligned with the tokens (not shifted), labels[t] = tokens[t] where token t carries
    loss, else IGNORE (-100); the model shifts them inside each sample (model.next_token_targets), so position t
    learns labels[t + 1] of its own sample, never the next sample's first token."""
    tokens, labels = [], []
    for ids, loss in pieces:
        tokens += ids
        labels += ids if loss else [IGNORE] * len(ids)
    return tokens, labels


def encode(record, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, for_generation=False):
    """Record dict -> Sample. Conversations are the tokenizer's chat template (encode_chat), or without one the
    built-in ChatML `<|im_start|>role\\n...<|im_end|>\\n`, with loss on assistant replies and their
    <|im_end|> (not the template's trailing "\\n"); a "system" turn becomes a system message (there is no
    default system prompt). Caption/interleaved/text records carry loss on all text and end with the eos token
    (after the tokenizer's bos, if its post-processor adds one). Image tokens never carry loss.
    for_generation=True drops the last reply, ends the prompt with the assistant's turn header and puts the
    reply in `answer`."""
    rid = record.get("id", "?")
    reason = check_record(record, need_reply=not for_generation)
    if reason:
        raise DataError(f"{rid}: {reason}")
    images = [_record_image(img, rid, min_pixels, max_pixels) for img in record.get("images", [])]
    if record["format"] == "conversation" and tokenizer.chat is not None:
        return encode_chat(record, tokenizer, images, for_generation)
    if record["format"] != "conversation" and for_generation:
        raise DataError(f"{rid}: for_generation needs a conversation record")
    pieces, starts, ends, answer = _builtin_pieces(record, tokenizer, images, for_generation)
    tokens, labels = label_pieces(pieces)
    return Sample(tokens, labels, images, record.get("task", ""), answer, rid, starts, ends)


def _record_image(img, rid, min_pixels, max_pixels):
    """One image of record `rid` (a path, encoded bytes or a PIL image) at the pixel budget, as process_image
    gives it; a DataError names the record and the file."""
    try:
        budget = (min_pixels, max_pixels)
        pil = load_image(img, budget) if isinstance(img, str) else \
            load_image_bytes(img, budget) if isinstance(img, bytes) else img
        return process_image(pil, min_pixels, max_pixels)
    except DataError as e:
        named = "" if not isinstance(img, str) or img in str(e) else f" ({img})"
        raise DataError(f"{rid}: {e}{named}", reason=e.reason) from e


def _builtin_pieces(record, tok, images, for_generation):
    """A record in the built-in format (ChatML conversations; pre-training text between bos and eos) as
    (ids, has_loss) pieces, with the token index of each image's first pad, the index just past each reply's
    <|im_end|>, and the reply left out to generate (for_generation)."""
    pieces, starts, ends, queue, answer, n = [], [], [], iter(images), None, 0

    def add(ids, loss=False):
        nonlocal n
        pieces.append((ids, loss))
        n += len(ids)

    def add_text(text, loss):  # text with <image> tags; content never parses special tokens
        for k, piece in enumerate(text.split(IMAGE_TAG)):
            if k:
                _, (_, h, w) = next(queue)
                add([tok.vision_start_id])
                starts.append(n)
                add([tok.image_pad_id] * (h * w // MERGE ** 2))
                add([tok.vision_end_id])
            add(tok.encode(piece, special=False), loss)

    if record["format"] != "conversation":
        add([tok.bos_id] if tok.bos_id is not None else [])
        add_text(record["text"], True)
        add([tok.eos_id], True)
        return pieces, starts, ends, answer
    turns = record["conversations"]
    if for_generation:
        turns, answer = _prompt_turns(turns, record.get("id", "?"))
    for t in turns:
        reply = t["from"] == "gpt"
        add([tok.im_start_id] + tok.encode(CHAT_ROLES[t["from"]] + "\n", special=False))
        add_text(t["value"], reply)
        add([tok.im_end_id], reply)
        ends += [n] if reply else []
        add(tok.encode("\n", special=False))
    if for_generation:
        add([tok.im_start_id] + tok.encode("assistant\n", special=False))
    return pieces, starts, ends, answer


CHAT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _prompt_turns(turns, rid):
    """(the turns before the last reply, that reply) of a conversation to generate for; (turns, None) when it
    ends with the user's turn (a question without a reference reply)."""
    if turns[-1]["from"] == "gpt":
        return turns[:-1], turns[-1]["value"]
    if turns[-1]["from"] != "human":
        raise DataError(f"{rid}: a conversation to answer ends with a human turn or the reply to it")
    return turns, None


def encode_chat(record, tok, images, for_generation=False):
    """A conversation as the tokenizer's chat template writes it, the ids transformers' apply_chat_template
    gives (default system prompt, bos and end-of-turn tokens are the template's). Each <image> becomes
    <|vision_start|><|image_pad|><|vision_end|> in the text (as Qwen2.5-VL's template writes an image part)
    and the pad then the image's merged-token count of pads. Loss on each reply and the end-of-turn token the
    template writes right after it (reply_spans). Text holding a special-token string is refused: the
    template's tokens must come from the template."""
    rid, turns, answer = record.get("id", "?"), record["conversations"], None
    for t in turns:
        special = next((s for s in tok.special_tokens if s in t["value"]), None)
        if special:
            raise DataError(f"{rid}: text contains the special token {special!r}", reason="special token in text")
    if for_generation:
        turns, answer = _prompt_turns(turns, rid)
    messages = [{"role": CHAT_ROLES[t["from"]], "content": t["value"].replace(IMAGE_TAG, "".join(IMAGE_TOKENS))}
                for t in turns]
    text = tok.normalize(tok.chat.render(messages, add_generation_prompt=for_generation))
    spans = [] if for_generation else reply_spans(tok, messages, text, rid)
    ids = tok.encode(text)
    if ids.count(tok.image_pad_id) != len(images):
        raise DataError(f"{rid}: the chat template wrote {ids.count(tok.image_pad_id)} image pads for "
                        f"{len(images)} images")
    pieces, starts, ends = _template_pieces(tok, ids, text, spans, images)
    tokens, labels = label_pieces(pieces)
    return Sample(tokens, labels, images, record.get("task", ""), answer, rid, starts, ends)


def _template_pieces(tok, ids, text, spans, images):
    """The template's `ids` of `text` as (ids, has_loss) pieces, one piece per token, each image's pad repeated
    to its merged-token count; a token carries loss where its characters overlap a reply span and it is no image
    token. With the token index of each image's first pad and the index just past each span."""
    offsets = tok.enc.decode_with_offsets(ids)[1] + [len(text)]
    image_ids = {tok.vision_start_id, tok.vision_end_id, tok.image_pad_id}
    pieces, starts, ends, queue, n = [], [], [], iter(images), 0
    span_ends = [e for _, e in spans]
    for k, t in enumerate(ids):
        m = 1
        if t == tok.image_pad_id:
            _, (_, h, w) = next(queue)
            starts.append(n)
            m = h * w // MERGE ** 2
        loss = t not in image_ids and any(offsets[k] < e and offsets[k + 1] > s for s, e in spans)
        pieces.append(([t] * m, loss))
        n += m
        ends += [n] if span_ends and offsets[k] < span_ends[0] <= offsets[k + 1] else []
        while span_ends and span_ends[0] <= offsets[k + 1]:
            span_ends.pop(0)
    return pieces, starts, ends


def reply_spans(tok, messages, text, rid):
    """Character spans [start, end) in `text` of each assistant reply and the special token the template writes
    right after it (<|im_end|>, <|eot_id|>, ...). The conversation rendered with a marker for each reply shows
    the template's own text between replies (headers, default system prompt, thinking tags), which is then
    found in `text` in order: what lies between is the reply as the template wrote it (trimmed, say)."""
    marked, k = [], 0
    for m in messages:
        marked.append(m | {"content": f"\ue000{k}\ue001"} if m["role"] == "assistant" else m)
        k += m["role"] == "assistant"
    pieces = re.split("\ue000[0-9]+\ue001", tok.normalize(tok.chat.render(marked)))
    bad = DataError(f"{rid}: the chat template does not write each reply once, as given, so the reply tokens "
                    "cannot be told apart", reason="chat template")
    if len(pieces) != k + 1 or not text.startswith(pieces[0]) or not text.endswith(pieces[-1]):
        raise bad
    spans, pos = [], len(pieces[0])
    for i, piece in enumerate(pieces[1:]):
        end = len(text) - len(piece) if i == k - 1 else text.find(piece, pos)
        if end < pos:
            raise bad
        eot = max((s for s in tok.special_tokens if piece.startswith(s)), key=len, default="")
        spans.append((pos, end + len(eot)))
        pos = end + len(piece)
    return spans


def first_samples(source, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tries=100):
    """{source name: its first sample that encodes (of its first `tries` records)} of a Mixture: what a stage
    shows before it trains."""
    out = {}
    for name, src in zip(source.names, source.sources):
        for i in range(min(tries, len(src))):
            try:
                out[name] = encode(src[i], tokenizer, min_pixels, max_pixels)
                break
            except DataError:
                continue
    return out


def show_sample(sample, tokenizer):
    """The sample's text with the tokens that carry loss in [[ ]] and each image's pads as <|image_pad|>xN."""
    pieces = []
    for (loss, pad), run in itertools.groupby(zip(sample.tokens, sample.labels),
                                              key=lambda x: (x[1] != IGNORE, x[0] == tokenizer.image_pad_id)):
        ids = [t for t, _ in run]
        text = f"<|image_pad|>x{len(ids)}" if pad else tokenizer.decode(ids)
        pieces.append(f"[[{text}]]" if loss else text)
    return "".join(pieces)


# ----------------------------------------------------------------------------- data files

PARQUET_CACHE_BYTES = 256 * 2 ** 20  # decoded Parquet row groups kept per file


class FileDataset:
    """The records of one data file, its format told by its bytes: JSONL (one object per line), a JSON array
    (LLaVA's llava_v1_5_mix665k.json), Parquet or Arrow (Hugging Face datasets; images as bytes in a column).
    A record is LLaVA-style {"image": path | "images": [paths], "conversations": [{"from": "human"|"gpt",
    "value": "<image>\\n..."}]}, OpenAI-style {"messages": [{"role", "content": text or parts}]} (see
    _from_messages), the_cauldron's {"images", "texts": [{"user", "assistant"}]}, or {"text": ...} (text-only;
    with images: caption/interleaved, images placed at the front when the text has no <image> tag). Optional
    "task". Image paths are relative to image_root; Parquet/Arrow images are {"bytes", "path"} structs or bytes.
    Paths must stay inside image_root (a dataset from elsewhere must not make the trainer read any file it
    names) unless allow_outside_root. Construction only indexes the file (line offsets, array element offsets, row-group sizes; Arrow is memory-
    mapped), so millions of records cost little at start-up; a record is parsed and checked when read, and a
    bad one (malformed JSON, missing image file, wrong number of <image> tags, empty reply) raises DataError
    naming file:line (Parquet, Arrow: file:row), which PackedLoader skips and counts with on_bad="skip".
    Corrupt image bytes surface at encode time (DataError naming the image and the record). A syntax error
    inside a JSON array ends what can be read of it: that one raises at construction."""

    def __init__(self, path, image_root=".", allow_outside_root=False, need_reply=True):
        self.path, self.image_root, self.task = path, image_root, os.path.splitext(os.path.basename(path))[0]
        self.allow_outside_root, self.need_reply = allow_outside_root, need_reply  # False: questions to answer
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(UTF8_BOM)
        if head.startswith((b"PAR1", b"ARROW1", b"\xff\xff\xff\xff")):
            import pyarrow as pa  # here: only Parquet and Arrow files need pyarrow
            try:
                self._open_arrow(path, head)
            except (pa.ArrowException, OSError) as e:  # a truncated or corrupt file: pyarrow's message names none
                raise DataError(f"{path}: cannot read the {'Parquet' if head.startswith(b'PAR1') else 'Arrow'} "
                                f"file ({e}); it may be truncated or still being written") from None
        elif head.lstrip()[:1] == b"[":
            self.format = "json"
            self.text, self.starts, self.ends, self.linenos = _json_array_index(path)
        else:
            self.format = "jsonl"
            self.starts, self.linenos = _line_index(path)

    def _open_arrow(self, path, head):
        import pyarrow as pa
        import pyarrow.parquet as pq
        if head.startswith(b"PAR1"):
            self.format, self.parquet, self.groups = "parquet", pq.ParquetFile(path), collections.OrderedDict()
            meta = self.parquet.metadata  # row i is in the row group g with starts[g] <= i < starts[g + 1]
            self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        else:  # Arrow IPC file or stream (datasets' save_to_disk)
            reader = (pa.ipc.open_file if head.startswith(b"ARROW1") else pa.ipc.open_stream)(pa.memory_map(path))
            self.format, self.table = "arrow", reader.read_all()  # memory-mapped: rows are read where they lie
            self.starts = np.array([0, self.table.num_rows])

    def __len__(self):
        return int(self.starts[-1]) if self.format in ("parquet", "arrow") else len(self.starts)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: record {index} of {len(self)}")
        if self.format == "parquet":
            g = int(np.searchsorted(self.starts, index, side="right")) - 1
            row = self._row_group(g).slice(index - self.starts[g], 1).to_pylist()[0]
            return self._parse(row, f"{self.path}:row {index}")
        if self.format == "arrow":
            return self._parse(self.table.slice(index, 1).to_pylist()[0], f"{self.path}:row {index}")
        if self.format == "json":
            line = self.text[self.starts[index]:self.ends[index]]
            where = f"{self.path}:{self.linenos[index]} (element {index})"
        else:
            with open(self.path, "rb") as f:
                f.seek(int(self.starts[index]))
                line = f.readline()
            where = f"{self.path}:{self.linenos[index]}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: malformed JSON ({e})", reason="malformed JSON") from None
        return self._parse(obj, where)

    def _row_group(self, g):
        """Parquet row group g, decoded; the most recently read groups stay decoded up to PARQUET_CACHE_BYTES,
        so shuffled reads of a file that fits decode each group once, not once per row."""
        table = self.groups.pop(g, None)
        if table is None:
            import pyarrow as pa
            try:
                table = self.parquet.read_row_group(g)
            except (pa.ArrowException, OSError) as e:  # data pages cut short or corrupt
                raise DataError(f"{self.path}:row {self.starts[g]}: cannot read row group {g} ({e}); the file may be "
                                "truncated", reason="unreadable file") from None
            while self.groups and sum(t.nbytes for t in self.groups.values()) + table.nbytes > PARQUET_CACHE_BYTES:
                self.groups.popitem(last=False)
        self.groups[g] = table
        return table

    def _parse(self, obj, where):
        """One decoded record (any format) -> our record dict, checked: the path every format goes through."""
        if not isinstance(obj, dict):
            raise DataError(f"{where}: malformed JSON (not an object)", reason="malformed JSON")
        images = obj.get("images")  # None also where a Parquet row has no images
        if images is None:
            images = [obj["image"]] if obj.get("image") is not None else []
        if not isinstance(images, list):
            raise DataError(f"{where}: image/images must be a path or a list of paths")
        images = [_image_ref(p, where) for p in images]
        rec = {"task": obj.get("task") or self.task, "id": where}
        if "messages" in obj:
            turns, images = _from_messages(obj["messages"], images, where)
            rec.update(format="conversation", conversations=turns)
        elif "texts" in obj:
            turns = _from_texts(obj["texts"], len(images), where)
            rec.update(format="conversation", conversations=turns)
        elif "conversations" in obj:
            rec.update(format="conversation", conversations=obj["conversations"])
        else:
            text = obj.get("text")
            if isinstance(text, str) and images and IMAGE_TAG not in text:
                text = IMAGE_TAG * len(images) + text
            rec.update(format="text" if not images else "caption" if len(images) == 1 else "interleaved", text=text)
        images = [self._image_path(p, where) if isinstance(p, str) else p for p in images]
        rec["images"] = images
        reason = check_record(rec, self.need_reply)
        if reason:
            raise DataError(f"{where}: {reason}")
        for p in images:
            if isinstance(p, str) and not os.path.isfile(p):
                raise DataError(f"{where}: missing image ({p})", reason="missing image")
        return rec

    def _image_path(self, p, where):
        """`p` under image_root; a path that leaves the root (absolute, ../, a symlink out) is a DataError."""
        full = os.path.join(self.image_root, p)
        root = os.path.realpath(self.image_root)
        if not self.allow_outside_root and os.path.commonpath([root, os.path.realpath(full)]) != root:
            raise DataError(f"{where}: image path {p!r} leaves the image root {self.image_root!r} "
                            "(--allow-outside-image-root permits it)", reason="image outside root")
        return full


def _line_index(path, chunk=1 << 20):
    """(start offsets, 1-based line numbers) of a file's non-blank lines, found with numpy 1 MB at a time: a
    line is blank when it has no byte other than whitespace (a running count of those at every newline)."""
    newlines, counts, pos, total = [], [], 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            b = np.frombuffer(block, np.uint8)
            solid = np.cumsum((b != 32) & (b != 9) & (b != 10) & (b != 13), dtype=np.int32)
            nl = np.flatnonzero(b == 10)
            newlines.append(nl + pos)
            counts.append(solid[nl].astype(np.int64) + total)
            pos, total = pos + len(block), total + int(solid[-1])
    line_starts = np.concatenate([[0], *(n + 1 for n in newlines)])
    solid_before = np.concatenate([[0], *counts, [total]])
    keep = np.diff(solid_before) > 0  # line k holds a non-blank byte
    return line_starts[keep], np.flatnonzero(keep) + 1


def _json_array_index(path):
    """A JSON array file's text and each element's start and end offsets and line: parsed once here to find
    the elements (json's C scanner), decoded again when read."""
    with open(path, "rb") as f:
        raw = f.read().removeprefix(UTF8_BOM)  # a byte-order mark, as some editors write, is not JSON
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); a JSON file must be UTF-8") from None
    decoder, space, sep = json.JSONDecoder(), re.compile(r"\s*"), re.compile(r"\s*([,\]])")
    starts, ends, linenos, line, counted = array.array("q"), array.array("q"), array.array("q"), 1, 0
    i = space.match(text).end() + 1  # past the "["
    empty = re.compile(r"\s*\]").match(text, i) is not None
    while not empty:
        i = space.match(text, i).end()
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); the array cannot be read past it") from None
        line, counted = line + text.count("\n", counted, i), i
        starts.append(i), ends.append(end), linenos.append(line)
        m = sep.match(text, end)
        if m is None:
            raise DataError(f"{path}:{line}: malformed JSON (no ',' or ']' after element {len(starts) - 1})")
        i = m.end()
        if m.group(1) == "]":
            break
    return text, *(np.frombuffer(a, dtype=np.int64) for a in (starts, ends, linenos))


def _image_ref(x, where):
    """An image as a record gives it -> a path (str) or encoded bytes: Parquet's {"bytes", "path"} structs, raw
    bytes, file:// and data:...;base64 URLs."""
    if isinstance(x, dict):
        x = x.get("bytes") or x.get("path")
    if isinstance(x, str) and x.startswith("data:"):
        head, _, payload = x.partition(",")
        if not head.endswith(";base64"):
            raise DataError(f"{where}: image data URL {head!r} is not base64")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise DataError(f"{where}: image data URL: bad base64 ({e})") from None
    if isinstance(x, str) and x.startswith(("http://", "https://")):
        raise DataError(f"{where}: image URL {x[:80]!r}: remote images are not fetched; download them first")
    if isinstance(x, str):
        return x.removeprefix("file://")
    if isinstance(x, bytes) and x:
        return x
    raise DataError(f"{where}: image/images must be a path or a list of paths (or image bytes)")


ROLES = {role: who for who, role in CHAT_ROLES.items()}  # OpenAI roles -> LLaVA's


def _from_messages(messages, images, where):
    """OpenAI-style chat -> (LLaVA conversations, images). content: a string, or parts {"type": "text",
    "text"}, {"type": "image_url", "image_url": {"url"} or url}, {"type": "image", "image": path or bytes}, or
    a bare {"type": "image"} that takes the record's next "images" entry (Hugging Face's layout); each image
    part becomes an <image> tag where it stands."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: messages must be a list")
    queue, turns, refs = iter(images), [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: messages need role system|user|assistant")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise DataError(f"{where}: message content must be a string or a list of parts")
        value = ""
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                value += part["text"]
            elif kind in ("image_url", "image"):
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                refs.append(_image_ref(url, where) if url is not None else next(queue, None))
                value += IMAGE_TAG
            else:
                raise DataError(f"{where}: message part {part!r:.80}: need type text (with text), image_url or image")
        turns.append({"from": ROLES[m["role"]], "value": value})
    if None in refs:
        raise DataError(f"{where}: more image parts than images")
    return turns, refs + list(queue)  # images no part placed fail check_record's tag count


def _from_texts(texts, n_images, where):
    """the_cauldron / FineVision turns [{"user", "assistant"}] -> LLaVA conversations, the images before the
    first question (these datasets have no <image> tags)."""
    if not isinstance(texts, list) or not all(isinstance(t, dict) for t in texts):
        raise DataError(f"{where}: texts must be a list of {{user, assistant}} turns")
    turns = [{"from": r, "value": t.get(k)} for t in texts for r, k in (("human", "user"), ("gpt", "assistant"))]
    if turns and isinstance(turns[0]["value"], str) and IMAGE_TAG not in turns[0]["value"]:
        turns[0]["value"] = IMAGE_TAG * n_images + "\n" * bool(n_images) + turns[0]["value"]
    return turns


# ----------------------------------------------------------------------------- mixing

def parse_data_flag(spec, flag="--data"):
    """'name=path' or 'name=path:weight' -> (name, path, weight). A ':' ends the path unless the whole text
    names an existing file, so 'name=path:abc' is an error about the weight, not a missing 'path:abc'."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"{flag} {spec!r}: expected name=path or name=path:weight")
    head, colon, tail = rest.rpartition(":")
    if not colon or os.path.isfile(rest):
        return name, rest, 1.0
    try:
        weight = float(tail)
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: weight {tail!r} is not a number") from None
    if not weight >= 0 or math.isinf(weight):
        raise ValueError(f"{flag} {spec!r}: weight {tail!r} must be a finite number >= 0")
    return name, head, weight


class Mixture:
    """Samples sources by ratio (e.g. MM1's caption:interleaved:text = 5:5:1). mixture[n] is a pure
    function of (seed, n): position n picks a source at random by weight and takes that source's
    next item in an order reshuffled every epoch. Being a pure function of the position, it has no
    state of its own: a loader resumes it by remembering the position."""

    BLOCK = 4096  # source choices are drawn in blocks so that jumping to position n costs n/BLOCK draws

    def __init__(self, sources, weights, seed=0):
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same keys")
        for name, src in sources.items():
            if len(src) == 0:
                raise ValueError(f"mixture source {name!r} is empty")
            if weights[name] < 0:
                raise ValueError(f"mixture weight {name!r} is negative")
        if sum(weights.values()) <= 0:
            raise ValueError("mixture weights must not all be zero")
        self.names = list(sources)
        self.sources = [sources[k] for k in self.names]
        p = np.array([weights[k] for k in self.names], dtype=np.float64)
        self.p, self.seed = p / p.sum(), seed
        self._prefix = [np.zeros(len(p), dtype=np.int64)]  # per-source counts before each block
        self._perm, self._block = {}, (None, None)  # caches: per-source (epoch, order), last block's choices

    def _choices(self, block):
        if self._block[0] != block:
            self._block = (block, np.random.default_rng([self.seed, 0, block]).choice(len(self.p), self.BLOCK,
                                                                                      p=self.p))
        return self._block[1]

    def locate(self, n):
        """(source number, index in that source) of position n."""
        block, r = divmod(n, self.BLOCK)
        while len(self._prefix) <= block:
            self._prefix.append(self._prefix[-1] + np.bincount(self._choices(len(self._prefix) - 1),
                                                               minlength=len(self.p)))
        choices = self._choices(block)
        k = int(choices[r])
        count = int(self._prefix[block][k] + np.count_nonzero(choices[:r] == k))
        epoch, i = divmod(count, len(self.sources[k]))
        if self._perm.get(k, (None,))[0] != epoch:
            self._perm[k] = (epoch, np.random.default_rng([self.seed, 1, k, epoch]).permutation(len(self.sources[k])))
        return k, int(self._perm[k][1][i])

    def __getitem__(self, n):
        k, i = self.locate(n)
        return self.sources[k][i]


# ----------------------------------------------------------------------------- packing

@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] all samples concatenated
    labels: torch.Tensor  # [T] the samples' labels (label_pieces), one after another
    position_ids: torch.Tensor  # [T], or [3, T] (t, h, w) for M-RoPE; restart at 0 for every sample
    cu_seqlens: torch.Tensor  # [B+1] int32 sample boundaries
    max_seqlen: int
    pixel_patches: torch.Tensor  # [P, 3*14*14] all images' patches
    image_grid: torch.Tensor  # [n_img, 3] (t, h, w) in patches

    def to(self, device):
        return PackedBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})


def mrope_positions(n_tokens, image_starts, grids):
    """Qwen2-VL M-RoPE (t, h, w) positions of one sample: text tokens share one running position in
    all rows; an image's pads at merged-grid (row, col) get (s, s+row, s+col) with s the position the
    image starts at, and the text after it continues from the image's largest position + 1."""
    pos = np.zeros((3, n_tokens), dtype=np.int64)
    cur = i = 0
    for start, (_, h, w) in zip(image_starts, grids):
        pos[:, i:start] = np.arange(cur, cur + start - i)
        cur += start - i
        gh, gw = h // MERGE, w // MERGE
        pos[0, start:start + gh * gw] = cur
        pos[1, start:start + gh * gw] = cur + np.repeat(np.arange(gh), gw)
        pos[2, start:start + gh * gw] = cur + np.tile(np.arange(gw), gh)
        cur += max(gh, gw)
        i = start + gh * gw
    pos[:, i:] = np.arange(cur, cur + n_tokens - i)
    return pos


def collate(samples, mrope=False):
    """One PackedBatch of the given samples, in order (e.g. prompts for generation)."""
    lengths = [len(s.tokens) for s in samples]
    ids, labels, pos = [], [], []
    for s in samples:
        ids.extend(s.tokens)
        labels.extend(s.labels)
        if mrope:
            pos.append(mrope_positions(len(s.tokens), s.image_starts, [g for _, g in s.images]))
        else:
            pos.append(np.arange(len(s.tokens)))
    images = [im for s in samples for im in s.images]
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        position_ids=torch.from_numpy(np.concatenate(pos, axis=-1)).long() if samples else torch.zeros(
            (3, 0) if mrope else (0,), dtype=torch.long),
        cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32),
        max_seqlen=max(lengths, default=0),
        pixel_patches=torch.cat([p for p, _ in images]) if images else torch.zeros(0, 3 * PATCH * PATCH),
        image_grid=torch.tensor([g for _, g in images], dtype=torch.long).reshape(-1, 3))


def fit(sample, max_tokens, truncate=False):
    """The sample if it fits max_tokens; with truncate, a conversation keeps the whole turns that fit (the later
    turns and their images dropped: every reply it keeps is whole), other samples their text cut from the end
    (never an image); otherwise DataError naming the sample. A cut sample records its length in cut_from."""
    n = len(sample.tokens)
    if n <= max_tokens:
        return sample
    if not truncate:
        raise DataError(f"sample {sample.id} ({sample.task}) has {n} tokens > the packing length {max_tokens} "
                        "(raise --packing-length, or --truncate to cut its text)", reason="too long")
    cut = max((e for e in sample.turn_ends if e <= max_tokens), default=None)
    if cut is not None:
        keep = sum(start < cut for start in sample.image_starts)
        return Sample(sample.tokens[:cut], sample.labels[:cut], sample.images[:keep], sample.task, sample.answer,
                      sample.id, sample.image_starts[:keep], [e for e in sample.turn_ends if e <= cut], n)
    images_end = max((st + g[1] * g[2] // MERGE ** 2 + 1 for st, (_, g) in zip(sample.image_starts, sample.images)),
                     default=0)
    if images_end > max_tokens:
        raise DataError(f"sample {sample.id} ({sample.task}): its images alone reach token {images_end} > "
                        f"the packing length {max_tokens}; text-only truncation cannot fit it "
                        "(raise --packing-length or lower --max-pixels)", reason="too long")
    if all(label == IGNORE for label in sample.labels[1:max_tokens]):  # a first label is never a target (shifted)
        raise DataError(f"sample {sample.id} ({sample.task}): --truncate to the packing length {max_tokens} cuts "
                        f"away its whole reply ({n} tokens)", reason=REPLY_CUT)
    return Sample(sample.tokens[:max_tokens], sample.labels[:max_tokens], sample.images, sample.task,
                  sample.answer, sample.id, sample.image_starts, [e for e in sample.turn_ends if e <= max_tokens], n)


def best_fit_decreasing(lengths, capacity):
    """Bins (lists of indices) of total length <= capacity: longest first, each into the bin with the
    least room that still fits it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []  # free: sorted (room left, bin index)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack(samples, max_tokens, mrope=False, truncate=False):
    """Best-fit-decreasing packing of samples into PackedBatches of at most max_tokens tokens; no sample
    is split. A longer sample is a DataError, or has its text truncated when truncate=True."""
    samples = [fit(s, max_tokens, truncate) for s in samples]
    return [collate([samples[i] for i in b], mrope) for b in best_fit_decreasing([len(s.tokens) for s in samples],
                                                                                 max_tokens)]


# ----------------------------------------------------------------------------- data workers

PREFETCH_BATCHES = 2  # the workers together encode up to this many batches' tokens ahead of the loader
WORKER_NICE = 10  # workers yield the CPU to the training step: they fill the cores it leaves idle


def _die_with(parent):
    """Linux: the kernel kills this process when the training process dies, however it dies (kill -9 too);
    elsewhere _worker's credit wait notices the parent is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _tokens_of(item):
    """What a worker's item holds against its prefetch budget: a sample's tokens, 1 for an error."""
    return len(item[1].tokens) if item[0] == "ok" else 1


def _worker(loader, start, k, n, out, credits, parent):
    """Data worker k of n: encodes the loader's reads start + k, start + k + n, ... into `out` in order, as
    ("ok", sample with numpy patches) or ("bad", message, reason) for a DataError; any other failure is sent
    as ("crash", traceback) and ends it. It queues at most PREFETCH_BATCHES * max_tokens / n tokens (one sample at
    least) and holds the next one until the loader, which sends each item's tokens back on `credits` as it
    takes it, has made room. Signals are the training process's to act on: it finishes its step and
    checkpoints (train.StopRequested), then kills it."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _die_with(parent)
    torch.set_num_threads(1)
    os.nice(WORKER_NICE)
    budget, ahead = PREFETCH_BATCHES * loader.max_tokens // n, 0
    for j in itertools.count(start + k, n):
        try:
            s = loader._sample(j)
            item = ("ok", dataclasses.replace(s, images=[(p.numpy(), g) for p, g in s.images]))
        except DataError as e:
            item = ("bad", str(e), e.reason)
        except Exception:  # noqa: BLE001 (sent to the training process, which raises it)
            item = ("crash", traceback.format_exc())
        while ahead and ahead + _tokens_of(item) > budget:
            try:
                ahead -= credits.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    os._exit(0)
        ahead += _tokens_of(item)
        out.put(item)
        if item[0] == "crash":
            return


class Workers:
    """`n` forked processes encoding a PackedLoader's reads from `start` on, PREFETCH_BATCHES batches' tokens
    ahead: read j is worker (j - start) % n's, so samples arrive in read order whatever each one costs."""

    def __init__(self, loader, start, n):
        ctx = multiprocessing.get_context("fork")  # the loader (tokenizer, open data files) is inherited, not pickled
        self.start, self.next = start, start
        self.queues, self.credits = [ctx.Queue() for _ in range(n)], [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_worker, args=(loader, start, k, n, q, c, os.getpid()), daemon=True,
                                  name=f"data worker {k}") for k, (q, c) in enumerate(zip(self.queues, self.credits))]
        for p in self.procs:
            p.start()
        atexit.register(self.close)  # before multiprocessing's own exit hook, which would wait on them

    def get(self, j):
        """Read j's sample (reads are taken in order); DataError as the in-process encode raises it."""
        assert j == self.next, (j, self.next)
        k = (j - self.start) % len(self.procs)
        while True:
            try:
                item = self.queues[k].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.procs[k].is_alive():
                    raise RuntimeError(f"data worker {k} (pid {self.procs[k].pid}) died with exit code "
                                       f"{self.procs[k].exitcode} (out of memory?) before read {j}") from None
        self.next += 1
        self.credits[k].put(_tokens_of(item))
        if item[0] == "crash":
            raise RuntimeError(f"data worker {k} failed on read {j}:\n{item[1]}")
        if item[0] == "bad":
            raise DataError(item[1], reason=item[2])
        return dataclasses.replace(item[1], images=[(torch.from_numpy(p), g) for p, g in item[1].images])

    def close(self):
        """Kill and reap the workers (they hold nothing to save); safe to call twice."""
        atexit.unregister(self.close)
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()
        for q in self.queues + self.credits:
            q.cancel_join_thread()
            q.close()
        self.procs = []


class PackedLoader:
    """Infinite iterator of PackedBatches of at most max_tokens tokens. Rank r of world_size reads
    positions r, r+W, r+2W, ... of the source (a Mixture; any other indexable source is wrapped in a
    one-source Mixture seeded by `seed`, i.e. read in an order reshuffled each epoch), keeps
    `buffer_size` encoded samples, and each step emits the fullest best-fit-decreasing bin of the
    buffer (ties: the bin with the oldest sample). state_dict() = {"reads", "buffer" (read numbers
    of the buffered samples), "batches", "tokens", "skipped"}: samples are pure functions of their
    position, so load_state_dict re-encodes the buffer and reproduces the uninterrupted batches.
    `efficiency` is the filled fraction of the token budget over all batches so far. Bad samples
    (DataError: unreadable image, too long without truncate) raise, or with on_bad="skip" are
    counted in `skips` by (source, reason) (last message in `last_error`); samples truncation left without a
    loss token are always skipped and counted, outside the rate. A source that skips more
    than max_skip_rate of its samples (judged after MIN_READS of them), or a loader that reads
    `patience` samples in a row without a usable one, raises DataError instead of going on.
    workers > 0 encodes in that many processes (Workers) ahead of the reads: the same samples in the same order,
    so batches, state_dict and skip counts are those of workers=0. close() ends them."""

    MIN_READS = 20  # a source's skip rate is judged once it has had this many reads

    def __init__(self, source, tokenizer, max_tokens, seed=0, rank=0, world_size=1, min_pixels=MIN_PIXELS,
                 max_pixels=MAX_PIXELS, mrope=False, truncate=False, on_bad="raise", buffer_size=256,
                 max_skip_rate=1.0, patience=1000, workers=0):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.source = source if isinstance(source, Mixture) else Mixture({"data": source}, {"data": 1.0}, seed)
        self.tokenizer, self.max_tokens, self.rank, self.world_size = tokenizer, max_tokens, rank, world_size
        self.min_pixels, self.max_pixels, self.mrope, self.truncate = min_pixels, max_pixels, mrope, truncate
        self.on_bad, self.buffer_size, self.max_skip_rate, self.patience = on_bad, buffer_size, max_skip_rate, patience
        self.workers, self.pool = workers, None
        self.load_state_dict({"reads": 0, "buffer": [], "batches": 0, "tokens": 0, "skips": [], "source_reads": {}})

    def _sample(self, j):
        """Encoded sample of this rank's j-th read (source position rank + j * world_size)."""
        record = self.source[self.rank + j * self.world_size]
        return fit(encode(record, self.tokenizer, self.min_pixels, self.max_pixels), self.max_tokens, self.truncate)

    def _fetch(self, j):
        """The j-th read's sample: from the workers (started at the first read) when there are any."""
        if not self.workers:
            return self._sample(j)
        if self.pool is None:
            self.pool = Workers(self, j, self.workers)
        return self.pool.get(j)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @property
    def skipped(self):
        return sum(self.skips.values())

    def skip_summary(self):
        """'source: reason xN, ...' of every skipped sample so far."""
        return ", ".join(f"{src}: {reason} x{k}" for (src, reason), k in sorted(self.skips.items()))

    def _read(self):
        """Read the next sample into the buffer; give up when a source skips too many or nothing is usable."""
        name = self.source.names[self.source.locate(self.rank + self.reads * self.world_size)[0]]
        self.source_reads[name] = self.source_reads.get(name, 0) + 1
        self.reads += 1
        try:
            self.buffer.append((self.reads - 1, self._fetch(self.reads - 1)))
            self.since_good = 0
            self.truncated += bool(self.buffer[-1][1].cut_from)  # cut to the packing length (fit)
            return
        except DataError as e:
            if self.on_bad == "raise" and e.reason != REPLY_CUT:
                raise
            self.skips[name, e.reason] = self.skips.get((name, e.reason), 0) + 1
            self.last_error, self.since_good = str(e), self.since_good + 1
        # samples --truncate left without a reply are dropped by the user's choice, not bad data: not in the rate
        bad = sum(k for (src, reason), k in self.skips.items() if src == name and reason != REPLY_CUT)
        reads = self.source_reads[name]
        if reads >= self.MIN_READS and bad / reads > self.max_skip_rate:
            raise DataError(f"data source {name!r}: {bad} of {reads} samples skipped ({100 * bad / reads:.0f}%), "
                            f"more than --max-skip-rate {self.max_skip_rate:g} ({self.skip_summary()}); "
                            f"last: {self.last_error}", reason="skip rate")
        if self.since_good >= self.patience:
            raise DataError(f"no usable sample in the last {self.since_good} reads ({self.skip_summary()}); "
                            f"last: {self.last_error}", reason="no progress")

    def __iter__(self):
        return self

    def fill(self):
        """Read until the buffer is full (what the next batch needs; reading early changes no batch). A read
        that raises ends the workers (a later read restarts them where it stands)."""
        try:
            while len(self.buffer) < self.buffer_size:
                self._read()
        except BaseException:
            self.close()
            raise

    def __next__(self):
        self.fill()
        lengths = [len(s.tokens) for _, s in self.buffer]
        # emit the fullest bin; ties go to the bin holding the oldest sample
        chosen = max(best_fit_decreasing(lengths, self.max_tokens), key=lambda b: (sum(lengths[i] for i in b), -min(b)))
        chosen = set(chosen)
        batch = collate([x[1] for i, x in enumerate(self.buffer) if i in chosen], self.mrope)
        self.buffer = [x for i, x in enumerate(self.buffer) if i not in chosen]
        self.batches += 1
        self.tokens += len(batch.input_ids)
        return batch

    @property
    def efficiency(self):
        return self.tokens / max(1, self.batches * self.max_tokens)

    def state_dict(self):
        return {"reads": self.reads, "buffer": [j for j, _ in self.buffer], "batches": self.batches,
                "tokens": self.tokens, "skips": [[src, r, k] for (src, r), k in self.skips.items()],
                "source_reads": dict(self.source_reads), "since_good": self.since_good, "truncated": self.truncated}

    def load_state_dict(self, state):
        self.close()  # workers encode ahead of the old position
        self.reads, self.batches, self.tokens = state["reads"], state["batches"], state["tokens"]
        self.skips, self.last_error = {(src, r): k for src, r, k in state["skips"]}, None
        self.source_reads, self.since_good = dict(state["source_reads"]), state.get("since_good", 0)
        self.truncated = state.get("truncated", 0)
        self.buffer = [(j, self._sample(j)) for j in state["buffer"]]


def reshard_loader_states(states, world_size):
    """PackedLoader states of len(states) ranks -> states for `world_size` ranks that continue the same
    stream: every source position some rank read but did not emit (its buffer, and positions below the
    furthest read that their rank had not reached yet) goes to new rank position % world_size, so no sample
    is trained on twice or skipped; the ranks' counters are pooled."""
    old = len(states)
    frontier = max(r + s["reads"] * old for r, s in enumerate(states))  # no rank has read from here on
    pending = sorted({r + j * old for r, s in enumerate(states) for j in s["buffer"]}
                     | {p for r, s in enumerate(states) for p in range(r + s["reads"] * old, frontier, old)})
    total = lambda key: sum(s.get(key, 0) for s in states)  # noqa: E731
    skips, reads = {}, {}  # the skip counts, pooled on the new rank 0
    for s in states:
        for src, reason, k in s["skips"]:
            skips[src, reason] = skips.get((src, reason), 0) + k
        for src, k in s["source_reads"].items():
            reads[src] = reads.get(src, 0) + k
    return [{"reads": max(0, -(-(frontier - r) // world_size)),
             "buffer": [p // world_size for p in pending if p % world_size == r],
             "batches": total("batches") // world_size, "tokens": total("tokens") // world_size,
             "skips": [[src, reason, k] for (src, reason), k in skips.items()] if r == 0 else [],
             "truncated": total("truncated") if r == 0 else 0,
             "source_reads": reads if r == 0 else {}} for r in range(world_size)]
