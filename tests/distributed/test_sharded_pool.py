"""The column-sharded pool (--samoe-pool-sharding sharded, DESIGN.md §6) equals the single-process
reference: real gloo processes at world 4, DeepSpeed engine, losses, gradient norms and every
parameter (the pool gathered whole) after each of 3 steps.

Layouts: EP2 x EDP2, EP1 x EDP4 (every rank holds a quarter of the pool) and EP4 x EDP1 (one shard:
the replicated pool); ZeRO 0, 1 and 2; top-1 and top-2; gradient accumulation 2; and one case each of
full recompute, capacity factor 1.0, SwiGLU, the allgather dispatcher, shared routing, and bf16 (at
the rounding bound of tests/distributed/test_expert_parallel.py).
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_world
from tests.distributed.test_expert_parallel import (BF16_ADAM_EPS, BF16_ROUNDINGS, STEPS, _args, _assert_same_run,
                                                    _grad_norm, _reference, assert_bf16_tracks)

SHARDED = ("--samoe-pool-sharding", "sharded")
ACCUMULATE = ("--global-batch-size", "16")  # 16 / (micro-batch 2 x 4 ranks): 2 micro-batches a step

CASES = [  # (ep, topk, zero, extra flags), world 4; each layout, ZeRO stage and feature at least once
    # Capacity 1.0 drops tokens, which leaves some embedding rows' gradient within fp32 rounding of 0
    # (a sum of cancelling terms of ~1e-2, so a rounding difference d ~ 1e-9 between layouts); with
    # eps 1e-6 Adam turns that into lr * d / eps ~ 1e-5, PARAM_ATOL itself (measured: 2.3e-5 on one
    # of 5120 elements, also with the replicated pool). eps 1e-4 bounds it by 1e-7; a gradient off by
    # a factor is still caught by the gradient norm, compared at 1e-5.
    (2, 2, 1, ("--moe-expert-capacity-factor", "1.0", "--adam-eps", "1e-4")),
    (2, 2, 2, (*ACCUMULATE, "--recompute-granularity", "full")),
    (1, 1, 0, (*ACCUMULATE, "--swiglu")),
    (4, 2, 1, ("--moe-token-dispatcher-type", "allgather")),
]


@pytest.mark.parametrize("ep, topk, zero, extra", CASES)
def test_sharded_pool_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, ep, topk, zero, extra):
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", topk, *extra)
    runs = run_world(4, _args(tmp_path, *tiny_corpus, "samoe", topk, ep, zero, *SHARDED, *extra), STEPS,
                     tmp_path / "out", probe=_grad_norm)
    whole = ref[0]["params"][0]["gpt.samoe_pool.w1"].numel()
    assert all(r["pool_w1_numel"] * (4 // ep) == whole for r in runs)  # each rank holds 1/EDP of the pool
    _assert_same_run(runs, ref)


def test_sharded_shared_routing_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus):
    """Shared routing on a sharded pool: each rank gathers its owned pool rows' columns, no combination."""
    ref = _reference(tmp_path_factory, tiny_corpus, "shared", 2)
    runs = run_world(4, _args(tmp_path, *tiny_corpus, "shared", 2, 2, 1, *SHARDED), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    _assert_same_run(runs, ref)


def test_sharded_bf16_tracks_single_process(tmp_path, tmp_path_factory, tiny_corpus):
    """bf16, ZeRO-1, EP2 x EDP2 against the single-process bf16 ZeRO-1 run. One rounding more than
    the replicated EP=2 bound: an expert's weight gradient is split over the 2 EDP ranks and summed
    by the reduce-scatter in bf16."""
    extra = ("--bf16", "--adam-eps", BF16_ADAM_EPS)
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", 2, *extra, zero=1)
    runs = run_world(4, _args(tmp_path, *tiny_corpus, "samoe", 2, 2, 1, *SHARDED, *extra), STEPS,
                     tmp_path / "out", probe=_grad_norm)
    assert_bf16_tracks(runs, ref, BF16_ROUNDINGS + 1)
