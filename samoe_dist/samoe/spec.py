"""ModuleSpecs of an MoE layer: megatron's own MoELayer with standard or SaMoE experts.

Both specs are megatron-core's local-backend MoE spec (the ``mlp`` of
``get_gpt_layer_local_spec(num_experts=N)``: MoELayer, TopKRouter, SequentialMLP experts, shared
experts spec); the SaMoE one only swaps the experts module for :class:`SaMoEExperts`, so routing,
dispatch and the auxiliary losses are megatron's, unchanged.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from samoe_dist.config import SaMoEConfig
from samoe_dist.samoe.experts import SaMoEExperts
from samoe_dist.samoe.pool import PoolRef

# The spec's structure does not depend on N (N is read from TransformerConfig.num_moe_experts);
# any positive value selects the MoE branch of megatron's spec builder.
_ANY_NUM_EXPERTS = 2


def standard_moe_spec() -> ModuleSpec:
    """megatron's MoELayer spec with SequentialMLP experts on local (non-TE) linear layers."""
    return get_gpt_layer_local_spec(num_experts=_ANY_NUM_EXPERTS, moe_grouped_gemm=False).submodules.mlp


def samoe_moe_spec(pool_ref: PoolRef, moe_layer_index: int, samoe_cfg: SaMoEConfig) -> ModuleSpec:
    """The standard spec with its experts replaced by SaMoEExperts of MoE layer ``moe_layer_index``.

    ``moe_layer_index`` counts MoE layers only (0 for the first MoE layer); it places the peaked
    initialisation of this layer's combination rows on the pool.
    """
    base = standard_moe_spec()
    experts = ModuleSpec(
        module=SaMoEExperts,
        params={"pool_ref": pool_ref, "moe_layer_index": moe_layer_index, "samoe": samoe_cfg},
    )
    submodules = dataclasses.replace(base.submodules, experts=experts)
    return ModuleSpec(
        module=base.module, params=dict(base.params), submodules=submodules, metainfo=dict(base.metainfo)
    )
