"""Export to Hugging Face (evaluate.py --export-hf): transformers' from_pretrained loads what we write and its
logits equal ours; Hugging Face -> ours -> Hugging Face gives the same tensors bit for bit; what a
transformers class cannot express is refused by name."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import data
import evaluate
import model as M
import train
from conftest import requires
from test_model import GRIDS, hf_pixels, pack, qwen2_5_vl_dir, sample  # noqa: F401 (a fixture)

transformers = requires("transformers")
TOL = 1e-5  # max abs logit difference between transformers on our export and our model (fp32)
# the tiny preset in Qwen2.5-VL's layout: Qwen2 decoder (q/k/v bias, no QK-norm) with M-RoPE over head_dim/2 = 16
QWEN2_5_VL_LAYOUT = {"text.num_layers": 2, "vision.depth": 2, "text.qkv_bias": True, "text.qk_norm": False,
                     "text.mrope_section": (4, 6, 6)}


def quiet(*a, **k):
    pass


@pytest.mark.slow  # ~25 s alone on 2 cores (imports included)
def test_qwen2_5_vl_export_after_training_matches_transformers(tmp_path, capsys):
    cfg = train.TrainConfig(out=str(tmp_path / "run"), stage="3", max_steps=2, packing_length=256, device="cpu",
                            log_every=1000, eval=False, peak_tflops=1.0)
    ckpt = train.run(cfg, QWEN2_5_VL_LAYOUT, log=quiet)["stages"]["stage3"].checkpoint
    out = tmp_path / "hf"
    evaluate.main(["--export-hf", str(out), "--ckpt", str(tmp_path / "run" / "stage3"), "--max-shard-gb", "0.001"])
    assert (out / "model.safetensors.index.json").exists() and "wrote" in capsys.readouterr().out  # sharded past 1 MB
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    ours = M.MLLM.from_pretrained(ckpt).eval()
    tok = data.Tokenizer()
    c = hf.config
    assert (c.image_token_id, c.vision_start_token_id, c.vision_end_token_id) == (
        tok.image_pad_id, tok.vision_start_id, tok.vision_end_id)
    tokens, _, images = sample(6, GRIDS, pad_id=tok.image_pad_id, start_id=tok.vision_start_id,
                               end_id=tok.vision_end_id, vocab=256)
    ids, grid = torch.tensor(tokens)[None], torch.tensor(GRIDS)
    mm_types = (ids == tok.image_pad_id).int()
    positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
    patches = torch.cat([p for p, _ in images])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=hf_pixels(patches), image_grid_thw=grid,
                  mm_token_type_ids=mm_types).logits[0]
        got = ours.logits(pack([(tokens, tokens, images)], positions=positions[:, 0]))
    assert want.abs().max() > 0.5 and (got - want).abs().max() < TOL
    back, trained = M.named_state(convert.load_hf(str(out))), M.named_state(ours)  # ours -> HF -> ours: bit for bit
    assert back.keys() == trained.keys() and all(torch.equal(t, back[k]) for k, t in trained.items())


def test_qwen2_5_vl_hf_ours_hf_is_bitwise(qwen2_5_vl_dir, tmp_path):  # noqa: F811
    """Every tensor back bit for bit; the patch embedding, of which still images see only the sum over the
    Conv3d's two frames, comes back as that sum split evenly over both frames in Qwen2.5-VL's own layout
    [out, 3, 2, 14, 14]: exactly the source's where its frames are equal."""
    path, _ = qwen2_5_vl_dir
    conv = "visual.patch_embed.proj.weight"
    theirs = convert._read_hf_tensors(path)
    exported = convert.hf_tensors(convert.load_hf(path))
    assert exported.keys() == theirs.keys()
    assert all(torch.equal(exported[k], theirs[k]) for k in theirs if k != conv)
    assert torch.equal(convert.fold_patch_embed(exported[conv]), convert.fold_patch_embed(theirs[conv]))
    assert exported[conv].shape == theirs[conv].shape == (32, 3, 2, 14, 14)
    assert torch.equal(exported[conv][:, :, 0], exported[conv][:, :, 1])
    still = tmp_path / "still"  # the source with its second frame's kernel made equal to the first's
    shutil.copytree(path, still)
    tensors = load_file(still / "model.safetensors")
    frames = next(t for k, t in tensors.items() if k.endswith("patch_embed.proj.weight"))
    frames[:, :, 1] = frames[:, :, 0]
    save_file(tensors, still / "model.safetensors", metadata={"format": "pt"})
    theirs, exported = convert._read_hf_tensors(still), convert.hf_tensors(convert.load_hf(still))
    assert not torch.equal(theirs[conv], convert._read_hf_tensors(path)[conv])
    assert all(torch.equal(exported[k], theirs[k]) for k in theirs)


def write_byte_tokenizer(path):
    """A byte-level BPE tokenizer.json without merges (ids 0..255 the bytes, then our six special tokens)."""
    chars = data.bytes_to_unicode()
    tj = {"model": {"type": "BPE", "vocab": {chars[b]: b for b in range(256)}, "merges": []},
          "added_tokens": [{"id": 256 + i, "content": s, "special": True} for i, s in enumerate(data.SPECIAL_TOKENS)],
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "normalizer": None}
    (path / "tokenizer.json").write_text(json.dumps(tj))


