"""The model: configs and presets, the Qwen2.5-ViT vision encoder, the PatchMerger connector, the dense
Qwen2/Qwen3 decoder, the MLLM that splices image features into the packed token stream (loss and KV-cache
generation), and our checkpoints (save_pretrained / from_pretrained; their files: common.py). Hugging Face
import and export: convert.py.

Everything runs on one flat packed stream (tensors [T, heads, head_dim], sample boundaries `cu_seqlens`,
data.PackedBatch). Compute-heavy ops go through kernels.py so fused paths land in one place.
"""
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import read_json, read_safetensors, write_checkpoint
from kernels import apply_rope, decode_attention, grouped_mm, linear_cross_entropy, rms_norm, swiglu, \
    varlen_attention

# ----------------------------------------------------------------------------- configs


def _field(default, help):
    """A config field and its one line of help (train.py makes a flag of every field)."""
    return field(default=default, metadata={"help": help})


@dataclass
class VisionConfig:
    depth: int = _field(32, "ViT blocks")
    hidden_size: int = _field(1280, "ViT width")
    num_heads: int = _field(16, "ViT attention heads")
    intermediate_size: int = _field(3420, "ViT MLP width")
    patch_size: int = _field(14, "ViT patch side in pixels")
    spatial_merge_size: int = _field(2, "PatchMerger groups merge x merge patches into one LLM token")
    window_size: int = _field(112, "ViT window-attention side in pixels")
    fullatt_blocks: tuple = _field((7, 15, 23, 31), "ViT blocks with full attention, e.g. 7,15,23,31 (the others "
                                   "use window attention)")
    rope_theta: float = _field(10000.0, "ViT 2D rotary base")
    rms_norm_eps: float = _field(1e-6, "ViT RMSNorm epsilon")

    def __post_init__(self):
        self.fullatt_blocks = tuple(self.fullatt_blocks)
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size or head_dim % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must give "
                             "a head_dim divisible by 4 (2D rotary: half rows, half columns)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"vision window_size {self.window_size} is not a multiple of patch_size * "
                             f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")

    @property
    def window_units(self):
        """A window's side in merge groups (= LLM tokens)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)


# the decoder layouts of published LLMs this file computes (convert.py maps their checkpoints)
FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "deepseek_v3", "llama", "mistral")


@dataclass
class TextConfig:
    vocab_size: int = _field(151936, "decoder vocabulary")
    hidden_size: int = _field(4096, "decoder width")
    num_layers: int = _field(36, "decoder layers")
    num_heads: int = _field(32, "decoder query heads")
    num_kv_heads: int = _field(8, "decoder key/value heads (GQA)")
    head_dim: int = _field(128, "decoder head dimension")
    intermediate_size: int = _field(12288, "decoder MLP width")
    qk_norm: bool = _field(True, "Qwen3 per-head RMSNorm on q and k before rotary")
    qkv_bias: bool = _field(False, "Qwen2 bias on q/k/v")
    tie_word_embeddings: bool = _field(False, "share input embedding and output head")
    rope_theta: float = _field(1000000.0, "decoder rotary base")
    mrope_section: tuple | None = _field(None, "M-RoPE (t,h,w) split of head_dim/2 (Qwen2-VL), or none: 1D rotary")
    rms_norm_eps: float = _field(1e-6, "decoder RMSNorm epsilon")
    rope_scaling: dict | None = _field(None, 'YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", '
                                       '"beta_fast", "beta_slow", "mscale", "mscale_all_dim"} (DeepSeek-V3), or '
                                       '{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", '
                                       '"original_max_position_embeddings"} (Llama 3.1)')
    # "mla": DeepSeek-V3 §2.1.1 multi-head latent attention (num_kv_heads, head_dim, qk_norm unused)
    attention: str = _field("gqa", "decoder attention: gqa or mla")
    q_lora_rank: int | None = _field(None, "MLA query latent rank (none: full-rank query projection)")
    kv_lora_rank: int = _field(512, "MLA key/value latent rank")
    qk_nope_head_dim: int = _field(128, "MLA query/key dims without rotary")
    qk_rope_head_dim: int = _field(64, "MLA decoupled rotary dims (the rotary key is shared by all heads)")
    v_head_dim: int = _field(128, "MLA value head dimension")
    # mixture of experts (DeepSeek-V3 §2.1.2)
    n_routed_experts: int = _field(0, "MoE routed experts (0: every FFN dense)")
    n_shared_experts: int = _field(0, "MoE shared experts")
    num_experts_per_tok: int = _field(8, "MoE routed experts per token")
    moe_intermediate_size: int = _field(2048, "MoE expert MLP width")
    first_k_dense: int = _field(0, "MoE: the first layers keep a dense FFN (DeepSeek-V3)")
    n_group: int = _field(1, "MoE group-limited routing: experts in this many groups")
    topk_group: int = _field(1, "MoE group-limited routing: top-k within the best topk_group groups")
    scoring: str = _field("sigmoid", "MoE expert affinities: sigmoid (DeepSeek-V3) or softmax (Qwen3-MoE)")
    norm_topk_prob: bool = _field(True, "MoE gate values = top-k affinities normalised to sum 1")
    routed_scaling_factor: float = _field(1.0, "MoE: times the gate values (2.5 in DeepSeek-V3)")
    bias_update_speed: float = _field(0.001, "MoE balancing bias step per optimizer step (DeepSeek-V3 §2.1.2 gamma)")
    seq_aux_loss_coef: float = _field(0.0, "MoE sequence-wise balance loss (DeepSeek-V3 eq. 17 alpha; 0 = off)")
    family: str | None = _field(None, f"decoder family, whose layout import, export and chat format follow: "
                                f"{', '.join(FAMILIES)} (none: inferred from the fields above)")

    def __post_init__(self):
        if self.family is None:  # the family whose layout these fields describe (saved explicitly in config.json)
            self.family = ("deepseek_v3" if self.attention == "mla" else "qwen3_moe" if self.n_routed_experts
                           else "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: choose from {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention {self.attention!r}: choose 'gqa' or 'mla'")
        if self.attention == "mla" and self.mrope_section is not None:
            raise ValueError("attention 'mla' with M-RoPE (mrope_section) is not supported")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("yarn", "llama3"):
            raise ValueError(f"rope_scaling {self.rope_scaling}: only types 'yarn' and 'llama3' are supported")
        if self.scoring not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring {self.scoring!r}: choose 'sigmoid' or 'softmax'")
        E, G = self.n_routed_experts, self.n_group
        if E and (E % G or not 1 <= self.topk_group <= G or (G > 1 and E // G < 2)
                  or not 1 <= self.num_experts_per_tok <= self.topk_group * E // G):
            raise ValueError(f"MoE routing: {E} experts in n_group {G} groups (>= 2 experts each), topk_group "
                             f"{self.topk_group} and num_experts_per_tok {self.num_experts_per_tok} must fit")
        if self.mrope_section is not None:
            self.mrope_section = tuple(self.mrope_section)
            if sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = "
                                 f"{self.head_dim // 2}")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_pad_id: int = _field(151655, "token id of <|image_pad|>: one placeholder per merged image token")

    @staticmethod
    def from_dict(d):
        # how a model runs (MLLM's arguments) is not its shape; older checkpoints saved it here: ignored
        d = {k: v for k, v in d.items() if k not in ("z_loss", "activation_checkpointing", "attn_backend")}
        return ModelConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # CPU-sized: a few million parameters, byte-level tokenizer ids (data.Tokenizer), 1D rotary
    "tiny": {
        "vision": {"depth": 2, "hidden_size": 96, "num_heads": 4, "intermediate_size": 256,
                   "window_size": 56, "fullatt_blocks": (1,)},
        "text": {"vocab_size": 262, "hidden_size": 192, "num_layers": 4, "num_heads": 6, "num_kv_heads": 2,
                 "head_dim": 32, "intermediate_size": 512, "tie_word_embeddings": True, "rope_theta": 10000.0},
        "image_pad_id": 261,
    },
    # MindVL-8B's shapes: Qwen2.5-VL's 675M vision tower + Qwen3-8B
    "qwen2.5-vit-675m+qwen3-8b": {
        "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                   "window_size": 112, "fullatt_blocks": (7, 15, 23, 31)},
        "text": {"vocab_size": 151936, "hidden_size": 4096, "num_layers": 36, "num_heads": 32, "num_kv_heads": 8,
                 "head_dim": 128, "intermediate_size": 12288, "qk_norm": True, "qkv_bias": False,
                 "tie_word_embeddings": False, "rope_theta": 1000000.0},
        "image_pad_id": 151655,
    },
    # CPU-sized DeepSeek-V3-style decoder: MLA, a dense first layer, then shared + group-routed experts
    "tiny-moe": {
        "vision": {"depth": 2, "hidden_size": 96, "num_heads": 4, "intermediate_size": 256,
                   "window_size": 56, "fullatt_blocks": (1,)},
        "text": {"vocab_size": 262, "hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4,
                 "intermediate_size": 384, "qk_norm": False, "tie_word_embeddings": True, "rope_theta": 10000.0,
                 "attention": "mla", "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
                 "qk_rope_head_dim": 16, "v_head_dim": 32,
                 "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 96, "first_k_dense": 1, "n_group": 4, "topk_group": 2,
                 "scoring": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 1.0,
                 "bias_update_speed": 0.001, "seq_aux_loss_coef": 0.0001},
        "image_pad_id": 261,
    },
    # MindVL-671B-A37B's shapes: the Qwen2.5-ViT + DeepSeek-V3 (DeepSeek-V3 §4.2 hyper-parameters)
    "qwen2.5-vit-675m+deepseek-v3": {
        "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                   "window_size": 112, "fullatt_blocks": (7, 15, 23, 31)},
        "text": {"vocab_size": 129280, "hidden_size": 7168, "num_layers": 61, "num_heads": 128,
                 "num_kv_heads": 128, "intermediate_size": 18432, "qk_norm": False, "tie_word_embeddings": False,
                 "rope_theta": 10000.0, "attention": "mla", "q_lora_rank": 1536, "kv_lora_rank": 512,
                 "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                 "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                 "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 2048, "first_k_dense": 3, "n_group": 8, "topk_group": 4,
                 "scoring": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                 "bias_update_speed": 0.001, "seq_aux_loss_coef": 0.0001},
        "image_pad_id": 129279,  # a spare id of DeepSeek-V3's padded vocabulary; MindVL's own id is unpublished
    },
}


def config_from_preset(name, **overrides):
    """PRESETS[name] with overrides: top-level fields (image_pad_id=...) or nested ones as "text.num_layers"=...
    (pass those as **{"text.num_layers": 2})."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    d = {"vision": dict(PRESETS[name]["vision"]), "text": dict(PRESETS[name]["text"]),
         **{k: v for k, v in PRESETS[name].items() if k not in ("vision", "text")}}
    for key, value in overrides.items():
        section, _, sub = key.rpartition(".")
        if section:
            if section not in ("vision", "text"):
                raise ValueError(f"override {key!r}: section must be 'vision' or 'text'")
            d[section][sub] = value
        else:
            d[key] = value
    return ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward (Qwen2/Qwen3 decoder without bias, Qwen2.5-ViT with bias)."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _max_len(cu_seqlens):
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares: rotary cos/sin of the tokens, the boundaries of the
    packed samples (ViT: images or windows) and the longest, and during generation the KV cache."""
    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cache: "KVCache | None" = None
    split: "parallel.SequenceSplit | None" = None  # context parallelism (cos/sin: this rank's tokens only)


def _run_block(block, use_checkpoint, *args):
    """One block, or the same block recomputed in backward (activation checkpointing) when training."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def compile_blocks(model):
    """torch.compile every ViT block and decoder layer in place (regional compilation: the blocks of a kind
    share one compiled graph, weights are its inputs), with dynamic shapes so packed lengths that change every
    step reuse it. Attention runs eagerly between a block's two graphs (kernels.varlen_attention: per-sample
    bounds are data; its backends are fused kernels already). State dict names are unchanged."""
    # after attention, resume inside the block's frame: otherwise the layer's attention module becomes a frame
    # of its own, guarded on its layer index, and recompiles for every layer
    torch._dynamo.config.nested_graph_breaks = True
    for block in [*model.vision.blocks, *model.decoder.layers]:
        block.compile(dynamic=True)
    return model


