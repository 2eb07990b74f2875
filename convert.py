"""Hugging Face checkpoints: the name tables between our modules and the published Qwen2.5-VL / Qwen2 / Qwen3 /
Qwen3-MoE / DeepSeek-V3 layouts, loading their weights into model.py's modules (load_hf, load_hf_decoder) and
exporting ours in their layout (hf_tensors, hf_decoder_tensors, *_config_to_hf, save_hf; export_hf writes a
checkpoint as a directory transformers' from_pretrained loads). Kept beside model.py as DeepSeek-V3 keeps
convert.py beside its model.py: model.py computes, this file only renames and reshapes.
"""
import json
import math
import os
import shutil

import torch

import data

from common import RUN_ARGS, check_output_dir, is_our_checkpoint, output_dir, read_json, read_safetensors, \
    save_safetensors, write_json
from model import Decoder, MLLM, ModelConfig, PatchMerger, TextConfig, VisionConfig, VisionEncoder, assign_state, \
    named_state

# ----------------------------------------------------------------------------- Hugging Face checkpoints

# transformers >= 4.52 module names -> the (older) names published checkpoints use; both occur on disk
HF_PREFIX_ALIASES = {"model.visual.": "visual.", "model.language_model.": "model."}

# (our name prefix, Hugging Face name prefix), first match wins; the rest of the name is identical
HF_DECODER_NAMES = [("lm_head.", "lm_head."), ("", "model.")]
HF_VISION_NAMES = [("patch_embed.weight", "visual.patch_embed.proj.weight"), ("", "visual.")]
HF_MERGER_NAMES = [("fc1.", "visual.merger.mlp.0."), ("fc2.", "visual.merger.mlp.2."), ("", "visual.merger.")]


def fold_patch_embed(w):
    """Conv3d [d, 3, 2, 14, 14] over 2 frames -> Linear [d, 3*14*14]: a still image repeats its frame, so
    the conv of the repeated frame equals the frame times the kernel summed over time."""
    return w.sum(2).flatten(1)


def unfold_patch_embed(w, temporal_patch_size=2):
    """The inverse for export: Linear [d, 3*p*p] -> Conv3d [d, 3, 2, p, p], half the kernel on each frame, so
    fold_patch_embed gives `w` back exactly (halving and adding two equal halves are exact in floating point)."""
    p = math.isqrt(w.shape[1] // 3)
    return (w / temporal_patch_size).view(w.shape[0], 3, 1, p, p).expand(-1, -1, temporal_patch_size, -1, -1)


# Hugging Face name -> (its tensor to ours, ours to its tensor) where the layouts differ
HF_CONVERT = {"visual.patch_embed.proj.weight": (fold_patch_embed, unfold_patch_embed)}


def _hf_name(name, table):
    for ours, theirs in table:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"no Hugging Face name for {name!r}")


