"""The finish: a trained composition (the Qwen2.5-VL ViT + a Qwen3 or Llama decoder) answers from the command line
(chat.py), is evaluated without flags, and exports to a directory transformers loads (trust_remote_code) whose
logits and greedy answers equal ours, with the tokenizer, chat template, pixel budget and special ids the run
trained with."""
import json
import os

import pytest
import torch
from PIL import Image

import chat
import common
import convert
import data
import evaluate
import model as M
import train
from conftest import requires
from hf_sources import llama_dir, qwen2_5_vl_vision_dir, qwen3_dir
from test_model import hf_pixels

transformers = requires("transformers")
QUESTION = "What colour is the square?"


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def trained(request, tmp_path_factory):
    """A composition trained through stage 3 (so every part moved) and exported."""
    root = tmp_path_factory.mktemp(request.param)
    vl = qwen2_5_vl_vision_dir(root / "vl")
    llm = (qwen3_dir if request.param == "qwen3" else llama_dir)(root / "llm")
    run = root / "run"
    flags = ["--out", str(run), "--packing-length", "256", "--device", "cpu", "--log-every", "1000",
           "--peak-tflops", "1", "--max-pixels", "3136"]
    train.main(["--stage", "1", "--max-steps", "2", "--init-vision-from", str(vl), "--init-text-from", str(llm), *flags])
    train.main(["--stage", "3", "--max-steps", "3", "--init-from", str(run / "stage1"), *flags])
    evaluate.main(["--export-hf", str(root / "hf"), "--ckpt", str(run / "stage3")])
    image = root / "square.png"
    Image.new("RGB", (70, 50), (30, 60, 220)).save(image)
    return {"run": run, "hf": root / "hf", "image": str(image), "family": request.param,
            "ckpt": common.checkpoint_dir(str(run / "stage3"))}


def prompt(trained, images):
    tok = data.load_tokenizer(trained["ckpt"])
    record = {"format": "conversation", "images": images,
              "conversations": [{"from": "human", "value": data.IMAGE_TAG * len(images) + QUESTION}]}
    return tok, data.encode(record, tok, 3136, 3136, for_generation=True)