SMALL_DECODER = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
HF_DECODERS = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **SMALL_DECODER, num_key_value_heads=2, head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **SMALL_DECODER, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **SMALL_DECODER, num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale": 0.8, "mscale_all_dim": 0.7,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=64, num_nextn_predict_layers=0)),
}


@pytest.mark.parametrize("kind", list(HF_DECODERS))
def test_decoder_export_after_training_matches_transformers(tmp_path, kind):
    """Hugging Face LLM -> train.py --init-text-from (stage 2: 2 steps that train the decoder) -> --export-hf
    --decoder-only: the tensors moved away from the source's and are our trained decoder's, read back bit for
    bit; transformers' logits equal our decoder's; the run's tokenizer files (saved in its checkpoints) come
    along."""
    torch.manual_seed(0)
    src = tmp_path / "src"
    source = HF_DECODERS[kind]().eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            p.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.1)  # routing far from near-ties
        for name, b in source.named_buffers():
            b.normal_(0, 0.1) if name.endswith("e_score_correction_bias") else None
    source.save_pretrained(src)
    write_byte_tokenizer(src)
    cfg = train.TrainConfig(out=str(tmp_path / "run"), stage="2", max_steps=2, packing_length=256, device="cpu",
                            log_every=1000, eval=False, peak_tflops=1.0, init_text_from=str(src), random_vision=True,
                            chat_template="chatml")
    ckpt = train.run(cfg, {}, log=quiet)["stages"]["stage2"].checkpoint
    out = tmp_path / "hf"
    evaluate.main(["--export-hf", str(out), "--ckpt", ckpt, "--decoder-only"])
    theirs, exported = convert._read_hf_tensors(src), convert._read_hf_tensors(out)
    assert exported.keys() == theirs.keys()
    assert [k for k in theirs if torch.equal(exported[k], theirs[k])] == []  # every tensor trained
    ours = M.MLLM.from_pretrained(ckpt).decoder.eval()
    back = convert.load_hf_decoder(str(out)).state_dict()
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(t, back[k]) for k, t in ours.state_dict().items())
    assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    seqs = [torch.randint(0, 300, (n,)) for n in (29, 7)]  # 29 > YaRN's original 16 positions
    with torch.no_grad():
        want = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        got = ours(torch.cat(seqs), torch.cat([torch.arange(len(s)) for s in seqs]),
                   torch.tensor([0, 29, 36], dtype=torch.int32), 29)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < TOL


def test_what_transformers_cannot_express_is_named(tmp_path):
    tiny = M.MLLM(M.config_from_preset("tiny", **{"text.num_layers": 1, "vision.depth": 1,
                                                  "vision.fullatt_blocks": (0,), "vision.rms_norm_eps": 1e-5}))
    tiny.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"cannot export the whole model: vision rms_norm_eps 1e-05.*--decoder-only"):
        convert.export_hf(str(tmp_path / "tiny"), str(tmp_path / "out"), data.Tokenizer())
    assert not (tmp_path / "out").exists()
    mla = M.config_from_preset("tiny-moe").text
    with pytest.raises(ValueError, match="DeepSeek-V3 routes by sigmoid"):
        convert.text_config_to_hf(M.TextConfig(**{**vars(mla), "scoring": "softmax"}))
    gqa_moe = M.TextConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, n_routed_experts=8,
                           num_experts_per_tok=2, moe_intermediate_size=16, scoring="softmax")
    decoder = M.Decoder(gqa_moe)
    decoder.layers[1].mlp.gate.expert_bias[3] = 0.01
    with pytest.raises(ValueError, match="layer 1 has a non-zero expert_bias"):
        convert.hf_decoder_tensors(decoder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not overwriting"):
        convert.export_hf(str(tmp_path / "tiny"), str(tmp_path / "mine"), data.Tokenizer(), decoder_only=True)


def test_bf16_export_keeps_deepseek_routing_bias_in_fp32(tmp_path):
    torch.manual_seed(0)
    moe = M.MLLM(M.config_from_preset("tiny-moe"))
    moe.save_pretrained(tmp_path / "ckpt")
    evaluate.main(["--export-hf", str(tmp_path / "hf"), "--ckpt", str(tmp_path / "ckpt"), "--decoder-only",
                   "--dtype", "bf16"])
    config, tensors = json.loads((tmp_path / "hf" / "config.json").read_text()), convert._read_hf_tensors(tmp_path / "hf")
    assert config["model_type"] == "deepseek_v3" and config["torch_dtype"] == "bfloat16"
    bias = {k for k in tensors if k.endswith("e_score_correction_bias")}
    assert len(bias) == 2 and all(tensors[k].dtype == torch.float32 for k in bias)  # as DeepSeek publishes it
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k not in bias)
    assert torch.equal(tensors["model.embed_tokens.weight"], moe.decoder.embed_tokens.weight.bfloat16())
