"""The shared expert pool: P expert FFNs used by every SaMoE layer of the model (DESIGN.md §2).

The pool is registered ONCE, at model level (:func:`attach_pool`); the layers reach it through a
:class:`PoolRef`, a plain holder that is not a ``torch.nn.Module``, so the pool is neither a
submodule nor a parameter of any layer. The state dict therefore holds each pool tensor once, and
the pool's gradient hooks fire once per tensor however many layers use it (DESIGN.md §4).

Layout matches megatron-core's expert MLP so weights map one to one (``linear_fc1.weight`` is
``[f, h]`` or ``[2f, h]`` gated, ``linear_fc2.weight`` is ``[h, f]``)::

    w1[p] = linear_fc1.weight[:f].T     [h, f]   (the activation's input; the "gate" when gated)
    w3[p] = linear_fc1.weight[f:].T     [h, f]   (gated only: the linear "up" half)
    w2[p] = linear_fc2.weight.T         [f, h]

Sharded pool (``--samoe-pool-sharding sharded``, DESIGN.md §6): each pool tensor, viewed as
``[P, D]`` (D = h*f), has its columns split over the expert-data-parallel group; a rank stores its
slice ``[P, D / S]`` only (:class:`PoolShard`). The values are the same for every layout: each pool
expert is drawn, whole, from its own seed (:meth:`ExpertPool.reset_parameters`), then sliced.

Gradient sink (:class:`PoolGradSink`): the pool is used by every MoE layer; letting autograd sum the
layers' full-size pool gradients costs one [P, D] temporary and one add per layer. Instead each
forward passes the pool through one :class:`_PoolGate`; every layer's backward hands the sink its
factors A [n, P] and dW [n, D], the sink sums them into one buffer (one GEMM over the kept factors'
stacked rows, ``addmm_`` in place when the buffer exists), and the gate hands that buffer to autograd
once per backward, so DeepSpeed's gradient hooks fire once per pool tensor and micro-batch. The
buffer is allocated late (as long as the layers' kept factors are smaller than it): not at the start
of backward, where the activations peak.

Step cache (``--samoe-materialize-once-per-step``, DESIGN.md §6): inside :meth:`ExpertPool.step_cache`
(the Trainer opens it around one optimizer step's micro-batches and closes it before the optimizer
updates the weights) each layer's materialised (sharded: gathered) experts are computed at their first
use and reused by every later forward and backward of the step. Outside it nothing is cached, so
evaluation, export and any use between steps always see the current weights.

Prefetched gathers (``--samoe-prefetch-gather``, sharded pool, DESIGN.md §6): in a model forward each
SaMoE layer starts the next layer's all-gather (asynchronous) before it runs its own experts, so the
collective can run while this layer computes; the next layer waits for it instead of gathering.
The order of the layers is the one the first forward called them in (:meth:`ExpertPool.layer_prefetch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class PoolShard:
    """Where this rank's pool columns lie: slice ``rank`` of ``size`` over ``group`` (the
    expert-data-parallel group; DESIGN.md §6)."""

    group: Any
    size: int
    rank: int

    def columns(self, numel: int) -> tuple[int, int]:
        """[lo, hi) of this rank's columns of a ``numel``-column tensor."""
        if numel % self.size:
            raise ValueError(f"a pool expert of {numel} elements does not split into {self.size} equal column "
                             f"slices: choose hidden and expert FFN sizes whose product divides by {self.size}")
        width = numel // self.size
        return self.rank * width, (self.rank + 1) * width


