"""Model builder: megatron-core's GPTModel, dense, standard MoE or SaMoE, from one RunConfig.

The transformer is megatron-core's own (``GPTModel``, ``TransformerBlock``, the local layer spec);
only the MLP submodule of each MoE layer changes:

- dense: ``--num-experts`` not given, every layer has megatron's MLP;
- standard MoE: every ``--moe-layer-freq``-th layer is megatron's ``MoELayer`` with N experts;
- SaMoE: those layers are ``MoELayer`` whose experts are combinations of one shared pool
  (``samoe_dist.samoe``), the pool registered once at model level.

Both MoE kinds use :class:`samoe_dist.router.ExplicitLossRouter`, so their auxiliary losses are
added to the training loss by :class:`GPTLM` in plain sight.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from samoe_dist import cpu_compat
from samoe_dist.config import ConfigError, RunConfig
from samoe_dist.gradient_flow import ReceivedTokens
from samoe_dist.init import initialize_parameters
from samoe_dist.router import ExplicitLossRouter

logger = logging.getLogger(__name__)


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig for this run (CPU-safe settings where CUDA is absent)."""
    m, moe = cfg.model, cfg.moe
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        add_bias_linear=False,
        gated_linear_unit=m.swiglu,
        activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False,
        bf16=cfg.training.bf16,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        expert_tensor_parallel_size=1,  # experts whole on a rank (docs/DESIGN.md section 7)
        perform_initialization=False,  # samoe_dist.init draws every weight, layout-independently
    )
    if moe.enabled:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.moe_router_topk,
            moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
            moe_z_loss_coeff=moe.moe_z_loss_coeff,
            moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
            moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
            moe_router_pre_softmax=moe.moe_router_pre_softmax,
            moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
            moe_router_load_balancing_type="aux_loss" if moe.moe_aux_loss_coeff > 0 else "none",
        )
    kwargs.update(cpu_compat.cpu_safe_config_overrides())
    return TransformerConfig(**kwargs)


def _with_mlp(layer_spec, mlp_spec):
    """A copy of a TransformerLayer spec whose MLP submodule is ``mlp_spec``."""
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp_spec))


def _with_explicit_router(moe_spec):
    return dataclasses.replace(moe_spec, submodules=dataclasses.replace(moe_spec.submodules, router=ExplicitLossRouter))


def _with_norm(layer_spec, norm):
    sub = layer_spec.submodules
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, input_layernorm=norm,
                                                                          pre_mlp_layernorm=norm))


def block_spec(cfg: RunConfig, pool_ref=None) -> TransformerBlockSubmodules:
    """Per-layer specs: dense layers, and MoE/SaMoE layers at cfg.moe_layer_indices()."""
    norm = cfg.model.normalization
    dense = get_gpt_layer_local_spec(num_experts=None, normalization=norm)
    sp_norm = None
    if cfg.parallel.sequence_parallel:  # megatron's torch-norm wrapper refuses it (samoe_dist.tensor_parallel)
        from samoe_dist.tensor_parallel import SequenceParallelNorm

        sp_norm = SequenceParallelNorm
        dense = _with_norm(dense, sp_norm)
    specs = [dense] * cfg.model.num_layers
    if cfg.moe.enabled:
        moe_layer = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts, normalization=norm)
        if sp_norm is not None:
            moe_layer = _with_norm(moe_layer, sp_norm)
        for j, i in enumerate(cfg.moe_layer_indices()):
            if cfg.samoe.enabled:
                from samoe_dist.samoe.spec import samoe_moe_spec

                mlp = samoe_moe_spec(pool_ref, j, cfg.samoe)
            else:
                mlp = moe_layer.submodules.mlp
            mlp = _with_explicit_router(mlp)
            if cfg.parallel.tensor_model_parallel_size > 1 and not cfg.parallel.sequence_parallel:
                mlp = dataclasses.replace(mlp, module=TokenSplitMoELayer)
            specs[i] = _with_mlp(moe_layer, mlp)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=sp_norm or dense.submodules.input_layernorm)


