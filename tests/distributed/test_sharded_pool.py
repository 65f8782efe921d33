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
import torch

from tests.distributed.harness import run_fn, run_world
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


H, F, P, N_LOCAL = 4, 6, 3, 2  # H * F = 24 columns per pool expert, 12 per rank at S = 2


def _pool_tensors(gated):
    gen = torch.Generator().manual_seed(11)
    shapes = ((H, F), (F, H), (H, F)) if gated else ((H, F), (F, H))
    return [torch.randn(P, *shape, generator=gen, dtype=torch.float64) for shape in shapes], shapes


def sharded_ffn_call(groups, gated):
    """One sharded expert FFN call on this rank's tokens (rank-dependent), counting the collectives."""
    from samoe_dist.samoe import pool as pool_mod
    from samoe_dist.samoe.expert_ffn import PoolAccess, materialized_expert_ffn

    counted = {"all_gather": 0, "reduce_scatter": 0}
    all_gather, reduce_scatter = pool_mod._collectives()

    def counting():
        def ag(*a, **k):
            counted["all_gather"] += 1
            return all_gather(*a, **k)

        def rs(*a, **k):
            counted["reduce_scatter"] += 1
            return reduce_scatter(*a, **k)
        return ag, rs

    pool_mod._collectives = counting
    shard = pool_mod.PoolShard(groups.expert_dp_group, groups.edp_size, groups.edp_rank)
    full, shapes = _pool_tensors(gated)
    lo, hi = shard.columns(H * F)
    local = [w.reshape(P, -1)[:, lo:hi].clone().requires_grad_() for w in full]
    x, probs, A, G = _tokens(groups.rank)
    y = materialized_expert_ffn(x, probs, (3, 2), A, local[0], local[1], local[2] if gated else None,
                                torch.nn.functional.silu, PoolAccess(shard=shard, shapes=shapes))
    after_forward = dict(counted)
    (y * G).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dA": A.grad, "dpool": [w.grad for w in local], "columns": (lo, hi),
            "forward": after_forward, "total": dict(counted)}


def _tokens(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5, H, generator=gen, dtype=torch.float64).requires_grad_()
    probs = torch.rand(5, generator=gen, dtype=torch.float64)
    A = torch.softmax(torch.randn(N_LOCAL, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64), -1)
    G = torch.randn(5, H, generator=gen, dtype=torch.float64)
    return x, probs, A.requires_grad_(), G


@pytest.mark.parametrize("gated", [False, True], ids=["gelu-shapes", "swiglu"])
def test_sharded_call_is_one_gather_each_way_and_one_reduce_scatter(tmp_path, gated):
    """EDP = 2: a layer call gathers all its weights in ONE all-gather in forward and one in backward,
    and reduce-scatters all its weight gradients in ONE reduce-scatter, whatever the number of pool
    tensors; outputs, token gradients, the pool slices' gradients (summed over the group's tokens) and
    the combination gradient (summed over the column shards) equal plain autograd on the whole pool.
    float64 throughout: every value is a sum of at most H * F = 24 products of order 1-10 taken in
    another order, so the paths differ by about 24 * 2^-53 * 10^2 < 1e-12."""
    from samoe_dist.samoe.expert_ffn import reference_expert_ffn

    runs = run_fn(2, 1, sharded_ffn_call, (gated,), tmp_path)
    full, _ = _pool_tensors(gated)
    leaves = [w.clone().requires_grad_() for w in full]
    A_ref = None
    total_loss = 0
    for rank, res in enumerate(runs):
        assert res["forward"] == {"all_gather": 1, "reduce_scatter": 0}
        assert res["total"] == {"all_gather": 2, "reduce_scatter": 1}
        x, probs, A, G = _tokens(rank)
        A_ref = A if A_ref is None else A_ref
        y = reference_expert_ffn(x, probs, (3, 2), A_ref, leaves[0], leaves[1], leaves[2] if gated else None,
                                 torch.nn.functional.silu)
        torch.testing.assert_close(res["y"], y.detach(), rtol=1e-12, atol=1e-12)
        (dx,) = torch.autograd.grad((y * G).sum(), x, retain_graph=True)
        torch.testing.assert_close(res["dx"], dx, rtol=1e-12, atol=1e-12)
        total_loss = total_loss + (y * G).sum()
    grads = torch.autograd.grad(total_loss, [*leaves, A_ref])
    for rank, res in enumerate(runs):
        lo, hi = res["columns"]
        for got, want in zip(res["dpool"], grads[:-1]):
            torch.testing.assert_close(got, want.reshape(P, -1)[:, lo:hi], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[0]["dA"] + runs[1]["dA"], grads[-1], rtol=1e-12, atol=1e-12)
