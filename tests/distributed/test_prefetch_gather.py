"""--samoe-prefetch-gather (DESIGN.md §6) equals the single-process reference: real gloo processes at
world 4 (EP2 x EDP2, sharded pool), DeepSpeed engine, losses, gradient norms and every parameter after
each of 3 steps. A prefetched weight that was stale (gathered before an optimizer step) or another
layer's would change the losses from step 2 on.

Each rank also counts its gathers from the second step on (the first forward records the layers'
order and prefetches nothing): in every forward the first layer gathers as usual and each later
layer takes the gather its predecessor started; backward gathers as usual, and so does a forward
rerun by full recompute (a call past the recorded order neither takes nor starts one). In bf16 the
run with the flag is the run without it, bit for bit (the same GEMMs and collective on the same values).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.test_expert_parallel import (BF16_ADAM_EPS, STEPS, _args, _assert_same_run, _grad_norm,
                                                    _reference)

PREFETCH = ("--samoe-pool-sharding", "sharded", "--samoe-prefetch-gather")
ACCUMULATE = ("--global-batch-size", "16")  # 16 / (micro-batch 2 x 4 ranks): 2 micro-batches a step
LAYERS = 2  # the MoE layers of tests/distributed/test_expert_parallel._args


def _probe(trainer) -> dict:
    """Grad norm and the step's gathers: (started now and waited for, started early)."""
    from samoe_dist.samoe import expert_ffn, experts

    counts = getattr(expert_ffn, "_test_gathers", None)
    if counts is None:
        counts = expert_ffn._test_gathers = {"now": 0, "early": 0}

        def counted(fn, key):
            return lambda *a, **k: counts.__setitem__(key, counts[key] + 1) or fn(*a, **k)
        expert_ffn.materialize_many = counted(expert_ffn.materialize_many, "now")
        experts.start_materialize_many = counted(experts.start_materialize_many, "early")
    seen = (counts["now"], counts["early"])
    counts["now"] = counts["early"] = 0
    return {"grad_norm": trainer.last_grad_norm, "gathers": seen}


CASES = [  # (kind, topk, zero, extra flags, gathers per step from the second on: (now, early))
    # GA 2: per micro-batch, forward 1 now + 1 early, backward 2 now
    ("samoe", 2, 1, ACCUMULATE, (2 * (1 + LAYERS), 2 * (LAYERS - 1))),
    # full recompute: the forward rerun in backward gathers now (2 more per micro-batch)
    ("samoe", 1, 2, (*ACCUMULATE, "--recompute-granularity", "full"), (2 * (1 + 2 * LAYERS), 2 * (LAYERS - 1))),
    # shared routing: the owned pool rows' columns are what is gathered
    ("shared", 2, 0, (), (1 + LAYERS, LAYERS - 1)),
]


@pytest.mark.parametrize("kind, topk, zero, extra, per_step", CASES, ids=["ga2", "recompute", "shared"])
def test_prefetched_gathers_match_single_process(tmp_path, tmp_path_factory, tiny_corpus, kind, topk, zero, extra,
                                                 per_step):
    ref = _reference(tmp_path_factory, tiny_corpus, kind, topk, *extra)
    runs = run_world(4, _args(tmp_path, *tiny_corpus, kind, topk, 2, zero, *extra, *PREFETCH), STEPS,
                     tmp_path / "out", probe=_probe)
    for res in runs:
        for p in res["extra"][1:]:
            assert p["gathers"] == per_step
    _assert_same_run([{**r, "extra": [p["grad_norm"] for p in r["extra"]]} for r in runs], ref)


def test_prefetched_gathers_are_the_same_bits_in_bf16(tmp_path, tiny_corpus):
    args = _args(tmp_path, *tiny_corpus, "samoe", 2, 2, 1, "--samoe-pool-sharding", "sharded", "--bf16",
                 "--adam-eps", BF16_ADAM_EPS)
    plain = run_world(4, args, STEPS, tmp_path / "plain", probe=_grad_norm)
    early = run_world(4, [*args, "--samoe-prefetch-gather"], STEPS, tmp_path / "early", probe=_grad_norm)
    for a, b in zip(plain, early):
        assert a["losses"] == b["losses"] and a["extra"] == b["extra"]
        for step in range(STEPS):
            assert sorted(a["params"][step]) == sorted(b["params"][step])
            for name, value in a["params"][step].items():
                assert torch.equal(value, b["params"][step][name]), (step, name)
