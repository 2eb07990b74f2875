"""parallel.py on CPU with gloo: processes spawned here train `tiny` sharded (the hand-written FSDP and
PyTorch's FSDP2) and must match one process on the same global batch; per-rank memory is ~1/N; sharded
checkpoints resume exactly; the full checkpoint loads at another world size."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

import data as D
import parallel as P
from model import MLLM, config_from_preset

STEPS, SAVE_AT, RESUME_STEPS = 10, 5, 3
RTOL = 1e-5  # fp32 losses and grad norms
# weights: Adam's first step moves an element by ~lr * g / (|g| + eps) whatever |g| is, so a gradient at roundoff
# level (seen: 1.2e-8 against a typical 2e-3) turns a different summation order into a visible move (seen: lr/80);
# 1e-5 is a tenth of the smallest lr below, far under the whole-step errors a sharding bug makes
ATOL = 1e-5
CASES = [(mode, stage, ckpt) for mode in ("ours", "torch") for stage in (1, 2) for ckpt in (False, True)]

# each step's global batch: (text length, image grid) per sample; rank r takes samples r::N. Every sample has
# an image (micro-batches without one: tests/test_distributed.py runs train.py on them).
LAYOUT = [(5, (1, 4, 4)), (7, (1, 4, 8)), (4, (1, 4, 4)), (6, (1, 8, 4))]


def make_sample(gen, n_text, grid):
    """Text, one image, text; loss on the text."""
    text = lambda: torch.randint(0, 256, (n_text,), generator=gen).tolist()
    before, image = text(), [259] + [261] * (grid[1] * grid[2] // 4) + [260]
    tokens = before + image + text()
    labels = [-100 if t in image else t for t in tokens]
    patches = torch.randn(grid[1] * grid[2], 3 * 14 * 14, generator=gen)
    return D.Sample(tokens=tokens, labels=labels, images=[(patches, grid)], task="test",
                    image_starts=[len(before) + 1])


def global_batches(n_steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[make_sample(gen, n, g) for n, g in LAYOUT] for _ in range(n_steps)]


def build(stage, ckpt):
    torch.manual_seed(0)
    model = MLLM(config_from_preset("tiny"), activation_checkpointing=ckpt)
    if stage == 1:  # MindVL stage 1: only the connector trains
        model.requires_grad_(False)
        model.connector.requires_grad_(True)
    return model


LR = {"vision": 1e-4, "connector": 2e-4, "decoder": 1e-4}


def group_of(name, param):
    """Optimizer group as train.py forms them: an lr per module, weight decay on matrices only."""
    return name.split(".")[0], param.dim() >= 2


def optimizer_for(model):
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # a hand-written FSDP shard carries the group of the parameters inside it
            groups.setdefault(getattr(p, "fsdp_group", None) or group_of(name, p), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": LR[module], "weight_decay": 0.1 if matrix else 0.0}
                              for (module, matrix), ps in groups.items()])


def train(model, opt, batches, dist):
    """One optimizer step per global batch; the loss is the global token mean however many ranks share it.
    Returns [(loss, grad norm)] per step."""
    log = []
    for samples in batches:
        batch = D.collate(samples[dist.rank::dist.world_size])
        loss_sum, stats = model(batch, loss_divisor=1.0)
        n = P.all_reduce_sum(torch.tensor(float(stats["n_loss_tokens"])), dist)
        # gradients are averaged over ranks, so each rank divides its sum by the global count / N
        (loss_sum * dist.world_size / n).backward()
        norm = P.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0, dist)
        opt.step()
        log.append((P.all_reduce_sum(loss_sum.detach(), dist).item() / n.item(), norm.item()))
        if batches[-1] is not samples:  # the last step's gradients stay, for held_bytes
            opt.zero_grad(set_to_none=True)
    return log


def held_bytes(model, opt):
    """Bytes of the parameters, gradients and optimizer state this rank holds (plus any gathered full
    parameters a hand-written FSDP unit still keeps: none between steps)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(p.grad) for p in model.parameters() if p.grad is not None]
    tensors += [local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    gathered = sum(f.full.untyped_storage().nbytes() for f in model.fsdp.flats()) if hasattr(model, "fsdp") else 0
    return sum(t.numel() * t.element_size() for t in tensors) + gathered


def save_full(state, config, directory):
    """What train.py writes for evaluate.py: model.safetensors (our key names) + config.json."""
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)


# ----------------------------------------------------------------------------- spawned jobs


