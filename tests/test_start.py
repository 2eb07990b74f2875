"""MindVL's real start (train.py --init-vision-from VDIR --init-text-from LDIR): a pretrained Qwen2.5-VL ViT and a
pretrained LLM joined by a new connector, trained in the LLM's own chat format. Checked against transformers on
tiny random sources built here: the ids we train on equal apply_chat_template's (and the Qwen2.5-VL processor's
with images), Llama imports and exports exactly, stage 1 moves only the connector, later stages and evaluate.py
need no extra flags, and a start that cannot work stops in one line before --out changes."""
import json
import os
import shutil

import pytest
import torch

import common
import convert
import data
import evaluate
import model as M
import train
from conftest import requires
from hf_sources import QWEN_TEMPLATE, llama_dir, qwen2_5_vl_vision_dir, qwen3_dir, randomize, tokenizer_dir

transformers = requires("transformers")
CONVERSATIONS = [
    [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "It is red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " How many shapes? "},
     {"role": "assistant", "content": " Three. "}, {"role": "user", "content": "And the colour?"},
     {"role": "assistant", "content": "Blue.\n"}],
    [{"role": "user", "content": "Say It is red."}, {"role": "assistant", "content": "It is red."},
     {"role": "user", "content": "It is red."}, {"role": "assistant", "content": "red"}],
]


def as_record(messages):
    return {"format": "conversation", "conversations": [{"from": data.ROLES[m["role"]], "value": m["content"]}
                                                        for m in messages]}


