"""model.py against transformers' Qwen2 / Qwen3 / Qwen2.5-VL on tiny random configs (weights through
save_pretrained -> our loaders), packing invisibility, training, checkpoints, KV-cache generation."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from safetensors.torch import load_file, save_file

import convert
import model as M
from conftest import requires
from data import PackedBatch as Batch

transformers = requires("transformers")

PATCH = 3 * 14 * 14
TOL = 1e-4  # max abs logit difference against transformers (fp32)




def image_tokens(grid, pad_id, start_id, end_id):
    return [start_id] + [pad_id] * (grid[1] * grid[2] // 4) + [end_id]


def sample(n_text, grids, pad_id=261, start_id=259, end_id=260, vocab=256):
    """Random text around one image block per grid; labels = tokens except -100 on image tokens."""
    tokens = torch.randint(0, vocab, (n_text,)).tolist()
    for g in grids:
        tokens += image_tokens(g, pad_id, start_id, end_id) + torch.randint(0, vocab, (n_text,)).tolist()
    labels = [-100 if t in (pad_id, start_id, end_id) else t for t in tokens]
    images = [(torch.randn(g[1] * g[2], PATCH), g) for g in grids]
    return tokens, labels, images


def pack(samples, positions=None):
    """Samples (tokens, labels, images) -> one Batch; positions restart at 0 per sample unless given."""
    ids = [torch.tensor(s[0]) for s in samples]
    lens = [len(x) for x in ids]
    images = [im for s in samples for im in s[2]]
    return Batch(
        input_ids=torch.cat(ids), labels=torch.cat([torch.tensor(s[1]) for s in samples]),
        position_ids=torch.cat([torch.arange(n) for n in lens]) if positions is None else positions,
        cu_seqlens=torch.tensor([0] + lens).cumsum(0).to(torch.int32), max_seqlen=max(lens),
        pixel_patches=torch.cat([p for p, _ in images]) if images else torch.zeros(0, PATCH),
        image_grid=torch.tensor([g for _, g in images], dtype=torch.long).view(-1, 3))


def randomize(module, std=0.1):
    """HF inits norms to 1 and biases to 0, which would hide a wrong key mapping: make every tensor random."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.normal_(0, std)


def tiny_model(z_loss=0.0, activation_checkpointing=False, attn_backend=None, **overrides):
    torch.manual_seed(0)
    return M.MLLM(M.config_from_preset("tiny", **overrides), z_loss, activation_checkpointing, attn_backend).eval()


# ----------------------------------------------------------------------------- transformers parity


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    randomize(hf)
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path)
    return path, hf


def decoder_parity(hf, ours, lengths):
    seqs = [torch.randint(0, hf.config.vocab_size, (n,)) for n in lengths]
    with torch.no_grad():
        want = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        got = ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lengths]), cu, max(lengths))
    assert want.abs().max() > 0.5  # logits large enough for the tolerance to mean something
    assert (got - want).abs().max() < TOL


def test_qwen3_decoder_matches_transformers(qwen3_dir):
    path, hf = qwen3_dir
    ours = convert.load_hf_decoder(path).eval()
    assert ours.config.qk_norm and not ours.config.qkv_bias and ours.config.head_dim == 24
    decoder_parity(hf, ours, [13, 7, 20])


