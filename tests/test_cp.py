"""Context parallelism (--cp, Ulysses all-to-all around attention): one model's forward and gradients on 2
spawned ranks against one process on a packed batch cut inside samples and images; train.py under torchrun
(helpers of tests/test_distributed.py) against one process on the same micro-batches: dense with M-RoPE on
mixed text+image data, tiny-moe with --ep, --fsdp, resume across CP sizes in both directions, and the
layouts it refuses."""
import signal

import pytest
import torch
from PIL import Image

import data as D
import parallel as P
import train
from model import MLLM, config_from_preset, loss_tokens
from test_distributed import (STEPS, assert_same_run, finish, flags, mix, one_thread,  # noqa: F401 (fixtures)
                              result, start, stop_mid_run)
from test_parallel import spawn

MROPE = ["--text-mrope-section", "4,6,6"]  # tiny's head_dim 32: (t, h, w) bands of 16 frequencies
# three of the mix's ~50-token samples per micro-batch: the ranks' halves cut inside the middle sample
CP_PACKING = ["--packing-length", "160"]
RTOL, ATOL = 1e-5, 1e-6  # gradients as tests/test_ep.py: sums over the ranks' shares in another order


def build_tiny():
    torch.manual_seed(0)
    return MLLM(config_from_preset("tiny", **{"text.mrope_section": (4, 6, 6)}))


def packed_batch():
    """Four samples, images in the first and third, 111 tokens: 2 ranks cut inside the second image's sample."""
    tok, gen = D.Tokenizer(), torch.Generator().manual_seed(1)
    image = lambda side: Image.fromarray(  # noqa: E731
        torch.randint(0, 255, (side, side, 3), generator=gen, dtype=torch.uint8).numpy())
    records = [{"format": "caption", "images": [image(56)], "text": D.IMAGE_TAG + "a blue square"},
               {"format": "text", "text": "just some text to read here"},
               {"format": "caption", "images": [image(112)], "text": D.IMAGE_TAG + "noise at 112 pixels"},
               {"format": "text", "text": "the end, once more: done"}]
    return D.collate([D.encode(r, tok) for r in records], mrope=True)


