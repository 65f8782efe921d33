"""SaMoE: each MoE layer's experts are a learned soft combination of one shared expert pool.

The pieces, one concern per file (DESIGN.md is the spec):

- :mod:`.pool`          ExpertPool (the P stacked expert FFNs), PoolRef, attach_pool
- :mod:`.combination`   A = softmax(C / tau) (optional top-m) and the initialisation of C
- :mod:`.grouped_gemm`  per-expert GEMMs on tokens grouped by expert
- :mod:`.expert_ffn`    the autograd Function: materialise + expert FFN, weights recomputed in backward
- :mod:`.experts`       SaMoEExperts, the ``experts`` submodule of megatron's MoELayer
- :mod:`.spec`          ModuleSpecs: megatron's MoELayer with SaMoE or standard experts
- :mod:`.reference`     the single-process for-loop oracle

``SaMoEExperts``, ``samoe_moe_spec`` and ``standard_moe_spec`` import megatron-core and are
loaded on first use, so the pure-torch parts (and the oracle) import without it.
"""

from samoe_dist.samoe.combination import combination_weights, init_combination_logits
from samoe_dist.samoe.expert_ffn import materialized_expert_ffn
from samoe_dist.samoe.pool import ExpertPool, PoolRef, attach_pool

_LAZY = {
    "SaMoEExperts": "samoe_dist.samoe.experts",
    "samoe_moe_spec": "samoe_dist.samoe.spec",
    "standard_moe_spec": "samoe_dist.samoe.spec",
}

__all__ = [
    "ExpertPool",
    "PoolRef",
    "attach_pool",
    "combination_weights",
    "init_combination_logits",
    "materialized_expert_ffn",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