def _read_hf_tensors(path, keep=lambda name: True):
    """All tensors of a HF checkpoint dir (single `model.safetensors` or sharded with an index file),
    under the names of HF_PREFIX_ALIASES; `keep` filters by name before reading."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for file in files:
        tensors.update((_hf_alias(k), t) for k, t in
                       read_safetensors(os.path.join(path, file), lambda k: keep(_hf_alias(k))).items())
    return tensors


def _hf_alias(key):
    """A HF tensor name under the prefixes of HF_PREFIX_ALIASES."""
    for new, old in HF_PREFIX_ALIASES.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _take_hf(module, table, tensors, where):
    """Our state dict for `module`, popped from `tensors` (HF names); a missing key is named."""
    state = {}
    for name in named_state(module):
        hf = _hf_name(name, table)
        if hf not in tensors:
            raise KeyError(f"{where}: missing key {hf!r} (for our {name!r})")
        state[name] = HF_CONVERT[hf][0](tensors.pop(hf)) if hf in HF_CONVERT else tensors.pop(hf)
    return state


def _check_consumed(tensors, where):
    if tensors:
        raise KeyError(f"{where}: unexpected keys {sorted(tensors)}")


def text_config_from_hf(d, tie_word_embeddings=None):
    """TextConfig from a Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 / Llama / Mistral / Qwen2.5-VL (text part)
    config.json dict; what our decoder does not compute is a ValueError naming it."""
    kind = d.get("model_type")
    if kind == "deepseek_v3":
        return _deepseek_v3_config(d)
    if kind not in ("qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "qwen2_5_vl", "qwen2_5_vl_text"):
        raise ValueError(f"unsupported decoder model_type {kind!r} (qwen2, qwen3, qwen3_moe, deepseek_v3, llama, "
                         "mistral, qwen2_5_vl)")
    llama = kind in ("llama", "mistral")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope") + (("llama3",) if llama else ()):
        raise ValueError(f"{kind} config: unsupported rope scaling {rope}")
    if d.get("hidden_act", "silu") != "silu" or d.get("use_sliding_window") or (kind == "mistral" and
                                                                              d.get("sliding_window")):
        raise ValueError(f"{kind} config: unsupported hidden_act {d.get('hidden_act')!r} or sliding window")
    qwen3 = kind in ("qwen3", "qwen3_moe")
    if (qwen3 or llama) and (d.get("attention_bias") or d.get("mlp_bias")):
        raise ValueError(f"{kind} config with attention_bias / mlp_bias (a bias on o_proj or the MLP) is not "
                         "supported")
    heads = d["num_attention_heads"]
    llama3 = {"type": "llama3", **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                        "original_max_position_embeddings")}} \
        if rope_type == "llama3" else None
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, intermediate_size=d["intermediate_size"],
        qk_norm=qwen3, qkv_bias=not (qwen3 or llama), rope_scaling=llama3,
        tie_word_embeddings=(d.get("tie_word_embeddings", False) if tie_word_embeddings is None
                             else tie_word_embeddings),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)), mrope_section=rope.get("mrope_section"),
        rms_norm_eps=d["rms_norm_eps"], family="qwen2" if kind.startswith("qwen2") else kind,
        **(_qwen3_moe_fields(d) if kind == "qwen3_moe" else {}))


def _qwen3_moe_fields(d):
    """Qwen3-MoE: softmax routing over all experts, no shared experts, every layer MoE, and no balancing bias
    (bias_update_speed 0: its layout has no tensor for DeepSeek-V3's, so one trained here could not be exported)."""
    if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
        raise ValueError(f"qwen3_moe config: decoder_sparse_step {d.get('decoder_sparse_step')} / mlp_only_layers "
                         f"{d.get('mlp_only_layers')}: only all-MoE layers are supported")
    return dict(n_routed_experts=d.get("num_experts") or d["num_local_experts"], n_shared_experts=0,
                num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["moe_intermediate_size"],
                scoring="softmax", norm_topk_prob=d.get("norm_topk_prob", False), routed_scaling_factor=1.0,
                bias_update_speed=0.0)


def _deepseek_v3_config(d):
    """TextConfig from a DeepSeek-V3 config.json dict (the original or transformers' spelling)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn") or (rope_type == "yarn" and not rope.get("factor")):
        raise ValueError(f"deepseek_v3 config: unsupported rope scaling {rope}")
    if (d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("scoring_func", "sigmoid") != "sigmoid"
            or d.get("topk_method", "noaux_tc") != "noaux_tc"):
        raise ValueError("deepseek_v3 config: need hidden_act silu, attention_bias false, scoring_func sigmoid, "
                         "topk_method noaux_tc")
    yarn_keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    heads = d["num_attention_heads"]
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=heads, intermediate_size=d["intermediate_size"], qk_norm=False,
        tie_word_embeddings=d.get("tie_word_embeddings", False), rms_norm_eps=d["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_scaling={"type": "yarn", **{k: rope[k] for k in yarn_keys if k in rope}} if rope_type == "yarn" else None,
        attention="mla", q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["moe_intermediate_size"],
        first_k_dense=d.get("first_k_dense_replace", 0), n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1, scoring="sigmoid", norm_topk_prob=d.get("norm_topk_prob", True),
        routed_scaling_factor=d.get("routed_scaling_factor", 1.0), family="deepseek_v3")


def _hf_moe_tensors(tensors, c: TextConfig, rope_interleave, where):
    """Rename a Qwen3-MoE / DeepSeek-V3 checkpoint's tensors (in place) so that _take_hf maps them one to one:
    per-expert matrices stacked into our [expert, in, out] layout, e_score_correction_bias -> expert_bias
    (zeros where there is none: Qwen3-MoE), DeepSeek's interleaved rotary rows put in half-split order (the
    same permutation on q and k leaves q.k unchanged), and the MTP layers past num_layers dropped (the MTP
    module, DeepSeek-V3 §2.2, is not built here)."""
    fp8 = [k for k in tensors if k.endswith("weight_scale_inv")]
    if fp8:
        raise ValueError(f"{where}: FP8 checkpoint ({fp8[0]}); convert it to bf16 first")
    for key in [k for k in tensors if k.startswith("model.layers.") and int(k.split(".")[2]) >= c.num_layers]:
        del tensors[key]

    def pop(key):
        if key not in tensors:
            raise KeyError(f"{where}: missing key {key!r}")
        return tensors.pop(key)
    for i in range(c.first_k_dense, c.num_layers) if c.n_routed_experts else ():
        p = f"model.layers.{i}.mlp."
        w = {n: torch.stack([pop(f"{p}experts.{e}.{n}.weight") for e in range(c.n_routed_experts)])
             for n in ("gate_proj", "up_proj", "down_proj")}
        tensors[p + "gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1).transpose(1, 2)
        tensors[p + "down_proj"] = w["down_proj"].transpose(1, 2)
        bias = tensors.pop(p + "gate.e_score_correction_bias", None)
        tensors[p + "gate.expert_bias"] = torch.zeros(c.n_routed_experts) if bias is None else bias.float()
    if c.attention == "mla" and rope_interleave:
        _permute_mla_rope(tensors, c, _half_split(c.qk_rope_head_dim), where)


def _half_split(r):
    """Row order taking DeepSeek's interleaved rotary pairs to our half-split layout: (x0, x2, ..., x1, x3, ...)."""
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])


