"""The oracle: a top-k MoE layer and a SaMoE layer in plain torch, loops over tokens and experts.

Written for clarity, from the definitions, with no megatron and no process groups. Every
distributed or megatron-based configuration must match it (DESIGN.md §4). Its routing semantics
are those of megatron-core 0.16.1's TopKRouter with the softmax score function:

- logits = x @ Wr^T (Wr is megatron's ``router.weight`` [N, h]).
- pre-softmax: gates = the top-k entries of softmax(logits) over all N experts (not renormalised);
  otherwise: choose the top-k logits, gates = softmax over those k logits.
- capacity (when a capacity factor is set) = ceil(T * k / N * capacity_factor); when it is below
  T, each expert keeps its ``capacity`` highest-gate tokens and drops the rest ('probs' drop
  policy, no padding). Dropped (token, expert) pairs contribute nothing.
- Switch load-balancing loss = coeff * N * sum_e f_e * P_e, f_e = fraction of the T*k top-k
  assignments (before dropping) that go to e, P_e = mean over ALL T tokens of softmax(logits)[e].
  Its gradient flows through P_e only (f_e counts are constants).
- z-loss = coeff * mean_t logsumexp(logits_t)^2.

megatron returns only y and injects the two losses' gradients in backward
(MoEAuxLossAutoScaler, scale 1 by default): megatron's backward of ``(y * G).sum()`` equals the
gradient of ``(y * G).sum() + aux_loss + z_loss`` here.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

Expert = tuple  # (w1 [h, f], w2 [f, h], w3 [h, f] or None)


def expert_ffn(x_H: torch.Tensor, w1_HF, w2_FH, w3_HF, activation: Callable) -> torch.Tensor:
    """One expert on one token: ``(act(x @ w1) [* (x @ w3)]) @ w2``, no biases."""
    hidden_F = activation(x_H @ w1_HF)
    if w3_HF is not None:
        hidden_F = hidden_F * (x_H @ w3_HF)
    return hidden_F @ w2_FH


def route(logits_TN: torch.Tensor, topk: int, pre_softmax: bool):
    """Per token: the chosen experts (list of k ints) and their gates ([k] tensor)."""
    chosen, gates = [], []
    for logits_N in logits_TN:
        if pre_softmax:
            top_gates, top_idx = torch.topk(torch.softmax(logits_N, dim=-1), topk)
        else:
            top_logits, top_idx = torch.topk(logits_N, topk)
            top_gates = torch.softmax(top_logits, dim=-1)
        chosen.append([int(e) for e in top_idx])
        gates.append(top_gates)
    return chosen, gates


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def kept_assignments(chosen, gates, num_experts: int, topk: int, capacity_factor: Optional[float]):
    """Set of (token, expert) pairs that survive the capacity limit ('probs' policy)."""
    T = len(chosen)
    pairs = {(t, e) for t in range(T) for e in chosen[t]}
    if capacity_factor is None:
        return pairs
    capacity = expert_capacity(T, num_experts, topk, capacity_factor)
    if capacity > T:
        return pairs
    kept = set()
    for e in range(num_experts):
        routed = [(float(gates[t][chosen[t].index(e)].detach()), t) for t in range(T) if e in chosen[t]]
        routed.sort(key=lambda gt: (-gt[0], gt[1]))  # highest gate first; ties: lower token index
        kept.update((t, e) for _, t in routed[:capacity])
    return kept


def load_balancing_loss(logits_TN: torch.Tensor, topk: int, coeff: float) -> torch.Tensor:
    """Switch loss coeff * N * sum_e f_e * P_e over all tokens (see module docstring)."""
    T, N = logits_TN.shape
    probs_TN = torch.softmax(logits_TN, dim=-1)
    counts = [0] * N
    for probs_N in probs_TN:
        for e in torch.topk(probs_N, topk).indices:
            counts[int(e)] += 1
    loss = logits_TN.new_zeros(())
    for e in range(N):
        f_e = counts[e] / (T * topk)
        P_e = probs_TN[:, e].mean()
        loss = loss + f_e * P_e
    return coeff * N * loss


def z_loss(logits_TN: torch.Tensor, coeff: float) -> torch.Tensor:
    return coeff * torch.logsumexp(logits_TN, dim=-1).square().mean()


def reference_moe_layer(
    x_TH: torch.Tensor,
    router_weight_NH: torch.Tensor,
    experts: Sequence[Expert],
    topk: int,
    pre_softmax: bool = True,
    capacity_factor: Optional[float] = None,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: Optional[float] = None,
    activation: Callable = torch.nn.functional.gelu,
    gated: bool = False,
    return_kept: bool = False,
):
    """(y_TH, aux_loss, z_loss) of a standard top-k MoE layer on T tokens (see module docstring).

    With ``return_kept`` a 4th element is the set of (token, expert) pairs that survived the
    capacity limit, so a test can check that a capacity-bounded case really dropped tokens.
    """
    T, _ = x_TH.shape
    N = router_weight_NH.shape[0]
    logits_TN = x_TH @ router_weight_NH.t()
    chosen, gates = route(logits_TN, topk, pre_softmax)
    kept = kept_assignments(chosen, gates, N, topk, capacity_factor)

    rows = []
    for t in range(T):
        y_H = torch.zeros_like(x_TH[t])
        for slot, e in enumerate(chosen[t]):
            if (t, e) not in kept:
                continue
            w1, w2, w3 = experts[e]
            if gated != (w3 is not None):
                raise ValueError(f"expert {e}: gated={gated} but w3 is {'set' if w3 is not None else 'None'}")
            y_H = y_H + gates[t][slot] * expert_ffn(x_TH[t], w1, w2, w3, activation)
        rows.append(y_H)
    y_TH = torch.stack(rows)

    aux = load_balancing_loss(logits_TN, topk, aux_loss_coeff) if aux_loss_coeff else logits_TN.new_zeros(())
    z = z_loss(logits_TN, z_loss_coeff) if z_loss_coeff else logits_TN.new_zeros(())
    return (y_TH, aux, z, kept) if return_kept else (y_TH, aux, z)


def reference_combination_weights(logits_NP: torch.Tensor, temperature: float, top_m: int = 0) -> torch.Tensor:
    """A_NP row by row: softmax(C/tau), or over the top-m logits of the row with zeros elsewhere."""
    N, P = logits_NP.shape
    rows = []
    for logits_P in logits_NP / temperature:
        if 0 < top_m < P:
            keep = torch.topk(logits_P.detach(), top_m).indices
            row = torch.zeros_like(logits_P)
            row = row.index_put((keep,), torch.softmax(logits_P[keep], dim=-1))
        else:
            row = torch.softmax(logits_P, dim=-1)
        rows.append(row)
    return torch.stack(rows)


def reference_materialize(A_NP: torch.Tensor, pool: Sequence) -> list:
    """Layer experts [(W1_l[e], W2_l[e], W3_l[e] or None)] with W_l[e] = sum_p A[e, p] * W_pool[p]."""
    w1_PHF, w2_PFH, w3_PHF = pool
    experts = []
    for A_P in A_NP:
        w1 = torch.einsum("p,phf->hf", A_P, w1_PHF)
        w2 = torch.einsum("p,pfh->fh", A_P, w2_PFH)
        w3 = torch.einsum("p,phf->hf", A_P, w3_PHF) if w3_PHF is not None else None
        experts.append((w1, w2, w3))
    return experts


def reference_samoe_layer(
    x_TH: torch.Tensor,
    router_weight_NH: torch.Tensor,
    combination_logits_NP: torch.Tensor,
    pool: Sequence,
    temperature: float,
    top_m: int,
    topk: int,
    pre_softmax: bool = True,
    capacity_factor: Optional[float] = None,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: Optional[float] = None,
    activation: Callable = torch.nn.functional.gelu,
    gated: bool = False,
    return_kept: bool = False,
):
    """A SaMoE layer: materialise the layer's experts from the pool (DESIGN.md §2), then the
    standard reference layer. Returns what :func:`reference_moe_layer` returns."""
    A_NP = reference_combination_weights(combination_logits_NP, temperature, top_m)
    experts = reference_materialize(A_NP, pool)
    return reference_moe_layer(
        x_TH, router_weight_NH, experts, topk, pre_softmax, capacity_factor,
        aux_loss_coeff, z_loss_coeff, activation, gated, return_kept,
    )