def _expert_seed(base: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"{base}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ExpertPool(torch.nn.Module):
    """P bias-free expert FFNs stored as stacked tensors ``w1_PHF``, ``w2_PFH`` (+ ``w3_PHF``)."""

    def __init__(
        self,
        pool_size: int,
        hidden_size: int,
        ffn_hidden_size: int,
        gated: bool = False,
        init_method_std: float = 0.02,
        output_layer_init_std: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        shard: Optional[PoolShard] = None,
        seed: Optional[int] = None,
    ):
        super().__init__()
        if pool_size <= 0 or hidden_size <= 0 or ffn_hidden_size <= 0:
            raise ValueError(
                f"ExpertPool needs positive sizes, got pool_size={pool_size}, "
                f"hidden_size={hidden_size}, ffn_hidden_size={ffn_hidden_size}"
            )
        self.pool_size = pool_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.gated = gated
        self.init_method_std = init_method_std
        self.output_layer_init_std = (
            init_method_std if output_layer_init_std is None else output_layer_init_std
        )
        P, h, f = pool_size, hidden_size, ffn_hidden_size
        self.shard = shard if shard is not None and shard.size > 1 else None
        # The seed every pool expert is drawn from (torch's RNG by default: a seeded run is reproducible).
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        kw = dict(dtype=dtype, device=device)

        def make(*shape):
            if self.shard is None:
                return torch.nn.Parameter(torch.empty(P, *shape, **kw))
            lo, hi = self.shard.columns(math.prod(shape))
            return torch.nn.Parameter(torch.empty(P, hi - lo, **kw))  # flat column slice

        self.w1 = make(h, f)  # w1_PHF (sharded: [P, h*f/S])
        self.w2 = make(f, h)  # w2_PFH (sharded: [P, f*h/S])
        self.w3 = make(h, f) if gated else None  # w3_PHF
        self._live = None  # (gated views, sink) of the forward in progress
        self._step_weights: Optional[dict] = None  # {layer key: {tensor index: weights}} inside step_cache()
        # --samoe-prefetch-gather: set by the model builder; acts only on a sharded pool
        self.prefetch_gathers = False
        self._order: list = []  # [(layer key, start its gather)] in the first forward's call order
        self._order_known = False
        self._calls = 0  # SaMoE layer calls since the model forward began
        self._pending: Optional[tuple] = None  # (layer key, PrefetchedGather) started for that layer
        self.reset_parameters()

    @classmethod
    def from_transformer_config(cls, config, pool_size: int, shard: Optional[PoolShard] = None) -> "ExpertPool":
        """A pool shaped and initialised like megatron's experts for this TransformerConfig.

        Expert FFN size is ``config.moe_ffn_hidden_size``; fc2 uses megatron's output-layer std
        ``init_method_std / sqrt(2 * num_layers)``; the device follows
        ``config.use_cpu_initialization`` as megatron's own layers do.
        """
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        return cls(
            pool_size=pool_size,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.moe_ffn_hidden_size,
            gated=config.gated_linear_unit,
            init_method_std=config.init_method_std,
            output_layer_init_std=config.init_method_std / math.sqrt(2.0 * config.num_layers),
            dtype=config.params_dtype,
            device=device,
            shard=shard,
        )

    def expert_shapes(self) -> tuple:
        """Full per-expert shapes of (w1, w2, w3): ([h, f], [f, h], [h, f] or None)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return (h, f), (f, h), ((h, f) if self.gated else None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal init as megatron's experts: fc1 (and its gated half) with std, fc2 with out std.

        Each pool expert of each tensor is drawn on the CPU from its own generator, seeded by
        (pool seed, tensor, expert): the same values on any device and for any sharding (a rank
        keeps its columns), one expert in host memory at a time.
        """
        stds = {"w1": self.init_method_std, "w2": self.output_layer_init_std, "w3": self.init_method_std}
        for name, shape in zip(("w1", "w2", "w3"), self.expert_shapes()):
            param = getattr(self, name)
            if param is None:
                continue
            lo, hi = self.shard.columns(math.prod(shape)) if self.shard is not None else (None, None)
            for p in range(self.pool_size):
                gen = torch.Generator().manual_seed(_expert_seed(self.seed, name, p))
                value = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(stds[name])
                if self.shard is not None:
                    value = value.reshape(-1)[lo:hi]
                param[p].copy_(value.to(device=param.device, dtype=param.dtype))

    def tensors(self) -> tuple:
        """(w1, w2, w3 or None) as stored: ``[P, h, f]``... or, sharded, this rank's ``[P, D/S]`` slices."""
        return self.w1, self.w2, self.w3

    def live_tensors(self) -> tuple:
        """(tensors, sink) for a layer's forward: while gradients are recorded, the pool passed
        through this forward's gate and the sink its layers' backward accumulate into; otherwise the
        stored tensors and None."""
        if not (torch.is_grad_enabled() and self.w1.requires_grad):
            return self.tensors(), None
        if self._live is None or self._live[1].consumed:
            sink = PoolGradSink(len([w for w in self.tensors() if w is not None]), self.pool_size)
            views = iter(_PoolGate.apply(sink, *[w for w in self.tensors() if w is not None]))
            self._live = (tuple(None if w is None else next(views) for w in self.tensors()), sink)
        return self._live

    def begin_forward(self) -> None:
        """A new model forward starts: its layers get a fresh gate (called by the model's forward)."""
        self._live = None
        self._calls = 0
        self._order_known = self._order_known or bool(self._order)
        self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending is not None:  # never taken (the forward stopped early): let the collective end
            self._pending[1].take()
            self._pending = None

    def layer_prefetch(self, key, start_gather) -> Optional["PrefetchedGather"]:
        """Called by each SaMoE layer at the start of its forward (``--samoe-prefetch-gather``, sharded
        pool): returns this layer's gather if the previous layer started it (else None: gather as
        usual), and starts the next layer's. ``start_gather()`` starts the caller's own all-gather
        and returns its :class:`PrefetchedGather`.

        The first forward records the layers' order and prefetches nothing. A call past the last
        layer of the order (a layer's forward rerun by activation recomputation in backward) neither
        takes nor starts a gather, and neither does a call inside :meth:`step_cache` (its store
        gathers once per step). Every rank makes the same calls in the same order, so every rank
        starts the same collectives in the same order."""
        if not self.prefetch_gathers or self.shard is None or self._step_weights is not None:
            return None
        k, self._calls = self._calls, self._calls + 1
        if not self._order_known:
            if all(key != known for known, _ in self._order):
                self._order.append((key, start_gather))
            return None
        mine = None
        if self._pending is not None and self._pending[0] == key:
            mine, self._pending = self._pending[1], None
        self._drop_pending()
        if k < len(self._order) - 1 and self._order[k][0] == key:
            next_key, start_next = self._order[k + 1]
            self._pending = (next_key, start_next())
        return mine

    @contextlib.contextmanager
    def step_cache(self):
        """Within this block each layer's materialised experts are kept after their first use and
        reused (module docstring). The weights must not change inside it: close it before the
        optimizer step. Leaving it (also by an exception) drops every cached weight."""
        if self._step_weights is not None:
            raise RuntimeError("ExpertPool.step_cache() is already open")
        self._step_weights = {}
        try:
            yield
        finally:
            # Emptied, not only dropped: a finished backward's autograd nodes may still hold a
            # layer's store (through its PoolAccess) as long as something keeps the graph alive.
            for store in self._step_weights.values():
                store.clear()
            self._step_weights = None

    def cached_weights(self, layer_key) -> Optional[dict]:
        """The {tensor index: materialised weights} store of one layer inside :meth:`step_cache`
        (filled by the layer's first call), or None outside it."""
        if self._step_weights is None:
            return None
        return self._step_weights.setdefault(layer_key, {})

    @torch.no_grad()
    def full_tensors(self) -> tuple:
        """(w1_PHF, w2_PFH, w3_PHF or None) whole and detached (a collective over the shard group
        when sharded)."""
        return tuple(None if w is None else self.gather_full(w) for w in self.tensors())

    def parameter_names(self) -> dict:
        """{id(tensor): (attribute, full per-expert shape)} of the stored pool tensors."""
        return {id(w): (name, shape) for name, w, shape in zip(("w1", "w2", "w3"), self.tensors(), self.expert_shapes())
                if w is not None}

    @torch.no_grad()
    def gather_full(self, w: torch.Tensor) -> torch.Tensor:
        """One stored pool tensor, whole: [P, *shape] (a collective over the shard group if sharded)."""
        _, shape = self.parameter_names()[id(w)]
        if self.shard is None:
            return w.detach()
        return gather_columns(w.detach(), self.shard).view(self.pool_size, *shape)

    @torch.no_grad()
    def load_full(self, w: torch.Tensor, full: torch.Tensor) -> None:
        """Copy a whole [P, *shape] pool tensor into the stored one (this rank's columns if sharded)."""
        _, shape = self.parameter_names()[id(w)]
        if tuple(full.shape) != (self.pool_size, *shape):
            raise ValueError(f"pool tensor of shape {tuple(full.shape)}, the pool expects {(self.pool_size, *shape)}")
        if self.shard is not None:
            lo, hi = self.shard.columns(math.prod(shape))
            full = full.reshape(self.pool_size, -1)[:, lo:hi]
        w.copy_(full.to(device=w.device, dtype=w.dtype))

    def extra_repr(self) -> str:
        return (
            f"pool_size={self.pool_size}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, gated={self.gated}"
        )


def _collectives():
    """(all-gather, reduce-scatter) of flat tensors: torch's ``*_single`` names where they exist
    (torch >= 2.13 deprecates the ``*_tensor`` ones), same semantics on NCCL and gloo."""
    import torch.distributed as dist

    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor,
            getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)


