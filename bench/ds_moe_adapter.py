"""DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``) as the MLP of megatron-core's GPT layers.

The throughput benchmark compares SaMoE with two standard MoEs at the same active compute:
megatron-core's ``MoELayer`` (what ``samoe_dist.model.build_model`` builds) and DeepSpeed's own
MoE layer, plugged in here through a layer spec so that everything else (attention, norms,
embedding, loss, DeepSpeed engine, Trainer) is the same model.

- :class:`DeepSpeedMoEMLP` fills the ``mlp`` slot of a megatron ``TransformerLayer``: it takes
  ``[s, b, h]`` hidden states (and megatron's ``padding_mask``), runs DeepSpeed's gate, capacity
  dispatch, all-to-all and experts, and returns ``(output, None)`` as megatron's MLP does. The
  auxiliary loss DeepSpeed returns (``l_aux``) is kept until :meth:`pop_aux_loss`.
- :class:`DSMoEGPTLM` is :class:`samoe_dist.model.GPTLM` that also adds
  ``moe_aux_loss_coeff * l_aux`` of every DeepSpeed MoE layer to the training loss.
- :func:`build_ds_moe_model` has ``samoe_dist.model.build_model``'s signature.

DeepSpeed's MoE is capacity-based (tokens over ``capacity_factor * k * tokens / N`` per expert are
dropped and every expert runs a padded ``[capacity, h]`` block); with ``capacity_factor = 1`` its
experts process ``k * tokens`` rows per layer, as many as megatron's dropless MoE.
The expert FFN is megatron's expert (bias-free fc1, activation, fc2; gated when --swiglu).
DeepSpeed tags the expert weights itself (``allreduce = False``, ``group_name = ep_size_N``) and
its engine finds the ``MoE`` modules and hands them their expert-parallel group; they are also
tagged ``samoe_expert`` so the project's parameter accounting counts them as experts (its name-based
router class does not recognise DeepSpeed's gate ``wg``, counted as dense).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from samoe_dist.init import initialize_parameters
from samoe_dist.model import GPTLM, transformer_config


class ExpertFFN(torch.nn.Module):
    """One expert: ``fc2(act(fc1(x)))`` (``act(a) * b`` of fc1's halves when gated), no biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation, gated: bool, dtype: torch.dtype):
        super().__init__()
        self.activation = activation
        self.gated = gated
        self.fc1 = torch.nn.Linear(hidden_size, (2 if gated else 1) * ffn_hidden_size, bias=False, dtype=dtype)
        self.fc2 = torch.nn.Linear(ffn_hidden_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        if self.gated:
            a, b = z.chunk(2, dim=-1)
            return self.fc2(self.activation(a) * b)
        return self.fc2(self.activation(z))


class DeepSpeedMoEMLP(MegatronModule):
    """megatron's MLP slot filled by ``deepspeed.moe.layer.MoE`` (see module docstring)."""

    def __init__(self, config, *, num_experts: int, ep_size: int, topk: int, capacity_factor: float,
                 min_capacity: int = 4):
        super().__init__(config=config)
        f = config.moe_ffn_hidden_size or config.ffn_hidden_size
        expert = ExpertFFN(config.hidden_size, f, config.activation_func, config.gated_linear_unit,
                           config.params_dtype)
        self.moe = MoE(hidden_size=config.hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size,
                       k=topk, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                       min_capacity=min_capacity, drop_tokens=True)
        for p in self.moe.deepspeed_moe.experts.parameters():
            p.samoe_expert = True  # counted as expert (x EP) by samoe_dist.params, like megatron's
        self._l_aux: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        out, l_aux, _exp_counts = self.moe(hidden_states)  # [s, b, h], scalar, [N]
        if self.training and torch.is_grad_enabled():
            self._l_aux = l_aux  # replaced, not accumulated: a recompute cannot count twice
        return out.to(hidden_states.dtype), None

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """DeepSpeed's load-balancing loss of the last training forward (no coefficient), or None."""
        value, self._l_aux = self._l_aux, None
        return value


class DSMoEGPTLM(GPTLM):
    """GPTLM whose auxiliary loss is ``coeff * sum over layers of l_aux`` of DeepSpeed's MoE layers."""

    def __init__(self, gpt: GPTModel, aux_loss_coeff: float) -> None:
        super().__init__(gpt)
        self.aux_loss_coeff = aux_loss_coeff
        self.ds_moe_layers = [m for m in gpt.modules() if isinstance(m, DeepSpeedMoEMLP)]

    def collect_aux_losses(self) -> dict[str, torch.Tensor]:
        out = super().collect_aux_losses()
        for layer in getattr(self, "ds_moe_layers", []):
            l_aux = layer.pop_aux_loss()
            if l_aux is not None and self.aux_loss_coeff > 0:
                value = self.aux_loss_coeff * l_aux
                out["load_balancing_loss"] = out["load_balancing_loss"] + value if "load_balancing_loss" in out else value
        return out


def build_ds_moe_model(cfg, groups, capacity_factor: float = 1.0) -> DSMoEGPTLM:
    """The GPT of ``cfg`` with DeepSpeed MoE layers at ``cfg.moe_layer_indices()``.

    Same signature as ``samoe_dist.model.build_model`` (``groups`` is the run's ParallelGroups).
    """
    if not cfg.moe.enabled or cfg.samoe.enabled:
        raise ValueError("build_ds_moe_model needs --num-experts and no --samoe-pool-size")
    tcfg = transformer_config(cfg)
    norm = cfg.model.normalization
    dense = get_gpt_layer_local_spec(num_experts=None, normalization=norm)
    mlp = ModuleSpec(module=DeepSpeedMoEMLP, params=dict(
        num_experts=cfg.moe.num_experts, ep_size=groups.ep_size, topk=cfg.moe.moe_router_topk,
        capacity_factor=capacity_factor))
    moe_layer = dataclasses.replace(dense, submodules=dataclasses.replace(dense.submodules, mlp=mlp))
    specs = [dense] * cfg.model.num_layers
    for i in cfg.moe_layer_indices():
        specs[i] = moe_layer
    gpt = GPTModel(
        config=tcfg,
        transformer_layer_spec=TransformerBlockSubmodules(layer_specs=specs, layer_norm=dense.submodules.input_layernorm),
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
        pg_collection=groups.pg_collection,
    )
    initialize_parameters(gpt, tcfg, cfg.training.seed, expert_offset=0)
    return DSMoEGPTLM(gpt, cfg.moe.moe_aux_loss_coeff)
