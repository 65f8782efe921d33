"""Tensor and sequence parallelism around megatron-core's layers (docs/DESIGN.md section 7).

megatron-core's ``GPTModel`` already splits attention, the dense MLP, the vocabulary embedding and
the output over the tensor-parallel (TP) group once its config says so. This module holds what the
trainer needs on top of it:

- **Full <-> shard.** Checkpoints and initialisation are layout-free: a TP-sharded weight is drawn,
  saved and loaded whole and cut here (:func:`tp_shard`, :func:`tp_unshard`). megatron's shards are
  contiguous blocks of ``partition_dim`` (whole head groups for QKV), except the dense SwiGLU
  ``linear_fc1``: each rank holds its block of the gate rows followed by its block of the up rows.
  Experts are whole on a rank (expert TP = 1): never cut.
- **Gradients of replicated parameters under sequence parallelism.** With ``--sequence-parallel``
  each TP rank runs the norms and the MoE layers on its 1/TP of the sequence, so a parameter that is
  the same on every TP rank (norm weights, router, SaMoE pool and combination logits, and experts
  when EP = 1) gets only its rank's share of the gradient there. The share is summed over the TP
  group by a hook on the parameter (:func:`install_sequence_parallel_grad_sum`) before DeepSpeed sees
  the gradient, so DeepSpeed's averaging over the data-parallel group is then right, under every
  ZeRO stage. megatron marks such parameters ``sequence_parallel = True``; the trainer's own are
  marked the same way here (:func:`mark_sequence_parallel`).
- **Norms.** megatron's torch-norm wrapper refuses sequence parallelism (its fused norm needs apex);
  :class:`SequenceParallelNorm` is the same torch norm with that mark.
"""

from __future__ import annotations

import torch


def is_tp_sharded(param: torch.Tensor) -> bool:
    """A weight megatron splits over the TP group (not an expert: expert TP is 1)."""
    return bool(getattr(param, "tensor_model_parallel", False)) and not getattr(param, "samoe_expert", False)


def mark_tensor_parallel_weights(model: torch.nn.Module, ep_size: int) -> int:
    """Give megatron's TP-split weights their ``tensor_model_parallel`` / ``partition_dim`` marks.

    megatron sets them only inside its own initialisation, which the trainer turns off
    (``perform_initialization=False``, samoe_dist.init): column-parallel layers and the vocabulary
    embedding are split by rows (dim 0), row-parallel layers by columns (dim 1). Experts (expert TP 1)
    are not split; at EP > 1 (EP groups span whole TP groups) a replica's TP ranks hold different
    experts, so they get ``model_parallel``: DeepSpeed's gradient norm then counts them on every TP
    rank and sums over TP, as it does for the split weights. Returns how many weights were split."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    n = 0
    for m in model.modules():
        if getattr(m, "is_expert", False):
            if ep_size > 1:
                for p in m.parameters(recurse=False):
                    p.model_parallel = True
            continue
        dim = 0 if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) else (
            1 if isinstance(m, RowParallelLinear) else None)
        w = getattr(m, "weight", None)
        if dim is None or w is None:
            continue
        set_tensor_model_parallel_attributes(w, is_parallel=True, dim=dim, stride=1)
        n += 1
    return n


def _is_swiglu_fc1(name: str, gated: bool) -> bool:
    return gated and name.endswith("mlp.linear_fc1.weight") and "experts" not in name


def full_shape(name: str, param: torch.Tensor, tp_size: int) -> tuple:
    """The layout-free shape of this rank's parameter ``param``."""
    shape = list(param.shape)
    if tp_size > 1 and is_tp_sharded(param):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def tp_shard(full: torch.Tensor, name: str, param: torch.Tensor, tp_rank: int, tp_size: int,
             gated: bool) -> torch.Tensor:
    """This TP rank's block of the whole weight ``full`` (``param``: the rank's parameter)."""
    if tp_size == 1 or not is_tp_sharded(param):
        return full
    dim = param.partition_dim
    if _is_swiglu_fc1(name, gated):  # [gate; up] -> [gate_r; up_r]
        two_f, h = full.shape
        return full.view(2, tp_size, two_f // (2 * tp_size), h)[:, tp_rank].reshape(-1, h)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_unshard(local: torch.Tensor, name: str, param: torch.Tensor, tp_size: int, gated: bool,
               group) -> torch.Tensor:
    """The whole weight from every TP rank's block (a collective over the TP group ``group``)."""
    if tp_size == 1 or not is_tp_sharded(param):
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if _is_swiglu_fc1(name, gated):
        f_r, h = local.shape[0] // 2, local.shape[1]
        return torch.stack([p.view(2, f_r, h) for p in parts], dim=1).reshape(-1, h)
    return torch.cat(parts, dim=param.partition_dim)


def mark_sequence_parallel(model: torch.nn.Module, ep_size: int) -> int:
    """Mark the trainer's replicated parameters whose gradient is per-token under sequence
    parallelism: the SaMoE pool and combination logits and, with EP = 1 (every rank holds every
    expert, each runs its own share of the tokens), the experts. megatron marks its norms and router
    itself. Returns how many were marked.

    A sharded pool's column slices are not marked (call this after ``mark_pool_shards``): the TP
    ranks of a replica lie in one EP group and hold the same slice, and the slice's gradient is
    summed over that EP group anyway (docs/DESIGN.md section 6), TP shares included; a TP sum on top
    would count each share TP times."""
    from samoe_dist.model import is_pool_shard

    n = 0
    for name, p in model.named_parameters():
        if is_pool_shard(p):
            continue
        mine = "samoe_pool." in name or name.endswith("combination_logits")
        if mine or (ep_size == 1 and getattr(p, "samoe_expert", False)):
            p.sequence_parallel = True
            n += 1
    return n


def install_sequence_parallel_grad_sum(model: torch.nn.Module, tp_group) -> list:
    """Sum the gradient of every ``sequence_parallel`` parameter over the TP group, as autograd hands
    it to the parameter (once per backward, however many layers use the parameter), so every TP
    rank holds the whole data-parallel replica's gradient. Returns the hook handles."""
    import torch.distributed as dist

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group)
        return grad

    handles, seen = [], set()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            handles.append(p.register_hook(hook))
    return handles


class SequenceParallelNorm:
    """megatron's ``WrappedTorchNorm`` (torch LayerNorm / RMSNorm) that also works under sequence
    parallelism: the weight (and bias) carry ``sequence_parallel`` as megatron's fused norm marks them."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization}: use LayerNorm or RMSNorm")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm

