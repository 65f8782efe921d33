"""The language-model loss of a plain model, computed as the trainer computes it.

The trainer's ``lm loss`` (``samoe_dist.model.GPTLM``) is the token cross-entropy averaged over
the tokens of a micro-batch whose ``loss_mask`` is 1; a global batch's loss is the mean over its
micro-batches. Computing the same number from a converted checkpoint, with no megatron-core and
no process group, shows that a conversion kept the model: same weights, same loss.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """Masked mean cross-entropy of ``model.logits(tokens)`` [b, s, V] against ``labels`` [b, s]."""
    logits_BSV = model.logits(tokens).float()
    per_token_BS = F.cross_entropy(logits_BSV.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    mask_BS = loss_mask.to(per_token_BS.dtype)
    return float((per_token_BS * mask_BS).sum() / mask_BS.sum().clamp(min=1.0))


def mean_lm_loss(model, micro_batches: Iterable[dict]) -> float:
    """Mean of :func:`lm_loss` over micro-batches (dicts with tokens, labels, loss_mask), as the
    trainer averages the micro-batches of a global batch."""
    losses = [lm_loss(model, b["tokens"], b["labels"], b["loss_mask"]) for b in micro_batches]
    if not losses:
        raise ValueError("mean_lm_loss needs at least one micro-batch")
    return sum(losses) / len(losses)
