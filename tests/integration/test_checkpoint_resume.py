"""Exact resume: N steps, stop, resume to 2N equals 2N uninterrupted steps (a standard MoE at 2 processes, EP=2; the
sharded pool at 4 processes, EP2 x EDP2, under ZeRO-0, whose optimizer state DeepSpeed would keep
for one column slice only, and ZeRO-1; tensor parallelism at 4 processes, TP2 x EP2 with sequence
parallelism, whose DeepSpeed files are per TP rank: SaMoE's replicated pool at EP=2 under ZeRO-1, plus TP,
and the sharded pool under ZeRO-2, plus TP)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import read_metrics, run_launcher, tiny_model_args

SAMOE = ["--num-experts", "4", "--samoe-pool-size", "2"]
SHARDED = [*SAMOE, "--samoe-pool-sharding", "sharded"]
KINDS = {  # kind: (flags, processes, ZeRO stage)
    "moe": (["--num-experts", "4"], 2, 1),
    "sharded-zero0": (SHARDED, 4, 0),
    "sharded-zero1": (SHARDED, 4, 1),
    "tensor-parallel": ([*SAMOE, "--tensor-model-parallel-size", "2", "--sequence-parallel"], 4, 1),  # TP2 x EP2
    "tensor-parallel-sharded": ([*SHARDED, "--tensor-model-parallel-size", "2", "--sequence-parallel"], 4, 2),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_continues_the_same_run_bitwise(tmp_path, tiny_corpus, kind):
    corpus, tok = tiny_corpus
    flags, nprocs, zero = KINDS[kind]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": zero}, "optimizer": {"type": "AdamW", "params": {}}}))
    common = [*flags, "--expert-model-parallel-size", "2", "--micro-batch-size", "2", "--ds_config", str(ds),
              "--global-batch-size", "8", "--lr", "3e-3", "--train-iters", "8", "--lr-warmup-iters", "2",
              "--eval-iters", "1", "--hidden-dropout", "0.1"]  # dropout: the RNG state must resume too

    def run(name, *extra):
        metrics = tmp_path / f"{name}.jsonl"
        out = run_launcher(nprocs, tiny_model_args(tmp_path, corpus, tok, *common, "--metrics-file", str(metrics),
                                                   *extra))
        assert out.returncode == 0, out.stderr[-3000:]
        return out, metrics

    _, full = run("full")
    ckpt = tmp_path / "ckpt"
    _, first = run("first", "--save", str(ckpt), "--save-interval", "4", "--exit-interval", "4")
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    if zero == 0:  # DeepSpeed's per-EP-rank optimizer files, which the resume's completeness check names
        assert sorted(p.name for p in (ckpt / "iter_0000004").glob("expp_rank_*")) == [
            "expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"]
    out, second = run("second", "--load", str(ckpt))
    assert "at iteration 4 (32 samples consumed)" in out.stdout + out.stderr

    keys = ("iteration", "consumed_samples", "lm_loss", "load_balancing_loss", "grad_norm")
    want = [tuple(r[k] for k in keys) for r in read_metrics(full, "train")]
    got = [tuple(r[k] for k in keys) for r in read_metrics(first, "train") + read_metrics(second, "train")]
    assert got == want  # bitwise: fp32 on CPU, same reduction order
    assert read_metrics(second, "final")[0]["final_valid_loss"] == read_metrics(full, "final")[0]["final_valid_loss"]