def ids_of(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"vl": str(qwen2_5_vl_vision_dir(root / "vl")), "qwen3": str(qwen3_dir(root / "qwen3")),
            "llama": str(llama_dir(root / "llama"))}


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_training_ids_equal_apply_chat_template(tmp_path, style):
    hf = tokenizer_dir(tmp_path, style)
    tok = data.load_tokenizer(str(tmp_path))
    eot = "<|im_end|>" if style == "qwen" else "<|eot_id|>"
    assert tok.decode([tok.stop_ids[0]]) == eot and tok.added == ([] if style == "qwen" else list(data.IMAGE_TOKENS))
    for messages in CONVERSATIONS:
        s = data.encode(as_record(messages), tok)
        assert s.tokens == ids_of(hf.apply_chat_template(messages, tokenize=True))
        # loss on each reply (as the template writes it: Llama 3's trims) and the end-of-turn token after it
        replies = [m["content"].strip() if style == "llama" else m["content"] for m in messages
                   if m["role"] == "assistant"]
        assert tok.decode([t for t in s.labels if t != -100]) == "".join(r + eot for r in replies)
        assert all(label in (-100, t) for t, label in zip(s.tokens, s.labels))
        prompt = data.encode(as_record(messages), tok, for_generation=True)
        assert prompt.tokens == ids_of(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
        assert prompt.answer == messages[-1]["content"]


def test_default_system_prompt_and_special_text(tmp_path):
    tokenizer_dir(tmp_path, "qwen")
    tok = data.load_tokenizer(str(tmp_path))
    s = data.encode(as_record(CONVERSATIONS[0]), tok)
    assert tok.decode(s.tokens).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    with pytest.raises(data.DataError, match=r"special token '<\|im_end\|>'"):
        data.encode(as_record([{"role": "user", "content": "hi<|im_end|>"}, {"role": "assistant", "content": "x"}]), tok)


def test_images_equal_qwen2_5_vl_processor(tmp_path):
    """An <image> tag (or an image part) is <|vision_start|>, the image's pads, <|vision_end|>, where it stands."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from PIL import Image
    hf_tok = tokenizer_dir(tmp_path, "qwen")
    vl_template = QWEN_TEMPLATE.replace(
        "message.content + '<|im_end|>\\n'",
        "(message.content if message.content is string else (message.content | map(attribute='text', default="
        "'<|vision_start|><|image_pad|><|vision_end|>') | join)) + '<|im_end|>\\n'")
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    image.save(tmp_path / "a.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    # what Qwen2_5_VLProcessor does: the template's one pad per image becomes grid / merge^2 pads, then tokenize
    text = hf_tok.apply_chat_template(messages, tokenize=False, chat_template=vl_template)
    grid = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})(
        images=[image], return_tensors="pt")["image_grid_thw"][0]
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
    want = hf_tok(text, add_special_tokens=False)["input_ids"]
    tok = data.load_tokenizer(str(tmp_path))
    record = as_record([{"role": "user", "content": "<image>What colour is it?"},
                        {"role": "assistant", "content": "Red."}]) | {"images": [str(tmp_path / "a.png")]}
    s = data.encode(record, tok, 3136, 12544)
    assert s.tokens == want and s.tokens.count(tok.image_pad_id) == s.images[0][1][1] * s.images[0][1][2] // 4
    assert all(label == -100 for t, label in zip(s.tokens, s.labels) if t in
               (tok.image_pad_id, tok.vision_start_id, tok.vision_end_id))


def test_llama_import_matches_transformers_and_exports_bit_for_bit(sources, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(sources["llama"]).eval()
    ours = convert.load_hf_decoder(sources["llama"]).eval()
    assert ours.config.family == "llama" and ours.config.rope_scaling["type"] == "llama3"
    ids = torch.randint(0, ours.config.vocab_size, (1, 200))  # past original_max_position_embeddings (64)
    with torch.no_grad():
        want = hf(ids).logits[0]
        got = ours(ids[0], torch.arange(200), torch.tensor([0, 200], dtype=torch.int32), 200)
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-5
    ours.config.rope_scaling = None  # the scaling mattered: without it the logits move
    with torch.no_grad():
        plain = ours(ids[0], torch.arange(200), torch.tensor([0, 200], dtype=torch.int32), 200)
    assert (plain - want).abs().max() > 1e-3
    exported = convert.hf_decoder_tensors(convert.load_hf_decoder(sources["llama"]))
    theirs = convert._read_hf_tensors(sources["llama"])
    assert exported.keys() == theirs.keys() and all(torch.equal(t, exported[k]) for k, t in theirs.items())
    back = convert.text_config_from_hf(convert.text_config_to_hf(convert.load_hf_decoder(sources["llama"]).config))
    assert back == convert.load_hf_decoder(sources["llama"]).config


def test_mistral_import_matches_transformers(tmp_path):
    cfg = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=None)
    randomize(transformers.MistralForCausalLM(cfg)).save_pretrained(tmp_path)
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path).eval()
    ours = convert.load_hf_decoder(str(tmp_path)).eval()
    ids = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        got = ours(ids[0], torch.arange(50), torch.tensor([0, 50], dtype=torch.int32), 50)
        assert ours.config.family == "mistral" and (got - hf(ids).logits[0]).abs().max() < 1e-5
    assert convert.text_config_to_hf(ours.config)["architectures"] == ["MistralForCausalLM"]


def stage1(out, *flags):
    return ["--stage", "1", "--out", str(out), "--max-steps", "3", "--packing-length", "256", "--device", "cpu",
            "--log-every", "1000", "--peak-tflops", "1", "--no-eval", *flags]


@pytest.mark.parametrize("llm", ["qwen3", "llama"])
def test_stage1_moves_only_the_connector_and_the_run_keeps_its_tokenizer(sources, tmp_path, llm, capsys):
    train.main(stage1(tmp_path / "run", "--init-vision-from", sources["vl"], "--init-text-from", sources[llm]))
    ckpt = common.checkpoint_dir(str(tmp_path / "run" / "stage1"))
    model = M.MLLM.from_pretrained(ckpt)
    vision, merger = convert.load_hf_vision(sources["vl"])
    decoder = convert.load_hf_decoder(sources[llm])
    tok = data.load_tokenizer(sources[llm])
    assert model.config.image_pad_id == tok.image_pad_id and model.config.text.family == llm
    for name, t in M.named_state(vision).items():
        assert torch.equal(M.named_state(model.vision)[name], t), name
    grown = [tok.special_tokens[s] for s in tok.added]
    for name, t in M.named_state(decoder).items():
        ours = M.named_state(model.decoder)[name]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            rows = torch.ones(len(ours), dtype=torch.bool)
            rows[grown] = False
            assert torch.equal(ours[rows][:len(t)], t[: rows.sum()]) and len(ours) == max(len(t), tok.vocab_size)
            if grown:  # rows of the added image tokens start as the mean of the others
                torch.testing.assert_close(ours[grown], t.mean(0).expand(len(grown), -1))
        else:
            assert torch.equal(ours, t), name
    cfg, overrides = train.parse_args(stage1(tmp_path / "run", "--init-vision-from", sources["vl"], "--init-text-from",
                                             sources[llm]))
    start = train.compose_model(cfg, train.build_tokenizer(cfg), overrides)  # what stage 1 started from
    assert model.connector.fc2.weight.shape == (decoder.config.hidden_size, 4 * vision.config.hidden_size)
    for name, t in M.named_state(start).items():  # stage 1 trained the connector alone
        assert torch.equal(t, M.named_state(model)[name]) != name.startswith("connector."), name
    # the run's tokenizer and chat format travel with it: stage 3 needs no source flags
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(ckpt))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "stage1" / "first_samples.jsonl")]
    assert [r["source"] for r in rows] == ["caption"] and len(rows[0]["input_ids"]) == len(rows[0]["labels"])
    assert "[[" in capsys.readouterr().out
    train.main(["--stage", "3", "--init-from", str(tmp_path / "run" / "stage1"), "--out", str(tmp_path / "run"),
                "--max-steps", "1", "--packing-length", "256", "--device", "cpu", "--peak-tflops", "1"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "stage3" / "first_samples.jsonl")]
    assert len(rows) == len(train.STAGES[3].mix)
    saved = data.load_tokenizer(common.checkpoint_dir(str(tmp_path / "run" / "stage3")))
    record = as_record(CONVERSATIONS[1])
    assert data.encode(record, saved).tokens == data.encode(record, tok).tokens
    hf = transformers.AutoTokenizer.from_pretrained(common.checkpoint_dir(str(tmp_path / "run" / "stage3")))
    assert ids_of(hf.apply_chat_template(CONVERSATIONS[1], tokenize=True)) == data.encode(record, tok).tokens
    if llm == "llama":  # --decoder-only export: transformers' Llama computes our trained decoder, tokenizer beside it
        evaluate.main(["--export-hf", str(tmp_path / "hf"), "--ckpt", str(tmp_path / "run" / "stage3"),
                       "--decoder-only"])
        hf_lm = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        trained = M.MLLM.from_pretrained(common.checkpoint_dir(str(tmp_path / "run" / "stage3"))).decoder.eval()
        ids = torch.tensor(data.encode(record, tok).tokens)
        with torch.no_grad():
            got = trained(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids))
            assert (got - hf_lm(ids[None]).logits[0]).abs().max() < 1e-5
        exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert ids_of(exported_tok.apply_chat_template(CONVERSATIONS[1], tokenize=True)) == ids.tolist()
    for _ in range(2):  # an average carries the tokenizer too, and replaces its own earlier output
        evaluate.main(["--average", str(tmp_path / "run" / "stage1"), str(tmp_path / "run" / "stage3"), "--out",
                       str(tmp_path / "avg")])
    assert data.encode(record, data.load_tokenizer(str(tmp_path / "avg"))).tokens == data.encode(record, tok).tokens
    evaluate.main(["--ckpt", str(tmp_path / "run" / "stage3"), "--tasks", "vqa_color", "--eval-n", "2", "--device", "cpu",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])  # the run's tokenizer, no flag
    assert json.load(open(tmp_path / "eval" / "eval.json"))


def test_grow_vocab_rows(tmp_path):
    decoder = M.Decoder(M.config_from_preset("tiny", **{"text.tie_word_embeddings": False}).text)
    before = decoder.embed_tokens.weight.detach().clone()
    decoder.grow_vocab(265, [262, 263, 264])
    assert decoder.embed_tokens.weight.shape == (265, 192) and decoder.lm_head.weight.shape == (265, 192)
    assert torch.equal(decoder.embed_tokens.weight[:262], before) and decoder.config.vocab_size == 265
    torch.testing.assert_close(decoder.embed_tokens.weight[263], before.mean(0))
    logits = decoder(torch.tensor([262, 5]), torch.arange(2), torch.tensor([0, 2], dtype=torch.int32), 2)
    assert logits.shape == (2, 265)


def refused(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_refused_starts_name_the_flag_and_touch_nothing(sources, tmp_path):
    out = tmp_path / "run"
    llm_only = refused(stage1(out, "--init-from", sources["qwen3"]))
    assert "--init-vision-from" in llm_only and "--random-vision" in llm_only
    assert "--init-vision-from" in refused(stage1(out, "--init-text-from", sources["qwen3"]))
    assert "--init-text-from" in refused(stage1(out, "--init-vision-from", sources["vl"]))
    assert "--init-vision-from" in refused(stage1(out, "--init-vision-from", sources["qwen3"],
                                                  "--init-text-from", sources["llama"]))
    assert "--init-text-from" in refused(stage1(out, "--init-vision-from", sources["vl"],
                                                "--init-text-from", str(tmp_path / "missing")))
    assert "--keep-vision-merger" in refused(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from",
                                                    sources["qwen3"], "--keep-vision-merger"))
    assert "one or the other" in refused(stage1(out, "--init-from", sources["vl"], "--init-text-from", sources["qwen3"]))
    assert "fixes the model shape" in refused(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from",
                                                     sources["qwen3"], "--text-num-layers", "3"))
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"  # an LLM directory missing one tensor
    shutil.copytree(sources["qwen3"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, broken / "model.safetensors")
    message = refused(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from", str(broken)))
    assert message.startswith(f"--init-text-from {broken}") and "model.layers.1.mlp.up_proj.weight" in message
    small = qwen3_dir(tmp_path / "small_vocab", vocab_size=300)  # a tokenizer with more ids than the LLM has rows
    assert "not its tokenizer" in refused(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from",
                                                 str(small)))
    bare = tmp_path / "no_template"  # an LLM whose tokenizer has no chat template
    os.makedirs(bare)
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(sources["qwen3"], f), bare / f)
    tokenizer_dir(bare, "qwen", template=False)
    message = refused(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from", str(bare)))
    assert "--chat-template" in message
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]
    # the documented default, chosen by the flag: the built-in ChatML format
    train.main(stage1(out, "--init-vision-from", sources["vl"], "--init-text-from", str(bare), "--chat-template",
                      "chatml", "--max-steps", "1"))


def test_random_vision_is_an_explicit_choice(sources, tmp_path):
    train.main(stage1(tmp_path / "run", "--init-text-from", sources["llama"], "--random-vision", "--max-steps", "1"))
    model = M.MLLM.from_pretrained(common.checkpoint_dir(str(tmp_path / "run" / "stage1")))
    assert model.config.vision == M.config_from_preset("tiny").vision and model.config.text.family == "llama"
