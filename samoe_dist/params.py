"""Parameter accounting: total, expert (or pool), router, combination, and active per token.

Counts are global (the whole model, not one rank's shard): standard-MoE experts are sharded over
the expert-parallel group, so their local count is multiplied by the EP size; the SaMoE pool and
combination logits are counted once (a sharded pool's local column slice is multiplied by its
shard count); a tensor-parallel weight's block is multiplied by the TP size.
"""

from __future__ import annotations

import torch

from samoe_dist.config import RunConfig
from samoe_dist.tensor_parallel import is_tp_sharded


def classify(name: str, param: torch.Tensor) -> str:
    """'pool', 'combination', 'router', 'expert' or 'dense' for one named parameter."""
    if ".samoe_pool." in f".{name}":
        return "pool"
    if name.endswith("combination_logits"):
        return "combination"
    if ".router." in name:
        return "router"
    if getattr(param, "samoe_expert", False):
        return "expert"
    return "dense"


def expert_size(cfg: RunConfig) -> int:
    """|E|: weights of one expert FFN (2*h*f, or 3*h*f gated)."""
    f = cfg.moe.moe_ffn_hidden_size or cfg.model.ffn_hidden_size
    return (3 if cfg.model.swiglu else 2) * cfg.model.hidden_size * f


def count_parameters(model: torch.nn.Module, cfg: RunConfig) -> dict[str, int]:
    """Parameter counts of the whole model (see module docstring)."""
    counts = {"pool": 0, "combination": 0, "router": 0, "expert": 0, "dense": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embedding/output weights
            continue
        seen.add(id(p))
        tp = cfg.parallel.tensor_model_parallel_size if is_tp_sharded(p) else 1
        counts[classify(name, p)] += p.numel() * getattr(p, "samoe_pool_shards", 1) * tp
    counts["expert"] *= cfg.parallel.expert_model_parallel_size
    n_moe = len(cfg.moe_layer_indices())
    active_experts = n_moe * cfg.moe.moe_router_topk * expert_size(cfg) if cfg.moe.enabled else 0
    return {
        "total": sum(counts.values()),
        # expert parameters: the per-layer experts of a standard MoE, or SaMoE's pool
        "expert": counts["expert"] + counts["pool"],
        "pool": counts["pool"],
        "router": counts["router"],
        "combination": counts["combination"],
        "dense": counts["dense"],
        "active_per_token": counts["dense"] + counts["router"] + active_experts,
    }


def format_counts(counts: dict[str, int]) -> str:
    return " | ".join(f"{k}: {v:,}" for k, v in counts.items())