def test_qwen2_decoder_sharded_tied_matches_transformers(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                   tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = convert.load_hf_decoder(tmp_path).eval()
    assert ours.config.qkv_bias and not ours.config.qk_norm
    assert ours.lm_head.weight is ours.embed_tokens.weight
    decoder_parity(hf, ours, [9, 16])


def test_hf_loader_names_missing_and_unexpected_keys(qwen3_dir, tmp_path):
    path, _ = qwen3_dir
    tensors = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_norm.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_norm.weight"):
        convert.load_hf_decoder(tmp_path)
    save_file({**tensors, "model.layers.0.mlp.extra": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.0.mlp.extra"):
        convert.load_hf_decoder(tmp_path)


@pytest.fixture(scope="module")
def qwen2_5_vl_dir(tmp_path_factory):
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  window_size=56, fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=299,
                                        video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)
    torch.manual_seed(2)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize(hf)
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    hf.save_pretrained(path)
    return path, hf


def hf_pixels(patches):
    """Our still-image patches [P, 3*14*14] -> Qwen2.5-VL's [P, 3*2*14*14] (the frame repeated in time)."""
    return patches.view(-1, 3, 1, 14, 14).expand(-1, 3, 2, 14, 14).reshape(len(patches), -1)


GRIDS = [(1, 8, 12), (1, 6, 4)]  # 56-pixel windows: 2x2 merge groups, partial windows in both images


def test_qwen2_5_vl_vision_matches_transformers(qwen2_5_vl_dir):
    path, hf = qwen2_5_vl_dir
    vision, merger = convert.load_hf_vision(path)
    patches = torch.randn(sum(h * w for _, h, w in GRIDS), PATCH)
    grid = torch.tensor(GRIDS)
    with torch.no_grad():
        want = hf.model.visual(hf_pixels(patches), grid_thw=grid).pooler_output
        got = merger(vision.eval()(patches, grid))
    assert got.shape == (patches.shape[0] // 4, 64)
    assert (got - want).abs().max() < TOL
    vision.config.window_size = 14 * 2 * 8  # one window per image: window attention must have mattered
    with torch.no_grad():
        assert (merger(vision(patches, grid)) - want).abs().max() > 100 * TOL


def qwen2_5_vl_inputs(hf):
    c = hf.config
    tokens, _, images = sample(5, GRIDS, pad_id=c.image_token_id, start_id=c.vision_start_token_id,
                               end_id=c.vision_end_token_id, vocab=290)
    ids = torch.tensor(tokens)[None]
    grid = torch.tensor(GRIDS)
    mm_types = (ids == c.image_token_id).int()
    positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
    patches = torch.cat([p for p, _ in images])
    return ids, grid, mm_types, positions[:, 0], patches, tokens, images


def test_qwen2_5_vl_whole_model_matches_transformers(qwen2_5_vl_dir):
    path, hf = qwen2_5_vl_dir
    ours = convert.load_hf(path).eval()
    assert ours.config.text.mrope_section == (2, 3, 3)
    ids, grid, mm_types, positions, patches, tokens, images = qwen2_5_vl_inputs(hf)
    batch = pack([(tokens, tokens, images)], positions=positions)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=hf_pixels(patches), image_grid_thw=grid,
                  mm_token_type_ids=mm_types).logits[0]
        got = ours.logits(batch)
    assert want.abs().max() > 0.5
    assert (got - want).abs().max() < TOL


def test_qwen2_5_vl_generate_matches_transformers(qwen2_5_vl_dir):
    path, hf = qwen2_5_vl_dir
    ours = convert.load_hf(path).eval()
    ids, grid, mm_types, positions, patches, tokens, images = qwen2_5_vl_inputs(hf)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=hf_pixels(patches), image_grid_thw=grid,
                           mm_token_type_ids=mm_types, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert len(set(want)) > 2, want
    got = ours.generate(pack([(tokens, tokens, images)], positions=positions), max_new_tokens=12)
    assert got == [want]


# ----------------------------------------------------------------------------- our model


def three_samples():
    return [sample(7, [(1, 4, 6)]), sample(11, []), sample(3, [(1, 8, 4), (1, 2, 2)])]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_packing_is_invisible(backend):
    model = tiny_model(attn_backend=backend)
    samples = three_samples()
    with torch.no_grad():
        packed = model.logits(pack(samples))
        alone = torch.cat([model.logits(pack([s])) for s in samples])
    assert (packed - alone).abs().max() < 1e-5


def reference_loss(model, batch, z_loss):
    """Token-mean CE of each sample's next token (F.cross_entropy per sample) + z_loss * mean(lse^2)."""
    logits = model.logits(batch).float()
    ce, z, n = 0.0, 0.0, 0
    cu = batch.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        lg, tg = logits[s:e - 1], batch.labels[s + 1:e]
        keep = tg != -100
        ce = ce + F.cross_entropy(lg[keep], tg[keep], reduction="sum")
        z = z + (torch.logsumexp(lg[keep], -1) ** 2).sum()
        n += int(keep.sum())
    return ce / n, z_loss * z / n, n


def test_loss_shifts_within_samples_and_divides():
    model = tiny_model(z_loss=1e-2)
    batch = pack(three_samples())
    with torch.no_grad():
        loss, stats = model(batch)
        ce, z, n = reference_loss(model, batch, 1e-2)
        assert abs(loss.item() - (ce + z).item()) < 1e-5
        assert abs(stats["ce"] - ce.item()) < 1e-5 and abs(stats["z_loss"] - z.item()) < 1e-7
        assert stats["n_loss_tokens"] == n and stats["n_tokens"] == len(batch.input_ids) and stats["n_images"] == 3
        summed, _ = model(batch, loss_divisor=1000.0)
        assert abs(summed.item() - loss.item() * n / 1000.0) < 1e-6


def test_chunked_loss_matches_full_logits():
    """MLLM.forward's chunked loss (kernels.linear_cross_entropy, 1024 tokens a chunk) against [tokens, vocab]
    fp32 logits and F.cross_entropy: same loss (CE + z-loss) and same gradients for every parameter."""
    model = tiny_model(z_loss=1e-2, **{"text.num_layers": 1}).train()
    batch = pack([sample(900, [(1, 4, 6)]), sample(700, []), sample(500, [(1, 8, 4)])])  # > 2 chunks
    params = [p for p in model.parameters()]
    loss, _ = model(batch, loss_divisor=3000.0)
    got = torch.autograd.grad(loss, params)

    targets = torch.roll(batch.labels, -1)
    targets[batch.cu_seqlens[1:].long() - 1] = -100
    keep = targets != -100
    assert keep.sum() > 2048
    logits = (model.hidden_states(batch) @ model.decoder.lm_head.weight.t()).float()[keep]
    want_loss = (F.cross_entropy(logits, targets[keep], reduction="sum")
                 + 1e-2 * torch.logsumexp(logits, -1).square().sum()) / 3000.0
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)


def test_image_pad_count_mismatch_is_an_error():
    model = tiny_model()
    tokens, labels, images = sample(4, [(1, 4, 4)])
    batch = pack([(tokens + [261], labels + [-100], images)])
    with pytest.raises(ValueError, match="5 <\\|image_pad\\|> tokens .* give 4 features"):
        model(batch)


def test_tiny_trains():
    model = tiny_model().train()
    batch = pack([sample(40, [(1, 8, 8)]), sample(60, []), sample(20, [(1, 4, 6)])])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses  # measured: 5.6 -> 0.11


def test_activation_checkpointing_same_loss_and_grads():
    batch = pack(three_samples())
    runs = []
    for flag in (False, True):
        model = tiny_model(activation_checkpointing=flag).train()
        loss, _ = model(batch)
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    for name, g in runs[0][1].items():
        assert torch.allclose(g, runs[1][1][name], atol=1e-6), name


GROUPS = ("vision", "connector", "decoder")


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("trains", [GROUPS, ("connector",), ("decoder",)])
def test_model_flops_match_torch_flop_counter(preset, trains):
    """model_flops against FlopCounterMode's count of the matmuls forward and backward ran. Attention runs
    as SDPA's math kernel (plain bmm: the full s x s product, as model_flops counts it, causal or not; the
    reference backend's tiles skip the causal half forward and recompute QK^T backward, and SDPA's fused CPU
    kernel is not counted by FlopCounterMode at all). What the counter sees beyond model FLOPs is added here:
    the chunked loss forms its gradients in the forward (its backward matmuls count there), and MLA pads v to
    the q/k head dim for varlen_attention."""
    config = M.config_from_preset(preset)
    model = M.MLLM(config, attn_backend="sdpa").train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in trains)
    batch = pack(three_samples())
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            loss, _ = model(batch)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    want = M.model_flops(config, batch, trains)
    t = config.text
    n_loss = int((M.next_token_targets(batch.labels, batch.cu_seqlens) != -100).sum())
    # the head's dh (and dW where the decoder trains) matmuls, run by the chunked loss's forward
    moved = 2 * t.hidden_size * t.vocab_size * n_loss * (1 + ("decoder" in trains))
    extra_fwd = 0
    if t.attention == "mla":  # PV over v zero-padded from v_head_dim to qk_nope + qk_rope
        lens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        extra_fwd = 2 * t.num_layers * t.num_heads * (t.qk_rope_head_dim + t.qk_nope_head_dim - t.v_head_dim) * int(
            (lens ** 2).sum())
    assert want["forward"] + moved + extra_fwd == pytest.approx(fwd.get_total_flops(), rel=1e-6)
    assert want["backward"] - moved + 2 * extra_fwd == pytest.approx(bwd.get_total_flops(), rel=1e-6)


