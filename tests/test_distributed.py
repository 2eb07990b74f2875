"""train.py itself on several gloo ranks (spawned with torchrun through its own entry point) against one process
on the same global batch: plain data parallelism and both FSDPs on a JSONL mix where a rank's micro-batch may
hold no image, stage 1 included; rank 0 alone writes; SIGTERM / SIGINT on one rank stops every rank after the
same step with one checkpoint and --resume equals the uninterrupted run; a 2-rank run resumes on one process."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import train
from model import MLLM, config_from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--text-num-layers", "2", "--vision-depth", "1", "--vision-fullatt-blocks", "0"]
STEPS, PACKING = 8, 64
RTOL = ATOL = 1e-5  # as tests/test_parallel.py (and its lr): sums in another order; Adam amplifies roundoff
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread too: tiny models gain nothing from two, and spawned ranks share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixed_jsonl(tmp_path, n=30):
    """Captions of a 56x56 square (every third record) among text-only records, all encoding to the same
    number of tokens: each packed micro-batch then holds one sample, taken in read order, so rank r's
    micro-batch of step k is sample 2k + r, and one process with --grad-accum 2 sees the same global batch."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (40, 80, 220)).save(tmp_path / "img" / "sq.png")
    image_tokens = 2 + 56 * 56 // 28 ** 2  # <|vision_start|>, a pad per 2x2 patches, <|vision_end|>
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i in range(n):
            text = f"{i:02d} the quick brown fox jumps over the lazy dog"
            f.write(json.dumps({"image": "sq.png", "text": text} if i % 3 == 0 else
                               {"text": text + "." * image_tokens}) + "\n")
    return ["--data", f"mixed={tmp_path / 'mixed.jsonl'}:1", "--image-root", str(tmp_path / "img")]