# ----------------------------------------------------------------------------- vision encoder (Qwen2.5-ViT)


def vision_layout(image_grid, merge, window_units, device):
    """Token bookkeeping for a batch of images whose patches arrive in Qwen2-VL order (each merge x merge
    group contiguous, groups row-major). Returns (rows, cols) patch coordinates for 2D rotary, the token
    permutation that puts each window's merge groups together (Qwen2.5-VL window attention: windows
    row-major, groups row-major inside a window), and cu_seqlens over images and over windows."""
    rows, cols, order = [], [], []
    cu_images, cu_windows = [0], [0]
    groups_before = 0
    for i, (t, h, w) in enumerate(image_grid.tolist()):
        if t != 1 or h % merge or w % merge:
            raise ValueError(f"image_grid[{i}] = {(t, h, w)}: need t == 1 and h, w multiples of {merge}")
        gh, gw = h // merge, w // merge
        r = torch.arange(h)[:, None].expand(h, w)
        c = torch.arange(w)[None, :].expand(h, w)
        rows.append(r.reshape(gh, merge, gw, merge).permute(0, 2, 1, 3).flatten())
        cols.append(c.reshape(gh, merge, gw, merge).permute(0, 2, 1, 3).flatten())
        groups = torch.arange(gh * gw).view(gh, gw) + groups_before
        for r0 in range(0, gh, window_units):
            for c0 in range(0, gw, window_units):
                window = groups[r0:r0 + window_units, c0:c0 + window_units].flatten()
                order.append(window)
                cu_windows.append(cu_windows[-1] + window.numel() * merge * merge)
        cu_images.append(cu_images[-1] + h * w)
        groups_before += gh * gw
    group_order = torch.cat(order)
    token_order = (group_order[:, None] * merge * merge + torch.arange(merge * merge)).flatten()
    as_cu = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return (torch.cat(rows).to(device), torch.cat(cols).to(device), token_order.to(device),
            as_cu(cu_images), as_cu(cu_windows))


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig, backend):
        super().__init__()
        self.num_heads, self.backend = c.num_heads, backend
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x, a: AttentionInputs):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        q, k = apply_rope(q, a.cos, a.sin), apply_rope(k, a.cos, a.sin)
        out = varlen_attention(q, k, v, a.cu_seqlens, a.max_seqlen, causal=False, backend=self.backend)
        return self.proj(out.flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig, backend):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = VisionAttention(c, backend)
        self.norm2 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, a: AttentionInputs):
        x = x + self.attn(self.norm1(x), a)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Qwen2.5-ViT: native-resolution patches, 2D rotary, window attention except in `fullatt_blocks`.
    (pixel_patches [P, 3*14*14], image_grid [n_img, 3]) -> [P, hidden] in the input's patch order."""

    def __init__(self, config: VisionConfig, attn_backend=None, activation_checkpointing=False):
        super().__init__()
        self.config, self.activation_checkpointing = config, activation_checkpointing
        # a still image: Qwen2.5-VL's Conv3d over 2 repeated frames folds to one linear map (convert.load_hf_vision)
        self.patch_embed = nn.Linear(3 * config.patch_size ** 2, config.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(config, attn_backend) for _ in range(config.depth))
        self.apply(_init_weights)

    def rotary(self, rows, cols):
        """2D rotary (Qwen2-VL): the first half of each head's frequencies rotate by row, the second by column."""
        head_dim = self.config.hidden_size // self.config.num_heads
        half = head_dim // 2
        inv_freq = 1.0 / self.config.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32, device=rows.device) / half)
        freqs = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_patches, image_grid):
        c = self.config
        if int(image_grid.prod(-1).sum()) != pixel_patches.shape[0]:
            raise ValueError(f"image_grid {image_grid.tolist()} covers {int(image_grid.prod(-1).sum())} patches "
                             f"but pixel_patches has {pixel_patches.shape[0]}")
        rows, cols, order, cu_images, cu_windows = vision_layout(
            image_grid, c.spatial_merge_size, c.window_units, pixel_patches.device)
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))[order]
        cos, sin = self.rotary(rows[order], cols[order])
        full = AttentionInputs(cos, sin, cu_images, _max_len(cu_images))
        window = AttentionInputs(cos, sin, cu_windows, _max_len(cu_windows))
        for i, block in enumerate(self.blocks):
            x = _run_block(block, self.activation_checkpointing, x, full if i in c.fullatt_blocks else window)
        return x[torch.argsort(order)]


