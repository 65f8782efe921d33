"""tools/convert_checkpoint.py reshard, end to end with the real launcher.

A SaMoE and a standard-MoE model train for a few steps at expert-parallel size 2 on 2 processes (a
sharded-pool SaMoE and a TP2 x EP2 one on 4) and save. ``reshard`` writes weights-only checkpoints for other layouts, and the trainer loads them
there with a fresh optimizer, continuing the data stream and LR schedule at the source's iteration.
The loss is the check that the model survived:

- the plain model (``export`` of the resharded checkpoint, no megatron) computes the original
  run's final validation loss from the resharded weights;
- the runs loaded at another EP size and world size log, for their first step, the training loss
  the plain model computes on the same global batch (a fresh optimizer changes only the update,
  not the first forward).
"""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from tests.helpers import read_metrics, run_launcher, run_tool, tiny_model_args

COMMON = ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
          "--lr-warmup-iters", "1"]
# (EP size, processes) each checkpoint is loaded at: one launch per kind keeps the test near a minute
# (a 4-process launch costs ~20 s on 2 CPU cores, a 1-process one ~8 s, a 2-process one ~12 s).
TARGETS = {"samoe": (4, 4), "moe": (1, 1), "sharded": (1, 2), "tensor-parallel": (1, 1),
           "tensor-parallel-sharded": (1, 1)}
KIND_FLAGS = {"samoe": ["--samoe-pool-size", "2"], "moe": [],
              "sharded": ["--samoe-pool-size", "2"], "tensor-parallel": ["--samoe-pool-size", "2"],
              "tensor-parallel-sharded": ["--samoe-pool-size", "2"]}
# The sharded kind is written by 4 processes, EP2 x EDP2, with the pool's columns split over EDP, and
# loaded at EP1 on 2 processes with the pool replicated: model.safetensors holds it whole either way.
# The tensor-parallel kind is written by 4 processes, TP2 x EP2 with sequence parallelism (the model
# file holds whole weights), and loaded at TP1 x EP1 on 1 process; so is the tensor-parallel-sharded
# kind, the same with the pool's columns split over EDP 2 (TP ranks of a replica share a slice).
SOURCE = {"sharded": (4, ["--samoe-pool-sharding", "sharded"]),
          "tensor-parallel": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
          "tensor-parallel-sharded": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                          "--samoe-pool-sharding", "sharded"])}


def convert(*argv: str) -> subprocess.CompletedProcess:
    return run_tool("convert_checkpoint", list(argv), timeout=120)


def plain_losses(args: list[str], world_size: int, ckpt, tmp_path, consumed: int) -> tuple[float, float]:
    """(validation loss, loss of the training batch after ``consumed`` samples) of ``ckpt``'s plain
    model on the data ``args`` describes, micro-batch by micro-batch as the trainer reads it."""
    from samoe_dist.arguments import parse_args
    from samoe_dist.config import validate_layout
    from samoe_dist.data_adapter import build_training_data
    from samoe_dist.export import PlainGPT
    from samoe_dist.export.convert import export
    from samoe_dist.export.evaluate import mean_lm_loss

    cfg, _ = parse_args(args)
    validate_layout(cfg, world_size)  # sets the global batch size as the run did
    data = build_training_data(cfg, SimpleNamespace(is_main=True, dp_size=1))
    model = PlainGPT.from_pretrained(export(str(ckpt), str(tmp_path / "plain.safetensors"))[0])
    tr = cfg.training
    micro = tr.micro_batch_size
    per_batch = tr.global_batch_size // micro

    def batches(split: str, first_sample: int):
        return [data.micro_batch(split, first_sample, micro, 0, 1, m) for m in range(per_batch)]

    valid = [b for i in range(tr.eval_iters) for b in batches("valid", i * tr.global_batch_size)]
    return mean_lm_loss(model, valid), mean_lm_loss(model, batches("train", consumed))


@pytest.mark.parametrize("kind", list(TARGETS))
def test_reshard_loads_at_another_expert_parallel_size(tmp_path, tiny_corpus, kind):
    corpus, tok = tiny_corpus
    model_flags = [*COMMON, *KIND_FLAGS[kind]]
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "train.jsonl"
    source_procs, source_flags = SOURCE.get(kind, (2, []))
    run = run_launcher(source_procs, tiny_model_args(tmp_path, corpus, tok, *model_flags, *source_flags,
                                                     "--expert-model-parallel-size", "2", "--train-iters", "3",
                                                     "--save", str(ckpt), "--metrics-file", str(metrics)))
    assert run.returncode == 0, run.stderr[-3000:]
    original_valid = read_metrics(metrics, "final")[0]["final_valid_loss"]

    ep, nprocs = TARGETS[kind]
    resharded = tmp_path / f"ckpt_ep{ep}"
    out = convert("reshard", "--load", str(ckpt), "--save", str(resharded), "--expert-model-parallel-size", str(ep),
                  "--world-size", str(nprocs))
    assert out.returncode == 0, out.stderr
    assert (resharded / "latest").read_text() == "iter_0000003"

    loaded_metrics = tmp_path / "loaded.jsonl"
    loaded_args = tiny_model_args(tmp_path, corpus, tok, *model_flags, "--expert-model-parallel-size", str(ep),
                                  "--train-iters", "4", "--load", str(resharded), "--metrics-file", str(loaded_metrics))
    run = run_launcher(nprocs, loaded_args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(weights only, fresh optimizer) at iteration 3 (24 samples consumed)" in run.stdout + run.stderr
    first = read_metrics(loaded_metrics, "train")[0]
    assert first["iteration"] == 4 and first["consumed_samples"] == 32
    # the LR schedule continues too: step 4's lr is the one the original schedule gives it
    from samoe_dist.arguments import parse_args
    from samoe_dist.optim import lr_at

    assert first["lr"] == pytest.approx(lr_at(3, parse_args(loaded_args)[0].training))

    valid, train = plain_losses(loaded_args, nprocs, resharded, tmp_path, consumed=24)
    assert abs(valid - original_valid) <= 1e-5 * abs(original_valid), (valid, original_valid)
    assert abs(train - first["lm_loss"]) <= 1e-5 * abs(train), (train, first["lm_loss"])
