"""Combination weights A = softmax(C / tau) (top-m optional) and the initialisation of C."""

from __future__ import annotations

import math

import pytest
import torch

from samoe_dist.samoe.combination import (
    combination_weights,
    init_combination_logits,
    peaked_pool_index,
    row_entropy,
)
from samoe_dist.samoe.reference import reference_combination_weights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("top_m", [0, 1, 3, 7])
@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_rows_sum_to_one_and_match_reference(top_m, temperature):
    logits_NP = torch.randn(5, 7, dtype=torch.float64)
    A_NP = combination_weights(logits_NP, temperature, top_m)
    torch.testing.assert_close(A_NP.sum(-1), torch.ones(5, dtype=torch.float64))
    assert (A_NP >= 0).all()
    torch.testing.assert_close(A_NP, reference_combination_weights(logits_NP, temperature, top_m))
    kept = top_m if 0 < top_m < 7 else 7
    assert ((A_NP > 0).sum(-1) == kept).all()


def test_top_m_zeros_the_smallest_and_keeps_them_out_of_the_gradient():
    logits_NP = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A_NP = combination_weights(logits_NP, 1.0, 2)
    top2 = torch.topk(logits_NP.detach(), 2, dim=-1).indices
    mask = torch.zeros(4, 6, dtype=torch.bool).scatter(1, top2, True)
    assert (A_NP[~mask] == 0).all() and (A_NP[mask] > 0).all()
    # kept entries = softmax over the kept logits
    torch.testing.assert_close(A_NP.gather(1, top2), torch.softmax(logits_NP.detach().gather(1, top2), -1))
    (A_NP * torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    assert (logits_NP.grad[~mask] == 0).all()
    assert (logits_NP.grad[mask] != 0).all()


def test_top_m_equal_to_pool_is_dense_and_temperature_sharpens():
    logits_NP = torch.tensor([[0.3, -1.0, 0.9, 0.1, 0.0], [2.0, 1.5, -0.5, 0.2, 1.9], [0.0, 0.0, 0.0, 0.0, 0.2]])
    torch.testing.assert_close(combination_weights(logits_NP, 1.0, 5), torch.softmax(logits_NP, -1))
    sharp = combination_weights(logits_NP, 0.01, 0)  # the smallest logit gap is 0.1 = 10 tau
    assert torch.equal(sharp.argmax(-1), logits_NP.argmax(-1))
    assert (sharp.max(-1).values > 0.99).all()
    with pytest.raises(ValueError, match="temperature"):
        combination_weights(logits_NP, 0.0)


@pytest.mark.parametrize("N,P,layer", [(4, 16, 0), (4, 16, 3), (8, 12, 2), (6, 6, 5)])
def test_peaked_init_argmax_is_distinct_and_follows_the_formula(N, P, layer):
    gen = torch.Generator().manual_seed(0)
    logits_NP = init_combination_logits(N, P, layer, "peaked", peak=4.0, noise=0.01, generator=gen)
    expected = torch.tensor([(layer * N + e) % P for e in range(N)])
    assert torch.equal(logits_NP.argmax(-1), expected)
    assert torch.equal(peaked_pool_index(N, P, layer), expected)
    assert len(set(expected.tolist())) == N  # distinct within the layer (N <= P)
    assert (logits_NP.max(-1).values > 3.9).all()


def test_uniform_random_init_and_reproducibility():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    uniform = init_combination_logits(4, 8, 0, "uniform", noise=0.01, generator=gen())
    assert uniform.abs().max() < 0.1 and uniform.abs().max() > 0
    assert torch.equal(init_combination_logits(4, 8, 0, "uniform", noise=0.0, generator=gen()), torch.zeros(4, 8))
    rnd = init_combination_logits(64, 64, 0, "random", generator=gen())
    assert 0.9 < rnd.std().item() < 1.1
    assert torch.equal(rnd, init_combination_logits(64, 64, 0, "random", generator=gen()))
    with pytest.raises(ValueError, match="samoe_init"):
        init_combination_logits(4, 8, 0, "nope")


def test_row_entropy_bounds():
    P = 8
    assert row_entropy(torch.eye(P)).item() == 0.0
    torch.testing.assert_close(row_entropy(torch.full((3, P), 1.0 / P)), torch.tensor(math.log(P)))
