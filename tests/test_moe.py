"""The MoE decoder against transformers' DeepSeek-V3 and Qwen3-MoE on tiny random configs (weights through
save_pretrained -> load_hf_decoder, packed and unpacked), the router's expert_bias semantics, auxiliary-loss-
free balancing measured over training steps, the sorted/grouped expert computation against a per-token loop,
the sequence-wise balance loss, tiny-moe training and the MindVL-671B-A37B parameter counts."""

import pytest
import torch

import convert
from conftest import requires
import model as M
from data import PackedBatch as Batch

transformers = requires("transformers")

TOL = 1e-4  # max abs logit difference against transformers (fp32)




def text_batch(seqs):
    lens = [len(s) for s in seqs]
    ids = torch.cat(seqs)
    return Batch(ids, ids.clone(), torch.cat([torch.arange(n) for n in lens]),
                 torch.tensor([0] + lens).cumsum(0).to(torch.int32), max(lens),
                 torch.zeros(0, 3 * 14 * 14), torch.zeros(0, 3, dtype=torch.long))


def randomize(hf_model, gate_std):
    """Every tensor random (norms near 1); gate rows spread wide so no routing decision is a near-tie that
    float rounding could flip; e_score_correction_bias random so its mapping to expert_bias is tested."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, gate_std if name.endswith("mlp.gate.weight") else 0.1)
        for name, b in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def assert_parity(hf_model, decoder, lengths, vocab):
    """Three samples: each alone through transformers, each alone and all packed through ours."""
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    with torch.no_grad():
        ref = [hf_model(input_ids=s[None]).logits[0] for s in seqs]
        b = text_batch(seqs)
        packed = decoder(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
        for s, r, p in zip(seqs, ref, packed.split(lengths)):
            alone = text_batch([s])
            ours = decoder(alone.input_ids, alone.position_ids, alone.cu_seqlens, alone.max_seqlen)
            assert (ours - r).abs().max() < TOL
            assert (p - r).abs().max() < TOL
    assert ref[0].abs().max() > 0.1  # the comparison is not between near-zero logits


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.8, "mscale_all_dim": 0.7,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


@pytest.mark.parametrize("q_lora_rank,rope,interleave", [(24, YARN, True),
                                                         (None, {"rope_type": "default", "rope_theta": 500.0}, False)])
def test_deepseek_v3_parity(tmp_path, q_lora_rank, rope, interleave):
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_parameters=rope, rope_interleave=interleave, max_position_embeddings=64, rms_norm_eps=1e-6,
        num_nextn_predict_layers=0)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    randomize(hf, gate_std=0.5)
    hf.save_pretrained(tmp_path)
    decoder = convert.load_hf_decoder(str(tmp_path)).eval()
    c = decoder.config
    assert (c.attention, c.first_k_dense, c.n_group, c.scoring) == ("mla", 1, 4, "sigmoid")
    assert isinstance(decoder.layers[0].mlp, M.MLP) and isinstance(decoder.layers[1].mlp, M.MoE)
    bias = hf.model.layers[2].mlp.gate.e_score_correction_bias
    assert torch.equal(decoder.layers[2].mlp.gate.expert_bias, bias) and bias.abs().max() > 0
    assert_parity(hf, decoder, [7, 29, 12], cfg.vocab_size)  # 29 > original_max_position_embeddings


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_parity(tmp_path, norm_topk_prob):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    randomize(hf, gate_std=0.5)
    hf.save_pretrained(tmp_path)
    decoder = convert.load_hf_decoder(str(tmp_path)).eval()
    assert (decoder.config.scoring, decoder.config.n_shared_experts) == ("softmax", 0)
    assert not decoder.layers[0].mlp.gate.expert_bias.any()
    assert_parity(hf, decoder, [9, 17, 5], cfg.vocab_size)


# ----------------------------------------------------------------------------- routing


def moe_config(**overrides):
    d = dict(hidden_size=32, num_heads=4, num_kv_heads=4, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, moe_intermediate_size=24, n_group=4, topk_group=2)
    return M.TextConfig(**(d | overrides))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_expert_bias_changes_choice_not_gate_values(norm_topk_prob):
    gate = M.MoEGate(moe_config(norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5, n_group=1, topk_group=1))
    x = torch.randn(64, 32)
    before_w, before_e, before_s = gate(x)
    with torch.no_grad():
        gate.expert_bias[5] = 1.0  # more than any sigmoid gap: expert 5 is now always chosen
    w, e, s = gate(x)
    assert (e == 5).any(-1).all() and not (before_e == 5).any(-1).all()
    assert torch.equal(s, before_s)
    # the gate value of a chosen expert comes from its unbiased affinity sigmoid(x . w_i) alone
    chosen = torch.sigmoid(x @ gate.weight.T).gather(1, e)
    expected = chosen / chosen.sum(-1, keepdim=True) if norm_topk_prob else chosen
    torch.testing.assert_close(w, 2.5 * expected)
    if not norm_topk_prob:  # a token's value for an expert chosen both times does not move at all
        same = e[:, :, None] == before_e[:, None, :]
        assert same.any() and torch.equal(w[:, :, None].expand_as(same)[same],
                                          before_w[:, None, :].expand_as(same)[same])


def test_group_limited_routing_stays_in_best_groups():
    gate = M.MoEGate(moe_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2))
    with torch.no_grad():
        gate.expert_bias.normal_(0, 0.05)
    x = torch.randn(50, 32)
    _, experts, scores = gate(x)
    choice = (scores + gate.expert_bias).view(50, 4, 4)
    best = choice.topk(2, -1).values.sum(-1).topk(2, -1).indices  # DeepSeek-V3: groups by top-2 sum
    assert all(set((experts[t] // 4).tolist()) <= set(best[t].tolist()) for t in range(50))
    assert (experts // 4).unique(dim=None).numel() > 2  # different tokens do pick different groups


def per_token_moe(moe, x):
    """The MoE written per token: shared experts + sum over the k chosen experts of g * SwiGLU expert."""
    w, e, _ = moe.gate(x)
    out = moe.shared_experts(x).clone()
    rows = []
    for t in range(x.shape[0]):
        y = out[t]
        for j in range(e.shape[1]):
            gate, up = (x[t] @ moe.gate_up_proj[e[t, j]]).chunk(2)
            y = y + w[t, j] * (torch.nn.functional.silu(gate) * up) @ moe.down_proj[e[t, j]]
        rows.append(y)
    return torch.stack(rows)


def test_moe_matches_per_token_loop_with_idle_experts():
    torch.manual_seed(0)
    moe = M.MoE(moe_config())
    with torch.no_grad():
        moe.gate.expert_bias[:2] = 1.0  # every token to experts 0 and 1; experts 2..7 receive no tokens
    x = torch.randn(20, 32, requires_grad=True)
    out = moe(x, torch.tensor([0, 20], dtype=torch.int32))
    assert moe.load.tolist() == [20, 20, 0, 0, 0, 0, 0, 0]
    ref = per_token_moe(moe, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x, moe.gate_up_proj, moe.down_proj, moe.gate.weight]
    grads = torch.autograd.grad((out * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not grads[1][2:].any() and not grads[2][2:].any() and grads[1][:2].abs().sum() > 0


def test_moe_with_no_tokens():
    """An empty token set (an expert-parallel rank or micro-batch shard with nothing to route) runs both ways."""
    moe = M.MoE(moe_config())
    x = torch.zeros(0, 32, requires_grad=True)
    out = moe(x, torch.tensor([0], dtype=torch.int32))
    assert out.shape == (0, 32) and moe.load.tolist() == [0] * 8
    out.sum().backward()
    assert x.grad.shape == (0, 32) and not moe.gate_up_proj.grad.any()


# ----------------------------------------------------------------------------- balancing


def test_sequence_balance_loss_values_and_packing():
    # DeepSeek-V3 eq. 17-20 by hand: 4 experts, k=1. Balanced choices and uniform affinities give 1;
    # every token on expert 0 with all affinity there gives E = 4.
    one = torch.tensor([0, 4], dtype=torch.int32)
    balanced = M.sequence_balance_loss(torch.full((4, 4), 0.3), torch.arange(4)[:, None], one)
    collapsed = M.sequence_balance_loss(torch.eye(4)[[0, 0, 0, 0]], torch.zeros(4, 1, dtype=torch.long), one)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    torch.testing.assert_close(collapsed, torch.tensor(4.0))
    # per packed sample: the packed loss is the mean of each sample's loss alone
    scores, experts = torch.rand(30, 8), torch.rand(30, 8).topk(2, -1).indices
    packed = M.sequence_balance_loss(scores, experts, torch.tensor([0, 5, 21, 30], dtype=torch.int32))
    alone = [M.sequence_balance_loss(scores[a:b], experts[a:b], torch.tensor([0, b - a], dtype=torch.int32))
             for a, b in ((0, 5), (5, 21), (21, 30))]
    torch.testing.assert_close(packed, sum(alone) / 3)


def skewed_moe_run(gamma, steps=60):
    """A MoE whose router favours experts 0 and 1 for every token (inputs share a mean direction, as hidden
    states do; both experts' gate rows point along it), trained on a regression task with AdamW. Returns
    the load spread (max / mean tokens per expert) per step and the final loss."""
    torch.manual_seed(0)
    moe = M.MoE(moe_config(moe_intermediate_size=32))
    mu = torch.randn(32)
    teacher = torch.randn(32, 32) / 32 ** 0.5
    with torch.no_grad():
        moe.gate.weight[:2] += mu / mu.norm() ** 2  # +1 logit on experts 0, 1 for the mean input
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    spreads, losses = [], []
    for _ in range(steps):
        x = mu + torch.randn(256, 32)
        loss = (moe(x, torch.tensor([0, 128, 256], dtype=torch.int32)) - torch.tanh(x @ teacher)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        spreads.append((moe.load.max() / moe.load.float().mean()).item())
        losses.append(loss.item())
        moe.step_load = moe.load  # what MLLM.forward records in training
        M.update_expert_bias(moe, gamma)
    return spreads, sum(losses[-10:]) / 10


def test_bias_update_balances_a_skewed_router():
    on, loss_on = skewed_moe_run(gamma=0.01)
    off, loss_off = skewed_moe_run(gamma=0.0)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    # measured (torch 2.13 CPU): both start at 4.00 (all tokens on 2 of 8 experts); after 60 steps the
    # last 10 average 1.32 with the bias update and 4.00 without; the regression loss is the same (~0.09)
    assert mean(on[:5]) > 3.5 and mean(off[:5]) > 3.5
    assert mean(on[-10:]) < 2.0
    assert mean(off[-10:]) > 3.5
    assert loss_on < 1.5 * loss_off


def test_mllm_records_load_and_update_moves_bias_against_it():
    torch.manual_seed(0)
    model = M.MLLM(M.config_from_preset("tiny-moe")).train()
    seqs = [torch.randint(0, 256, (n,)) for n in (20, 12)]
    loss, stats = model(text_batch(seqs))
    _, stats2 = model(text_batch(seqs))  # a second micro-batch of the same step
    moe_layers = [i for i, layer in enumerate(model.decoder.layers) if isinstance(layer.mlp, M.MoE)]
    assert moe_layers == [1, 2] and stats["moe_load_spread"] >= 1.0
    assert {f"moe_load_spread.{i}" for i in moe_layers} <= stats.keys()
    torch.testing.assert_close(torch.tensor(loss.item()),
                               torch.tensor(stats["ce"] + stats["z_loss"] + stats["balance_loss"]))
    assert stats["balance_loss"] > 0
    moe = model.decoder.layers[1].mlp
    assert torch.equal(moe.step_load, 2 * moe.load)  # summed over the step's micro-batches
    load = moe.step_load.float()
    M.update_expert_bias(model, 0.001)
    expected = 0.001 * torch.sign(load.mean() - load)
    assert torch.equal(moe.gate.expert_bias, expected) and moe.step_load is None
    assert "decoder.layers.1.mlp.gate.expert_bias" in model.state_dict()  # saved with the checkpoint


def test_activation_checkpointing_counts_each_token_once():
    """Recomputing blocks in backward re-runs the router; the step's load and the loss must not change."""
    seqs = [torch.randint(0, 256, (n,)) for n in (20, 12)]
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = M.MLLM(M.config_from_preset("tiny-moe"), activation_checkpointing=ckpt).train()
        loss, _ = model(text_batch(seqs))
        loss.backward()
        moe = model.decoder.layers[1].mlp
        results.append((loss.detach(), moe.gate.weight.grad, moe.step_load.clone()))
    (loss_a, grad_a, load_a), (loss_b, grad_b, load_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert torch.equal(load_a, load_b) and int(load_a.sum()) == 32 * 2


def test_tiny_moe_trains_and_generates():
    torch.manual_seed(0)
    model = M.MLLM(M.config_from_preset("tiny-moe")).train()
    perm = torch.randperm(256)
    seqs = []
    for n in (40, 24, 32):  # a fixed bigram chain: learnable in a few steps
        s = [int(torch.randint(0, 256, ()))]
        for _ in range(n - 1):
            s.append(int(perm[s[-1]]))
        seqs.append(torch.tensor(s))
    batch = text_batch(seqs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, stats = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        M.update_expert_bias(model, model.config.text.bias_update_speed)
        losses.append(stats["ce"])
    assert losses[-1] < 0.5 * losses[0]
    # KV-cache decoding through MLA equals greedy decoding by full recomputation
    model.eval()
    prompts = text_batch([seqs[0][:6], seqs[1][:9]])
    out = model.generate(prompts, max_new_tokens=4)
    for prompt, new in zip((seqs[0][:6], seqs[1][:9]), out):
        ids = prompt.tolist()
        for _ in range(4):
            with torch.no_grad():
                ids.append(int(model.logits(text_batch([torch.tensor(ids)]))[-1].argmax()))
        assert new == ids[len(prompt):]


def test_mindvl_671b_preset_counts():
    config = M.config_from_preset("qwen2.5-vit-675m+deepseek-v3")
    counts = M.parameter_counts(config)
    # DeepSeek-V3: 671B total, 37B activated per token (decoder; its 14B MTP module is not built here)
    assert abs(counts["decoder"] / 671e9 - 1) < 0.02
    assert abs(counts["decoder_activated"] / 37e9 - 1) < 0.02
    assert 0.6e9 < counts["vision"] < 0.75e9 and counts["total"] == counts["decoder"] + counts["vision"]
    assert M.count_parameters(config) == counts["total"]


# DeepSeek-V3's published config.json (architecture fields)
DEEPSEEK_V3_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "attention_bias": False}


def test_671b_preset_matches_deepseek_v3_config():
    ours = M.config_from_preset("qwen2.5-vit-675m+deepseek-v3").text
    theirs = convert.text_config_from_hf(DEEPSEEK_V3_CONFIG)
    training_only = ("bias_update_speed", "seq_aux_loss_coef")  # DeepSeek-V3 §4.2, not in config.json
    assert {k: v for k, v in vars(ours).items() if k not in training_only} == \
        {k: v for k, v in vars(theirs).items() if k not in training_only}


def test_moe_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="attention"):
        moe_config(attention="mha")