class PatchMerger(nn.Module):
    """The MLP connector: RMSNorm, concatenate each 2x2 group of patches, Linear-GELU-Linear to the
    decoder width. [P, d_vision] -> [P/4, out_dim]."""

    def __init__(self, config: VisionConfig, out_dim):
        super().__init__()
        self.group_dim = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc1 = nn.Linear(self.group_dim, self.group_dim)
        self.fc2 = nn.Linear(self.group_dim, out_dim)
        self.apply(_init_weights)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).view(-1, self.group_dim))))


# ----------------------------------------------------------------------------- decoder (Qwen2 / Qwen3)


def yarn_mscale(factor, mscale=1.0):
    """YaRN (Peng et al. 2023) attention temperature: 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim, theta, scaling=None):
    """Rotary inverse frequencies [dim/2] and the factor cos/sin are scaled by, with optional YaRN scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if scaling is None:
        return inv_freq, 1.0
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    if scaling["type"] == "llama3":  # Llama 3.1: wavelengths past original/low slowed by `factor`, below
        # original/high kept, a linear ramp in 1/wavelength between; no temperature
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        smooth = ((original * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        return inv_freq / factor * (1 - smooth) + inv_freq * smooth, 1.0

    def dim_of(rotations):  # YaRN eq. 17: the dimension that turns `rotations` times over the original length
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(dim_of(scaling.get("beta_fast", 32))), 0)
    high = min(math.ceil(dim_of(scaling.get("beta_slow", 1))), dim - 1)
    # YaRN §3.2 "NTK-by-parts": interpolate low frequencies by `factor`, keep high ones, ramp in between
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # DeepSeek's variant: the rest of the temperature goes on q.k (see MLA)
        return inv_freq, yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return inv_freq, yarn_mscale(factor)


def rope_cos_sin(position_ids, head_dim, theta, mrope_section, scaling=None):
    """cos/sin [T, head_dim] for 1D positions [T] or M-RoPE positions [3, T] (t, h, w)."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    if position_ids.dim() == 2:
        if mrope_section is None:
            raise ValueError("position_ids [3, T] (M-RoPE) given but the text config has mrope_section=None")
        # Qwen2-VL M-RoPE: consecutive frequency bands rotate by temporal, height, width position
        freqs = torch.cat([f[i] for i, f in enumerate(freqs.split(mrope_section, dim=-1))], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


class KVCache:
    """Keys/values of each layer in a buffer [samples, capacity, heads, dim] that grows by doubling; sample b's
    first `lens[b]` rows are its keys. Each decoder call first `extend`s the lengths by that call's packed
    tokens; each layer then `attend`s: it writes its new keys in place (a decoding step writes one row per
    sample, the cache is never copied) and attends over the buffer (the first call: over its packed tokens)."""

    def __init__(self, num_layers):
        self.k, self.v = [None] * num_layers, [None] * num_layers
        self.lens = None

    def extend(self, cu_seqlens_new):
        """Where this call's tokens (cu_seqlens_new over them) go: after each sample's cached ones."""
        new_lens = (cu_seqlens_new[1:] - cu_seqlens_new[:-1]).long()
        self.first = self.lens is None
        old_lens = torch.zeros_like(new_lens) if self.first else self.lens
        sample = torch.repeat_interleave(torch.arange(len(new_lens), device=new_lens.device), new_lens)
        within = torch.arange(len(sample), device=new_lens.device) - cu_seqlens_new[:-1].long()[sample]
        self.rows = (sample, old_lens[sample] + within)
        self.lens = old_lens + new_lens
        self.longest = int(self.lens.max())

    def _store(self, cache, layer, new):
        buf = cache[layer]
        if buf is None or buf.shape[1] < self.longest:
            grown = new.new_zeros(len(self.lens), max(self.longest, 2 * (0 if buf is None else buf.shape[1])),
                                  *new.shape[1:])
            if buf is not None:
                grown[:, :buf.shape[1]] = buf
            cache[layer] = buf = grown
        buf[self.rows] = new
        return buf[:, :self.longest]

    def attend(self, layer, q, k, v, a: AttentionInputs, backend, scale=None):
        """Causal attention of this call's queries (packed, cu_seqlens) over each sample's cached + new keys."""
        kb, vb = self._store(self.k, layer, k), self._store(self.v, layer, v)
        if self.first:  # the prompts: their own packed keys are all there is
            return varlen_attention(q, k, v, a.cu_seqlens, a.max_seqlen, causal=True, backend=backend, scale=scale)
        if q.shape[0] != len(self.lens):
            raise ValueError(f"KVCache: after the prompts, one new token per sample ({len(self.lens)}), got "
                             f"{q.shape[0]}")
        return decode_attention(q, kb, vb, self.lens, scale)


def causal_attention(q, k, v, a: AttentionInputs, layer_idx, backend, scale=None):
    """Causal attention within each packed sample, or (generating) over its cached keys and the new ones."""
    if a.cache is not None:
        return a.cache.attend(layer_idx, q, k, v, a, backend, scale)
    if a.split is not None:  # Ulysses: this rank's heads over every token, so the kernel sees whole samples
        q, k, v = a.split.to_heads(q), a.split.to_heads(k), a.split.to_heads(v)
        out = varlen_attention(q, k, v, a.cu_seqlens, a.max_seqlen, causal=True, backend=backend, scale=scale)
        return a.split.to_tokens(out)
    return varlen_attention(q, k, v, a.cu_seqlens, a.max_seqlen, causal=True, backend=backend, scale=scale)


class Attention(nn.Module):
    """GQA with optional qkv bias (Qwen2) and optional per-head QK-norm (Qwen3), varlen over the packed stream."""

    def __init__(self, c: TextConfig, layer_idx, backend=None):
        super().__init__()
        self.layer_idx, self.backend = layer_idx, backend
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, a: AttentionInputs):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, a.cos, a.sin), apply_rope(k, a.cos, a.sin)
        return self.o_proj(causal_attention(q, k, v, a, self.layer_idx, self.backend).flatten(1))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3 §2.1.1 MLA: queries and keys/values pass through low-rank latents (q_lora_rank,
    kv_lora_rank); rotary position sits on separate qk_rope_head_dim dims whose key is shared by all heads.
    Rotary dims are in the half-split layout (convert.load_hf_decoder converts DeepSeek's interleaved one)."""

    def __init__(self, c: TextConfig, layer_idx, backend=None):
        super().__init__()
        self.layer_idx, self.num_heads, self.c, self.backend = layer_idx, c.num_heads, c, backend
        qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_heads * qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, c.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.scale = qk_head_dim ** -0.5
        if c.rope_scaling and c.rope_scaling.get("mscale_all_dim"):  # YaRN temperature, DeepSeek-V3's split
            self.scale *= yarn_mscale(c.rope_scaling["factor"], c.rope_scaling["mscale_all_dim"]) ** 2

    def forward(self, x, a: AttentionInputs):
        c, T, H = self.c, x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        # sizes spelled out: under context parallelism a rank's share of a short micro-batch may be empty
        q_nope, q_rope = q.view(T, H, c.qk_nope_head_dim + c.qk_rope_head_dim).split(
            [c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(T, H, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, a.cos, a.sin)], dim=-1)
        k = torch.cat([k_nope, apply_rope(k_rope[:, None], a.cos, a.sin).expand(T, H, -1)], dim=-1)
        v = F.pad(v, (0, q.shape[-1] - c.v_head_dim))  # varlen attention wants one head_dim for q, k, v
        out = causal_attention(q, k, v, a, self.layer_idx, self.backend, self.scale)
        return self.o_proj(out[..., :c.v_head_dim].flatten(1))


class MoEGate(nn.Module):
    """DeepSeek-V3 §2.1.2 routing. Returns gate values [T, k], chosen experts [T, k], affinities [T, E]."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        # DeepSeek-V3 §2.1.2: a per-expert bias moved by load after each step, not by gradient (a buffer)
        self.register_buffer("expert_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x):
        c, T = self.c, x.shape[0]
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias.float()  # DeepSeek-V3 §2.1.2: the bias only affects routing
        if c.n_group > 1:  # group-limited routing: a group's affinity is the sum of its top-2 experts'
            choice = choice.view(T, c.n_group, c.n_routed_experts // c.n_group)
            best_groups = choice.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
            dropped = torch.ones(T, c.n_group, dtype=torch.bool, device=x.device).scatter_(1, best_groups, False)
            choice = choice.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        experts = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)  # DeepSeek-V3 eq. 13: gate values from s, not s + b
        if c.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * c.routed_scaling_factor, experts, scores


class MoE(nn.Module):
    """DeepSeek-V3 eq. 12: h + sum of shared experts + sum over the top-k routed experts of g_i * FFN_i.
    Routed experts run on the tokens sorted by expert, one grouped matmul per projection; the step's
    token counts per expert (`load`) feed update_expert_bias, and an optional sequence-wise balance loss
    (DeepSeek-V3 eq. 17-20) is left in `balance_loss` for MLLM.forward."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.c = c
        E, D, I = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.gate = MoEGate(c)
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * I))  # [expert, in, out]: grouped_mm's layout
        self.down_proj = nn.Parameter(torch.empty(E, I, D))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.shared_experts = MLP(D, I * c.n_shared_experts, bias=False) if c.n_shared_experts else None
        self.load = self.step_load = self.balance_loss = None
        # expert parallelism: parallel.shard_experts keeps this rank's experts only and sets a function
        # (rows sorted by expert, counts per expert, self.experts) -> rows that runs them on their owners' ranks
        self.expert_dispatch = None

    def forward(self, x, cu_seqlens, split=None):
        c = self.c
        weights, experts, scores = self.gate(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)                    # (token, slot) pairs sorted by expert
        token = order // c.num_experts_per_tok
        counts = torch.bincount(flat, minlength=c.n_routed_experts)
        if self.expert_dispatch is None:
            y = self.experts(x[token], counts)
        else:  # expert parallelism: the rows travel to the ranks that own their experts and come back
            y = self.expert_dispatch(x[token], counts, self.experts)
        y = y * weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.load = counts.detach()
        self.balance_loss = None
        if c.seq_aux_loss_coef > 0 and torch.is_grad_enabled():
            self.balance_loss = c.seq_aux_loss_coef * sequence_balance_loss(scores, experts, cu_seqlens, split)
        return out

    def experts(self, x, counts):
        """The routed experts this module holds on rows sorted by expert, `counts` rows each."""
        gate, up = grouped_mm(x, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_mm(swiglu(gate, up), self.down_proj, counts)


def sequence_balance_loss(scores, experts, cu_seqlens, split=None):
    """DeepSeek-V3 eq. 17-20 per packed sample, averaged over samples: sum_i f_i P_i, with f_i = E/(k T) *
    (tokens choosing expert i) and P_i the mean over the sample of affinities normalised per token.
    Context parallelism (`split`): scores are this rank's tokens; the sums over a sample add up over the group."""
    E, k, B = scores.shape[1], experts.shape[1], len(cu_seqlens) - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sample = torch.repeat_interleave(torch.arange(B, device=scores.device), lengths)
    if split is not None:
        sample = sample[split.lo:split.hi]
    chosen = torch.zeros_like(scores).scatter_(1, experts, 1.0)
    f = scores.new_zeros(B, E).index_add_(0, sample, chosen) * E / k
    p = scores.new_zeros(B, E).index_add_(0, sample, scores / scores.sum(-1, keepdim=True))
    if split is not None:
        f, p = split.all_reduce(f), split.all_reduce(p)
    return ((f * p).sum(-1) / lengths.clamp_min(1) ** 2).mean()


@torch.no_grad()
def update_expert_bias(model, gamma, all_reduce_sum=None):
    """DeepSeek-V3 §2.1.2, after each optimizer step: b_i += gamma * sign(mean load - load_i), the load being
    the tokens routed to expert i over the step's micro-batches, summed over data-parallel ranks (the
    trainer passes parallel.all_reduce_sum) so all replicas keep the same biases."""
    for m in model.modules():
        if isinstance(m, MoE) and m.step_load is not None:
            load = m.step_load.float()
            if all_reduce_sum is not None:
                load = all_reduce_sum(load)
            m.gate.expert_bias += gamma * torch.sign(load.mean() - load)
            m.step_load = None


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer_idx, backend=None):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = (MultiHeadLatentAttention if c.attention == "mla" else Attention)(c, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.n_routed_experts and layer_idx >= c.first_k_dense:
            self.mlp = MoE(c)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=False)

    def forward(self, x, a: AttentionInputs):
        x = x + self.self_attn(self.input_layernorm(x), a)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, a.cu_seqlens, a.split) if isinstance(self.mlp, MoE) else self.mlp(h))