def flags(out, data_flags, stage="2", *extra):
    """train.py flags of a short run of `tiny` (fewer layers) on the JSONL mix, or of tiny-moe with --preset."""
    return ["--device", "cpu", "--stage", stage, "--max-steps", str(STEPS), "--packing-length", str(PACKING),
            "--out", str(out), "--log-every", "1", "--peak-tflops", "1", "--lr", "1e-4", "--warmup", "2",
            "--no-eval", *data_flags, *SMALL, *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(nproc, argv):
    """train.py under torchrun with nproc gloo ranks (nproc=0: plain `python train.py`); output captured."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return subprocess.Popen([sys.executable, *(launcher if nproc else []), "train.py", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers (their own session, see start)
        raise
    assert proc.returncode == 0, out
    return out


def result(out, stage="2"):
    """(metrics rows, final weights) of a run directory's stage."""
    stage_dir = os.path.join(out, f"stage{stage}")
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows, load_file(os.path.join(common.checkpoint_dir(stage_dir), "model.safetensors"))


def assert_same_run(got, want, what, rtol=RTOL, atol=ATOL):
    (rows, state), (rows_ref, state_ref) = got, want
    assert [r["step"] for r in rows] == [r["step"] for r in rows_ref], what
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows]), torch.tensor([r[key] for r in rows_ref]),
                                   rtol=rtol, atol=0, msg=lambda m: f"{what} {key}: {m}")
    assert state.keys() == state_ref.keys(), what
    for name in state_ref:
        torch.testing.assert_close(state[name], state_ref[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {name}: {m}")


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """The data flags, after checking the premise: equal-length samples, and steps where one rank's
    micro-batch has an image and the other's none (and steps where neither has one)."""
    tmp = tmp_path_factory.mktemp("mix")
    data_flags = mixed_jsonl(tmp)
    cfg, _ = train.parse_args(flags(tmp / "x", data_flags))
    source = train.build_source(cfg, 2, train.STAGES[2])
    records = [source[p] for p in range(2 * STEPS)]
    assert len({len(data.encode(r, data.Tokenizer()).tokens) for r in records}) == 1
    imaged = [(bool(records[2 * k]["images"]), bool(records[2 * k + 1]["images"])) for k in range(STEPS)]
    assert {(True, False), (False, True), (False, False)} <= set(imaged), imaged
    imaged_4 = {tuple(bool(source[4 * k + r]["images"]) for r in range(4)) for k in range(STEPS)}
    assert len(imaged_4 - {(False,) * 4, (True,) * 4}) >= STEPS // 2, imaged_4  # 4 ranks: some hold images
    return data_flags


@pytest.fixture(scope="module")
def one_process(mix, tmp_path_factory):
    """(stage, preset, micro-batches per step) -> that run on one process (in this one), run once."""
    runs = {}

    def run(stage, preset="tiny", accum=2):
        if (stage, preset, accum) not in runs:
            out = tmp_path_factory.mktemp(f"one{stage}")
            train.main(flags(out, mix, stage, "--grad-accum", str(accum), "--preset", preset))
            runs[stage, preset, accum] = result(out, stage)
        return runs[stage, preset, accum]
    return run


def test_image_free_micro_batch_adds_nothing_and_trains_stage_1(mix, one_process):
    """The blank image MLLM.forward runs for an image-free micro-batch leaves the loss as it is and gives the
    ViT and connector zero gradients; stage 1 (connector only) then still steps (it raised before)."""
    model = train.build_model("tiny", None, {}, 0)
    batch = data.collate([data.encode({"format": "text", "text": "no image here"}, data.Tokenizer())])
    model.eval()
    loss_eval, _ = model(batch)
    model.train()
    loss, _ = model(batch)
    loss.backward()
    assert torch.equal(loss, loss_eval)
    for name, p in model.named_parameters():
        assert p.grad is not None and (p.grad.abs().sum() > 0) == name.startswith("decoder."), name
    cfg, _ = train.parse_args(flags("x", mix, "1"))
    source = train.build_source(cfg, 1, train.STAGES[1])
    assert not all(source[p]["images"] for p in range(2 * STEPS))  # some stage-1 micro-batches have no image
    rows, _ = one_process("1")
    assert len(rows) == STEPS and all(r["loss"] is not None for r in rows)


@pytest.fixture(scope="module")
def data_parallel(mix, tmp_path_factory):
    """Plain torchrun on 2 ranks, uninterrupted: (run directory, its output)."""
    out = tmp_path_factory.mktemp("dp")
    return out, finish(start(2, flags(out, mix)))


def test_data_parallel_equals_one_process_and_rank_0_writes(data_parallel, one_process):
    out, log = data_parallel
    assert_same_run(result(out), one_process("2"), "2 ranks, data parallel")
    ckpt = common.checkpoint_dir(str(out / "stage2"))
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "train_state.pt"]  # no per-rank shards
    assert set(os.listdir(out)) == {".lock", "stage2"}
    assert set(os.listdir(out / "stage2")) - {"loss.png"} == {"args.json", "first_samples.jsonl", "latest",
                                                              "metrics.jsonl", os.path.basename(ckpt)}
    for step in range(1, STEPS + 1):  # one progress line per step: the other rank prints nothing
        assert log.count(f"stage 2 step {step:5d}/{STEPS}") == 1, log
    assert train.load_train_state(ckpt)["loader"][1]["batches"] == STEPS  # both ranks' data positions kept


def test_our_fsdp_stopped_on_2_ranks_resumes_on_1_and_equals_one_process(mix, one_process, tmp_path):
    """--fsdp over image-free micro-batches on 2 ranks, stopped by SIGTERM to rank 1, resumed under torchrun
    on one rank (optimizer shards re-cut, data positions merged): losses, grad norms, weights as one process."""
    argv = flags(tmp_path, mix, "2", "--fsdp")
    stop_mid_run(2, argv, tmp_path, signal.SIGTERM, rank=1)
    log = finish(start(1, [*argv, "--resume", "--grad-accum", "2"]))  # the same global batch
    assert "written by 2 rank(s), this run has 1" in log
    assert_same_run(result(tmp_path), one_process("2"), "ours FSDP on 2 ranks, resumed on 1")


@pytest.mark.slow
@pytest.mark.parametrize("mode,stage", [("ours", "1"), ("torch", "2")])
def test_fsdp_with_image_free_micro_batches_equals_one_process(mix, one_process, tmp_path, mode, stage):
    finish(start(2, flags(tmp_path, mix, stage, "--fsdp", mode)))
    assert_same_run(result(tmp_path, stage), one_process(stage), f"{mode} FSDP stage {stage}")


def test_ep_times_fsdp_on_2_ranks_equals_one_process_and_resumes(mix, one_process, tmp_path):
    """tiny-moe, --ep 2 --fsdp: both ranks one expert-parallel group, the rest sharded over both; SIGTERM after
    a step, then --resume (per-rank shards): losses, grad norms, weights and expert_bias as one process."""
    argv = flags(tmp_path, mix, "2", "--preset", "tiny-moe", "--ep", "2", "--fsdp")
    stop_mid_run(2, argv, tmp_path, signal.SIGTERM, rank=0)
    ckpt = common.checkpoint_dir(str(tmp_path / "stage2"))
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "shard_rank00000_of00002.pt",
                                        "shard_rank00001_of00002.pt", "train_state.pt"]
    finish(start(2, [*argv, "--resume"]))
    assert_same_run(result(tmp_path), one_process("2", "tiny-moe", 2), "EP 2 x FSDP on 2 ranks, resumed")
    with pytest.raises(SystemExit, match="per-rank optimizer shards"):  # one process: the error in docs/SCALING.md
        train.main(flags(tmp_path, mix, "2", "--preset", "tiny-moe", "--resume"))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [["--fsdp"], []])