def gather_columns(local_RD: torch.Tensor, shard: PoolShard) -> torch.Tensor:
    """[R, D] from every rank's [R, D/S] column slice (all-gather over the shard group)."""
    return gather_columns_many([local_RD], shard)[0]


def gather_columns_many(locals_RD: list, shard: PoolShard) -> list:
    """:func:`gather_columns` of several [R, D_i/S] slices (same R) in ONE all-gather: one
    collective per layer call instead of one per pool tensor (DESIGN.md section 6)."""
    return start_gather_columns_many(locals_RD, shard, async_op=False)()


def start_gather_columns_many(locals_RD: list, shard: PoolShard, async_op: bool = True):
    """Start :func:`gather_columns_many`'s all-gather (asynchronous unless ``async_op`` is False) and
    return a function that waits for it and gives its result. On a GPU the wait makes the current
    stream wait for the collective's; it does not block the host."""
    all_gather, _ = _collectives()
    R = locals_RD[0].shape[0]
    widths = [t.shape[1] for t in locals_RD]
    local_RW = locals_RD[0].contiguous() if len(locals_RD) == 1 else torch.cat(locals_RD, dim=1)
    parts_SRW = torch.empty(shard.size * R, local_RW.shape[1], dtype=local_RW.dtype, device=local_RW.device)
    work = all_gather(parts_SRW, local_RW, group=shard.group, async_op=async_op)

    def finish() -> list:
        nonlocal local_RW  # kept alive until the collective is over, then let go
        if work is not None:
            work.wait()
        local_RW = None
        full_SRW = parts_SRW.view(shard.size, R, -1)
        out, start = [], 0
        for width in widths:
            out.append(full_SRW[:, :, start:start + width].transpose(0, 1).reshape(R, shard.size * width))
            start += width
        return out

    return finish


