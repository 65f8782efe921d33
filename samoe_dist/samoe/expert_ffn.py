"""Materialise a rank's layer experts from the pool and run them, without keeping the weights.

DESIGN.md §3: the materialised ``W1_l = A_l @ W1_pool`` is as large as a standard MoE layer's
experts, so it must not live until backward. :class:`MaterializedExpertFFN` saves only the
tokens, the per-token probs, the owned combination rows, the pool tensors (parameters, stored
anyway) and the pre-activations; backward rematerialises one weight at a time, uses it for the
token gradient, and maps the weight gradient back onto the pool and the combination rows:

    dW1_pool = A_own^T @ dW1_l.view(n, -1)          dA_own += dW1_l.view(n, -1) @ W1_pool.view(P, -1)^T

The expert math is megatron's MLP (megatron/core/transformer/mlp.py) with no biases, fc1 split
into the activation half (w1) and, when gated, the linear half (w3)::

    z1 = x @ W1[e]                    (z3 = x @ W3[e])
    a  = act(z1)                      (a = act(z1) * z3 when gated)
    s  = (a * prob).to(x.dtype)       # megatron's per_token_scale, applied before fc2
    y  = s @ W2[e]

How the weights come from the pool tensors handed in is a :class:`PoolAccess`: the experts may be
pool rows used as they are (shared routing), the pool may be column-sharded over the
expert-data-parallel group (materialise the local columns, all-gather them; reduce-scatter the
weight gradient before mapping it back: DESIGN.md §6), and the pool's gradient may go to the
model's :class:`~samoe_dist.samoe.pool.PoolGradSink` instead of back through autograd.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from samoe_dist.cpu_compat import expert_gelu, without_onednn
from samoe_dist.samoe.grouped_gemm import GroupLayout, grouped_matmul, grouped_weight_grad
from samoe_dist.samoe.pool import (PoolGradSink, PoolShard, PrefetchedGather, gather_columns, gather_columns_many,
                                   reduce_scatter_columns_many, start_gather_columns_many)


@dataclass(frozen=True)
class PoolAccess:
    """How the n local experts' weights come from the pool tensors (module docstring).

    - ``rows``: with no combination (A None), the experts are pool rows ``[lo, hi)`` as they are;
    - ``shard``: the pool tensors are this rank's ``[P, D/S]`` column slices over ``shard.group``,
      and ``shapes`` gives each tensor's full per-expert shape (w1, w2, w3);
    - ``sink``: the pool's gradient is accumulated there and none is returned to autograd;
    - ``cache``: a dict that keeps this layer's materialised weights ({index: weights}) for reuse by
      later calls (:meth:`~samoe_dist.samoe.pool.ExpertPool.step_cache`); the caller guarantees the
      pool and ``A`` do not change while it is handed in;
    - ``prefetched``: sharded pool, this call's weights already being gathered
      (:func:`start_materialize_many`); the forward takes them, the backward gathers its own.
    """

    rows: Optional[tuple] = None
    shard: Optional[PoolShard] = None
    shapes: Optional[tuple] = None
    sink: Optional[PoolGradSink] = None
    cache: Optional[dict] = field(default=None, compare=False)
    prefetched: Optional[PrefetchedGather] = field(default=None, compare=False)


_PLAIN = PoolAccess()


def _local_flat(A_nP: Optional[torch.Tensor], w_pool: torch.Tensor, access: PoolAccess) -> torch.Tensor:
    """This rank's [n, D] (sharded: [n, D/S]) flat experts, before any gather."""
    P = w_pool.shape[0]
    if A_nP is None:
        lo, hi = access.rows if access.rows is not None else (0, P)
        return w_pool[lo:hi].reshape(hi - lo, -1)
    return A_nP @ w_pool.reshape(P, -1)


def materialize(A_nP: Optional[torch.Tensor], w_pool: torch.Tensor, access: PoolAccess = _PLAIN,
                index: int = 0) -> torch.Tensor:
    """Layer experts from the pool: ``einsum('np,p...->n...')`` as one GEMM on the flat pool
    (sharded: on the local columns, then all-gathered over the shard group). With ``A_nP`` None the
    weights are pool rows used as they are (``access.rows``; all of them by default).
    ``index`` is the tensor's position in (w1, w2, w3)."""
    shape = access.shapes[index] if access.shapes is not None else tuple(w_pool.shape[1:])
    if A_nP is None and access.rows is None and access.shard is None:
        return w_pool
    local_nD = _local_flat(A_nP, w_pool, access)
    if access.shard is not None:
        local_nD = gather_columns(local_nD, access.shard)
    return local_nD.view(local_nD.shape[0], *shape)


def materialize_many(A_nP: Optional[torch.Tensor], pools: Sequence[torch.Tensor], access: PoolAccess,
                     indices: Sequence[int]) -> list:
    """Sharded pool: :func:`materialize` of several pool tensors with ONE all-gather over the shard
    group (``indices``: each tensor's position in (w1, w2, w3))."""
    fulls = gather_columns_many([_local_flat(A_nP, w, access) for w in pools], access.shard)
    return [f.view(f.shape[0], *access.shapes[i]) for f, i in zip(fulls, indices)]


@torch.no_grad()
def start_materialize_many(A_nP: Optional[torch.Tensor], pools: Sequence[torch.Tensor], access: PoolAccess,
                           indices: Sequence[int]) -> PrefetchedGather:
    """:func:`materialize_many` started now and finished later: the local columns are materialised
    here and their all-gather is started asynchronously; ``take()`` of the result waits for it and
    gives ``{index: weights}``, the same values as :func:`materialize_many`."""
    finish = start_gather_columns_many([_local_flat(A_nP, w, access) for w in pools], access.shard)

    def weights() -> dict:
        return {i: f.view(f.shape[0], *access.shapes[i]) for f, i in zip(finish(), indices)}
    return PrefetchedGather(weights)


def _map_weight_grad(dW_n: torch.Tensor, A_nP: Optional[torch.Tensor], w_pool: torch.Tensor, need_pool: bool,
                     need_A: bool, access: PoolAccess = _PLAIN, index: int = 0):
    """(dW_pool, dA_nP) of a materialised weight's gradient dW_n (None where not needed, and the
    pool's None when a sink takes it). Sharded: dW_n is this rank's [n, D/S] columns, already
    reduce-scattered over the shard group (summed over the group's replicas of these experts)."""
    n = dW_n.shape[0]
    dW_nD = dW_n.reshape(n, -1)
    P = w_pool.shape[0]
    d_pool = d_A = None
    if A_nP is None:  # the experts are pool rows [lo, hi)
        if not need_pool:
            return None, None
        if access.rows is None and access.shard is None:
            return dW_n, None
        lo = access.rows[0] if access.rows is not None else 0
        if access.sink is not None:
            access.sink.add_rows(index, lo, dW_nD, w_pool)
            return None, None
        d_pool = torch.zeros_like(w_pool)
        d_pool.view(P, -1)[lo:lo + n].copy_(dW_nD)
        return d_pool, None
    if need_pool:
        if access.sink is not None:
            access.sink.add_mm(index, A_nP, dW_nD)
        else:
            d_pool = (A_nP.t() @ dW_nD).view_as(w_pool)
    if need_A:
        d_A = dW_nD @ w_pool.reshape(P, -1).t()
    return d_pool, d_A


def _activation_kernels(z1_TF: torch.Tensor, counts: GroupLayout):
    """Where the activation and its derivative run on the CPU. With ragged groups the row count
    changes from call to call, so they run without oneDNN, which would cache a kernel and its memory
    per shape (samoe_dist.cpu_compat, item 10). With equal groups (every expert padded to its
    capacity) a layer's shape is the same on every call, so oneDNN's one cached kernel is kept: in
    fp32 it is faster than torch's own (docs/RESULTS.md section 2, "The experts' activation at the
    capacity shape"); in bf16 it was not, so bf16 stays on torch's kernel. A dropless call whose
    groups happen to be equal takes this path too: rare, and it adds one cache entry at most.
    A no-op off the CPU."""
    if counts.uniform is not None and z1_TF.dtype == torch.float32:
        return contextlib.nullcontext()
    return without_onednn(z1_TF)


def _activation(activation: Callable, z1_TF: torch.Tensor, counts: GroupLayout) -> torch.Tensor:
    """act(z1) as a fresh tensor the caller may modify in place (z1 is saved for backward), on the
    kernels of :func:`_activation_kernels`."""
    with _activation_kernels(z1_TF, counts):
        act_TF = activation(z1_TF)
    if act_TF.data_ptr() == z1_TF.data_ptr():
        act_TF = act_TF.clone()
    return act_TF