def _permute_mla_rope(tensors, c: TextConfig, order, where):
    """Reorder (in place) the rotary rows of every MLA layer's query and shared rotary key by `order`; the
    same permutation on q and k leaves q.k unchanged."""
    r, nope = c.qk_rope_head_dim, c.qk_nope_head_dim
    for i in range(c.num_layers):
        p = f"model.layers.{i}.self_attn."
        q, kv = p + ("q_b_proj.weight" if c.q_lora_rank else "q_proj.weight"), p + "kv_a_proj_with_mqa.weight"
        missing = [k for k in (q, kv) if k not in tensors]
        if missing:
            raise KeyError(f"{where}: missing key {missing[0]!r}")
        w = tensors[q].view(c.num_heads, nope + r, -1)
        tensors[q] = torch.cat([w[:, :nope], w[:, nope:][:, order]], dim=1).flatten(0, 1)
        tensors[kv] = torch.cat([tensors[kv][:-r], tensors[kv][-r:][order]])


def vision_config_from_hf(d):
    """(VisionConfig, out_hidden_size) from a Qwen2.5-VL `vision_config` dict."""
    if d.get("in_channels", d.get("in_chans", 3)) != 3 or d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported vision config: in_channels {d.get('in_channels', d.get('in_chans'))}, "
                         f"hidden_act {d.get('hidden_act')!r}")
    rope = d.get("rope_parameters") or {}
    config = VisionConfig(
        depth=d["depth"], hidden_size=d["hidden_size"], num_heads=d["num_heads"],
        intermediate_size=d["intermediate_size"], patch_size=d.get("patch_size", 14),
        spatial_merge_size=d.get("spatial_merge_size", 2), window_size=d["window_size"],
        fullatt_blocks=d["fullatt_block_indexes"], rope_theta=rope.get("rope_theta", 10000.0))
    return config, d["out_hidden_size"]