def test_real_preset_parameter_count():
    config = M.config_from_preset("qwen2.5-vit-675m+qwen3-8b")
    with torch.device("meta"):
        model = M.MLLM(config)
    vision = sum(p.numel() for m in (model.vision, model.connector) for p in m.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert abs(vision / 675e6 - 1) < 0.02       # Qwen2.5-VL report: 675M ViT (incl. merger)
    assert abs(decoder / 8.2e9 - 1) < 0.02      # Qwen3-8B model card: 8.2B
    assert M.count_parameters(config) == vision + decoder
    assert 1e6 < M.count_parameters(M.config_from_preset("tiny")) < 1e7


def test_save_load_round_trip(tmp_path):
    model = tiny_model(z_loss=1e-4)
    model.save_pretrained(tmp_path)
    loaded = M.MLLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    batch = pack(three_samples())
    with torch.no_grad():
        assert torch.equal(model.logits(batch), loaded.logits(batch))


def test_from_pretrained_names_missing_and_unexpected_keys(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "vision.blocks.1.norm2.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="vision.blocks.1.norm2.weight"):
        M.MLLM.from_pretrained(tmp_path)
    save_file({**tensors, "decoder.bogus": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="decoder.bogus"):
        M.MLLM.from_pretrained(tmp_path)


def test_run_settings_older_checkpoints_saved_in_config_json_are_ignored(tmp_path):
    """z_loss, activation_checkpointing and attn_backend say how a model runs (MLLM's arguments), not what it
    is; checkpoints written before they left ModelConfig still load, as the same model."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    old = {**json.load(open(tmp_path / "config.json")), "z_loss": 1e-4, "activation_checkpointing": True,
           "attn_backend": "reference"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = M.MLLM.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.z_loss == 0.0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_config_presets_and_overrides(tmp_path):
    c = M.config_from_preset("tiny", image_pad_id=260, **{"text.num_layers": 3})
    assert c.image_pad_id == 260 and c.text.num_layers == 3 and c.text.vocab_size == 262
    assert M.ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown preset"):
        M.config_from_preset("nope")


def greedy_by_reforwarding(model, s, n):
    tokens, labels, images = s
    out = []
    for _ in range(n):
        with torch.no_grad():
            out.append(int(model.logits(pack([(tokens + out, labels + out, images)]))[-1].argmax()))
    return out


def test_generate_with_kv_cache_equals_reforwarding():
    model = tiny_model()
    randomize(model)  # at init scale a tiny model repeats one token; larger weights give varied greedy paths
    prompts = [sample(5, [(1, 4, 4)]), sample(9, []), sample(2, [(1, 2, 6)])]
    got = model.generate(pack(prompts), max_new_tokens=7)
    assert all(len(set(g)) > 3 for g in got), got
    assert got == [greedy_by_reforwarding(model, s, 7) for s in prompts]
    stop = got[1][3]
    stopped = model.generate(pack(prompts), max_new_tokens=7, stop_ids=[stop])
    assert stopped == [g[:g.index(stop)] if stop in g else g for g in got]