def test_ep_groups_on_4_ranks_equal_one_process(mix, one_process, tmp_path, fsdp):
    """tiny-moe on 4 ranks, --ep 2: two expert-parallel groups of 2; each expert slice has 2 replicas (with
    --fsdp sharded over them, the rest over all 4; without, replicated)."""
    finish(start(4, flags(tmp_path, mix, "2", "--preset", "tiny-moe", "--ep", "2", *fsdp)))
    assert_same_run(result(tmp_path), one_process("2", "tiny-moe", 4), f"EP 2 {fsdp} on 4 ranks")


@pytest.mark.parametrize("argv,world,error", [
    (["--ep", "2"], 3, "multiple of 2 processes"),
    (["--ep", "3"], 3, "8 routed experts do not split over 3 ranks"),
    (["--ep", "2", "--fsdp", "torch"], 2, "not --fsdp torch")])
def test_impossible_expert_layouts_are_refused(mix, tmp_path, monkeypatch, argv, world, error):
    monkeypatch.setattr(train.parallel, "init_distributed", lambda device: train.parallel.Dist(0, world))
    with pytest.raises(SystemExit, match=error):
        train.main(flags(tmp_path, mix, "2", "--preset", "tiny-moe", *argv))


def workers(agent):
    """{rank: pid} of torchrun's worker processes."""
    with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    ranks = {}
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def stop_mid_run(nproc, argv, out, sig, rank):
    """Start a run, send `sig` to one rank (nproc=0: the single process) once step 1 is logged; returns the
    seconds from the signal to a clean exit of every process."""
    proc = start(nproc, argv)
    metrics, deadline = out / "stage2" / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    os.kill(workers(proc)[rank] if nproc else proc.pid, sig)
    t0 = time.time()
    log = finish(proc, timeout=120)
    assert "interrupted at step" in log, log
    return time.time() - t0


@pytest.mark.parametrize("sig,nproc", [(signal.SIGTERM, 2), pytest.param(signal.SIGINT, 2, marks=pytest.mark.slow),
                                       pytest.param(signal.SIGTERM, 0, marks=pytest.mark.slow)])
