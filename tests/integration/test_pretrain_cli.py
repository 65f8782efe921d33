"""The entry script from the command line: dense, standard MoE and SaMoE train with 2 processes; bad
input stops with one line. The command a user types (the deepspeed launcher) runs SaMoE, expert
parallelism at 2 and the one-process errors; the other runs start the same script's ranks from the
preloaded fork server (tests/helpers.run_launcher), which saves the launcher's and each rank's
imports (~15 s a run on a 2-core CPU) and nothing of the script's path."""

from __future__ import annotations

import functools
import math

import pytest

from tests import helpers
from tests.helpers import error_lines, read_metrics, tiny_model_args

run_launcher = functools.partial(helpers.run_launcher, launcher="deepspeed")  # the command a user types
launch_preloaded = helpers.run_launcher  # the same script's ranks as forks of the preloaded server
# the kind trained through the deepspeed launcher (the others from the preloaded fork server)
LAUNCHED = "samoe"

KINDS = {
    "dense": [],
    "moe": ["--num-experts", "4", "--moe-router-topk", "2", "--moe-z-loss-coeff", "1e-3"],
    "samoe": ["--num-experts", "4", "--moe-router-topk", "2", "--samoe-pool-size", "2"],
    "shared": ["--num-experts", "4", "--moe-router-topk", "1", "--samoe-pool-size", "4", "--samoe-route-to-pool"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """Train each model kind once (2 processes, 4 layers, every other layer MoE)."""
    corpus, tok = tiny_corpus
    out = {}
    for kind, extra in KINDS.items():
        tmp = tmp_path_factory.mktemp(kind)
        metrics = tmp / "metrics.jsonl"
        args = tiny_model_args(tmp, corpus, tok, "--num-layers", "4", "--moe-layer-freq", "2",
                               "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "30",
                               "--lr", "5e-3", "--eval-interval", "15", "--log-interval", "10",
                               "--metrics-file", str(metrics), *extra)
        run = (run_launcher if kind == LAUNCHED else launch_preloaded)(2, args)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        out[kind] = (run, metrics)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_trains_and_reports(trained, kind):
    run, metrics = trained[kind]
    train = read_metrics(metrics, "train")
    final = read_metrics(metrics, "final")[0]
    assert len(train) == 30 and train[-1]["consumed_samples"] == 30 * 16
    # the validation loss at the end is clearly below the loss of the first step
    assert final["final_valid_loss"] < final["first_train_loss"] - 0.5, final
    assert "validation loss at the end" in run.stdout + run.stderr
    assert "iteration       10/      30" in run.stdout + run.stderr
    for rec in train:
        for key in ("iteration", "consumed_samples", "ms_per_iter", "tokens_per_sec", "lr", "lm_loss", "grad_norm"):
            assert key in rec
    if kind != "dense":
        assert all(r["load_balancing_loss"] > 0 for r in train)
    if kind == "moe":
        assert all(r["z_loss"] > 0 for r in train)
    logged = [r for r in train if "combination_entropy" in r]
    if kind == "samoe":  # logged at every log interval, per SaMoE layer, within [0, log P]
        assert [r["iteration"] for r in logged] == [10, 20, 30]
        assert all(len(r["combination_entropy_per_layer"]) == 2 for r in logged)
        assert all(0.0 < e <= math.log(2) + 1e-6 for r in logged for e in r["combination_entropy_per_layer"])
        assert "combination entropy:" in run.stdout + run.stderr
    else:
        assert not logged
    flow = [r for r in train if "expert_tokens_received" in r]
    if kind != "dense":  # per-expert gradient flow at every log interval: standard experts or the pool's
        assert [r["iteration"] for r in flow] == [10, 20, 30]
        # [MoE layers][experts] for a standard MoE; [P] for a pool (2 for SaMoE, 4 for shared routing)
        key, size = {"moe": ("expert_grad_norm", 2), "samoe": ("pool_grad_norm", 2), "shared": ("pool_grad_norm", 4)}[kind]
        assert all(key in r and len(r[key]) == size for r in flow)
        assert all(sum(map(sum, r["expert_tokens_received"])) > 0 for r in flow)
    else:
        assert not flow


def test_parameter_accounting(trained):
    params = {kind: read_metrics(trained[kind][1], "final")[0]["params"] for kind in KINDS}
    h, f, n, layers_moe, pool = 32, 128, 4, 2, 2
    expert = 2 * h * f
    assert params["dense"]["expert"] == 0
    assert params["moe"]["expert"] == layers_moe * n * expert
    assert params["samoe"]["expert"] == params["samoe"]["pool"] == pool * expert
    # SaMoE holds P/(L*N) of the standard model's expert parameters
    assert params["samoe"]["expert"] * layers_moe * n == params["moe"]["expert"] * pool
    assert params["samoe"]["combination"] == layers_moe * n * pool
    assert params["moe"]["router"] == params["samoe"]["router"] == layers_moe * n * h
    # same active compute per token for both MoE kinds
    assert params["moe"]["active_per_token"] == params["samoe"]["active_per_token"]
    assert params["moe"]["total"] - params["samoe"]["total"] == (layers_moe * n - pool) * expert - layers_moe * n * pool
    # shared routing: the pool of 4 experts, no combination, a router over the pool, top-1
    shared = params["shared"]
    assert shared["expert"] == shared["pool"] == n * expert and shared["combination"] == 0
    assert shared["router"] == layers_moe * n * h
    assert shared["active_per_token"] == shared["dense"] + shared["router"] + layers_moe * 1 * expert


def test_vocab_mismatch_is_one_line(tmp_path, tiny_corpus):
    corpus, tok = tiny_corpus
    run = run_launcher(1, tiny_model_args(tmp_path, corpus, tok, "--vocab-size", "999", "--train-iters", "1"))
    assert run.returncode != 0
    errors = error_lines(run.stderr)
    assert len(errors) == 1 and "--vocab-size 999 does not match the tokenizer" in errors[0]
    assert "Traceback" not in run.stderr


def test_missing_data_is_one_line(tmp_path, tiny_corpus):
    _, tok = tiny_corpus
    run = run_launcher(1, tiny_model_args(tmp_path, tmp_path / "nope.jsonl", tok, "--train-iters", "1"))
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1 and "does not exist" in errors[0]
    assert "fetch_corpus.py" in errors[0]


@pytest.mark.parametrize("nprocs, ep", [(2, 2), (4, 4)])
def test_expert_parallel_from_the_cli(tmp_path, tiny_corpus, nprocs, ep):
    corpus, tok = tiny_corpus
    metrics = tmp_path / "metrics.jsonl"
    launch = run_launcher if nprocs == 2 else launch_preloaded
    run = launch(nprocs, tiny_model_args(
        tmp_path, corpus, tok, "--num-experts", "4", "--samoe-pool-size", "2", "--expert-model-parallel-size", str(ep),
        "--micro-batch-size", "2", "--global-batch-size", str(2 * nprocs), "--train-iters", "4",
        "--log-interval", "2", "--metrics-file", str(metrics)))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    lines = [line for line in log.splitlines() if "expert load, MoE layer 0" in line]
    assert len(lines) == 2  # at each log interval
    assert all(f"r{nprocs - 1}=[" in line for line in lines)  # per-rank token counts
    rec = [r for r in read_metrics(metrics, "train") if "expert_load" in r][-1]
    per_rank = rec["expert_tokens_per_rank"]  # [world][MoE layers][experts]
    assert len(per_rank) == nprocs and len(per_rank[0]) == 2 and len(per_rank[0][0]) == 4
    # every token of every rank is routed to k=2 experts in each layer over the 2 logged steps
    tokens_per_rank = 2 * 2 * 32  # micro-batch x steps x seq
    assert all(sum(layer) == 2 * tokens_per_rank for rank in per_rank for layer in rank)
    assert abs(sum(rec["expert_load"][0]) - 1.0) < 1e-9
    # gradient flow: what the experts received (on their own EP rank) is what all ranks routed to them
    routed = [[sum(rank[layer][e] for rank in per_rank) for e in range(4)] for layer in range(2)]
    assert rec["expert_tokens_received"] == routed
    served = rec["pool_tokens"]  # [P]: the A-weighted sum over layers and experts
    assert len(served) == 2 and abs(sum(served) - sum(map(sum, routed))) < 1e-6 * sum(map(sum, routed))
    assert len(rec["pool_grad_norm"]) == 2 and all(g > 0 for g in rec["pool_grad_norm"])


def test_vocabulary_not_divisible_by_tp_is_one_line(tmp_path):
    """The tokenizer's vocabulary (161) is known only once the data is read; TP 2 cannot split it."""
    from tests.helpers import make_tiny_corpus

    corpus, tok = make_tiny_corpus(tmp_path / "odd", vocab_size=161)
    run = launch_preloaded(2, tiny_model_args(tmp_path, corpus, tok, "--tensor-model-parallel-size", "2",
                                              "--micro-batch-size", "2", "--train-iters", "1"))
    errors = error_lines(run.stderr)
    assert run.returncode != 0 and len(errors) == 1, run.stderr[-3000:]
    assert "the vocabulary has 161 tokens, which --tensor-model-parallel-size 2 does not divide" in errors[0]
    assert "Traceback" not in run.stderr
