"""Tiny random Hugging Face sources built in the tests (nothing downloads): byte-level BPE tokenizers with chat
templates in the styles of Qwen (a default system prompt) and Llama 3 (bos, header tokens, <|eot_id|>), and
the models MindVL starts from: a Qwen2.5-VL (its ViT), a Qwen3 and a Llama causal LM."""
import json

import torch

from conftest import requires

transformers = requires("transformers")

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["The quick brown fox jumps over the lazy dog. What colour is the circle? It is red.",
          "Describe the image. A blue square and a green triangle. How many shapes are there? Three.",
          "You are a helpful assistant. Read the text in the image. HELLO WORLD. 12345 apples!"] * 20

# Qwen2.5's template in short: a default system prompt unless the conversation brings one
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
# Llama 3's template: bos first, a header per turn, contents trimmed, <|eot_id|> after each
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tokenizer_dir(path, style="qwen", template=True):
    """A trained byte-level BPE tokenizer.json + tokenizer_config.json (with the style's chat template) in `path`;
    returns transformers' tokenizer loaded from it."""
    requires("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    path.mkdir(parents=True, exist_ok=True)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN if style == "qwen" else LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = QWEN_SPECIALS if style == "qwen" else LLAMA3_SPECIALS
    hf.add_special_tokens(specials)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    if style == "qwen":
        config |= {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    else:
        bos = hf.token_to_id("<|begin_of_text|>")
        hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
        config |= {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if template:
        config["chat_template"] = QWEN_TEMPLATE if style == "qwen" else LLAMA3_TEMPLATE
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def randomize(model, seed=0):
    """Every parameter drawn at random (transformers zero-initialises some, e.g. norms at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    return model


def save(model, tokenizer_style, path):
    model.save_pretrained(path)
    if tokenizer_style:
        tokenizer_dir(path, tokenizer_style)
    return path


def qwen3_dir(path, vocab_size=None, hidden=64):
    """A tiny Qwen3 causal LM with a Qwen-style tokenizer (vocabulary padded past the tokenizer, as Qwen's is)."""
    n = len(tokenizer_dir(path, "qwen"))
    cfg = transformers.Qwen3Config(vocab_size=vocab_size or n + 8, hidden_size=hidden, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    return save(randomize(transformers.Qwen3ForCausalLM(cfg).eval()), None, path)


def llama_dir(path, hidden=64, rope_scaling=True, tie=False):
    """A tiny Llama causal LM (llama3 rope scaling) with a Llama-3-style tokenizer: no image tokens, vocabulary
    exactly the tokenizer's, so the start must grow it."""
    n = len(tokenizer_dir(path, "llama"))
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if rope_scaling else \
        {"rope_type": "default", "rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                                   rope_parameters=rope, tie_word_embeddings=tie, max_position_embeddings=1024,
                                   bos_token_id=n - 5, eos_token_id=n - 1)
    return save(randomize(transformers.LlamaForCausalLM(cfg).eval()), None, path)


def qwen2_5_vl_vision_dir(path, out_hidden=48):
    """A tiny Qwen2.5-VL (its ViT is what a MindVL start takes; its merger's width differs from the LLMs')."""
    text = dict(vocab_size=300, hidden_size=out_hidden, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 7], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=out_hidden,
                  window_size=56, fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=299,
                                        video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)
    return save(randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval(), seed=1), None, path)
