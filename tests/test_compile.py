"""--compile (model.compile_blocks: regional torch.compile of the ViT blocks and decoder layers): the same losses
as eager, no recompiling as the packed length changes, with activation checkpointing; refused with sharding."""
import json
import os

import pytest
import torch

import train

SMALL = ["--text-num-layers", "2", "--vision-depth", "2", "--vision-fullatt-blocks", "1"]


def run_flags(out, *extra):
    return ["--device", "cpu", "--stage", "3", "--max-steps", "4", "--packing-length", "256", "--out", str(out),
            "--log-every", "1", "--peak-tflops", "1", "--no-eval", "--data-workers", "0", *SMALL, *extra]


def losses(out):
    with open(os.path.join(out, "stage3", "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow  # compiling costs ~30-60 s on a shared 2-core CPU
def test_compiled_steps_equal_eager_without_recompiling(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    torch.set_num_threads(1)
    train.main(run_flags(tmp_path / "eager"))
    graphs, lines, lengths = [], [], []
    real_record = train.StageLog.record

    def record(self, st, s, batches, *args):  # the compiled graphs after each step, and its shapes
        graphs.append(counters["stats"]["unique_graphs"])
        b = batches[0]  # tokens, ViT patches, samples
        lengths.append((len(b.input_ids), len(b.pixel_patches), len(b.cu_seqlens) - 1))
        if st.step == st.total:  # the dev loss (no grad) compiles its own graphs
            torch._dynamo.config.error_on_recompile = False
        return real_record(self, st, s, batches, *args)

    monkeypatch.setattr(train.StageLog, "record", record)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # training: neither per layer nor length
    monkeypatch.setattr(torch._dynamo.config, "nested_graph_breaks", False)  # compile_blocks sets it
    torch._dynamo.reset()  # graphs an earlier test compiled for these functions would count as recompiles
    counters.clear()
    train.run(*train.parse_args(run_flags(tmp_path / "compiled", "--compile", "--activation-checkpointing")),
              log=lines.append)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert abs(compiled[0] - eager[0]) <= 1e-3 * abs(eager[0])
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-2, atol=0)
    assert len(set(lengths)) > 1 and graphs[0] > 0 and len(set(graphs)) == 1, (lengths, graphs)  # no recompiles
    assert sum("--compile: the first step took" in line for line in lines) == 1


def test_compile_refused_with_sharding(tmp_path):
    for extra in (["--fsdp", "ours"], ["--ep", "2"], ["--cp", "2"]):
        with pytest.raises(SystemExit, match="--compile with --(fsdp|ep|cp): not supported"):
            train.main(run_flags(tmp_path, "--compile", *extra))
