"""Process groups: DeepSpeed's and megatron-core's, created together and checked to agree.

megatron-core makes the groups (PP = 1; docs/DESIGN.md section 7). Dense layers: world = TP x DP,
TP groups of consecutive ranks. Experts (whole on a rank, expert TP = 1): world = EP x EDP, EP
groups of consecutive ranks, so with TP > 1 the EP group folds into (or spans) TP groups, as in
megatron-core's MoE. With TP = 1 DeepSpeed builds its own expert groups and the start-up check
asserts they are the same sets of ranks as megatron's; with TP > 1 DeepSpeed's expert groups are
megatron's own group objects (DeepSpeed would put EP inside the data-parallel group instead), and
DeepSpeed gets megatron's tensor- and data-parallel groups through its ``mpu`` interface
(:class:`MegatronMPU`); the check then compares DeepSpeed's view of the data-parallel group too.
The groups reach the model as one :class:`ParallelGroups` object (its ``pg_collection`` is what
megatron-core's modules take), never as globals read inside the model math.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from samoe_dist import cpu_compat

logger = logging.getLogger(__name__)


class LayoutMismatchError(RuntimeError):
    """DeepSpeed and megatron-core disagree about which ranks form a group."""


@dataclass
class ParallelGroups:
    """The groups a run uses, handed explicitly to the model builder and the trainer."""

    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    ep_rank: int
    ep_group: Any
    expert_dp_group: Any
    ds_ep_group_name: str  # DeepSpeed's name of the EP groups ("ep_size_N")
    pg_collection: Any  # megatron.core.process_groups_config.ProcessGroupCollection
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None  # the dense data-parallel group (the world when TP = 1)

    @property
    def edp_size(self) -> int:
        """Expert-data-parallel size: ranks holding the same experts (world / EP)."""
        return self.world_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size  # EP groups are contiguous ranks

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas of the dense parameters: world / TP (PP = 1)."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size  # TP groups are consecutive ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# World-size variables of the launchers, in order: torchrun/deepspeed/SLURM templates, then MPI
# (mpirun of Open MPI, MPICH/Intel MPI's PMI, MVAPICH), before DeepSpeed's MPI discovery has run.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    for var in _WORLD_SIZE_VARS:
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's groups (PP = 1): the model-parallel group is
    the tensor-parallel group. DeepSpeed reduces dense gradients over ``get_data_parallel_group``,
    counts a parameter without ``tensor_model_parallel`` once per model-parallel group in the
    gradient norm, and names its checkpoint files by ``get_model_parallel_rank``. It has no
    ``get_sequence_parallel_*``: megatron's sequence parallelism is not DeepSpeed-Ulysses."""

    def __init__(self, groups: "ParallelGroups") -> None:
        self._g = groups

    def get_model_parallel_group(self):
        return self._g.tp_group

    def get_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._g.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._g.dp_rank * self._g.tp_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_group(self):
        return self._g.dp_group

    def get_data_parallel_rank(self) -> int:
        return self._g.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._g.dp_size

    def get_data_parallel_group_ranks(self) -> list:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self._g.dp_group)


def deepspeed_mpu(groups: "ParallelGroups"):
    """The mpu to hand deepspeed.initialize: None with TP = 1 (DeepSpeed's defaults are the layout)."""
    return MegatronMPU(groups) if groups.tp_size > 1 else None


def init_distributed(expert_model_parallel_size: int, timeout_minutes: float = 30.0,
                     tensor_model_parallel_size: int = 1) -> ParallelGroups:
    """Initialise torch.distributed through DeepSpeed, then both libraries' groups."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    cpu_compat.apply()
    backend = "gloo" if cpu_compat.on_cpu() else "nccl"
    # Also when torch.distributed is already up (tests): DeepSpeed then wraps the existing group.
    # Under mpirun (no RANK/WORLD_SIZE/MASTER_* set) DeepSpeed discovers rank, world and master
    # through mpi4py; the port is MASTER_PORT when given (mpirun -x MASTER_PORT=...), else its default.
    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                               distributed_port=port)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not cpu_compat.on_cpu():
        torch.cuda.set_device(local_rank)
    ep, tp = expert_model_parallel_size, tensor_model_parallel_size
    if not parallel_state.model_parallel_is_initialized():
        # No gloo twins of megatron's data-parallel groups: only megatron's own distributed optimizer
        # and checkpointing use them, and DeepSpeed does both here (one communicator fewer per group).
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=1, create_gloo_process_groups=False)
    group_name = f"ep_size_{ep}"
    if group_name not in ds_groups._get_expert_parallel_group_dict():
        if tp == 1:
            ds_groups._create_expert_and_data_parallel(ep)
        else:  # megatron's expert layout under TP, megatron's group objects (no new communicator)
            ep_group = parallel_state.get_expert_model_parallel_group()
            edp_group = parallel_state.get_expert_data_parallel_group()
            ds_groups._EXPERT_PARALLEL_GROUP[group_name] = ep_group
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(ep_group)
            ds_groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = edp_group
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(edp_group)
    groups = ParallelGroups(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        ep_size=ep,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        expert_dp_group=parallel_state.get_expert_data_parallel_group(),
        ds_ep_group_name=group_name,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )
    check_groups_agree(groups)
    return groups


# DeepSpeed's name for the sharded pool's groups. DeepSpeed reads the number after the second '_'
# of every group name as an EP size (groups._get_max_expert_size) and names its checkpoint files
# after the largest; 1 never exceeds the real "ep_size_<EP>" group's, which keeps that role.
POOL_SHARD_GROUP_NAME = "samoe_pool_1"


def register_pool_shard_group(groups: ParallelGroups) -> str:
    """Register the sharded pool's groups with DeepSpeed under POOL_SHARD_GROUP_NAME and return it.

    A pool column slice differs between the ranks of megatron's expert-data-parallel group and is
    the same on the ranks of its expert-parallel group (DESIGN.md §6), so DeepSpeed's "expert
    parallel" group of that name is megatron's EDP group and its "expert data parallel" group, over
    which the slice's gradient is summed, is megatron's EP group. The process groups are megatron's
    own objects: no new communicator.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    name = POOL_SHARD_GROUP_NAME
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.expert_dp_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.expert_dp_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.ep_group)
    return name


def check_groups_agree(groups: ParallelGroups) -> None:
    """Raise LayoutMismatchError unless both libraries put the same ranks in each group."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    name = groups.ds_ep_group_name
    pairs = {
        "expert-parallel": (dist.get_process_group_ranks(groups.ep_group),
                            ds_groups._get_expert_parallel_group_ranks(name)),
        "expert-data-parallel": (dist.get_process_group_ranks(groups.expert_dp_group),
                                 ds_groups._get_expert_data_parallel_group_ranks(name)),
    }
    if ds_groups.mpu is not None:  # DeepSpeed's data-parallel group, once the engine has its mpu
        pairs["data-parallel"] = (dist.get_process_group_ranks(groups.dp_group), ds_groups._get_data_parallel_group_ranks())
    for what, (mcore_ranks, ds_ranks) in pairs.items():
        if sorted(mcore_ranks) != sorted(ds_ranks):
            raise LayoutMismatchError(
                f"rank {groups.rank}: megatron-core's {what} group {sorted(mcore_ranks)} differs from "
                f"DeepSpeed's {sorted(ds_ranks)} (--expert-model-parallel-size {groups.ep_size}, "
                f"world {groups.world_size}); both must use contiguous EP groups: do not change "
                f"megatron's rank order or DeepSpeed's use_data_before_expert_parallel")


def destroy() -> None:
    """Tear down both libraries' groups (tests run several layouts in one process)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
