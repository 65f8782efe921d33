"""Expert-parallel training equals the single-process run (real gloo processes, DeepSpeed engine).

For world sizes 2 and 4 and every expert-parallel size of them, 3 optimizer steps of a tiny SaMoE
GPT give the same losses, gradient norms and parameters after every step as one process training
on the same global batch; top-1 and top-2 dropless routing; ZeRO 0, 1 and 2 across the cases. The
standard-MoE peer (megatron's experts, reduced over DeepSpeed's expert-data-parallel groups) is
checked the same way, and so is shared routing (each layer's router picks among the pool's experts).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import merged_params, run_world
from tests.helpers import BF16_U, bf16_aggregate, bf16_mean

STEPS = 3
# Parameters must agree to 1e-3 of one Adam update (lr = 1e-2): a gradient that is wrong, missing
# or double-counted on any tensor moves its elements by O(lr), and the gradient norm is compared
# to 1e-5 relative besides.
PARAM_ATOL = 1e-5
_references: dict = {}


def _grad_norm(trainer) -> float:
    return trainer.last_grad_norm


def _args(tmp, corpus, tok, kind: str, topk: int, ep: int, zero: int, *extra: str) -> list[str]:
    ds = tmp / f"ds_zero{zero}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": zero},
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    kind_args = ["--num-experts", "4", "--moe-router-topk", str(topk)]
    if kind == "samoe":
        kind_args += ["--samoe-pool-size", "3", "--samoe-init", "random"]
    elif kind == "shared":  # shared routing: each layer routes to the 4 pool experts directly
        kind_args += ["--samoe-pool-size", "4", "--samoe-route-to-pool"]
    return ["--ds_config", str(ds), "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--data-path", str(corpus), "--tokenizer-model", str(tok),
            "--data-cache-path", str(tmp), "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "10", "--lr", "1e-2", "--lr-warmup-iters", "1", "--clip-grad", "0",
            # Adam's first steps move a weight by lr * g / (|g| + eps): for a gradient near 0 a
            # float-rounding difference d in g (summation order) moves it by up to lr * d / eps.
            # eps = 1e-6 keeps that under PARAM_ATOL.
            "--adam-eps", "1e-6",
            "--expert-model-parallel-size", str(ep), *kind_args, *extra]


def _reference(tmp_path_factory, tiny_corpus, kind, topk, *extra, zero=0):
    key = (kind, topk, extra, zero)
    if key not in _references:
        tmp = tmp_path_factory.mktemp(f"ref_{kind}_{topk}")
        _references[key] = run_world(1, _args(tmp, *tiny_corpus, kind, topk, 1, zero, *extra), STEPS, tmp / "out",
                                     probe=_grad_norm)
    return _references[key]


def _assert_same_run(runs, ref):
    for step in range(STEPS):
        for name, value in ref[0]["losses"][step].items():
            for res in runs:
                got = res["losses"][step][name]
                assert abs(got - value) <= 1e-5 * abs(value) + 1e-9, (step, name, got, value)
            for res in runs:  # the gradient norm catches a double-counted (or missing) gradient
                assert abs(res["extra"][step] - ref[0]["extra"][step]) <= 1e-5 * ref[0]["extra"][step]
        want = ref[0]["params"][step]
        got = merged_params(runs, step)
        assert sorted(got) == sorted(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=PARAM_ATOL,
                                       msg=lambda m: f"{name} after step {step}: {m}")


CASES = [  # (world, ep, topk, zero stage): every EP size of worlds 2 and 4, top-1 and top-2, ZeRO 0/1/2
    (2, 1, 1, 0), (2, 2, 2, 1),
    (4, 1, 2, 2), (4, 2, 1, 1), (4, 4, 2, 0), (4, 4, 1, 2),
]


@pytest.mark.parametrize("world, ep, topk, zero", CASES)
def test_samoe_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, world, ep, topk, zero):
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", topk)
    runs = run_world(world, _args(tmp_path, *tiny_corpus, "samoe", topk, ep, zero), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    assert [r["ep_rank"] for r in runs] == [r % ep for r in range(world)]
    # the run's collectives went through the device check (samoe_dist/collective_check.py)
    assert {"all_reduce", "all_to_all_single", "all_gather_into_tensor"} <= set(runs[0]["collectives_checked"])
    _assert_same_run(runs, ref)


@pytest.mark.parametrize("world, ep, zero", [(2, 2, 1), (4, 2, 2)])
def test_standard_moe_peer_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, world, ep, zero):
    ref = _reference(tmp_path_factory, tiny_corpus, "moe", 2)
    runs = run_world(world, _args(tmp_path, *tiny_corpus, "moe", 2, ep, zero), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    _assert_same_run(runs, ref)


@pytest.mark.parametrize("world, ep, topk, zero", [(2, 2, 1, 0), (4, 2, 2, 1)])
def test_shared_routing_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, world, ep, topk, zero):
    """Shared routing (--samoe-route-to-pool) at EP=2 and EP2 x DP2: every layer's tokens reach the
    pool experts' owners by the all-to-all, and the pool's gradient, used by both layers, is reduced
    over the world as SaMoE's is."""
    ref = _reference(tmp_path_factory, tiny_corpus, "shared", topk)
    runs = run_world(world, _args(tmp_path, *tiny_corpus, "shared", topk, ep, zero), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    _assert_same_run(runs, ref)


# Far below these runs' gradient norms (about 1.1-1.3 in the first steps), so every step is clipped.
# Given after _args' "--clip-grad 0": the last occurrence of a flag wins.
CLIP = "0.3"


@pytest.mark.parametrize("kind, world, ep, zero, extra", [
    ("moe", 2, 2, 0, ()),  # experts differ over EP
    ("samoe", 4, 2, 0, ("--samoe-pool-sharding", "sharded")),  # pool slices differ over EDP
    ("samoe", 4, 2, 2, ("--samoe-pool-sharding", "sharded")),
    ("samoe", 4, 2, 1, ("--samoe-pool-sharding", "sharded", "--tensor-model-parallel-size", "2",
                        "--sequence-parallel")),  # TP2 x EP2: a replica's TP ranks share a slice
])
def test_gradient_clipping_uses_the_global_norm(tmp_path, tmp_path_factory, tiny_corpus, kind, world, ep, zero, extra):
    """--clip-grad clips by the norm of the whole model's gradient, wherever its parts live. Without
    ZeRO, DeepSpeed's own fp32 clipping averages each rank's local norm over the data-parallel group
    instead (wrong once ranks hold different experts or pool slices; the trainer clips by the global
    norm there); with ZeRO, DeepSpeed's norm must count each pool slice once."""
    ref = _reference(tmp_path_factory, tiny_corpus, kind, 2, "--clip-grad", CLIP, zero=zero)
    assert all(norm > float(CLIP) for norm in ref[0]["extra"])  # the reference did clip
    runs = run_world(world, _args(tmp_path, *tiny_corpus, kind, 2, ep, zero, *extra, "--clip-grad", CLIP), STEPS,
                     tmp_path / "out", probe=_grad_norm)
    _assert_same_run(runs, ref)


def test_accumulation_and_activation_checkpointing_keep_the_pool_gradient(tmp_path, tmp_path_factory, tiny_corpus):
    """Gradient accumulation 2 (world 2: 8 / (2 x 2)) with every layer recomputed in backward under
    ZeRO-2: the pool is used by both layers, in both micro-batches, and in the recomputation; its
    gradient (seen through the global grad norm) and the update equal the reference's."""
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", 2)
    runs = run_world(2, _args(tmp_path, *tiny_corpus, "samoe", 2, 2, 2, "--recompute-granularity", "full"),
                     STEPS, tmp_path / "out", probe=_grad_norm)
    _assert_same_run(runs, ref)


# -- bf16: tolerances derived from the rounding ------------------------------------------------------
# The EP=2 run and the single process do the same bf16 operations on the same tokens, grouped
# differently. Roundings that can differ between them on the path of one gradient element (the pool's,
# the longest):
#   - micro-batch accumulation: the single process adds 4 micro-batch gradients in bf16 (DeepSpeed
#     accumulates in the model dtype), each EP rank adds 2 and ZeRO-1 adds the 2 ranks in bf16:
#     at most 3 adds, associated differently                                                    3
#   - the pool serves both layers, whose contributions autograd adds in bf16                    1
#   - an expert's weight-gradient GEMM sums a different token set (the all-to-all brings both
#     ranks' tokens) and rounds its fp32 accumulator once                                       1
#   - a token's activations and their gradients: the same operations in both runs, but a CPU's
#     GEMM kernel may order its reduction by the batch shape (qkv, proj, fc1, fc2, each layer)  8
BF16_ROUNDINGS = 13
# Adam's eps for the bf16 runs, above the typical gradient element (|g| / sqrt(numel) ~ 1.1 / 196 ~
# 6e-3). A rounding difference d in a gradient then moves a weight by at most lr * d / eps, a relative
# error no larger than the gradient's, so the bounds below carry through the updates. With the fp32
# tests' eps = 1e-6 a gradient within rounding of 0 takes a full +-lr step whose sign the rounding
# picks (23 of 38k weights after the first step here): the runs part by whole updates, and by step 3
# the gradient norms differed by 0.7% on one CPU path and 1.0% on another; no rounding bound covers
# that, and Adam's scale invariance would hide a gradient off by a constant factor from the weights.
BF16_ADAM_EPS = "1e-2"


@pytest.mark.parametrize("kind, zero", [("samoe", 1), ("moe", 0)])
def test_bf16_expert_parallel_tracks_single_process(tmp_path, tmp_path_factory, tiny_corpus, kind, zero):
    """bf16 under ZeRO-1 with EP=2: DeepSpeed keeps fp32 master weights; losses, gradient norms and
    weights follow the single-process bf16 ZeRO-1 run to within the bf16 rounding of the operations
    that differ (see BF16_ROUNDINGS). (DeepSpeed's bf16 path without ZeRO updates differently from
    its ZeRO-1 bf16 path, so the reference uses the same stage.) Also the standard MoE without ZeRO,
    whose norm DeepSpeed's unfused bf16 optimizer would take without the experts (the trainer gives it
    the global one); its path rounds at a subset of SaMoE's operations (no pool), so the same bounds.

    Bounds, with E(m) = bf16_aggregate(BF16_ROUNDINGS, m) the relative rounding difference of m values
    (about 1.2% here): the gradient at step s carries its own rounding and the errors of the s earlier
    updates, each update changing the gradient by at most its own size, so at most E * 2^s of it;
    Adam moves an element by at most lr per step; a bf16 copy of an fp32 master weight is within one
    ulp (2u relative) of the other run's. The deviations measured on several CPU kernel paths and
    layouts stay below 1/6 of these bounds; a pool gradient doubled (or halved) on the EP ranks
    exceeds them at the first step: the gradient norm by 4.4x (1.1x), the pool weights by 4.5x (2.9x).
    """
    extra = ("--bf16", "--adam-eps", BF16_ADAM_EPS)
    ref = _reference(tmp_path_factory, tiny_corpus, kind, 2, *extra, zero=zero)
    runs = run_world(2, _args(tmp_path, *tiny_corpus, kind, 2, 2, zero, *extra), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    assert_bf16_tracks(runs, ref, BF16_ROUNDINGS)


def assert_bf16_tracks(runs, ref, roundings: int) -> None:
    """The bounds of test_bf16_expert_parallel_tracks_single_process for ``roundings`` roundings
    that can differ on the path of one gradient element."""
    ref_losses = [r["lm_loss"] for r in ref[0]["losses"]]
    tokens = 8 * 32  # global batch x sequence length
    numel = sum(v.numel() for v in ref[0]["params"][0].values())
    lr = 1e-2  # _args' --lr
    for step in range(STEPS):
        carried = 2 ** step
        # loss: a mean over the tokens of independently rounded token losses, plus the weights'
        # carried error on what the updates so far did to the loss
        want, got = ref_losses[step], runs[0]["losses"][step]["lm_loss"]
        bound = bf16_mean(roundings, tokens) * want + \
            bf16_aggregate(roundings, numel) * carried * abs(ref_losses[0] - want)
        assert abs(got - want) <= bound, ("lm loss", step, got, want, bound)
        # gradient norm: | |a| - |b| | <= |a - b|
        want, got = ref[0]["extra"][step], runs[0]["extra"][step]
        bound = bf16_aggregate(roundings, numel) * carried * want
        assert abs(got - want) <= bound, ("grad norm", step, got, want, bound)
        # weights (replicas agree exactly in merged_params): one ulp of storage plus the updates' errors
        final = merged_params(runs, step)
        for name, value in ref[0]["params"][step].items():
            updates = lr * value.numel() ** 0.5 * sum(2 ** t for t in range(step + 1))
            bound = 2 * BF16_U * value.norm() + bf16_aggregate(roundings, value.numel()) * updates
            diff = (final[name] - value).norm()
            assert diff <= bound, (name, step, float(diff), float(bound))