class Decoder(nn.Module):
    """Qwen3-style (or Qwen2 with qkv_bias, no qk_norm) decoder over a packed stream.
    decoder(input_ids [T], position_ids [T] or [3, T], cu_seqlens, max_seqlen) -> logits [T, V]."""

    def __init__(self, config: TextConfig, attn_backend=None, activation_checkpointing=False):
        super().__init__()
        self.config, self.activation_checkpointing = config, activation_checkpointing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, attn_backend) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def grow_vocab(self, vocab_size, new_ids):
        """Embedding and (untied) head rows for `vocab_size` ids (never fewer than now); the rows of `new_ids`
        (tokens a tokenizer gained) and any rows added past them are set to the mean of the other rows, so a new
        token starts as an average one (the mean input embedding; an output logit that is the mean of the others)."""
        old, new_ids = self.embed_tokens.weight.shape[0], list(new_ids)
        if not new_ids and vocab_size <= old:
            return
        rows = max(vocab_size, old)
        kept = torch.ones(rows, dtype=torch.bool)
        kept[new_ids], kept[old:] = False, False

        def grown(w):
            out = w.new_empty(rows, w.shape[1])
            out[:old] = w
            out[~kept] = w[kept[:old]].mean(0)  # the added tokens' rows, and any new padded rows
            return nn.Parameter(out, requires_grad=w.requires_grad)
        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = self.config.vocab_size = rows
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = rows
        self.tie_weights()

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen, inputs_embeds=None, cache=None,
                      split=None):
        """Final-norm hidden states [T, d] (the head is applied by the caller: logits or a chunked loss).
        Context parallelism (`split`): the inputs and outputs are this rank's tokens of the whole stream that
        cu_seqlens describes."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        c = self.config
        rope_dim = c.qk_rope_head_dim if c.attention == "mla" else c.head_dim
        a = AttentionInputs(*rope_cos_sin(position_ids, rope_dim, c.rope_theta, c.mrope_section, c.rope_scaling),
                            cu_seqlens, max_seqlen, cache, split)
        if cache is not None:
            cache.extend(cu_seqlens)
        for layer in self.layers:
            x = _run_block(layer, self.activation_checkpointing, x, a)  # (generation: no grad, no recompute)
        return self.norm(x)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, inputs_embeds=None):
        return self.lm_head(self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, inputs_embeds))


# ----------------------------------------------------------------------------- the MLLM


def next_token_targets(labels, cu_seqlens):
    """Position t's target: labels[t + 1] of the same sample, -100 (no loss) at each sample's last token, so no
    sample learns to predict the next sample's start (labels as data.label_pieces builds them)."""
    targets = torch.roll(labels, -1)
    targets[cu_seqlens[1:].long() - 1] = -100  # a sample's last token has nothing to predict
    return targets