class TokenSplitMoELayer(MoELayer):
    """megatron's ``MoELayer`` for TP > 1 without sequence parallelism.

    megatron-core refuses to train an MoE layer under TP without SP: every TP rank would route and
    compute all the tokens. This layer gives each TP rank 1/TP of the sequence (megatron's
    ``scatter_to_sequence_parallel_region``: backward all-gathers the gradient), runs megatron's
    layer on it exactly as under SP (its config says ``sequence_parallel``, so router and token
    counts reduce over the TP group), and all-gathers the output (backward keeps this rank's block:
    without SP the gradient arriving here is the same on every TP rank). The rest of the model is
    plain TP (docs/DESIGN.md section 7)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(dataclasses.replace(config, sequence_parallel=True), *args, **kwargs)

    def forward(self, hidden_states, *args, **kwargs):
        group = self.attn_tp_group
        local = scatter_to_sequence_parallel_region(hidden_states, group=group)
        output, bias = super().forward(local, *args, **kwargs)
        output = gather_from_sequence_parallel_region(output, tensor_parallel_output_grad=False, group=group)
        return output, bias


class GPTLM(torch.nn.Module):
    """GPTModel plus the loss: masked token cross-entropy + the routers' auxiliary losses.

    ``forward(tokens [b,s], labels [b,s], loss_mask [b,s])`` returns the scalar training loss and a
    dict of detached components (lm loss, load-balancing and z losses) for logging.
    """

    def __init__(self, gpt: GPTModel, pool: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        self.gpt = gpt
        if pool is not None:
            from samoe_dist.samoe.pool import attach_pool

            attach_pool(self.gpt, pool)
        self.routers = [m for m in self.gpt.modules() if isinstance(m, ExplicitLossRouter)]
        self.moe_layers = [m for m in self.gpt.modules() if isinstance(m, MoELayer)]
        self.samoe_experts = [m for m in self.gpt.modules() if hasattr(m, "combination_entropy")]
        self._received = ReceivedTokens(self.moe_layers)
        self._load: Optional[torch.Tensor] = None  # [L_moe, N] tokens routed since expert_loads()
        self._received_sum: Optional[torch.Tensor] = None  # [L_moe, n_local] tokens the experts received

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
        # drop values (aux losses, counts) a checkpoint recompute may have left behind
        self.collect_aux_losses()
        pool = getattr(self.gpt, "samoe_pool", None)
        if pool is not None:
            pool.begin_forward()  # this forward's layers share one pool gate (samoe.pool)
        self._pop_counts()
        per_token = self.gpt(tokens, _positions(tokens), None, labels=labels)  # [b, s] fp32 CE
        self._count_tokens()
        mask = loss_mask.to(per_token.dtype)
        lm_loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        total = lm_loss
        parts = {"lm loss": lm_loss.detach()}
        aux = self.collect_aux_losses()
        for name, value in aux.items():
            total = total + value.to(total.dtype)
            parts[name.replace("_", " ")] = value.detach()
        return total, parts

    def collect_aux_losses(self) -> dict[str, torch.Tensor]:
        """Sum each aux loss over the MoE layers of the last forward (empty in eval/no-grad)."""
        out: dict[str, torch.Tensor] = {}
        for router in self.routers:
            for name, value in router.pop_losses().items():
                out[name] = out[name] + value if name in out else value
        return out

    @torch.no_grad()
    def combination_entropies(self) -> list[float]:
        """Mean row entropy of each SaMoE layer's A_l (nats; log P when uniform, 0 when one-hot)."""
        return [float(m.combination_entropy()) for m in self.samoe_experts if not m.route_to_pool]

    @torch.no_grad()
    def combination_peak_masses(self) -> list[float]:
        """Mean share of each SaMoE layer's A_l rows on their initial peak pool expert (1: unmoved)."""
        return [float(m.combination_peak_mass()) for m in self.samoe_experts if not m.route_to_pool]

    def _pop_counts(self) -> tuple:
        return [r.pop_counts() for r in self.routers], self._received.pop()

    def _count_tokens(self) -> None:
        counts, received = self._pop_counts()
        if counts and all(c is not None for c in counts):
            step = torch.stack(counts)
            self._load = step if self._load is None else self._load + step
        if received is not None:
            self._received_sum = received if self._received_sum is None else self._received_sum + received

    def expert_loads(self) -> tuple:
        """Tokens this rank routed to each expert of each MoE layer [L_moe, N], and tokens this
        rank's local experts received from the dispatcher [L_moe, n_local], since the last call
        (on the CPU, float64)."""
        load, self._load = self._load, None
        received, self._received_sum = self._received_sum, None
        if load is None:
            n = self.gpt.config.num_moe_experts or 0
            load = torch.zeros(len(self.routers), n, dtype=torch.float64)
        if received is None:
            received = torch.zeros(len(self.moe_layers), 0, dtype=torch.float64)
        return load.cpu(), received.cpu()

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [b, s, V] (inference and evaluation)."""
        out = self.gpt(tokens, _positions(tokens), None)  # [b, s, V]
        self.collect_aux_losses()
        return out


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids [b, s] of a token batch [b, s]."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def build_model(cfg: RunConfig, groups) -> GPTLM:
    """Build the model on this rank. ``groups`` is the run's ParallelGroups."""
    if cfg.model.vocab_size % groups.tp_size:  # the tokenizer's size, known only now (config checks a given one)
        raise ConfigError(f"the vocabulary has {cfg.model.vocab_size} tokens, which --tensor-model-parallel-size "
                          f"{groups.tp_size} does not divide (the embedding and output are split by vocabulary "
                          f"rows): use a TP size that divides it, or a tokenizer whose vocabulary it divides")
    tcfg = transformer_config(cfg)
    pool, pool_ref = None, None
    if cfg.samoe.enabled:
        from samoe_dist.samoe.pool import ExpertPool, PoolRef, PoolShard

        shard = None
        if cfg.samoe.samoe_pool_sharding == "sharded" and groups.edp_size > 1:
            shard = PoolShard(groups.expert_dp_group, groups.edp_size, groups.edp_rank)
        pool = ExpertPool.from_transformer_config(tcfg, cfg.samoe.samoe_pool_size, shard=shard)
        pool.prefetch_gathers = cfg.samoe.samoe_prefetch_gather
        pool_ref = PoolRef(pool)
    gpt = GPTModel(
        config=tcfg,
        transformer_layer_spec=block_spec(cfg, pool_ref),
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
        pg_collection=groups.pg_collection,
    )
    if cpu_compat.on_cpu():  # megatron's per-expert MLPs: no oneDNN cache entry per row count
        cpu_compat.patch_expert_mlps(gpt)
    n_local = cfg.moe.num_experts // groups.ep_size if cfg.moe.enabled else 0
    has_experts = mark_expert_parameters(gpt, groups.ep_size, groups.ds_ep_group_name)  # before the draw
    if groups.tp_size > 1:
        from samoe_dist.tensor_parallel import mark_tensor_parallel_weights

        mark_tensor_parallel_weights(gpt, groups.ep_size)
    initialize_parameters(gpt, tcfg, cfg.training.seed, expert_offset=groups.ep_rank * n_local,
                          tp_rank=groups.tp_rank, tp_size=groups.tp_size)
    if cfg.training.recompute_granularity == "full":
        checkpoint_layers(gpt)
    model = GPTLM(gpt, pool)
    if pool is not None and pool.shard is not None:  # before the TP marks: its slices are reduced over EP
        mark_pool_shards(model, pool, groups)
    if groups.tp_size > 1:  # the MoE layers split the tokens over TP, with or without SP
        from samoe_dist.tensor_parallel import install_sequence_parallel_grad_sum, mark_sequence_parallel

        mark_sequence_parallel(model, groups.ep_size)
        model._tp_grad_hooks = install_sequence_parallel_grad_sum(model, groups.tp_group)
    if has_experts and groups.ep_size > 1:
        from samoe_dist.ds_moe_marker import ExpertParallelMarker

        model.ds_moe_marker = ExpertParallelMarker(cfg.moe.num_experts, groups.ep_size)
    return model