# Derivatives written into the incoming gradient's buffer (elementwise, so aliasing is safe):
# no activation output and no second [T, F] buffer, for megatron's gelu and SwiGLU's silu.
def _gelu_backward_inplace(g, z):
    return torch.ops.aten.gelu_backward.grad_input(g, z, grad_input=g)


_INPLACE_ACTIVATION_BACKWARD = {
    torch.nn.functional.gelu: _gelu_backward_inplace,
    expert_gelu: _gelu_backward_inplace,
    torch.nn.functional.silu: lambda g, z: torch.ops.aten.silu_backward.grad_input(g, z, grad_input=g),
}


def _activation_backward(activation: Callable, z1_TF: torch.Tensor, grad_TF: torch.Tensor,
                         counts: GroupLayout) -> torch.Tensor:
    """d act / d z1 applied to grad_TF (which it may overwrite), on the kernels of
    :func:`_activation_kernels`; other activations go through autograd on a recomputation."""
    inplace = _INPLACE_ACTIVATION_BACKWARD.get(activation)
    with _activation_kernels(z1_TF, counts):
        if inplace is not None and grad_TF.dtype == z1_TF.dtype and grad_TF.is_contiguous():
            return inplace(grad_TF, z1_TF)
        with torch.enable_grad():
            z1_leaf = z1_TF.detach().requires_grad_(True)
            (dz1_TF,) = torch.autograd.grad(activation(z1_leaf), z1_leaf, grad_TF)
    return dz1_TF


def _row_dot(a_TF: torch.Tensor, b_TF: torch.Tensor, dtype: torch.dtype, rows: int = 512) -> torch.Tensor:
    """[T] row-wise dot products in ``dtype``. On the CPU in row blocks: the [rows, F] temporary
    stays in cache (3-4x faster than one [T, F] product, and no [T, F] allocation). Elsewhere one
    fused reduction (``torch.linalg.vecdot``): a loop of T/rows x 4 small kernels would be
    launch-bound on a GPU."""
    if a_TF.device.type != "cpu":
        return torch.linalg.vecdot(a_TF.to(dtype), b_TF.to(dtype), dim=-1)
    out_T = torch.empty(a_TF.shape[0], dtype=dtype, device=a_TF.device)
    for start in range(0, a_TF.shape[0], rows):
        block = slice(start, start + rows)
        torch.sum(a_TF[block].to(dtype) * b_TF[block].to(dtype), dim=-1, out=out_T[block])
    return out_T


def _weight_grad(dW_n, A_nP, w_pool, need_w: bool, dA_nP, access: PoolAccess, index: int, deferred):
    """The pool's gradient of a weight's dW_n (None where not needed or a sink takes it); its
    combination gradient is added into dA_nP. Sharded pool (``deferred``, a list): dW_n is kept
    there unmapped for the call's one reduce-scatter, and None is returned."""
    if deferred is not None:
        deferred.append((index, dW_n, w_pool, need_w))
        return None
    dw_pool, dA = _map_weight_grad(dW_n, A_nP, w_pool, need_w, dA_nP is not None, access, index)
    if dA_nP is not None:
        dA_nP += dA
    return dw_pool


def _fc1_backward(x_TH, dz_TF, A_nP, w_PHF, dA_nP, counts, need_x: bool, need_w: bool, access, index,
                  weights: dict, deferred):
    """(dx_TH, dW_pool) of one fc1 half (``weights``: :func:`_call_weights`); accumulates its
    combination gradient into dA_nP (see :func:`_weight_grad` for ``deferred``)."""
    dx_TH = dw_pool = None
    if need_x:
        dx_TH = grouped_matmul(dz_TF, _take(weights, index).transpose(1, 2), counts)  # weight freed here (unless step-cached)
    if need_w or dA_nP is not None:
        dW_nHF = grouped_weight_grad(x_TH, dz_TF, counts)
        dw_pool = _weight_grad(dW_nHF, A_nP, w_PHF, need_w, dA_nP, access, index, deferred)
    return dx_TH, dw_pool


def _materialize_now(A_nP, pools, access: PoolAccess, indices: Sequence[int]) -> dict:
    """{index: weight} of the pool tensors at ``indices``, all materialised now (sharded: in one
    all-gather)."""
    if access.shard is not None:
        return dict(zip(indices, materialize_many(A_nP, [pools[i] for i in indices], access, indices)))
    return {i: materialize(A_nP, pools[i], access, i) for i in indices}