def loss_tokens(batch, lo=0, hi=None):
    """How many of the packed batch's positions lo..hi carry loss: those whose next-token target is not -100
    (the divisor of the token-mean loss)."""
    return int((next_token_targets(batch.labels, batch.cu_seqlens)[lo:hi] != -100).sum())


def next_tokens(logits, temperature=0.0, top_p=1.0, generator=None):
    """Greedy (temperature 0), or a draw from softmax(logits / temperature) within the smallest set of tokens
    whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020). logits [B, V] -> [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits / temperature, -1).sort(-1, descending=True)
    probs[probs.cumsum(-1) - probs >= top_p] = 0  # past the nucleus: the tokens before already reach top_p
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


def own_tokens(split, n_tokens):
    """The range of a packed stream's tokens this rank runs: all, or its share under context parallelism."""
    return (split.lo, split.hi) if split else (0, n_tokens)


class MLLM(nn.Module):
    """vision -> connector -> image features replace <|image_pad|> tokens -> decoder; the loss is on
    next_token_targets of the batch's labels.

    The arguments after `config` say how it runs, not what it is (not saved): the MM1 z-loss coefficient on
    logsumexp^2, activation checkpointing (blocks recomputed in backward), the kernels.varlen_attention
    backend (None: the best for the device)."""

    def __init__(self, config: ModelConfig, z_loss=0.0, activation_checkpointing=False, attn_backend=None):
        super().__init__()
        self.config, self.z_loss = config, z_loss
        flags = dict(attn_backend=attn_backend, activation_checkpointing=activation_checkpointing)
        self.vision = VisionEncoder(config.vision, **flags)
        self.connector = PatchMerger(config.vision, config.text.hidden_size)
        self.decoder = Decoder(config.text, **flags)
        # context parallelism: parallel.shard_context sets a function (tokens) -> parallel.SequenceSplit
        self.split_sequence = None

    def embed(self, batch, split=None):
        """Token embeddings with the merged image features spliced over the <|image_pad|> tokens, in order
        (context parallelism: this rank's tokens, the ViT run on all the micro-batch's images)."""
        lo, hi = own_tokens(split, batch.input_ids.shape[0])
        x = self.decoder.embed_tokens(batch.input_ids[lo:hi])
        is_pad = batch.input_ids == self.config.image_pad_id
        n_pad, n_images = int(is_pad.sum()), batch.image_grid.shape[0]
        n_features = int(batch.image_grid.prod(-1).sum()) // self.config.vision.spatial_merge_size ** 2
        if n_pad != n_features:
            raise ValueError(f"batch has {n_pad} <|image_pad|> tokens (id {self.config.image_pad_id}) but its "
                             f"{n_images} images (image_grid {batch.image_grid.tolist()}) give "
                             f"{n_features} features")
        if n_images == 0:
            if not self.training:
                return x
            # an image-free micro-batch still runs ViT + connector on one blank merge group, added times zero:
            # every rank then issues the same collectives (FSDP gathers, gradient reduction) and a stage that
            # trains only the connector gets a zero gradient instead of a loss with no graph
            c = self.config.vision
            m = c.spatial_merge_size
            blank = x.new_zeros(m * m, 3 * c.patch_size ** 2, dtype=batch.pixel_patches.dtype)
            grid = torch.tensor([[1, m, m]], device=batch.image_grid.device)
            return x + 0.0 * self.connector(self.vision(blank, grid)).sum().to(x.dtype)
        features = self.connector(self.vision(batch.pixel_patches, batch.image_grid))
        before = int(is_pad[:lo].sum())  # the features of pads on earlier ranks' tokens
        return x.masked_scatter(is_pad[lo:hi, None], features[before:].to(x.dtype))

    def hidden_states(self, batch, split=None):
        lo, hi = own_tokens(split, batch.input_ids.shape[0])
        return self.decoder.hidden_states(None, batch.position_ids[..., lo:hi], batch.cu_seqlens, batch.max_seqlen,
                                          inputs_embeds=self.embed(batch, split), split=split)

    def logits(self, batch):
        return self.decoder.lm_head(self.hidden_states(batch))

    def forward(self, batch, loss_divisor=None):
        """(loss, stats): cross-entropy summed over loss tokens, divided by their count (token mean) or by
        `loss_divisor` (the trainer's global count over micro-batches and ranks), plus the MM1 z-loss.
        Under context parallelism the loss and stats are this rank's tokens' share of the micro-batch."""
        split = self.split_sequence(batch.input_ids.shape[0]) if self.split_sequence else None
        lo, hi = own_tokens(split, batch.input_ids.shape[0])
        hidden = self.hidden_states(batch, split)
        targets = next_token_targets(batch.labels, batch.cu_seqlens)[lo:hi]
        # chunked over tokens: [tokens, vocab] fp32 logits never exist at once (8B vocab: 2.4 GB per 4k tokens)
        ce_sum, z_sum = linear_cross_entropy(hidden, self.decoder.lm_head.weight, targets, z_loss=True)
        n_loss = int((targets != -100).sum())  # loss_tokens(batch, lo, hi), from the targets at hand
        # no loss token anywhere (a global divisor of 0): the sums are 0, so is the loss; never a 0 / 0
        divisor = loss_divisor or max(n_loss, 1)
        ce = ce_sum / divisor
        # MM1: z-loss keeps the softmax normaliser near 1; at 0 it stays out of the graph (no backward pass for it)
        z = (self.z_loss * z_sum if self.z_loss else 0.0 * z_sum.detach()) / divisor
        stats = {"ce": ce.item(), "z_loss": z.item(), "n_loss_tokens": n_loss,
                 "n_tokens": hi - lo, "n_images": batch.image_grid.shape[0]}
        return ce + z + self._moe_terms(n_loss / divisor, stats), stats

    def _moe_terms(self, weight, stats):
        """After a forward: the MoE layers' balance loss (times `weight`, so micro-batches add up like the
        cross-entropy), their token counts added to the step's load for update_expert_bias, and the load
        spread (max / mean tokens per expert; 1 = balanced) per layer and on average into `stats`."""
        moe = {i: layer.mlp for i, layer in enumerate(self.decoder.layers) if isinstance(layer.mlp, MoE)}
        if not moe:
            return 0.0
        loads = torch.stack([m.load for m in moe.values()]).float()
        spread = (loads.amax(1) / loads.mean(1).clamp_min(1e-9)).tolist()
        stats["moe_load_spread"] = sum(spread) / len(spread)
        stats |= {f"moe_load_spread.{i}": x for i, x in zip(moe, spread)}
        if self.training:
            for m in moe.values():
                m.step_load = m.load if m.step_load is None else m.step_load + m.load
        losses = [m.balance_loss for m in moe.values() if m.balance_loss is not None]
        if not losses:
            return 0.0
        balance = sum(losses) * weight
        stats["balance_loss"] = balance.item()
        return balance

    @torch.no_grad()
    def generate(self, batch, max_new_tokens, stop_ids=(), vocab_size=None, temperature=0.0, top_p=1.0,
                 generator=None, on_token=None):
        """Decoding of every prompt in the packed batch at once with a KV cache: greedy, or sampled (next_tokens).
        Returns the new tokens per prompt, up to (not including) the first stop id; `on_token(sample, id)` sees
        each as it comes (streaming). Ids at or past `vocab_size` (the embedding's padded rows: no token of the
        tokenizer) are never chosen. Positions continue per sample from its largest position + 1 (for M-RoPE
        all three sections alike, as Qwen2-VL does)."""
        cu = batch.cu_seqlens
        lens = cu[1:] - cu[:-1]
        if (lens == 0).any():
            raise ValueError(f"generate: empty prompt at sample index {int((lens == 0).nonzero()[0])}")
        B, stop = len(lens), set(stop_ids)
        sample_of = torch.repeat_interleave(torch.arange(B, device=cu.device), lens.long())
        flat_pos = batch.position_ids if batch.position_ids.dim() == 1 else batch.position_ids.amax(0)
        next_pos = torch.zeros(B, dtype=torch.long, device=cu.device).scatter_reduce(
            0, sample_of, flat_pos.long(), "amax", include_self=False) + 1
        cache = KVCache(len(self.decoder.layers))
        hidden = self.decoder.hidden_states(None, batch.position_ids, cu, batch.max_seqlen,
                                            inputs_embeds=self.embed(batch), cache=cache)[cu[1:].long() - 1]
        one_each = torch.arange(B + 1, dtype=torch.int32, device=cu.device)
        out, done = [[] for _ in range(B)], [False] * B
        for step in range(max_new_tokens):
            logits = self.decoder.lm_head(hidden).float()
            if vocab_size is not None and vocab_size < logits.shape[-1]:
                logits[:, vocab_size:] = float("-inf")
            tokens = next_tokens(logits, temperature, top_p, generator)
            for b, t in enumerate(tokens.tolist()):
                done[b] = done[b] or t in stop
                if not done[b]:
                    out[b].append(t)
                    if on_token is not None:
                        on_token(b, t)
            if all(done) or step == max_new_tokens - 1:
                break
            pos = next_pos + step
            if batch.position_ids.dim() == 2:
                pos = pos.expand(3, B)
            hidden = self.decoder.hidden_states(tokens, pos, one_each, 1, cache=cache)
        return out

    def save_pretrained(self, path):
        """`model.safetensors` (our key names, tied weights once) + `config.json`."""
        write_checkpoint(path, named_state(self), self.config.to_dict())

    @staticmethod
    def from_pretrained(path, **runtime):
        """Our checkpoint directory; `runtime`: MLLM's z_loss, activation_checkpointing, attn_backend."""
        config = ModelConfig.from_dict(read_json(os.path.join(path, "config.json")))
        with torch.device("meta"):
            model = MLLM(config, **runtime)
        file = os.path.join(path, "model.safetensors")
        assign_state(model, read_safetensors(file), file)
        return model


def count_parameters(config: ModelConfig):
    """Parameter count (tied weights once), built on the meta device so real shapes cost no memory."""
    return parameter_counts(config)["total"]


def parameter_counts(config: ModelConfig):
    """{"total", "activated", "vision" (ViT + connector), "decoder", "decoder_activated"} on the meta device.
    Activated = what one token runs through: everything but the routed experts it does not pick. DeepSeek-V3's
    MTP module (DeepSeek-V3 §2.2) is not built, so not counted; its "671B total, 37B activated" excludes it too."""
    with torch.device("meta"):
        model = MLLM(config)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    vision = sum(p.numel() for p in model.parameters()) - decoder
    idle = sum((m.gate_up_proj.numel() + m.down_proj.numel()) * (1 - m.c.num_experts_per_tok / m.c.n_routed_experts)
               for m in model.decoder.modules() if isinstance(m, MoE))
    return {"total": vision + decoder, "activated": vision + decoder - int(idle), "vision": vision,
            "decoder": decoder, "decoder_activated": decoder - int(idle)}


# ----------------------------------------------------------------------------- FLOPs


def _decoder_layer_weights(t: TextConfig, layer_idx):
    """Matmul weights one token runs through in decoder layer `layer_idx`: the attention projections (MLA:
    its low-rank latents) and the FFN's activated part (MoE: router, shared and num_experts_per_tok routed
    experts, DeepSeek-V3 eq. 12)."""
    D, H = t.hidden_size, t.num_heads
    if t.attention == "mla":
        qk = t.qk_nope_head_dim + t.qk_rope_head_dim
        q = (D + H * qk) * t.q_lora_rank if t.q_lora_rank else D * H * qk
        attn = (q + D * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank * H * (t.qk_nope_head_dim + t.v_head_dim)
                + H * t.v_head_dim * D)
    else:
        attn = D * t.head_dim * (2 * H + 2 * t.num_kv_heads)
    if t.n_routed_experts and layer_idx >= t.first_k_dense:
        return attn + D * t.n_routed_experts + 3 * D * t.moe_intermediate_size * (
            t.n_shared_experts + t.num_experts_per_tok)
    return attn + 3 * D * t.intermediate_size


def _squares(cu_seqlens):
    return float(((cu_seqlens[1:] - cu_seqlens[:-1]).double() ** 2).sum())


def model_flops(config: ModelConfig, batch, trains=("vision", "connector", "decoder")):
    """{"forward", "backward"} model FLOPs of MLLM.forward + backward on `batch` with the module groups `trains`
    trainable, after PaLM (Chowdhery et al. 2022, App. B): a matmul with N weights costs 2N per token forward,
    2N for its input's gradient and 2N for its weights' (only when they train); embeddings and norms are not
    matmuls. MoE layers count the activated experts only. Attention over a sample of s tokens costs
    2 s^2 heads (d_qk + d_v) forward (QK^T and PV; MLA: d_qk = nope + rope dims, d_v = v_head_dim), without
    the causal half (PaLM's convention), and twice that backward (dQ, dK, dV, dP). Recomputation (activation
    checkpointing, the chunked loss's logits for a z-loss) is not counted: model FLOPs, not hardware FLOPs."""
    v, t = config.vision, config.text
    tokens, patches = float(batch.input_ids.shape[0]), float(batch.image_grid.prod(-1).sum())
    n_loss = float(loss_tokens(batch))
    # decoder: layers over every token, the head over the loss tokens only (the chunked loss)
    dec_w = sum(_decoder_layer_weights(t, i) for i in range(t.num_layers)) * tokens
    qk, vd = (t.qk_nope_head_dim + t.qk_rope_head_dim, t.v_head_dim) if t.attention == "mla" else (t.head_dim,) * 2
    dec_attn = 2 * t.num_layers * t.num_heads * (qk + vd) * _squares(batch.cu_seqlens)
    head_w = t.hidden_size * t.vocab_size * n_loss
    # vision: patch embedding, blocks (window attention but in fullatt_blocks), PatchMerger per merged token
    dv, m2 = v.hidden_size, v.spatial_merge_size ** 2
    embed_w = 3 * v.patch_size ** 2 * dv * patches
    vis_w = v.depth * (4 * dv * dv + 3 * dv * v.intermediate_size) * patches
    conn_w = (dv * m2 * dv * m2 + dv * m2 * t.hidden_size) * patches / m2
    vis_attn = 0.0
    if patches:
        _, _, _, cu_images, cu_windows = vision_layout(
            batch.image_grid.cpu(), v.spatial_merge_size, v.window_units, "cpu")
        n_full = len(v.fullatt_blocks)
        vis_attn = 4 * dv * (n_full * _squares(cu_images) + (v.depth - n_full) * _squares(cu_windows))
    forward = 2 * (dec_w + head_w + embed_w + vis_w + conn_w) + dec_attn + vis_attn
    # backward: input gradients wherever something trainable lies upstream (the connector's own RMSNorm gain
    # counts: it sits before fc1), weight gradients of the trained groups; pixels take no gradient
    vision, connector, decoder = ("vision" in trains), ("connector" in trains), ("decoder" in trains)
    backward = 0.0
    if vision:
        backward += 2 * (embed_w + vis_w) + 2 * vis_w + 2 * vis_attn
    if vision or connector:
        backward += 2 * conn_w * (1 + connector)
    if decoder or vision or connector:
        backward += 2 * dec_w * (1 + decoder) + 2 * dec_attn + 2 * head_w * (1 + decoder)
    return {"forward": forward, "backward": backward}


# ----------------------------------------------------------------------------- checkpoints


def named_state(module):
    """Parameters and buffers by name; a tied weight appears once, under its first name."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def assign_state(module, state, where):
    """Load `state` (our names) into `module` (possibly on meta) exactly; missing/unexpected keys name `where`."""
    expected = named_state(module)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, model expects "
                             f"{tuple(expected[name].shape)}")
    module.load_state_dict(state, strict=False, assign=True)
    for m in module.modules():
        if isinstance(m, Decoder):
            m.tie_weights()
