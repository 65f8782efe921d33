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
"""

from __future__ import annotations

import math
from typing import Optional

import torch


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
        kw = dict(dtype=dtype, device=device)
        self.w1 = torch.nn.Parameter(torch.empty(P, h, f, **kw))  # w1_PHF
        self.w2 = torch.nn.Parameter(torch.empty(P, f, h, **kw))  # w2_PFH
        self.w3 = torch.nn.Parameter(torch.empty(P, h, f, **kw)) if gated else None  # w3_PHF
        self.reset_parameters()

    @classmethod
    def from_transformer_config(cls, config, pool_size: int) -> "ExpertPool":
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
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal init as megatron's experts: fc1 (and its gated half) with std, fc2 with out std."""
        torch.nn.init.normal_(self.w1, mean=0.0, std=self.init_method_std)
        if self.w3 is not None:
            torch.nn.init.normal_(self.w3, mean=0.0, std=self.init_method_std)
        torch.nn.init.normal_(self.w2, mean=0.0, std=self.output_layer_init_std)

    def tensors(self) -> tuple:
        """(w1_PHF, w2_PFH, w3_PHF or None): the order the expert-FFN function takes them."""
        return self.w1, self.w2, self.w3

    def extra_repr(self) -> str:
        return (
            f"pool_size={self.pool_size}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, gated={self.gated}"
        )


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
