"""Tell DeepSpeed's engine that the model holds expert-parallel parameters.

DeepSpeed decides whether to reduce expert parameters over the expert-data-parallel group (and to
give ZeRO its expert groups) by looking for instances of its own ``deepspeed.moe.layer.MoE`` among
the model's modules; megatron-core's ``MoELayer`` is not one, and without the flag the engine
silently skips the reduction of ``allreduce = False`` parameters. This parameter-free marker is
that signal: it holds no weights (so DeepSpeed's expert checkpoint files stay empty) and never runs.
It is attached only for standard-MoE layers with EP > 1; SaMoE has no expert-parallel parameters
(its pool is replicated and reduced like a dense parameter).
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
