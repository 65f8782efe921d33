"""A dense model trained by 1 process and by 2 data-parallel processes (same global batch, same
seed) follows the same loss curve: real gloo processes started by torchrun (the suite's one run under
torchrun; the deepspeed launcher's runs are in tests/integration/test_pretrain_cli.py, mpirun's in
test_mpi_launch.py)."""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics, run_launcher, tiny_model_args


# ZeRO-2 through the launcher; ZeRO 0 and 1 at 1 vs 2 and 4 data-parallel ranks are covered in-process,
# dense parameters included, by tests/distributed/test_expert_parallel.py (EP 1 cases).
@pytest.mark.parametrize("zero_stage", [2])
def test_one_vs_two_processes_same_losses(tmp_path, tiny_corpus, zero_stage):
    corpus, tok = tiny_corpus
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": %d}, "optimizer": {"type": "AdamW", "params": {"torch_adam": true}}}' % zero_stage)
    losses = {}
    for nprocs in (1, 2):
        metrics = tmp_path / f"m{nprocs}.jsonl"
        args = tiny_model_args(tmp_path, corpus, tok, "--micro-batch-size", "2", "--global-batch-size", "8",
                               "--train-iters", "6", "--lr", "3e-3", "--metrics-file", str(metrics),
                               "--ds_config", str(ds))
        out = run_launcher(nprocs, args, launcher="torchrun")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        losses[nprocs] = [r["lm_loss"] for r in read_metrics(metrics, "train")]
        valid = read_metrics(metrics, "valid")
        losses[f"valid{nprocs}"] = valid[-1]["lm_loss"]
    assert len(losses[1]) == len(losses[2]) == 6
    assert losses[1][-1] < losses[1][0]  # it trains
    for a, b in zip(losses[1], losses[2]):
        assert abs(a - b) <= 2e-5 * abs(a), (losses[1], losses[2])
    assert abs(losses["valid1"] - losses["valid2"]) <= 2e-5 * losses["valid1"]