def _call_weights(A_nP, pools, access: PoolAccess, indices: Sequence[int]) -> dict:
    """{index: weight} of the pool tensors at ``indices`` (into (w1, w2, w3)) that a layer call uses.
    With a step cache (``access.cache``): the cached weights, all of the layer's materialised (and
    gathered) at its first call. A prefetched gather (``access.prefetched``): its weights, once.
    Sharded pool: gathered now, all in one all-gather. Otherwise thunks
    that materialise each weight when it is taken, so one materialised weight is alive at a time."""
    if access.cache is not None:
        store = access.cache
        if any(i not in store for i in indices):  # the layer's first call of the step: every tensor it has
            store.update(_materialize_now(A_nP, pools, access, [i for i, w in enumerate(pools) if w is not None]))
        return {i: store[i] for i in indices}
    if access.prefetched is not None:
        got = access.prefetched.take()  # the forward's, gathered early; None in backward
        if got is not None:
            return {i: got[i] for i in indices}
    if access.shard is not None:
        return _materialize_now(A_nP, pools, access, indices)
    return {i: functools.partial(materialize, A_nP, pools[i], access, i) for i in indices}


def _take(weights: dict, index: int) -> torch.Tensor:
    """Remove and return weight ``index``: a tensor, or a thunk that materialises it now."""
    w = weights.pop(index)
    return w() if callable(w) else w


class MaterializedExpertFFN(torch.autograd.Function):
    """Grouped expert FFN on pool-combined weights; weights recomputed in backward.

    Inputs: ``x_TH`` tokens grouped by local expert (``counts[e]`` rows for expert e),
    ``probs_T`` routing prob of each row, ``A_nP`` the combination rows of the n local experts
    (None: the weights below are the n experts themselves, used without materialisation), pool tensors ``w1_PHF``, ``w2_PFH``, ``w3_PHF`` (None unless gated).
    """

    @staticmethod
    def forward(ctx, x_TH, probs_T, A_nP, w1_PHF, w2_PFH, w3_PHF, counts: Sequence[int], activation: Callable,
                access: PoolAccess):
        gated = w3_PHF is not None
        counts = GroupLayout(counts)  # device offsets built once, reused by every GEMM of this call
        W = _call_weights(A_nP, (w1_PHF, w2_PFH, w3_PHF), access, (0, 2, 1) if gated else (0, 1))
        z1_TF = grouped_matmul(x_TH, _take(W, 0), counts)  # W1_nHF freed here (unless step-cached)
        z3_TF = grouped_matmul(x_TH, _take(W, 2), counts) if gated else None
        hidden_TF = _activation(activation, z1_TF, counts)
        if gated:
            hidden_TF.mul_(z3_TF)
        hidden_TF.mul_(probs_T.unsqueeze(-1))  # megatron's per_token_scale, kept in x's dtype
        y_TH = grouped_matmul(hidden_TF, _take(W, 1), counts)  # W2_nFH freed here (unless step-cached)

        ctx.access = access
        ctx.counts = counts
        ctx.activation = activation
        ctx.gated = gated
        ctx.save_for_backward(x_TH, probs_T, A_nP, w1_PHF, w2_PFH, w3_PHF, z1_TF, z3_TF)
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):
        x_TH, probs_T, A_nP, w1_PHF, w2_PFH, w3_PHF, z1_TF, z3_TF = ctx.saved_tensors
        need_x, need_probs, need_A, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:6]
        counts, gated, activation, access = ctx.counts, ctx.gated, ctx.activation, ctx.access
        dy_TH = dy_TH.contiguous()
        dA_nP = torch.zeros_like(A_nP) if need_A else None
        probs_T1 = probs_T.unsqueeze(-1)

        # Sharded pool: the call's weights in one all-gather, and its weight gradients in one
        # reduce-scatter at the end (``deferred``). Otherwise one materialised weight alive at a time.
        deferred = [] if access.shard is not None else None
        W = _call_weights(A_nP, (w1_PHF, w2_PFH, w3_PHF), access,
                          (1, 0, 2) if gated and need_x else (1, 0) if need_x else (1,))
        dhidden_TF = grouped_matmul(dy_TH, _take(W, 1).transpose(1, 2), counts)  # W2_nFH freed here (unless step-cached)

        # Recompute the fc2 input; the per-token prob's gradient; fc2's weight gradient.
        act_TF = _activation(activation, z1_TF, counts)
        gate_TF = act_TF * z3_TF if gated else act_TF  # act(z1) [* z3], before the prob scale
        dprobs_T = None
        if need_probs:  # in the promoted dtype, as autograd of megatron's `a * prob` would
            dprobs_T = _row_dot(dhidden_TF, gate_TF, torch.promote_types(probs_T.dtype, dhidden_TF.dtype))
            dprobs_T = dprobs_T.to(probs_T.dtype)
        dw2 = None
        if need_w2 or need_A:
            hidden_TF = gate_TF.mul_(probs_T1)  # in place: act_TF is not needed again unless gated
            dW2_nFH = grouped_weight_grad(hidden_TF, dy_TH, counts)
            del hidden_TF
            dw2 = _weight_grad(dW2_nFH, A_nP, w2_PFH, need_w2, dA_nP, access, 1, deferred)
            del dW2_nFH
        del gate_TF

        # Back through the prob scale, the gate and the activation.
        dgate_TF = dhidden_TF.mul_(probs_T1)
        dz3_TF = None
        if gated:
            dz3_TF = dgate_TF * act_TF
            dgate_TF.mul_(z3_TF)
        del act_TF
        dz1_TF = _activation_backward(activation, z1_TF, dgate_TF, counts)  # may reuse dgate's buffer
        del dgate_TF, dhidden_TF

        # fc1 (and its gated half).
        dx_TH, dw1 = _fc1_backward(x_TH, dz1_TF, A_nP, w1_PHF, dA_nP, counts, need_x, need_w1, access, 0,
                                   W, deferred)
        del dz1_TF
        dw3 = None
        if gated:
            dx3_TH, dw3 = _fc1_backward(x_TH, dz3_TF, A_nP, w3_PHF, dA_nP, counts, need_x, need_w3, access, 2,
                                        W, deferred)
            if need_x:
                dx_TH = dx_TH + dx3_TH
        if deferred:  # one reduce-scatter; mapped in the unfused order (w2, w1, w3), so dA sums alike
            parts = reduce_scatter_columns_many([dW.reshape(dW.shape[0], -1) for _, dW, _, _ in deferred], access.shard)
            pool_grads = {}
            for (index, _, w_pool, need_w), part in zip(deferred, parts):
                pool_grads[index], dA = _map_weight_grad(part, A_nP, w_pool, need_w, need_A, access, index)
                if need_A:
                    dA_nP += dA
            del deferred, parts
            dw1, dw2, dw3 = pool_grads.get(0), pool_grads.get(1), pool_grads.get(2)
        return dx_TH, dprobs_T, dA_nP, dw1, dw2, dw3, None, None, None


