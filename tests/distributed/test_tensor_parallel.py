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
from tests.distributed.test_expert_parallel import STEPS, _args, _assert_same_run, _grad_norm

_references: dict = {}


def _tp_args(tmp, corpus, tok, kind, tp, ep, zero, *extra):
    args = _args(tmp, corpus, tok, "moe" if kind == "dense" else kind, 2, ep, zero, *extra)
    if kind == "dense":  # the same run without experts
        i = args.index("--num-experts")
        del args[i:i + 4]
    return [*args, "--tensor-model-parallel-size", str(tp)]


def _reference(tmp_path_factory, tiny_corpus, kind, *extra):
    key = (kind, extra)
    if key not in _references:
        tmp = tmp_path_factory.mktemp(f"ref_{kind}")
        _references[key] = run_world(1, _tp_args(tmp, *tiny_corpus, kind, 1, 1, 0, *extra), STEPS, tmp / "out",
                                     probe=_grad_norm)
    return _references[key]


CASES = [  # (kind, TP, EP, ZeRO stage, extra flags)
    ("dense", 2, 1, 1, ()),  # TP2 x DP2
    ("dense", 2, 1, 0, ("--sequence-parallel",)),
    ("moe", 2, 2, 1, ("--sequence-parallel",)),  # TP2 x EP2: each TP rank holds 2 of the 4 experts
    ("samoe", 2, 1, 2, ("--sequence-parallel",)),  # experts (the pool) replicated on the TP ranks
    ("samoe", 2, 2, 0, ("--sequence-parallel",)),
]


@pytest.mark.parametrize("kind, tp, ep, zero, extra", CASES)
def test_tensor_parallel_matches_single_process(tmp_path, tmp_path_factory, tiny_corpus, kind, tp, ep, zero, extra):
    ref = _reference(tmp_path_factory, tiny_corpus, kind)
    runs = run_world(4, _tp_args(tmp_path, *tiny_corpus, kind, tp, ep, zero, *extra), STEPS, tmp_path / "out",
                     probe=_grad_norm)
    assert [r["tp_rank"] for r in runs] == [0, 1, 0, 1]
    assert [r["ep_rank"] for r in runs] == [r % ep for r in range(4)]
    _assert_same_run(runs, ref)
