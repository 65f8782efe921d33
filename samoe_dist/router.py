"""megatron-core's top-k router with its auxiliary losses handed to the caller explicitly.

Upstream attaches the load-balancing and z losses to activations through
``MoEAuxLossAutoScaler`` (their gradient appears in backward without being part of the loss) and
logs them into a module-global tracker. Here the routing is unchanged, but each loss of the last
forward is kept on the router until :meth:`pop_losses`, so the model adds them to the training loss
itself and they are logged like any other value. The same holds for the token counts per expert
(:meth:`pop_counts`). Values are replaced, not accumulated, by each forward: a forward re-run by
activation checkpointing in backward cannot count twice, since the model reads them right after
its own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import z_loss_func
from megatron.core.transformer.moe.router import TopKRouter


class ExplicitLossRouter(TopKRouter):
    """TopKRouter whose aux losses are collected with :meth:`pop_losses` instead of injected."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, torch.Tensor] = {}
        self._counts: Optional[torch.Tensor] = None  # on the routing device: no host sync per step

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask)
        if self.training:  # tokens this rank routed to each expert (after capacity dropping)
            self._counts = routing_map.sum(dim=0).detach().to(torch.float64)
        return probs, routing_map

    def pop_counts(self) -> Optional[torch.Tensor]:
        """Tokens this rank routed to each expert in the last training forward [N], or None."""
        counts, self._counts = self._counts, None
        return counts

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False,
                                           valid_token_count=None):
        # aux_loss already carries its coefficient (megatron's switch_load_balancing_loss_func); under
        # sequence parallelism it is this rank's share (megatron counts the tokens over the TP group).
        self._add("load_balancing_loss", aux_loss)
        return activation

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        if self.config.moe_z_loss_coeff is not None and self.training and torch.is_grad_enabled():
            # Under sequence parallelism this rank holds 1/TP of the tokens: its share of the mean
            # (megatron's own scaling), so the shares of the TP ranks sum to the whole z loss.
            coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
            self._add("z_loss", z_loss_func(logits, coeff, padding_mask=padding_mask))
        return logits

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._pending[name] = value  # one forward's value (see module docstring)

    def pop_losses(self) -> dict[str, torch.Tensor]:
        """The aux losses (coefficient applied) of the last training forward."""
        losses, self._pending = self._pending, {}
        return losses