class PrefetchedGather:
    """A layer's weights whose all-gather was started early (:meth:`ExpertPool.layer_prefetch`):
    :meth:`take` waits for it and returns ``{tensor index: weights}`` the first time, None after
    (a layer's backward gathers its own)."""

    def __init__(self, finish):
        self._finish = finish

    def take(self) -> Optional[dict]:
        finish, self._finish = self._finish, None
        return None if finish is None else finish()


def reduce_scatter_columns_many(fulls_RD: list, shard: PoolShard) -> list:
    """[R, D_i/S] each: this rank's columns of the sum over the shard group of every rank's [R, D_i],
    for several tensors (same R) in ONE reduce-scatter; views of one buffer."""
    _, reduce_scatter = _collectives()
    R = fulls_RD[0].shape[0]
    widths = [t.shape[1] // shard.size for t in fulls_RD]
    parts_SRW = torch.cat([t.reshape(R, shard.size, w).transpose(0, 1) for t, w in zip(fulls_RD, widths)], dim=2)
    out_RW = torch.empty(R, sum(widths), dtype=parts_SRW.dtype, device=parts_SRW.device)
    reduce_scatter(out_RW, parts_SRW.view(shard.size * R, -1), group=shard.group)
    return list(torch.split(out_RW, widths, dim=1))


class PoolGradSink:
    """The pool's gradient of one backward, one buffer per pool tensor, filled in place by every
    layer (see the module docstring).

    The [P, D] buffer is allocated late: a layer's ``A^T dW`` is kept as its factors (A [n, P] and
    dW [n, D]) while the factors kept for that tensor hold no more than P rows, and summed into the
    buffer when one more would exceed it, or when the gate takes the gradient. So the buffer is
    not held at the start of backward, where the activations peak, and what is kept instead never
    outgrows it. The kept factors are summed by one GEMM over their rows stacked in backward's
    layer order (:meth:`_flush`)."""

    __slots__ = ("grads", "pending", "rows", "consumed")

    def __init__(self, count: int, rows: int):
        self.grads: list = [None] * count
        self.pending: list = [[] for _ in range(count)]
        self.rows = rows  # P: the buffer's rows
        self.consumed = False

    def add_mm(self, index: int, A_nP: torch.Tensor, dW_nD: torch.Tensor) -> None:
        """grad[index] += A_nP^T @ dW_nD (the [P, D] gradient of a materialisation)."""
        pending = self.pending[index]
        if self.grads[index] is None and sum(a.shape[0] for a, _ in pending) + A_nP.shape[0] <= self.rows:
            pending.append((A_nP, dW_nD))
            return
        pending.append((A_nP, dW_nD))
        self._flush(index)

    def _flush(self, index: int) -> None:
        """Sum the kept factors into the buffer as ONE GEMM, ``[A_1; ...; A_k]^T [dW_1; ...; dW_k]``
        (the [P, D] result is written once, instead of once per layer; in bf16 it is rounded once).
        The dW factors are copied into one [rows, D] block, each freed once copied, so the peak
        stays at the kept factors plus one buffer."""
        pending, g = self.pending[index], self.grads[index]
        if not pending:
            return
        if len(pending) == 1:
            A_kP, dW_kD = pending.pop()
        else:
            A_kP = torch.cat([a for a, _ in pending])
            dW_kD = pending[0][1].new_empty(A_kP.shape[0], pending[0][1].shape[1])
            row = 0
            while pending:
                _, dW = pending.pop(0)
                dW_kD[row:row + dW.shape[0]].copy_(dW)
                row += dW.shape[0]
                del dW
        if g is None:
            self.grads[index] = A_kP.t() @ dW_kD
        else:
            g.addmm_(A_kP.t(), dW_kD)

    def add_rows(self, index: int, lo: int, dW_nD: torch.Tensor, like: torch.Tensor) -> None:
        """grad[index][lo:lo+n] += dW_nD (experts used as they are: shared routing)."""
        self._flush(index)  # keep backward's order if both kinds of use meet in one tensor
        g = self.grads[index]
        if g is None:
            g = self.grads[index] = torch.zeros(like.shape[0], dW_nD.shape[1], dtype=like.dtype, device=like.device)
        g[lo:lo + dW_nD.shape[0]].add_(dW_nD)

    def take(self, index: int):
        self._flush(index)
        g, self.grads[index] = self.grads[index], None
        return g


class _PoolGate(torch.autograd.Function):
    """Identity on the pool tensors whose backward returns the sink's buffers: the layers' backward
    returns no pool gradient, and autograd receives the sum once."""

    @staticmethod
    def forward(ctx, sink: PoolGradSink, *weights):
        ctx.sink = sink
        ctx.shapes = [w.shape for w in weights]
        ctx.set_materialize_grads(False)
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        sink = ctx.sink
        sink.consumed = True
        out = []
        for i, (g, shape) in enumerate(zip(grads, ctx.shapes)):
            acc = sink.take(i)
            acc = None if acc is None else acc.view(shape)
            if g is not None:  # the gated view was also used through plain autograd
                acc = g if acc is None else acc + g
            out.append(acc)
        return (None, *out)


class PoolRef:
    """A plain (non-Module) handle on the model's pool, shared by all SaMoE layers.

    Holding the pool through this object keeps it out of each layer's ``_modules`` and
    ``_parameters``: the pool is stored and reduced once, at model level.
    """

    __slots__ = ("pool",)

    def __init__(self, pool: Optional[ExpertPool] = None):
        self.pool = pool

    def __repr__(self) -> str:
        return f"PoolRef({type(self.pool).__name__ if self.pool is not None else None})"


POOL_ATTRIBUTE = "samoe_pool"


def attach_pool(model: torch.nn.Module, pool: ExpertPool) -> PoolRef:
    """Register ``pool`` once on ``model`` (as ``model.samoe_pool``) and return a PoolRef to it."""
    if getattr(model, POOL_ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(model).__name__} already holds a SaMoE pool ({POOL_ATTRIBUTE})")
    setattr(model, POOL_ATTRIBUTE, pool)
    return PoolRef(pool)