def _run(rank, world_size, port, job, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = P.init_distributed("cpu")
    result = job(dist, out_dir)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    P.close_distributed(dist)


def spawn(job, world_size, out_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(world_size, port, job, str(out_dir)), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def watch_gathered(model):
    """A list that gets, whenever a block starts its forward (or recompute) and when backward reaches it,
    (blocks whose full parameters are gathered, full gradients still being reduce-scattered) at that moment."""
    blocks = [u for u in model.fsdp.units if u.module is not model]
    seen = []

    def count(*_):
        gathered = sum(any(f.full.untyped_storage().nbytes() for f in u.flats) for u in blocks)
        seen.append((gathered, len(model.fsdp.reducing)))

    def on_output(module, args, out):
        if out.requires_grad:
            out.register_hook(count)

    for u in blocks:
        u.module.register_forward_pre_hook(count)
        u.module.register_forward_hook(on_output)
    return seen


def job_parity(dist, out_dir):
    """Every case for 10 steps; stage 2 without checkpointing also saves shards at step 5 (and, for ours, the
    full checkpoint), then a fresh model resumes from those shards; 3 steps of each FSDP in bf16."""
    batches = global_batches(STEPS)
    results = {}
    for mode, stage, ckpt in CASES:
        model = P.shard_model(build(stage, ckpt), dist, mode=mode, group_of=group_of)
        gathered = watch_gathered(model) if mode == "ours" else []
        opt = optimizer_for(model)
        log = train(model, opt, batches[:SAVE_AT], dist)
        opt.zero_grad(set_to_none=True)
        if (stage, ckpt) == (2, False):
            P.save_sharded(model, opt, dist, os.path.join(out_dir, f"shards_{mode}"), extra={"step": SAVE_AT})
            full = P.gather_full_state_dict(model, dist)
            if dist.is_main and mode == "ours":
                save_full(full, model.config, os.path.join(out_dir, "full"))
        log += train(model, opt, batches[SAVE_AT:], dist)
        results[mode, stage, ckpt] = {"log": log, "bytes": held_bytes(model, opt), "gathered": gathered,
                                      "state": P.gather_full_state_dict(model, dist)}
    for mode in ("ours", "torch"):  # mixed precision: gathered in bf16, fp32 shards and optimizer
        model = P.shard_model(build(2, True), dist, mode=mode, compute_dtype=torch.bfloat16, group_of=group_of)
        results["bf16", mode] = {"log": train(model, optimizer_for(model), batches[:3], dist),
                                 "dtypes": {p.dtype for p in model.parameters()}}
    for mode in ("ours", "torch"):
        model = P.shard_model(build(2, False), dist, mode=mode, group_of=group_of)
        opt = optimizer_for(model)
        extra = P.load_sharded(model, opt, dist, os.path.join(out_dir, f"shards_{mode}"))
        results["resumed", mode] = {"extra": extra, "log": train(model, opt, batches[SAVE_AT:], dist),
                                    "state": P.gather_full_state_dict(model, dist)}
    return results


def job_from_full(dist, out_dir):
    """Load the full checkpoint into a model sharded over this world size (both modes), train a few steps."""
    results = {}
    for mode in ("ours", "torch"):
        model = P.shard_model(build(2, False), dist, mode=mode, group_of=group_of)
        P.load_full_state_dict(model, load_file(os.path.join(out_dir, "full", "model.safetensors")), dist)
        loaded = P.gather_full_state_dict(model, dist)
        results[mode] = {"loaded": loaded,
                         "log": train(model, optimizer_for(model), global_batches(RESUME_STEPS, seed=1), dist)}
    try:
        P.load_sharded(model, optimizer_for(model), dist, os.path.join(out_dir, "shards_ours"))
    except FileNotFoundError as e:
        results["resume_error"] = str(e)
    return results


# ----------------------------------------------------------------------------- tests


def single_process(stage):
    model = build(stage, ckpt=False)
    opt = optimizer_for(model)
    log = train(model, opt, global_batches(STEPS), P.Dist())
    return {"log": log, "bytes": held_bytes(model, opt), "state": P.gather_full_state_dict(model, P.Dist())}


def assert_same_run(got, want, what):
    loss, norm = torch.tensor(got["log"]).T
    loss_ref, norm_ref = torch.tensor(want["log"]).T
    torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=0, msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(norm, norm_ref, rtol=RTOL, atol=0, msg=lambda m: f"{what} grad norms: {m}")
    assert list(got["state"]) == list(want["state"]), what
    for name in want["state"]:
        torch.testing.assert_close(got["state"][name], want["state"][name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what} {name}: {m}")


@pytest.fixture(scope="module")
def reference():
    return {stage: single_process(stage) for stage in (1, 2)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2ranks")
    return out, spawn(job_parity, 2, out)


def test_two_ranks_match_one_process(two_ranks, reference):
    _, ranks = two_ranks
    for stage in (1, 2):
        norms = torch.tensor(reference[stage]["log"])[:, 1]
        assert (norms > 1.0).any(), f"stage {stage}: clipping never engaged, the norm check proves little"
    start = build(1, False).state_dict()
    changed = [n for n, t in reference[1]["state"].items() if not torch.equal(t, start[n])]
    assert changed and all(n.startswith("connector.") for n in changed), f"stage 1 trained {changed}"
    for case in CASES:
        mode, stage, ckpt = case
        assert_same_run(ranks[0][case], reference[stage], f"{mode} FSDP, stage {stage}, checkpointing={ckpt}")
        assert ranks[1][case]["state"] == {}, "full state is gathered on rank 0 only"


def test_one_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = P.init_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.is_main, dist.device) == (0, 1, True, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun"):
        P.shard_model(build(2, False), dist)


def test_bf16_compute_with_fp32_shards(two_ranks):
    """Both FSDPs gather bf16 copies of fp32 shards: their losses agree to bf16 precision (FSDP2 also casts
    the blocks' float inputs, e.g. rotary tables, to bf16) and differ from the fp32 run."""
    _, ranks = two_ranks
    ours, theirs = ranks[0]["bf16", "ours"], ranks[0]["bf16", "torch"]
    assert ours["dtypes"] == theirs["dtypes"] == {torch.float32}
    loss, loss_torch = torch.tensor(ours["log"])[:, 0], torch.tensor(theirs["log"])[:, 0]
    loss_fp32 = torch.tensor(ranks[0]["ours", 2, True]["log"][:3])[:, 0]
    torch.testing.assert_close(loss, loss_torch, rtol=2e-3, atol=0)
    # the fp32 run has the same sharding and order, so without bf16 the losses would be equal bit for bit;
    # bf16 moves them by 8e-6 .. 1e-4 relative (measured), fp32 reruns by 0
    assert ((loss - loss_fp32).abs() > 1e-6 * loss_fp32).all(), "bf16 run equals the fp32 run: no bf16 compute"


def test_per_rank_memory_is_half(two_ranks, reference):
    _, ranks = two_ranks
    for stage in (1, 2):
        single = reference[stage]["bytes"]
        for mode in ("ours", "torch"):
            for rank in ranks:
                ratio = rank[mode, stage, False]["bytes"] / single
                # off 1/2 only by padding (< N elements per flat parameter, ours; per dim-0 row, FSDP2) and by
                # AdamW's scalar step counts (one per parameter tensor: fewer with flat shards)
                assert abs(ratio - 1 / 2) < 1e-3, f"{mode} stage {stage}: rank holds {ratio:.5f} of one process"


def test_blocks_are_gathered_only_while_used(two_ranks):
    """ZeRO-3: a block's full parameters exist only while it runs, plus the next block's prefetched gather;
    at most one unit's full gradient waits for its reduce-scatter."""
    _, ranks = two_ranks
    for case in CASES:
        if case[0] == "ours":
            for rank in ranks:
                gathered, reducing = zip(*rank[case]["gathered"])
                assert max(gathered) == 2, f"{case}: gathered blocks {gathered}"
                assert max(reducing) <= 1, f"{case}: reduce-scatters in flight {reducing}"


def test_sharded_checkpoint_resumes_exactly(two_ranks):
    _, ranks = two_ranks
    for mode in ("ours", "torch"):
        for rank in ranks:
            assert rank["resumed", mode]["extra"] == {"step": SAVE_AT}
        uninterrupted, resumed = ranks[0][mode, 2, False], ranks[0]["resumed", mode]
        assert resumed["log"] == uninterrupted["log"][SAVE_AT:], mode
        for name, t in uninterrupted["state"].items():
            assert torch.equal(resumed["state"][name], t), f"{mode} {name}"


def test_full_checkpoint_loads_on_one_and_four_ranks(two_ranks, tmp_path):
    out, _ = two_ranks
    one = MLLM.from_pretrained(str(out / "full"))
    one_state = P.gather_full_state_dict(one, P.Dist())
    one_log = train(one, optimizer_for(one), global_batches(RESUME_STEPS, seed=1), P.Dist())
    for name in ("full", "shards_ours"):
        (tmp_path / name).symlink_to(out / name)
    four = spawn(job_from_full, 4, tmp_path)[0]
    assert "shard_rank00000_of00004.pt" in four.get("resume_error", ""), "2-rank shards must not load on 4 ranks"
    for mode in ("ours", "torch"):
        for name, t in one_state.items():
            assert torch.equal(four[mode]["loaded"][name], t), f"{mode} {name}"
        torch.testing.assert_close(torch.tensor(four[mode]["log"]), torch.tensor(one_log), rtol=RTOL, atol=0,
                                   msg=lambda m: f"{mode} on 4 ranks: {m}")
