"""Tensor (and sequence) parallelism equals the single-process run, at world 4 in real gloo processes.

Dense, standard MoE and SaMoE: losses, gradient norm and every parameter (tensor-parallel weights
gathered whole) after each of 3 steps, against one process training on the same global batch, as
tests/distributed/test_expert_parallel.py does for expert parallelism (same tolerances, same reasons).
Layout (megatron-core's): TP groups {0,1} and {2,3}; EP groups of consecutive ranks, so at EP = 2
the two TP ranks of a replica hold different experts.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_world
from tests.distributed.test_expert_parallel import (BF16_ADAM_EPS, BF16_ROUNDINGS, STEPS, _args, _assert_same_run,
                                                    _grad_norm, assert_bf16_tracks)

_references: dict = {}


def _tp_args(tmp, corpus, tok, kind, tp, ep, zero, *extra):
    args = _args(tmp, corpus, tok, "moe" if kind == "dense" else kind, 2, ep, zero, *extra)
    if kind == "dense":  # the same run without experts
        i = args.index("--num-experts")
        del args[i:i + 4]
    return [*args, "--tensor-model-parallel-size", str(tp)]


def _reference(tmp_path_factory, tiny_corpus, kind, *extra, zero=0):
    key = (kind, extra, zero)
    if key not in _references:
        tmp = tmp_path_factory.mktemp(f"ref_{kind}")
        _references[key] = run_world(1, _tp_args(tmp, *tiny_corpus, kind, 1, 1, zero, *extra), STEPS, tmp / "out",
                                     probe=_grad_norm)
    return _references[key]


CASES = [  # (kind, TP, EP, ZeRO stage, extra flags)
    ("dense", 2, 1, 1, ()),  # TP2 x DP2
    ("dense", 2, 1, 0, ("--sequence-parallel",)),
    ("moe", 2, 2, 1, ("--sequence-parallel",)),  # TP2 x EP2: each TP rank holds 2 of the 4 experts
    ("moe", 2, 2, 2, ()),  # without SP: the MoE layers split the tokens over TP themselves
    ("moe", 2, 1, 1, ()),  # TP2 x DP2, EP 1: megatron's experts on every rank, gradient shares summed over TP
    ("samoe", 2, 1, 2, ("--sequence-parallel",)),  # experts (the pool) replicated on the TP ranks
    ("samoe", 2, 2, 0, ("--sequence-parallel",)),
    ("samoe", 2, 2, 1, ()),
    # the sharded pool: columns split over EDP 2 ({0, 2}, {1, 3}); a replica's TP ranks hold one slice
    ("samoe", 2, 2, 1, ("--sequence-parallel", "--samoe-pool-sharding", "sharded")),
    ("samoe", 2, 2, 2, ("--samoe-pool-sharding", "sharded", "--samoe-prefetch-gather")),
    ("samoe", 2, 1, 0, ("--samoe-pool-sharding", "sharded")),  # EP 1: columns split over all 4 ranks
    ("samoe", 2, 1, 1, ("--sequence-parallel", "--samoe-pool-sharding", "sharded")),
]


@pytest.mark.parametrize("kind, tp, ep, zero, extra", CASES)
def test_tensor_parallel_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, kind, tp, ep, zero, extra):
    ref = _reference(tmp_path_factory, tiny_corpus, kind)
    runs = run_world(4, _tp_args(tmp_path, *tiny_corpus, kind, tp, ep, zero, *extra), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    assert [r["tp_rank"] for r in runs] == [0, 1, 0, 1]
    assert [r["ep_rank"] for r in runs] == [r % ep for r in range(4)]
    assert all(r["param_counts"] == ref[0]["param_counts"] for r in runs)  # whole-model counts on every rank
    _assert_same_run(runs, ref)


# bf16: the roundings of tests/distributed/test_expert_parallel.py's EP=2 case (13), and those TP adds
# on the path of one gradient element, each a partial result rounded to bf16 before the TP sum where
# the single process rounds the whole result once:
#   - forward, each row-parallel layer (linear_proj, linear_fc2; 2 layers) sums the ranks' bf16
#     partial outputs                                                                             4
#   - backward, each column-parallel layer (linear_qkv, linear_fc1; 2 layers) sums the ranks' bf16
#     partial input gradients, and so does the output layer                                      5
#   - the pool's gradient shares of the two TP ranks (sequence parallelism) are added in bf16      1
BF16_ROUNDINGS_TP = BF16_ROUNDINGS + 4 + 5 + 1


@pytest.mark.parametrize("zero, pool", [(1, ()), (0, ("--samoe-pool-sharding", "sharded"))])
def test_bf16_tensor_parallel_tracks_single_process(tmp_path, tmp_path_factory, tiny_corpus, zero, pool):
    """SaMoE, bf16, TP2 x EP2 with sequence parallelism at world 4 follows the single-process bf16 run
    of the same ZeRO stage within the bounds of assert_bf16_tracks for BF16_ROUNDINGS_TP roundings:
    the replicated pool under ZeRO-1, and the sharded pool without ZeRO, whose norm the trainer takes
    (DeepSpeed's unfused bf16 optimizer would count TP rank 0's shards only), with one rounding more:
    an expert's weight gradient is split over the 2 EDP ranks and summed by the reduce-scatter in bf16."""
    extra = ("--bf16", "--adam-eps", BF16_ADAM_EPS)
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", *extra, zero=zero)
    runs = run_world(4, _tp_args(tmp_path, *tiny_corpus, "samoe", 2, 2, zero, *extra, "--sequence-parallel", *pool),
                     STEPS, tmp_path / "out", probe=_grad_norm)
    assert_bf16_tracks(runs, ref, BF16_ROUNDINGS_TP + (1 if pool else 0))