def _qwen2_5_vl_config(path):
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{path}/config.json: model_type {cfg.get('model_type')!r}, expected 'qwen2_5_vl'")
    return cfg


def load_hf_decoder(path, attn_backend=None, activation_checkpointing=False):
    """Decoder from a Hugging Face Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 causal-LM checkpoint directory."""
    hf_config = read_json(os.path.join(path, "config.json"))
    config = text_config_from_hf(hf_config)
    with torch.device("meta"):
        decoder = Decoder(config, attn_backend, activation_checkpointing)
    tensors = _read_hf_tensors(path)
    if config.n_routed_experts:
        _hf_moe_tensors(tensors, config, hf_config.get("rope_interleave", True), path)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
    state = _take_hf(decoder, HF_DECODER_NAMES, tensors, path)
    _check_consumed(tensors, path)
    assign_state(decoder, state, path)
    return decoder


def load_hf_vision(path, **flags):
    """(VisionEncoder, PatchMerger) from the `visual.*` weights of a Hugging Face Qwen2.5-VL checkpoint (flags:
    VisionEncoder's attn_backend, activation_checkpointing)."""
    config, out_dim = vision_config_from_hf(_qwen2_5_vl_config(path)["vision_config"])
    with torch.device("meta"):
        vision, merger = VisionEncoder(config, **flags), PatchMerger(config, out_dim)
    tensors = _read_hf_tensors(path, keep=lambda name: name.startswith("visual."))
    vision_state = _take_hf(vision, HF_VISION_NAMES, tensors, path)
    merger_state = _take_hf(merger, HF_MERGER_NAMES, tensors, path)
    _check_consumed(tensors, path)
    assign_state(vision, vision_state, path)
    assign_state(merger, merger_state, path)
    return vision, merger


def load_hf(path, **runtime):
    """MLLM (M-RoPE decoder) from a whole Hugging Face Qwen2.5-VL checkpoint directory (runtime: MLLM's)."""
    cfg = _qwen2_5_vl_config(path)
    vision, out_dim = vision_config_from_hf(cfg["vision_config"])
    text_dict = cfg.get("text_config") or cfg  # older checkpoints keep the text fields at the top level
    tie = cfg.get("tie_word_embeddings", False) or text_dict.get("tie_word_embeddings", False)
    text = text_config_from_hf({"model_type": "qwen2_5_vl", **text_dict}, tie_word_embeddings=tie)
    if out_dim != text.hidden_size:
        raise ValueError(f"{path}: vision out_hidden_size {out_dim} != text hidden_size {text.hidden_size}")
    with torch.device("meta"):
        model = MLLM(ModelConfig(vision=vision, text=text, image_pad_id=cfg["image_token_id"]), **runtime)
    tensors = _read_hf_tensors(path)
    if tie:
        tensors.pop("lm_head.weight", None)
    state = {}
    for prefix, module, table in (("vision.", model.vision, HF_VISION_NAMES),
                                  ("connector.", model.connector, HF_MERGER_NAMES),
                                  ("decoder.", model.decoder, HF_DECODER_NAMES)):
        state |= {prefix + k: v for k, v in _take_hf(module, table, tensors, path).items()}
    _check_consumed(tensors, path)
    assign_state(model, state, path)
    return model


# ----------------------------------------------------------------------------- export to Hugging Face


