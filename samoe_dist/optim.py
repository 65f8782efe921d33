"""Optimizer parameter groups and the learning-rate schedule (warmup, then cosine/linear decay)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from samoe_dist.config import TrainingConfig
from samoe_dist.model import is_expert_parallel


def param_groups(model: torch.nn.Module, weight_decay: float, lr: Optional[float] = None,
                 combination_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters; SaMoE's
    combination logits in a group of their own, without decay (it would pull every layer's experts
    towards the pool mean) and at ``lr * combination_lr_mult`` (``lr`` is needed when the
    multiplier is not 1; the scheduler scales every group's lr by the same factor).

    Expert parameters (``allreduce = False``) are split into DeepSpeed's MoE groups so ZeRO-1/2
    reduce them over the expert-data-parallel group.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay, combination = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("combination_logits"):
            combination.append(p)
        elif p.ndim < 2 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "combination", "params": combination, "weight_decay": 0.0},
    ]
    if combination_lr_mult != 1.0:
        if lr is None:
            raise ValueError("param_groups: a combination lr multiplier needs the base lr")
        groups[2]["lr"] = lr * combination_lr_mult
    groups = [g for g in groups if g["params"]]
    if any(is_expert_parallel(p) for g in groups for p in g["params"]):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_at(step: int, tr: TrainingConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based), Megatron's schedule shape."""
    if tr.lr_warmup_iters > 0 and step < tr.lr_warmup_iters:
        return tr.lr * (step + 1) / tr.lr_warmup_iters
    if tr.lr_decay_style == "constant":
        return tr.lr
    progress = (step - tr.lr_warmup_iters) / max(1, tr.lr_decay_iters - tr.lr_warmup_iters)
    progress = min(max(progress, 0.0), 1.0)
    if tr.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return tr.min_lr + coeff * (tr.lr - tr.min_lr)


def make_scheduler(optimizer: torch.optim.Optimizer, tr: TrainingConfig):
    """LambdaLR driven by :func:`lr_at`; DeepSpeed steps it after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tr) / tr.lr)
