"""--samoe-materialize-once-per-step (DESIGN.md §6) equals the single-process reference run WITHOUT
the flag: real gloo processes at world 4, DeepSpeed engine, 2 micro-batches per step, losses, gradient
norms and every parameter after each of 3 steps (a stale cached weight after an optimizer step would
change step 2's loss and every later parameter). Each rank also counts its materialisations: one per
layer and pool tensor per step (sharded: one fused gather per layer), where the default takes two per
layer call (forward, and backward's rematerialisation), and the cache is empty between steps. The
replicated case also runs full recompute (every forward rerun in backward takes the cached weights).
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_world
from tests.distributed.test_expert_parallel import STEPS, _args, _assert_same_run, _reference

ONCE = ("--samoe-materialize-once-per-step",)
ACCUMULATE = ("--global-batch-size", "16")  # 16 / (micro-batch 2 x 4 ranks): 2 micro-batches a step
LAYERS = 2  # the MoE layers of tests/distributed/test_expert_parallel._args


def _probe(trainer) -> dict:
    """Grad norm, materialisations during the step just taken (counted from the second step: the
    counters are installed by the first call), and whether the pool holds a cached weight now."""
    from samoe_dist.samoe import expert_ffn

    counts = getattr(expert_ffn, "_test_counts", None)
    if counts is None:
        counts = expert_ffn._test_counts = {"materialize": 0, "materialize_many": 0}
        for name in counts:
            real = getattr(expert_ffn, name)

            def counted(*a, _real=real, _name=name, **k):
                counts[_name] += 1
                return _real(*a, **k)
            setattr(expert_ffn, name, counted)
    seen = dict(counts)
    for name in counts:
        counts[name] = 0
    return {"grad_norm": trainer.last_grad_norm, "calls": seen,
            "cache_empty": trainer.model.gpt.samoe_pool.cached_weights("probe") is None}


CASES = [  # (ep, zero, sharding, extra flags, materialisations per step: (materialize, materialize_many))
    (2, 1, "sharded", (), (0, LAYERS)),  # EP2 x EDP2: one fused all-gather per layer and step
    # EP2 x DP2, w1 and w2 of each layer once; full recompute reruns every forward from the cache
    (2, 2, "replicated", ("--recompute-granularity", "full"), (2 * LAYERS, 0)),
]


@pytest.mark.parametrize("ep, zero, sharding, extra, per_step", CASES, ids=[c[2] for c in CASES])
def test_materialize_once_per_step_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, ep, zero,
                                                          sharding, extra, per_step):
    ref = _reference(tmp_path_factory, tiny_corpus, "samoe", 2, *ACCUMULATE)
    runs = run_world(4, _args(tmp_path, *tiny_corpus, "samoe", 2, ep, zero, "--samoe-pool-sharding", sharding,
                              *ACCUMULATE, *extra, *ONCE), STEPS, tmp_path / "out", probe=_probe)
    for res in runs:
        assert all(p["cache_empty"] for p in res["extra"])
        for p in res["extra"][1:]:
            assert (p["calls"]["materialize"], p["calls"]["materialize_many"]) == per_step
    _assert_same_run([{**r, "extra": [p["grad_norm"] for p in r["extra"]]} for r in runs], ref)