def family_problems(c: TextConfig):
    """What of decoder config `c` the transformers class of its family cannot compute (empty: nothing)."""
    f, problems = c.family, []
    if (c.attention == "mla") != (f == "deepseek_v3"):
        problems.append(f"attention {c.attention!r} (MLA is DeepSeek-V3's alone)")
    if f == "deepseek_v3":
        return problems + ([f"scoring {c.scoring!r} (DeepSeek-V3 routes by sigmoid)"] if c.scoring != "sigmoid" else [])
    if bool(c.n_routed_experts) != (f == "qwen3_moe"):
        problems.append(f"{c.n_routed_experts} routed experts (of the GQA families only qwen3_moe has experts)")
    if c.qk_norm != (f in ("qwen3", "qwen3_moe")):
        problems.append(f"qk_norm {c.qk_norm} (QK-norm is Qwen3's, and only Qwen3's)")
    if c.qkv_bias != (f == "qwen2"):
        problems.append(f"qkv_bias {c.qkv_bias} (a q/k/v bias alone is Qwen2's, and only Qwen2's)")
    if (c.rope_scaling or {}).get("type") not in ((None, "llama3") if f in ("llama", "mistral") else (None,)):
        problems.append(f"rope_scaling {c.rope_scaling}")
    if f == "qwen2" and c.head_dim * c.num_heads != c.hidden_size:
        problems.append(f"head_dim {c.head_dim} x num_heads {c.num_heads} != hidden_size {c.hidden_size} (Qwen2 "
                        "derives head_dim from them)")
    if f == "qwen3_moe" and (c.scoring != "softmax" or c.n_shared_experts or c.first_k_dense or c.n_group > 1
                             or c.routed_scaling_factor != 1.0):
        problems.append(f"Qwen3-MoE routes by softmax with no shared experts, no dense first layers, one group and "
                        f"routed_scaling_factor 1 (have scoring {c.scoring!r}, n_shared_experts {c.n_shared_experts}, "
                        f"first_k_dense {c.first_k_dense}, n_group {c.n_group}, routed_scaling_factor "
                        f"{c.routed_scaling_factor})")
    return problems


def hf_decoder_type(c: TextConfig):
    """The transformers model_type of decoder config `c` (its family), or ValueError naming the fields that
    family's class cannot compute (the inverse of text_config_from_hf)."""
    problems = family_problems(c)
    if problems:
        raise ValueError(f"no transformers {c.family} decoder computes this config: " + "; ".join(problems))
    return c.family


