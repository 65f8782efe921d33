"""A standard MoE whose experts run on SaMoE's grouped-GEMM code: the same-kernel peer.

The throughput benchmark's megatron-core MoE runs its experts as ``SequentialMLP`` (a Python loop
over experts), so a ratio of SaMoE over it measures the expert kernel as much as the method. This
peer is ``samoe_dist.model.build_model``'s standard MoE (megatron's router, dispatcher and aux
losses, the DeepSpeed engine) with each MoE layer's ``experts`` replaced by :class:`GroupedExperts`:
per-layer weights ``w1 [n, h, f]``, ``w2 [n, f, h]`` (``w3`` gated) owned by the layer, no pool, run
by ``samoe_dist.samoe.expert_ffn.materialized_expert_ffn`` with no combination (A = None), the very
function SaMoE's experts call. The ratio SaMoE / this peer is then SaMoE's own overhead
(materialisation, the pool gradient, its reduction), kernel for kernel.

The weights start as megatron's experts were initialised (copied from the ``SequentialMLP`` built
first), and are tagged as megatron's expert weights are (``samoe_expert``; with EP > 1
``allreduce = False`` and DeepSpeed's expert group name), so the engine reduces them over the
expert-data-parallel group.

    build_grouped_moe_model(cfg, groups)   # samoe_dist.model.build_model's signature
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from samoe_dist.model import GPTLM, build_model
from samoe_dist.samoe.expert_ffn import materialized_expert_ffn


class GroupedExperts(MegatronModule):
    """The n local experts of one MoE layer as stacked weights, megatron's expert contract
    (tokens grouped by local expert, ``(output, None)``)."""

    def __init__(self, sequential) -> None:
        super().__init__(config=sequential.config)
        cfg = sequential.config
        f = cfg.moe_ffn_hidden_size
        self.gated = cfg.gated_linear_unit
        fc1 = torch.stack([e.linear_fc1.weight.detach() for e in sequential.local_experts])  # [n, f or 2f, h]
        fc2 = torch.stack([e.linear_fc2.weight.detach() for e in sequential.local_experts])  # [n, h, f]
        self.w1 = torch.nn.Parameter(fc1[:, :f].transpose(1, 2).contiguous())  # [n, h, f]
        self.w3 = torch.nn.Parameter(fc1[:, f:].transpose(1, 2).contiguous()) if self.gated else None
        self.w2 = torch.nn.Parameter(fc2.transpose(1, 2).contiguous())  # [n, f, h]
        self.num_local_experts = sequential.num_local_experts

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_TH, probs_T = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x_TH = (probs_T.unsqueeze(-1) * x_TH).to(x_TH.dtype)
            probs_T = torch.ones_like(probs_T)
        counts = tokens_per_expert.tolist() if hasattr(tokens_per_expert, "tolist") else list(tokens_per_expert)
        y_TH = materialized_expert_ffn(x_TH, probs_T, counts, None, self.w1, self.w2, self.w3,
                                       self.config.activation_func)
        return y_TH, None

    def backward_dw(self):
        """No delayed weight-gradient pass (megatron's MoELayer API)."""


def build_grouped_moe_model(cfg, groups) -> GPTLM:
    """The standard-MoE GPT of ``cfg`` with every MoE layer's experts as :class:`GroupedExperts`."""
    if not cfg.moe.enabled or cfg.samoe.enabled:
        raise ValueError("build_grouped_moe_model needs --num-experts and no --samoe-pool-size")
    model = build_model(cfg, groups)
    for layer in model.moe_layers:
        old = layer.experts
        tagged = {k: getattr(old.local_experts[0].linear_fc1.weight, k)
                  for k in ("samoe_expert", "allreduce", "group_name")
                  if hasattr(old.local_experts[0].linear_fc1.weight, k)}
        layer.experts = GroupedExperts(old)
        for p in layer.experts.parameters():
            for k, v in tagged.items():
                setattr(p, k, v)
    return model