def mark_pool_shards(model: GPTLM, pool, groups) -> None:
    """Tag a column-sharded pool's slices for DeepSpeed (reduced over the EP group, samoe_dist.parallel
    .register_pool_shard_group) and add the marker that makes the engine look for such parameters."""
    from samoe_dist.ds_moe_marker import PoolShardMarker
    from samoe_dist.parallel import register_pool_shard_group

    name = register_pool_shard_group(groups)
    for w in pool.tensors():
        if w is not None:
            w.allreduce = False
            w.group_name = name
            w.samoe_pool_shards = pool.shard.size
            if groups.tp_size > 1:
                # A replica's TP ranks hold the same slice, and ZeRO-1/2 give each of them its own
                # partition of it (over the EP group): DeepSpeed's norm must count it on every TP rank.
                w.model_parallel = True
    model.ds_pool_marker = PoolShardMarker(name, pool.shard.size)


def is_pool_shard(param: torch.Tensor) -> bool:
    """True for a column slice of a sharded SaMoE pool (distinct over the expert-data-parallel group)."""
    return getattr(param, "samoe_pool_shards", 1) > 1


def is_expert_parallel(param: torch.Tensor) -> bool:
    """True for a weight DeepSpeed must not reduce over the whole world: standard experts (sharded
    over the EP group, mark_expert_parameters) and a sharded pool's slices (mark_pool_shards)."""
    return getattr(param, "allreduce", True) is False


def mark_expert_parameters(module: torch.nn.Module, ep_size: int, ds_group_name: str) -> int:
    """Tag megatron's expert weights so DeepSpeed reduces them over the right group.

    megatron-core builds experts from linear layers with ``is_expert=True`` and, only when
    EP > 1, sets ``allreduce = False`` on them without naming a group. They are tagged
    ``samoe_expert`` (parameter accounting) and, with EP > 1, given the ``group_name`` of
    DeepSpeed's expert-data-parallel group. With EP = 1 that group is the whole data-parallel
    world: they stay ordinary data-parallel parameters. Returns how many were tagged.
    """
    n = 0
    for sub in module.modules():
        if not getattr(sub, "is_expert", False):
            continue
        for p in sub.parameters(recurse=False):
            p.samoe_expert = True
            if ep_size > 1:
                p.allreduce = False
                p.group_name = ds_group_name
            n += 1
    return n


def checkpoint_layers(gpt: GPTModel) -> None:
    """Recompute every transformer layer in backward, with torch's NON-reentrant checkpointing.

    megatron-core's own recompute (``recompute_granularity='full'``) is reentrant: each layer's
    backward is a separate autograd call, so a parameter used by every layer (the SaMoE pool) has
    its gradient hook fire once per layer, which ZeRO-2 rejects ("gradient computed twice") and
    which breaks gradient-accumulation bookkeeping. Non-reentrant checkpointing keeps one backward
    graph: the pool's gradient is accumulated once per backward, however many layers use it.
    """
    from functools import partial

    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        gpt.decoder,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, TransformerLayer),
    )
