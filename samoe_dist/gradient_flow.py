"""Gradient-flow analytics: tokens received and gradient norm of every expert (DESIGN.md §2).

SaMoE's stated mechanism is that a layer's experts, each seeing about k/N of its layer's tokens,
are starved of gradient as N grows, while a pool expert collects gradient from every layer that
uses it. These figures measure that, at the log interval, for standard experts and pool experts
alike:

- ``expert_tokens_received`` [L_moe][N]: tokens each layer expert received from the dispatcher
  (after capacity dropping) since the last log, summed over all ranks;
- ``pool_tokens`` [P]: tokens each pool expert served, ``sum_l sum_e S_l[e, p] * received_l[e]``
  with ``S_l = |A_l| / sum_p |A_l|`` the share of pool expert p in layer expert e (A_l itself for
  a softmax combination; the identity, so exact counts, with shared routing);
- ``expert_grad_norm`` [L_moe][N] (standard MoE) and ``pool_grad_norm`` [P] (SaMoE and shared
  routing): the 2-norm of each expert's reduced gradient at the logged step, i.e. the gradient
  the optimizer applies (before clipping), read through DeepSpeed's ``safe_get_full_grad``.

The counts stay on the device they arrive on (no host sync per micro-batch); everything is moved
and reduced only at the log interval.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch


class ReceivedTokens:
    """Forward pre-hooks on each MoE layer's experts module recording ``tokens_per_expert`` [n_local].

    As the routers' counts (samoe_dist.router), each training forward REPLACES the value, and the
    model reads it right after its own forward (:meth:`pop`), so a forward re-run by activation
    checkpointing in backward is not counted twice.
    """

    def __init__(self, moe_layers: list) -> None:
        self._last: list[Optional[torch.Tensor]] = [None] * len(moe_layers)
        self.handles = [layer.experts.register_forward_pre_hook(partial(self._record, i))
                        for i, layer in enumerate(moe_layers)]

    def _record(self, index: int, module: torch.nn.Module, args: tuple) -> None:
        if not module.training:
            return
        counts = args[1]
        counts = counts.detach() if torch.is_tensor(counts) else torch.tensor(list(counts))
        self._last[index] = counts.to(torch.float64)

    def pop(self) -> Optional[torch.Tensor]:
        """[L_moe, n_local] tokens received in the last training forward (None if any layer saw none)."""
        last, self._last = self._last, [None] * len(self._last)
        if not last or any(c is None for c in last):
            return None
        device = last[0].device
        return torch.stack([c.to(device) for c in last])


def _full_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def _sq_norm_rows(tensors: list, rows: int) -> Optional[torch.Tensor]:
    """[rows] sum over ``tensors`` of the squared norm of each leading-dim row (fp64)."""
    out = None
    for t in tensors:
        if t is None:
            continue
        sq = t.detach().reshape(rows, -1).double().pow(2).sum(dim=1)
        out = sq if out is None else out + sq
    return out


@torch.no_grad()
def expert_grad_sq_norms(moe_layers: list, num_experts: int, expert_offset: int,
                         device: torch.device) -> torch.Tensor:
    """[L_moe, N] squared gradient norms of the standard experts this rank holds, at their global
    index (zeros elsewhere: the caller sums over the EP group). A collective under ZeRO-1/2:
    every rank calls it at the same step."""
    out = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64, device=device)
    for i, layer in enumerate(moe_layers):
        experts = layer.experts
        if not hasattr(experts, "local_experts"):  # experts stacked as [n, ...] tensors (one row each)
            n = experts.num_local_experts
            sq = _sq_norm_rows([_full_grad(p) for p in experts.parameters()], n)
            if sq is not None:
                out[i, expert_offset:expert_offset + n] = sq.to(device)
            continue
        for j, expert in enumerate(experts.local_experts):
            sq = _sq_norm_rows([_full_grad(p) for p in expert.parameters()], 1)
            if sq is not None:
                out[i, expert_offset + j] = sq.to(device)[0]
    return out


@torch.no_grad()
def pool_grad_norms(pool: torch.nn.Module) -> Optional[torch.Tensor]:
    """[P] gradient norm of each pool expert (its w1, w2 and w3 rows); the pool is reduced over
    the whole world, so every rank holds the same values. A sharded pool's rows are split over the
    shard group: their squares are summed over it (a collective there)."""
    grads = [_full_grad(w) for w in pool.tensors() if w is not None]
    if any(g is None for g in grads):
        return None
    sq = _sq_norm_rows(grads, pool.pool_size)
    if pool.shard is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=pool.shard.group)
    return sq.sqrt()


@torch.no_grad()
def pool_tokens(samoe_experts: list, received_LN: torch.Tensor) -> torch.Tensor:
    """[P] tokens served by each pool expert: ``sum_l S_l^T received_l`` (module docstring)."""
    total = None
    for experts, received_N in zip(samoe_experts, received_LN):
        A_NP = experts.combination_weights().double().abs()
        share_NP = A_NP / A_NP.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(A_NP.dtype).tiny)
        served = share_NP.t() @ received_N.to(share_NP.device, torch.float64)
        total = served if total is None else total + served
    return total