def test_signal_stops_every_rank_at_one_step_and_resume_equals_uninterrupted(
        mix, data_parallel, one_process, tmp_path, sig, nproc):
    seconds = stop_mid_run(nproc, flags(tmp_path, mix, "2", *([] if nproc else ["--grad-accum", "2"])),
                           tmp_path, sig, rank=1)
    assert seconds < 30
    stage_dir = tmp_path / "stage2"
    step = train.load_train_state(common.checkpoint_dir(str(stage_dir)))["step"]
    assert 1 <= step < STEPS and len(result(tmp_path)[0]) == step
    assert [d for d in os.listdir(stage_dir) if d.startswith(("step-", ".tmp"))] == [f"step-{step:06d}"]
    if nproc:
        shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-one")  # for the 1-process resume below
    if nproc:  # resumed on the same world size on the same machine: bit for bit
        finish(start(nproc, flags(tmp_path, mix, "2", "--resume")))
        assert_same_run(result(tmp_path), result(data_parallel[0]), "resumed on 2 ranks", rtol=0, atol=0)
        # resumed on one process (the ranks' data positions merged): the one-process run, to roundoff
        one = tmp_path.parent / f"{tmp_path.name}-one"
        train.main(flags(one, mix, "2", "--resume", "--grad-accum", "2"))
        assert_same_run(result(one), one_process("2"), "2 ranks resumed on 1")
    else:  # resumed in this process (other thread count): the one-process run, to roundoff
        train.main(flags(tmp_path, mix, "2", "--resume", "--grad-accum", "2"))
        assert_same_run(result(tmp_path), one_process("2"), "one process resumed")


def test_sigterm_on_one_process_checkpoints_exits_0_and_resumes(mix, one_process, tmp_path, monkeypatch):
    """The same in this process (the spawned variant above is slow): SIGTERM during step 2 ends the run after
    step 2 with its checkpoint, main() returns (exit status 0), --resume equals the uninterrupted run."""
    real_forward, calls = MLLM.forward, []

    def forward_with_sigterm(self, batch, loss_divisor=None):
        calls.append(1)
        if len(calls) == 3:  # step 2's first micro-batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, batch, loss_divisor)

    monkeypatch.setattr(MLLM, "forward", forward_with_sigterm)
    train.main(flags(tmp_path, mix, "2", "--grad-accum", "2"))
    monkeypatch.setattr(MLLM, "forward", real_forward)
    assert os.listdir(tmp_path / "stage2").count("step-000002") == 1 and len(result(tmp_path)[0]) == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is only there while training
    train.main(flags(tmp_path, mix, "2", "--grad-accum", "2", "--resume"))
    assert_same_run(result(tmp_path), one_process("2"), "one process resumed after SIGTERM", rtol=0, atol=0)


def test_memory_plan_matches_the_parameter_counts(capsys):
    """--dry-run's per-rank parameter bytes against the parameter count (test_model checks it against the
    published sizes) and the routed experts' size from the config: FSDP (with or without EP) holds 1/W of
    everything, EP alone the rest whole and 1/E of the experts."""
    for preset, world, ep in (("qwen2.5-vit-675m+qwen3-8b", 8, 1), ("qwen2.5-vit-675m+deepseek-v3", 256, 64)):
        config = config_from_preset(preset)
        with torch.device("meta"):
            model = MLLM(config)
        t, total = config.text, sum(p.numel() for p in model.parameters())
        routed = (t.num_layers - t.first_k_dense) * t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size
        sharded, replicated = (train.parallel.memory_plan(model, world, ep, fsdp) for fsdp in (True, False))
        assert sharded["parameters"] == pytest.approx(4 * total / world, rel=1e-12)
        assert replicated["parameters"] == pytest.approx(4 * (total - routed + routed / ep), rel=1e-12)
        assert sharded["optimizer"] == 2 * sharded["parameters"] and replicated["gathered"] == 0
        assert 0 < sharded["gathered"] < 2 * 4 * total / 10  # the root unit and two blocks, far from the model
    train.main(["--preset", "tiny-moe", "--dry-run", "2,4", "--ep", "2", "--fsdp"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| 2 |") and table[2].startswith("| 4 |")
