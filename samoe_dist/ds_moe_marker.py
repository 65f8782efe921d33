"""Tell DeepSpeed's engine that the model holds expert-parallel parameters.

DeepSpeed decides whether to reduce expert parameters over the expert-data-parallel group (and to
give ZeRO its expert groups) by looking for instances of its own ``deepspeed.moe.layer.MoE`` among
the model's modules; megatron-core's ``MoELayer`` is not one, and without the flag the engine
silently skips the reduction of ``allreduce = False`` parameters. This parameter-free marker is
that signal: it holds no weights and never runs. DeepSpeed's checkpointing of such a model writes
and later reads one file per (MoE layer, global expert); the marker gives it one tiny placeholder
buffer per local expert for that, so DeepSpeed's own MoE save/load path (which keeps each
expert-parallel rank's optimizer state) works unchanged. The real expert weights are checkpointed by
samoe_dist.checkpoint. It is attached only for standard-MoE layers with EP > 1; SaMoE has no
expert-parallel parameters when its pool is replicated (reduced like a dense parameter).

A SaMoE pool sharded by columns over the expert-data-parallel group (DESIGN.md §6) is the mirror
image of experts: different column slices on the ranks of megatron's expert-data-parallel group,
the same slice on the ranks of its expert-parallel group. :class:`PoolShardMarker` signals it, with
DeepSpeed's group of that name (``samoe_dist.parallel.register_pool_shard_group``) whose "data
parallel" side is megatron's EP group: DeepSpeed then sums the slice's gradient over the EP group,
divided by the world size as for every other parameter, and ZeRO-1/2 partition its optimizer state
over that group.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE


class ExpertParallelMarker(MoE):
    """A DeepSpeed ``MoE`` in type only: carries the expert counts and group name, no layer."""

    def __init__(self, num_experts: int, ep_size: int) -> None:
        torch.nn.Module.__init__(self)  # deliberately not MoE.__init__: no gate, no experts
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        # state-dict keys "deepspeed_moe.experts.deepspeed_experts.<i>.expert_slot", as DeepSpeed's MoE
        self.deepspeed_moe = torch.nn.Module()
        self.deepspeed_moe.experts = torch.nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = torch.nn.ModuleList(
            [_ExpertSlot() for _ in range(self.num_local_experts)])

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("ExpertParallelMarker is a marker for DeepSpeed's engine, not a layer")

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: the groups already exist (samoe_dist.parallel made and checked them)."""
        from deepspeed.utils import groups

        if use_data_before_expert_parallel_:
            raise ValueError("ds_config use_data_before_expert_parallel_ puts data-parallel ranks first, "
                             "but megatron-core's expert groups are contiguous ranks: remove that option")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"DeepSpeed expert group {self.expert_group_name} was not created: "
                               "call samoe_dist.parallel.init_distributed before building the engine")


class _ExpertSlot(torch.nn.Module):
    """One placeholder per local expert for DeepSpeed's per-expert checkpoint files."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("expert_slot", torch.zeros(1))


class PoolShardMarker(MoE):
    """A DeepSpeed ``MoE`` in type only, for a column-sharded SaMoE pool: no experts, no files."""

    def __init__(self, group_name: str, shard_count: int) -> None:
        torch.nn.Module.__init__(self)  # deliberately not MoE.__init__
        self.ep_size = shard_count
        self.expert_group_name = group_name
        self.num_experts = 0
        self.num_local_experts = 0
        self.deepspeed_moe = torch.nn.Module()
        self.deepspeed_moe.experts = torch.nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = torch.nn.ModuleList()

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("PoolShardMarker is a marker for DeepSpeed's engine, not a layer")

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        from deepspeed.utils import groups

        if use_data_before_expert_parallel_:
            raise ValueError("ds_config use_data_before_expert_parallel_ is not supported (contiguous EP groups)")
        if self.expert_group_name not in groups._get_expert_data_parallel_group_dict():
            raise RuntimeError(f"DeepSpeed group {self.expert_group_name} of the sharded pool was not registered: "
                               "build the model with samoe_dist.model.build_model")