def text_config_to_hf(c: TextConfig):
    """config.json dict (the published checkpoints' spelling: rope_theta / rope_scaling at the top) of the
    Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 causal LM that computes what `c` does; text_config_from_hf reads
    it back to `c` (M-RoPE aside: a decoder alone sees text only, where M-RoPE is 1D rotary)."""
    kind = hf_decoder_type(c)
    arch = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "deepseek_v3": "DeepseekV3",
            "llama": "Llama", "mistral": "Mistral"}[kind]
    d = {"architectures": [arch + "ForCausalLM"], "model_type": kind, "vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
         "intermediate_size": c.intermediate_size, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
         "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta}
    if kind == "deepseek_v3":
        return d | _deepseek_v3_config_to_hf(c)
    d |= {"num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "attention_bias": False}
    if kind in ("llama", "mistral"):
        d |= {"mlp_bias": False, "sliding_window": None} if kind == "mistral" else {"mlp_bias": False}
        if c.rope_scaling:
            d["rope_scaling"] = {"rope_type": "llama3", **{k: v for k, v in c.rope_scaling.items() if k != "type"}}
    if kind == "qwen3_moe":
        d |= {"num_experts": c.n_routed_experts, "num_experts_per_tok": c.num_experts_per_tok,
              "moe_intermediate_size": c.moe_intermediate_size, "norm_topk_prob": c.norm_topk_prob,
              "decoder_sparse_step": 1, "mlp_only_layers": []}
    return d


def _deepseek_v3_config_to_hf(c: TextConfig):
    """The DeepSeek-V3 fields of config.json; rotary rows interleaved as DeepSeek publishes them, no MTP layers."""
    d = {"num_key_value_heads": c.num_heads, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
         "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
         "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
         "num_experts_per_tok": c.num_experts_per_tok, "moe_intermediate_size": c.moe_intermediate_size,
         "first_k_dense_replace": c.first_k_dense if c.n_routed_experts else c.num_layers, "n_group": c.n_group,
         "topk_group": c.topk_group, "norm_topk_prob": c.norm_topk_prob,
         "routed_scaling_factor": c.routed_scaling_factor, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
         "attention_bias": False, "rope_interleave": True,
         "num_nextn_predict_layers": 0}
    if c.rope_scaling:
        d["rope_scaling"] = dict(c.rope_scaling)
        yarn = c.rope_scaling
        d["max_position_embeddings"] = int(yarn["factor"] * yarn["original_max_position_embeddings"])
    return d


def hf_decoder_tensors(decoder, where="decoder"):
    """{Hugging Face name: tensor} of our Decoder in the published layout (HF_DECODER_NAMES read backwards):
    per-expert matrices, e_score_correction_bias (DeepSeek-V3) and interleaved MLA rotary rows."""
    c = decoder.config
    kind = hf_decoder_type(c)
    tensors = {_hf_name(n, HF_DECODER_NAMES): t.detach() for n, t in named_state(decoder).items()}
    for i in range(c.first_k_dense, c.num_layers) if c.n_routed_experts else ():
        p = f"model.layers.{i}.mlp."
        gate, up = tensors.pop(p + "gate_up_proj").transpose(1, 2).chunk(2, dim=1)
        down = tensors.pop(p + "down_proj").transpose(1, 2)
        for e in range(c.n_routed_experts):
            tensors |= {f"{p}experts.{e}.gate_proj.weight": gate[e], f"{p}experts.{e}.up_proj.weight": up[e],
                        f"{p}experts.{e}.down_proj.weight": down[e]}
        bias = tensors.pop(p + "gate.expert_bias")
        if kind == "deepseek_v3":
            tensors[p + "gate.e_score_correction_bias"] = bias
        elif bias.any():  # DeepSeek-V3 §2.1.2's balancing bias, moved by training; Qwen3-MoE routes without one
            raise ValueError(f"{where}: layer {i} has a non-zero expert_bias, which Qwen3-MoE cannot express "
                             "(train it with --text-bias-update-speed 0)")
    if kind == "deepseek_v3":
        _permute_mla_rope(tensors, c, torch.argsort(_half_split(c.qk_rope_head_dim)), where)
    return tensors


def mllm_config_to_hf(config: ModelConfig, token_ids=None):
    """config.json dict of the Hugging Face model that computes what our MLLM does: Qwen2.5-VL where that class
    expresses it (a Qwen2 decoder with M-RoPE; text fields at the top, as published), else the trust_remote_code
    model of modeling_nanomindvl.py (the ViT of Qwen2.5-VL, the decoder family's own class, 1D rotary).
    `token_ids` adds vision_start_token_id etc. ValueError names what neither can express."""
    c, v = config.text, config.vision
    problems = family_problems(c)
    if c.mrope_section is not None and c.family != "qwen2":
        problems.append(f"M-RoPE with a {c.family} decoder (only Qwen2.5-VL, a Qwen2 decoder, places image tokens by "
                        "M-RoPE in transformers; train with --text-mrope-section none)")
    if v.rms_norm_eps != 1e-6:
        problems.append(f"vision rms_norm_eps {v.rms_norm_eps} (Qwen2.5-VL's ViT fixes 1e-6)")
    if problems:
        raise ValueError(f"cannot export the whole model: {'; '.join(problems)}; --decoder-only exports the decoder "
                         "alone where its family allows")
    text = text_config_to_hf(c)
    vision = {"model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size, "hidden_act": "silu",
              "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": 3,
              "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": 2,
              "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_blocks),
              "out_hidden_size": c.hidden_size, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    shared = {"vision_config": vision, "image_token_id": config.image_pad_id, **(token_ids or {})}
    if c.mrope_section is not None:
        return text | shared | {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                                "rope_scaling": {"type": "mrope", "mrope_section": list(c.mrope_section)}}
    model = f"{REMOTE_CODE[:-3]}.NanoMindVLForConditionalGeneration"
    return shared | {"architectures": ["NanoMindVLForConditionalGeneration"], "model_type": "nanomindvl",
                     "auto_map": {"AutoConfig": f"{REMOTE_CODE[:-3]}.NanoMindVLConfig",
                                  "AutoModelForImageTextToText": model, "AutoModelForCausalLM": model},
                     "text_config": text, "tie_word_embeddings": c.tie_word_embeddings}


REMOTE_CODE = "modeling_nanomindvl.py"  # beside this file; copied into exports that need trust_remote_code


def hf_tensors(model: MLLM, remote=False):
    """{Hugging Face name: tensor} of the whole MLLM: Qwen2.5-VL's published layout (load_hf's tables backwards),
    or (remote) modeling_nanomindvl.py's, whose decoder sits under `language_model.`."""
    tensors = {}
    for module, table in ((model.vision, HF_VISION_NAMES), (model.connector, HF_MERGER_NAMES)):
        for name, t in named_state(module).items():
            hf = _hf_name(name, table)
            tensors[hf] = HF_CONVERT[hf][1](t.detach()) if hf in HF_CONVERT else t.detach()
    return tensors | {("language_model." if remote else "") + k: t for k, t in hf_decoder_tensors(model.decoder).items()}


def preprocessor_config(min_pixels, max_pixels):
    """preprocessor_config.json of Qwen2-VL's image processor at the pixel budget given (data.py's processing)."""
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": data.CLIP_MEAN.tolist(), "image_std": data.CLIP_STD.tolist(),
            "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": data.PATCH, "merge_size": data.MERGE, "temporal_patch_size": 2}


def special_token_ids(tokenizer):
    """bos / eos / pad ids for config.json and generation_config.json (generation stops at every stop id)."""
    chat = tokenizer.chat.tokens if tokenizer.chat else {}
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.special_tokens.get(chat.get("bos_token"))
    pad = tokenizer.special_tokens.get(chat.get("pad_token"), tokenizer.eos_id)
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad}


def save_hf(path, config, tensors, max_shard_bytes=5 * 2 ** 30):
    """config.json + safetensors, in shards of at most max_shard_bytes with model.safetensors.index.json when
    there is more than one (the layout transformers' save_pretrained writes and Hugging Face loaders read)."""
    embed = next(t for k, t in tensors.items() if k.endswith("embed_tokens.weight"))
    config = config | {"torch_dtype": str(embed.dtype).removeprefix("torch.")}
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    os.makedirs(path, exist_ok=True)
    for name, shard in zip(names, shards):
        save_safetensors(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- a checkpoint as a Hugging Face directory

# the tokenizer files of a Hugging Face directory: those Tokenizer.save writes, and a slow tokenizer's
HF_TOKENIZER_FILES = (*data.TOKENIZER_FILES, "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json")
EXPORT_MARKER = "exported_from.json"  # marks a directory export_hf wrote, so a later export may replace it


def is_hf_dir(path):
    """A Hugging Face model directory: a config.json that is not ours (ours has `vision` and `text`)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not is_our_checkpoint(path)


def export_hf(ckpt, out, tokenizer, decoder_only=False, source=None, dtype=None, max_shard_bytes=5 * 2 ** 30,
              pixels=None, overwrite=False):
    """Write checkpoint `ckpt` as a Hugging Face directory `out` for transformers' from_pretrained: the whole MLLM
    (mllm_config_to_hf: Qwen2.5-VL, or trust_remote_code with modeling_nanomindvl.py), or (decoder_only) its
    decoder as its family's causal LM; weights cast to `dtype` if given; `tokenizer`'s files (the run's: chat
    template, added tokens) and the other tokenizer files of `source` (the Hugging Face directory the weights
    came from); bos/eos/pad ids in config.json and generation_config.json; for the whole model a
    preprocessor_config.json at `pixels` = (min_pixels, max_pixels). Written under a temp name, then renamed
    (only over a new or empty directory or an earlier export; with overwrite beside other files, which are
    kept); returns the files written beside the weights. ValueError names what the transformers classes cannot
    express."""
    others = check_output_dir(out, "--export-hf", EXPORT_MARKER, is_export_file, [ckpt] + ([source] if source else []),
                              overwrite)
    model = MLLM.from_pretrained(ckpt)
    ids = special_token_ids(tokenizer)
    if decoder_only:
        config, tensors = text_config_to_hf(model.config.text) | ids, hf_decoder_tensors(model.decoder, ckpt)
    else:
        if tokenizer.image_pad_id != model.config.image_pad_id:
            raise ValueError(f"{ckpt}: image_pad_id {model.config.image_pad_id} but the tokenizer's <|image_pad|> is "
                             f"{tokenizer.image_pad_id}; pass the model's tokenizer with --tokenizer")
        config = mllm_config_to_hf(model.config, {"vision_start_token_id": tokenizer.vision_start_id,
                                                  "vision_end_token_id": tokenizer.vision_end_id, **ids})
        tensors = hf_tensors(model, remote=config["model_type"] == "nanomindvl")
    if dtype is not None:  # DeepSeek-V3 keeps its routing bias in fp32, as published
        tensors = {k: t if k.endswith("e_score_correction_bias") else t.to(dtype) for k, t in tensors.items()}
    copied = [f for f in HF_TOKENIZER_FILES if source and os.path.isfile(os.path.join(source, f))
              and f not in tokenizer.files]
    with output_dir(out, is_export_file, keep_others=bool(others)) as tmp:
        save_hf(tmp, config, tensors, max_shard_bytes)
        for f in copied:
            shutil.copy(os.path.join(source, f), tmp)
        tokenizer.save(tmp)  # the tokenizer and chat template the run trained with
        written = copied + list(tokenizer.files)
        if config["model_type"] == "nanomindvl":
            shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_CODE), tmp)
            written.append(REMOTE_CODE)
        generation = os.path.join(tmp, "generation_config.json")  # the LLM's own, if the tokenizer brought one
        padded = list(range(tokenizer.vocab_size, model.config.text.vocab_size))  # rows that are no token
        files = {"generation_config.json": (read_json(generation) if os.path.isfile(generation) else {}) | ids | {
            "eos_token_id": list(tokenizer.stop_ids) or ids["eos_token_id"], "do_sample": False,
            **({"suppress_tokens": padded} if padded else {})}}
        if not decoder_only and pixels:
            files["preprocessor_config.json"] = preprocessor_config(*pixels)
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        write_json({"checkpoint": ckpt, "decoder_only": decoder_only, "copied_from": source},
                   os.path.join(tmp, EXPORT_MARKER))
    return list(dict.fromkeys(written + list(files)))


def is_export_file(name):
    """A file export_hf writes (its earlier output may be replaced; anything else in the directory may not)."""
    return name in HF_TOKENIZER_FILES + (EXPORT_MARKER, REMOTE_CODE, "config.json", "preprocessor_config.json",
                                         "model.safetensors.index.json") \
        or (name.startswith("model") and name.endswith(".safetensors"))


def hf_origin(ckpt, hops=8):
    """The Hugging Face directory a checkpoint's weights started from, or None: --init-from followed through
    the args.json of each run (a stage directory holds args.json; its checkpoints sit one level below)."""
    path = ckpt
    for _ in range(hops):
        up = [os.path.abspath(os.path.join(path, *[".."] * k)) for k in range(3)]
        args = next((os.path.join(d, RUN_ARGS) for d in up if os.path.isfile(os.path.join(d, RUN_ARGS))), None)
        if args is None:
            return None
        path = read_json(args)["train_config"].get("init_from")
        if not path or not os.path.isdir(path):
            return None
        if is_hf_dir(path):
            return path
    return None