@pytest.mark.parametrize("with_image", [False, True])
def test_export_loads_in_transformers_and_answers_as_chat_does(trained, with_image, capsys):
    images = [trained["image"]] if with_image else []
    hf = transformers.AutoModelForImageTextToText.from_pretrained(trained["hf"], trust_remote_code=True).eval()
    assert type(hf).__name__ == "NanoMindVLForConditionalGeneration"
    ours = M.MLLM.from_pretrained(trained["ckpt"]).eval()
    tok, sample = prompt(trained, images)
    batch = data.collate([sample])
    ids = torch.tensor(sample.tokens)[None]
    pixels = dict(pixel_values=hf_pixels(batch.pixel_patches), image_grid_thw=batch.image_grid) if images else {}
    with torch.no_grad():
        want, got = hf(input_ids=ids, **pixels).logits[0], ours.logits(batch)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-5
    theirs = hf.generate(input_ids=ids, **pixels, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    theirs = theirs[:next((k for k, t in enumerate(theirs) if t in tok.stop_ids), len(theirs))]
    capsys.readouterr()
    chat.main(["--ckpt", str(trained["run"] / "stage3"), "--max-new-tokens", "12", *sum([["--image", i] for i in images],
                                                                                        []), QUESTION])
    assert capsys.readouterr().out == tok.decode(theirs) + "\n"


def test_export_carries_what_training_used(trained):
    hf_tok = transformers.AutoTokenizer.from_pretrained(trained["hf"])
    tok = data.load_tokenizer(trained["ckpt"])
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Blue."}]
    record = {"format": "conversation", "conversations": [{"from": "human", "value": QUESTION},
                                                          {"from": "gpt", "value": "Blue."}]}
    out = hf_tok.apply_chat_template(messages, tokenize=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == data.encode(record, tok).tokens
    config = json.load(open(trained["hf"] / "config.json"))
    generation = json.load(open(trained["hf"] / "generation_config.json"))
    assert config["eos_token_id"] == tok.eos_id and generation["eos_token_id"] == list(tok.stop_ids)
    assert config["text_config"]["model_type"] == trained["family"]
    pre = json.load(open(trained["hf"] / "preprocessor_config.json"))
    assert (pre["min_pixels"], pre["max_pixels"]) == (data.MIN_PIXELS, 3136)  # the budget the run trained at


def test_padded_vocabulary_rows_are_never_generated(trained):
    """Rows past the tokenizer's ids (Qwen pads its vocabulary) are masked, however large their logits."""
    ours = M.MLLM.from_pretrained(trained["ckpt"]).eval()
    tok, sample = prompt(trained, [])
    rows = ours.config.text.vocab_size
    if rows == tok.vocab_size:  # no padded rows: give the head some
        ours.decoder.grow_vocab(rows + 8, [])
        rows += 8
    def favour_padded_rows(module, inputs, logits):
        logits[..., tok.vocab_size:] += 1e4
    ours.decoder.lm_head.register_forward_hook(favour_padded_rows)
    out = ours.generate(data.collate([sample]), 8, vocab_size=tok.vocab_size)[0]
    assert out and max(out) < tok.vocab_size
    unmasked = ours.generate(data.collate([sample]), 8)[0]
    assert max(unmasked) >= tok.vocab_size  # without the mask the padded rows would have won
    tok.decode(out)  # decodes (a padded id would raise)


def test_evaluate_answers_records_without_reply(trained, tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [{"id": "q1", "conversations": [{"from": "human", "value": QUESTION}]},
            {"id": "q2", "conversations": [{"from": "human", "value": "Name a colour."},
                                           {"from": "gpt", "value": "red"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.main(["--ckpt", str(trained["run"] / "stage3"), "--data", f"qs={path}", "--out", str(tmp_path / "ev"),
                   "--max-new-tokens", "6"])
    predictions = [json.loads(x) for x in open(tmp_path / "ev" / "predictions.jsonl")]
    assert [p["prompt"] for p in predictions] == [QUESTION, "Name a colour."]
    assert predictions[0]["reference"] is None and predictions[0]["score"] is None
    assert predictions[1]["reference"] == "red" and predictions[1]["score"] in (0.0, 1.0)
    result = json.load(open(tmp_path / "ev" / "eval.json"))["checkpoints"]["stage3"]["results"]["qs"]
    assert result["n"] == 1 and result["score"] == predictions[1]["score"]


def test_an_export_that_cannot_be_made_says_why(tmp_path):
    config = M.config_from_preset("tiny", **{"text.num_layers": 1, "vision.depth": 1, "vision.fullatt_blocks": (0,),
                                             "text.mrope_section": (4, 6, 6)})
    M.MLLM(config).save_pretrained(tmp_path / "ckpt")  # a Qwen3 decoder with M-RoPE: no transformers class
    with pytest.raises(ValueError, match=r"M-RoPE with a qwen3 decoder.*--text-mrope-section none"):
        convert.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), data.Tokenizer())
    assert not os.path.exists(tmp_path / "out")


MOE_DECODERS = {
    "deepseek_v3": {},  # the tiny-moe preset: MLA, a dense first layer, shared + group-routed experts
    "qwen3_moe": {"text.attention": "gqa", "text.num_kv_heads": 2, "text.head_dim": 32, "text.qk_norm": True,
                  "text.n_shared_experts": 0, "text.first_k_dense": 0, "text.n_group": 1, "text.topk_group": 1,
                  "text.scoring": "softmax", "text.seq_aux_loss_coef": 0.0, "text.family": "qwen3_moe"},
}


@pytest.mark.parametrize("family", list(MOE_DECODERS))
def test_moe_compositions_export_with_remote_code(tmp_path, family):
    torch.manual_seed(0)
    ours = M.MLLM(M.config_from_preset("tiny-moe", **MOE_DECODERS[family])).eval()
    with torch.no_grad():
        for name, p in ours.decoder.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # routing far from near-ties
    ours.save_pretrained(tmp_path / "ckpt")
    tok = data.Tokenizer()
    convert.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), tok, pixels=(3136, 3136))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert json.load(open(tmp_path / "hf" / "config.json"))["text_config"]["model_type"] == family
    image = Image.new("RGB", (56, 84), (200, 40, 40))
    record = {"format": "conversation", "images": [image],
              "conversations": [{"from": "human", "value": "<image>" + QUESTION}]}
    sample = data.encode(record, tok, 3136, 3136, for_generation=True)
    batch = data.collate([sample])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(sample.tokens)[None], pixel_values=hf_pixels(batch.pixel_patches),
                  image_grid_thw=batch.image_grid).logits[0]
        got = ours.logits(batch)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-5