def job_forward_backward(dist, out_dir):
    model = build_tiny()
    if dist.world_size > 1:
        P.shard_context(model, dist, dist.world_size)
    batch = packed_batch()
    n_loss = loss_tokens(batch)
    loss, stats = model(batch, loss_divisor=n_loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for g in grads.values():
        P.all_reduce_sum(g, dist)  # the gradient of the whole micro-batch's loss: the ranks' shares add up
    return {"loss": P.all_reduce_sum(loss.detach(), dist), "grads": grads, "n_loss": stats["n_loss_tokens"],
            "bounds": model.split_sequence(batch.input_ids.shape[0]).bounds if dist.world_size > 1 else None}


def test_split_forward_and_gradients_equal_one_process(tmp_path):
    """tiny with M-RoPE, one packed batch on 2 ranks: the loss and every gradient, summed over the ranks, equal
    one process's; the premise: the cut between the ranks falls inside a sample, inside an image's pads."""
    batch = packed_batch()
    ref = job_forward_backward(P.Dist(), tmp_path)
    ranks = spawn(job_forward_backward, 2, tmp_path)
    cut = ranks[0]["bounds"][1]
    starts = batch.cu_seqlens.tolist()
    assert cut not in starts and batch.input_ids[cut - 1] == batch.input_ids[cut] == build_tiny().config.image_pad_id
    assert ranks[0]["n_loss"] + ranks[1]["n_loss"] == loss_tokens(batch)
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], ref["loss"], rtol=1e-6, atol=0)
        for name, g in ref["grads"].items():
            torch.testing.assert_close(rank["grads"][name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def job_short_batch(dist, out_dir):
    """tiny-moe on a 3-token micro-batch: on 4 ranks, rank 0's share is empty."""
    torch.manual_seed(0)
    model = MLLM(config_from_preset("tiny-moe"))
    if dist.world_size > 1:
        P.shard_context(model, dist, dist.world_size)
    batch = D.collate([D.encode({"format": "text", "text": "ab"}, D.Tokenizer())])
    loss, _ = model(batch, loss_divisor=loss_tokens(batch))
    loss.backward()
    return {"loss": P.all_reduce_sum(loss.detach(), dist), "n_tokens": batch.input_ids.shape[0],
            "grads": {n: P.all_reduce_sum(p.grad, dist) for n, p in model.named_parameters()}}


@pytest.mark.slow
def test_a_rank_with_no_tokens_takes_part(tmp_path):
    ref = job_short_batch(P.Dist(), tmp_path)
    ranks = spawn(job_short_batch, 4, tmp_path)
    assert ref["n_tokens"] == 3  # bounds 0, 0, 1, 2, 3
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"], rtol=1e-6, atol=0)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference(mix, tmp_path_factory):
    """(preset) -> the one-process run on the CP tests' micro-batches, run once."""
    runs = {}

    def run(preset):
        if preset not in runs:
            out = tmp_path_factory.mktemp(f"ref-{preset}")
            train.main(cp_flags(out, mix, preset))
            runs[preset] = result(out)
        return runs[preset]
    return run


def cp_flags(out, mix, preset, *extra):
    return flags(out, mix, "2", "--preset", preset, *CP_PACKING, *(MROPE if preset == "tiny" else []), *extra)


def test_cp_2_equals_one_process_on_mixed_data(mix, reference, tmp_path):
    """tiny with M-RoPE, 3 samples per micro-batch (images in some), each micro-batch's tokens halved over 2
    ranks: losses, grad norms and weights as one process; tokens and loss tokens counted once. The premise:
    odd lengths (an uneven split), the cut inside a sample, rank 1's half with image pads at some steps only."""
    cfg, _ = train.parse_args(cp_flags(tmp_path, mix, "tiny"))
    loader = D.PackedLoader(train.build_source(cfg, 2, train.STAGES[2]), D.Tokenizer(), 160, seed=cfg.seed + 2,
                            mrope=True)
    halves = set()
    for _ in range(STEPS):
        b = next(loader)
        cut, pads = b.input_ids.shape[0] // 2, b.input_ids == D.Tokenizer().image_pad_id
        assert b.input_ids.shape[0] % 2 and 0 < cut - b.cu_seqlens[1] < b.cu_seqlens[2] - b.cu_seqlens[1]
        halves.add((bool(pads[:cut].any()), bool(pads[cut:].any())))
    assert {(True, False), (True, True), (False, False)} <= halves, halves
    log = finish(start(2, cp_flags(tmp_path, mix, "tiny", "--cp", "2")))
    assert "2 ranks = data parallel 1 x context parallel 2" in log
    assert_same_run(result(tmp_path), reference("tiny"), "--cp 2")
    rows, rows_ref = result(tmp_path)[0], reference("tiny")[0]
    assert [(r["tokens"], r["loss_tokens"]) for r in rows] == [(r["tokens"], r["loss_tokens"]) for r in rows_ref]


def test_cp_with_ep_and_fsdp_equals_one_process(mix, reference, tmp_path):
    """tiny-moe (MLA, the sequence-wise balance loss over samples cut between ranks) with --cp 2 --ep 2 --fsdp
    and activation checkpointing: backward recomputes each layer's all-to-alls in the same order on both ranks."""
    extra = ["--cp", "2", "--ep", "2", "--fsdp", "--activation-checkpointing"]
    finish(start(2, cp_flags(tmp_path, mix, "tiny-moe", *extra)))
    assert_same_run(result(tmp_path), reference("tiny-moe"), " ".join(extra))


@pytest.mark.slow
def test_cp_fsdp_stopped_resumes_at_cp_1(mix, reference, tmp_path):
    """--cp 2 --fsdp on 2 ranks stopped by SIGTERM, resumed by one rank (--cp 1, shards re-cut): as one process."""
    argv = cp_flags(tmp_path, mix, "tiny", "--fsdp")
    stop_mid_run(2, [*argv, "--cp", "2"], tmp_path, signal.SIGTERM, rank=1)
    log = finish(start(1, [*argv, "--resume"]))
    assert "stage 2: resumed from" in log
    assert_same_run(result(tmp_path), reference("tiny"), "--cp 2 --fsdp, resumed at --cp 1")


def test_one_process_resumes_at_cp_2(mix, reference, tmp_path, monkeypatch):
    """One process stopped after step 2, resumed under torchrun with --cp 2: as the uninterrupted run."""
    real_forward, calls = MLLM.forward, []

    def forward_with_sigterm(self, batch, loss_divisor=None):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_forward(self, batch, loss_divisor)

    monkeypatch.setattr(MLLM, "forward", forward_with_sigterm)
    train.main(cp_flags(tmp_path, mix, "tiny"))
    monkeypatch.undo()
    assert len(result(tmp_path)[0]) == 2
    finish(start(2, [*cp_flags(tmp_path, mix, "tiny"), "--cp", "2", "--resume"]))
    assert_same_run(result(tmp_path), reference("tiny"), "one process resumed at --cp 2")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--cp", "4"], ["--cp", "2", "--ep", "2"]])
def test_cp_on_4_ranks_equals_one_process(mix, reference, tmp_path, extra):
    """tiny-moe (4 heads) on 4 ranks: one micro-batch in quarters; and dp 2 x cp 2 with expert groups (the rest
    replicated) against one process with --grad-accum 2."""
    dp = 4 // int(extra[1])
    finish(start(4, cp_flags(tmp_path, mix, "tiny-moe", *extra)))
    if dp == 1:
        want = reference("tiny-moe")
    else:
        train.main(cp_flags(tmp_path / "ref", mix, "tiny-moe", "--grad-accum", str(dp)))
        want = result(tmp_path / "ref")
    assert_same_run(result(tmp_path), want, f"{extra} on 4 ranks")


@pytest.mark.parametrize("argv,world,error", [
    (["--cp", "4"], 4, "--cp 4: the decoder's 6 query / 2 key-value heads do not split over 4 ranks"),
    (["--cp", "2"], 3, "--cp 2: run under torchrun with a multiple of 2 processes"),
    (["--cp", "2"], 1, "--cp 2 splits the work over processes: run under torchrun")])
def test_impossible_cp_layouts_are_refused(mix, tmp_path, monkeypatch, argv, world, error):
    monkeypatch.setattr(train.parallel, "init_distributed", lambda device: train.parallel.Dist(0, world))
    if world == 1:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=error):
        train.main(flags(tmp_path / "out", mix, "2", *argv))
    assert not (tmp_path / "out" / "stage2").exists()  # refused before anything was written


def test_dry_run_plans_activations_per_rank(capsys):
    """--dry-run with --cp: each rank's activations are those of its packing-length / cp tokens; the rest of
    the plan is unchanged; heads that do not split are refused there too."""
    argv = ["--preset", "qwen2.5-vit-675m+qwen3-8b", "--dry-run", "8,64", "--fsdp", "--packing-length", "32768"]
    tables = []
    for cp in ("1", "4"):
        train.main([*argv, "--cp", cp])
        tables.append([line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
                       if line.startswith(("| 8 |", "| 64 |"))])
    config = config_from_preset("qwen2.5-vit-675m+qwen3-8b")
    for one, four in zip(*tables):
        assert one[:5] == four[:5]  # ranks, parameters, gradients, AdamW, gathered
        # the plan is for accelerators, where --dtype auto computes in bf16 (2 bytes)
        assert float(one[5]) == round(train.activation_bytes(config, 32768, 2) / 2 ** 30, 1)
        assert float(four[5]) == round(train.activation_bytes(config, 8192, 2) / 2 ** 30, 1)
    with pytest.raises(SystemExit, match="do not split over 3 ranks"):
        train.main([*argv, "--cp", "3"])
