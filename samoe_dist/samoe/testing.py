"""Small builders shared by the SaMoE tests and benchmarks: standalone megatron MoELayers.

A model builder does not need these (it builds whole GPTModels from the specs); they make one
MoELayer of either kind from a handful of numbers, and copy pool experts into a standard layer
(the degenerate-case check of DESIGN.md §2).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from samoe_dist import cpu_compat
from samoe_dist.config import SaMoEConfig
from samoe_dist.samoe.pool import ExpertPool, PoolRef
from samoe_dist.samoe.spec import samoe_moe_spec, standard_moe_spec


def moe_transformer_config(
    *,
    hidden_size: int,
    ffn_hidden_size: int,
    num_experts: int,
    topk: int,
    num_layers: int = 2,
    gated: bool = False,
    pre_softmax: bool = True,
    capacity_factor: Optional[float] = None,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: Optional[float] = None,
    dispatcher: str = "alltoall",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """A TransformerConfig for standalone MoE layers (no biases, CPU-safe when on the CPU)."""
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=1,
        ffn_hidden_size=ffn_hidden_size,
        moe_ffn_hidden_size=ffn_hidden_size,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=pre_softmax,
        moe_expert_capacity_factor=capacity_factor,
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_z_loss_coeff=z_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        gated_linear_unit=gated,
        activation_func=torch.nn.functional.silu if gated else torch.nn.functional.gelu,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    kwargs.update(cpu_compat.cpu_safe_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_samoe_layer(config: TransformerConfig, pool_ref: PoolRef, moe_layer_index: int,
                      samoe_cfg: SaMoEConfig, layer_number: int = 1):
    """megatron MoELayer with SaMoEExperts (training mode, as megatron builds it)."""
    return build_module(samoe_moe_spec(pool_ref, moe_layer_index, samoe_cfg), config=config,
                        layer_number=layer_number)


def build_standard_layer(config: TransformerConfig, layer_number: int = 1):
    """megatron MoELayer with SequentialMLP experts."""
    return build_module(standard_moe_spec(), config=config, layer_number=layer_number)


@torch.no_grad()
def load_pool_experts_into_standard(layer, pool: ExpertPool, pool_indices) -> None:
    """Copy pool experts ``pool_indices[e]`` into expert e of a standard (SequentialMLP) layer.

    Inverse of the layout documented in :mod:`samoe_dist.samoe.pool`: ``linear_fc1.weight`` is
    ``w1[p].T`` (stacked over ``w3[p].T`` when gated) and ``linear_fc2.weight`` is ``w2[p].T``.
    """
    for e, p in enumerate(pool_indices):
        expert = layer.experts.local_experts[e]
        fc1 = pool.w1[p].t()
        if pool.w3 is not None:
            fc1 = torch.cat([fc1, pool.w3[p].t()], dim=0)
        expert.linear_fc1.weight.copy_(fc1)
        expert.linear_fc2.weight.copy_(pool.w2[p].t())
