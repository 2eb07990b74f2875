"""Expert parallelism (parallel.shard_experts) on CPU with gloo: `tiny-moe` on 2 spawned ranks, each holding
half of every MoE layer's routed experts and exchanging tokens with all_to_all, must train like one process
on the same global batch, with some experts (and one rank's whole share) receiving no tokens."""
import pytest
import torch

import data as D
import parallel as P
from model import MoE, MLLM, config_from_preset, update_expert_bias
from test_parallel import spawn

STEPS, LR, CLIP = 5, 1e-4, 0.5
RTOL, ATOL = 1e-5, 1e-6
# text lengths; rank r takes samples r::2, and both ranks get the same number of samples and loss tokens, so
# the sequence-wise balance loss (a mean over each rank's samples) adds up to the one-process value
LENGTHS = [9, 14, 16, 11]
MUTED = {1: [0, 1], 2: [4, 5, 6, 7]}  # MoE layer -> experts pushed out of every top-k by a large negative bias


def global_batches(n_steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = lambda: [D.Sample(tokens=(t := torch.randint(0, 256, (n,), generator=gen).tolist()), labels=t,
                                images=[], task="test") for n in LENGTHS]
    return [samples() for _ in range(n_steps)]


def build():
    torch.manual_seed(0)
    model = MLLM(config_from_preset("tiny-moe"))
    with torch.no_grad():
        for i, experts in MUTED.items():
            model.decoder.layers[i].mlp.gate.expert_bias[experts] = -10.0
    return model


def moe_layers(model):
    return {i: layer.mlp for i, layer in enumerate(model.decoder.layers) if isinstance(layer.mlp, MoE)}


def train(model, batches, dist):
    """One AdamW step per global batch, as train.py does it; returns [(loss, grad norm, loads per layer)]."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    log = []
    for samples in batches:
        mine = samples[dist.rank::dist.world_size]
        batch = D.collate(mine)
        n = P.all_reduce_sum(torch.tensor(float(sum(len(s.tokens) - 1 for s in mine))), dist)  # loss tokens
        loss, stats = model(batch, loss_divisor=float(n) / dist.world_size)
        loss.backward()
        if dist.world_size > 1:
            P.all_reduce_grads(model, dist)
        norm = P.clip_grad_norm_(list(model.parameters()), CLIP, dist, replicated=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads = {i: m.load.clone() for i, m in moe_layers(model).items()}
        update_expert_bias(model, model.config.text.bias_update_speed,
                           (lambda t: P.all_reduce_sum(t, dist)) if dist.world_size > 1 else None)
        loss = P.all_reduce_sum(loss.detach(), dist) / dist.world_size
        log.append((loss.item(), norm.item(), loads))
    return log


def job_ep(dist, out_dir):
    model = P.shard_experts(build(), dist)
    shapes = {n: p.shape for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}
    log = train(model, global_batches(STEPS), dist)
    state = P.gather_full_state_dict(model, dist)
    bias = {i: m.gate.expert_bias.clone() for i, m in moe_layers(model).items()}
    fresh = P.shard_experts(build(), dist)
    P.load_full_state_dict(fresh, torch.load(f"{out_dir}/reference.pt"), dist)
    return {"log": log, "state": state, "bias": bias, "shapes": shapes,
            "reloaded": P.gather_full_state_dict(fresh, dist)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2ranks")
    model = build()
    reference = {"log": train(model, global_batches(STEPS), P.Dist()),
                 "state": P.gather_full_state_dict(model, P.Dist())}
    torch.save(reference["state"], out / "reference.pt")
    return reference, spawn(job_ep, 2, out)


def test_two_ranks_match_one_process(runs):
    reference, ranks = runs
    loss_ref, norm_ref, _ = zip(*reference["log"])
    for rank in ranks:
        loss, norm, _ = zip(*rank["log"])
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(loss_ref), rtol=RTOL, atol=0)
        torch.testing.assert_close(torch.tensor(norm), torch.tensor(norm_ref), rtol=RTOL, atol=0)
    assert any(x > CLIP for x in norm_ref), "clipping never engaged: the global-norm check proves little"
    state, want = ranks[0]["state"], reference["state"]
    assert list(state) == list(want) and ranks[1]["state"] == {}
    for name in want:
        torch.testing.assert_close(state[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    start = build().state_dict()
    assert not torch.equal(want["decoder.layers.1.mlp.down_proj"], start["decoder.layers.1.mlp.down_proj"])


def test_each_rank_holds_half_the_experts(runs):
    _, ranks = runs
    c = config_from_preset("tiny-moe").text
    E, D_, I = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    for rank in ranks:
        names = {f"decoder.layers.{i}.mlp.{n}" for i in (1, 2) for n in ("gate_up_proj", "down_proj")}
        assert set(rank["shapes"]) == names
        for name, shape in rank["shapes"].items():
            assert shape == ((E // 2, D_, 2 * I) if name.endswith("gate_up_proj") else (E // 2, I, D_)), name


def test_uneven_and_empty_expert_loads(runs):
    """The muted experts got no tokens (rank 1 received nothing at all in layer 2), the others uneven counts;
    the per-rank loads add up to the one-process loads."""
    reference, ranks = runs
    for step, (_, _, loads_ref) in enumerate(reference["log"]):
        for i, muted in MUTED.items():
            total = ranks[0]["log"][step][2][i] + ranks[1]["log"][step][2][i]
            assert torch.equal(total, loads_ref[i]), f"step {step} layer {i}: {total} vs {loads_ref[i]}"
            assert (total[muted] == 0).all() and (total[[e for e in range(len(total)) if e not in muted]] > 0).all()
            assert len(set(total.tolist())) > 2, f"layer {i}: loads {total.tolist()} are not uneven"


def test_expert_bias_is_global(runs):
    reference, ranks = runs
    for i in MUTED:
        want = reference["state"][f"decoder.layers.{i}.mlp.gate.expert_bias"]
        for rank in ranks:
            assert torch.equal(rank["bias"][i], want), f"layer {i}: rank bias {rank['bias'][i]} vs {want}"
        assert not torch.equal(want, build().decoder.layers[i].mlp.gate.expert_bias), "bias never moved"


def test_full_checkpoint_loads_into_expert_shards(runs):
    reference, ranks = runs
    for name, t in reference["state"].items():
        assert torch.equal(ranks[0]["reloaded"][name], t), name


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        P.shard_experts(build(), P.Dist())
