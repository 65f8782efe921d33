"""Combination weights A_l = softmax(C_l / tau) (optionally top-m sparse) or A_l = C_l, and the init of C_l.

DESIGN.md §2: each of a layer's N experts is a combination of the P pool experts, with row e of
``A_NP`` the weights of layer expert e: convex (``'softmax'``, the method's form) or signed
(``'linear'``, a variant). §2 (initialisation): rows start peaked on distinct pool experts so the N
experts of a layer differ from the first step.
"""

from __future__ import annotations

from typing import Optional

import torch

INIT_CHOICES = ("peaked", "uniform", "random")
COMBINATION_CHOICES = ("softmax", "linear")


def combination_weights(logits_NP: torch.Tensor, temperature: float, top_m: int = 0,
                        mode: str = "softmax") -> torch.Tensor:
    """A_NP: softmax of ``logits_NP / temperature`` over the pool, each row summing to 1; with
    ``mode='linear'`` the logits themselves (signed weights, no softmax, no temperature).

    With ``0 < top_m < P`` only the ``top_m`` largest logits of each row are kept and
    renormalised (a softmax over the kept logits), every other entry is exactly zero and gets no
    gradient. ``top_m`` of 0 or P is the dense softmax.
    """
    if mode not in COMBINATION_CHOICES:
        raise ValueError(f"combination mode must be one of {COMBINATION_CHOICES}, got {mode!r}")
    if mode == "linear":
        return logits_NP
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    P = logits_NP.shape[-1]
    scaled_NP = logits_NP / temperature
    if top_m <= 0 or top_m >= P:
        return torch.softmax(scaled_NP, dim=-1)
    _, keep_idx_NM = torch.topk(scaled_NP.detach(), k=top_m, dim=-1)
    kept_NM = torch.softmax(torch.gather(scaled_NP, -1, keep_idx_NM), dim=-1)
    return torch.zeros_like(scaled_NP).scatter(-1, keep_idx_NM, kept_NM)


def peaked_pool_index(num_experts: int, pool_size: int, moe_layer_index: int) -> torch.Tensor:
    """[N] pool expert each layer expert starts peaked on: ``(moe_layer_index*N + e) % P``."""
    return (moe_layer_index * num_experts + torch.arange(num_experts)) % pool_size


def init_combination_logits(
    num_experts: int,
    pool_size: int,
    moe_layer_index: int,
    init: str = "peaked",
    peak: float = 4.0,
    noise: float = 0.01,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C_NP at initialisation (on the CPU; the caller moves it).

    - ``'peaked'``: logit ``peak`` at pool expert ``(moe_layer_index*N + e) % P`` for layer expert
      e, plus N(0, noise) everywhere (a linear combination starts so with ``peak`` 1: one-hot rows).
    - ``'uniform'``: zeros plus N(0, noise): every layer expert starts as the pool mean.
    - ``'random'``: N(0, 1).
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"samoe_init must be one of {INIT_CHOICES}, got {init!r}")
    N, P = num_experts, pool_size
    if init == "random":
        return torch.randn(N, P, generator=generator, dtype=torch.float32).to(dtype)
    logits_NP = torch.randn(N, P, generator=generator, dtype=torch.float32) * noise
    if init == "peaked":
        logits_NP[torch.arange(N), peaked_pool_index(N, P, moe_layer_index)] += peak
    return logits_NP.to(dtype)


def row_entropy(weights_NP: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of A_NP (0 for one-hot rows, log P for uniform rows); signed
    rows (a linear combination) count by their normalised magnitudes |A| / sum |A|."""
    w = weights_NP.float().abs()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    plogp = torch.where(w > 0, w * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), torch.zeros_like(w))
    return -plogp.sum(dim=-1).mean()


def peak_mass(weights_NP: torch.Tensor, peak_index_N: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the share of row e's weight on its initial peak pool expert
    (``|A[e, peak_e]| / sum_p |A[e, p]|``: 1 while the rows stay on their peaks; how far the
    combinations moved from their initialisation)."""
    w = weights_NP.float().abs()
    on_peak_N = w.gather(-1, peak_index_N.to(w.device).view(-1, 1)).squeeze(-1)
    return (on_peak_N / w.sum(dim=-1).clamp_min(torch.finfo(w.dtype).tiny)).mean()