def materialized_expert_ffn(
    x_TH: torch.Tensor,
    probs_T: torch.Tensor,
    counts: Sequence[int],
    A_nP: torch.Tensor,
    w1_PHF: torch.Tensor,
    w2_PFH: torch.Tensor,
    w3_PHF: Optional[torch.Tensor],
    activation: Callable,
    access: PoolAccess = _PLAIN,
) -> torch.Tensor:
    """y_TH of the n local experts built from the pool by ``A_nP`` (see module docstring)."""
    counts = tuple(int(c) for c in counts)
    if A_nP is not None:
        n_local = A_nP.shape[0]
    elif access.rows is not None:
        n_local = access.rows[1] - access.rows[0]
    else:
        n_local = w1_PHF.shape[0]
    if len(counts) != n_local:
        raise ValueError(f"{len(counts)} token counts for {n_local} local experts")
    if sum(counts) != x_TH.shape[0]:
        raise ValueError(f"token counts sum to {sum(counts)} but {x_TH.shape[0]} tokens were given")
    return MaterializedExpertFFN.apply(x_TH, probs_T, A_nP, w1_PHF, w2_PFH, w3_PHF, counts, activation, access)


def reference_expert_ffn(x_TH, probs_T, counts, A_nP, w1_PHF, w2_PFH, w3_PHF, activation):
    """The same computation in plain autograd (keeps the materialised weights): a test oracle."""
    W1, W2 = materialize(A_nP, w1_PHF), materialize(A_nP, w2_PFH)
    W3 = materialize(A_nP, w3_PHF) if w3_PHF is not None else None
    outs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x_TH, list(counts)), torch.split(probs_T, list(counts)))):
        a = activation(xe @ W1[e])
        if W3 is not None:
            a = a * (xe @ W3[e])
        outs.append((a * pe.unsqueeze(-1)).to(a.dtype) @ W2[e])
    return torch.cat(outs, dim=0)
