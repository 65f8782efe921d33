"""Checkpoints: DeepSpeed's engine state plus a consolidated, layout-free copy of the weights.

Layout of ``--save DIR``::

    DIR/latest                    the tag of the newest COMPLETE checkpoint (moved last, atomically)
    DIR/iter_0000100/             one checkpoint (written as iter_0000100.partial, renamed when done)
        <DeepSpeed files>         module, optimizer (ZeRO partitions, per expert-parallel rank), ...
        model.safetensors         every weight once, experts under their GLOBAL index
        config.json               the RunConfig and the layout (world size, EP size) that wrote it
        client_state.json         iteration, consumed samples
        rng_rank<R>.pt            each rank's RNG states: torch's CPU generator, the CUDA generator of
                                  its device and megatron's model-parallel RNG tracker (dropout,
                                  resume-exact on CPU and GPU), Python's and NumPy's
        optim_rank<R>.pt          sharded pool without ZeRO only: each rank's optimizer state (below)

A crash or kill in the middle of a save leaves only a ``.partial`` directory: ``latest`` still names
the previous checkpoint, which stays loadable. ``model.safetensors`` + ``config.json`` is also the
interchange format of tools/convert_checkpoint.py; a checkpoint holding only those two files is
"weights-only" and loads into any parallel layout with a fresh optimizer.

Without ZeRO, DeepSpeed writes the optimizer state of a model with expert-parallel parameters once
per expert-parallel rank, from the first rank of each expert-data-parallel group, and every rank
reads its EP rank's file back. A column-sharded pool's slices (and so their Adam moments) differ
over the expert-data-parallel group, so that file would hold one slice's state for all of them:
here each rank then writes its own optimizer state too, and loads it after DeepSpeed's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from typing import Optional

import torch
import torch.distributed as dist

from samoe_dist.config import ConfigError, RunConfig
from samoe_dist.init import canonical_name
from samoe_dist.model import is_expert_parallel, is_pool_shard

logger = logging.getLogger("samoe")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CLIENT = "client_state.json"
PARTIAL = ".partial"
# Fault injection for tests: SIGKILL this process in the middle of the save at this iteration.
FAULT_KILL_IN_SAVE = "SAMOE_FAULT_KILL_IN_SAVE"

# Fields that change the shape or meaning of the weights: a checkpoint must agree on all of them.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
              "max_position_embeddings", "position_embedding_type", "normalization", "swiglu",
              "untie_embeddings_and_output_weights"),
    "moe": ("num_experts", "moe_router_topk", "moe_layer_freq", "moe_ffn_hidden_size"),
    "samoe": ("samoe_pool_size",),
}


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def consolidated_state(model: torch.nn.Module, cfg: RunConfig, groups) -> dict[str, torch.Tensor]:
    """Every weight of the model once, under its layout-free name (a collective over EP ranks).

    Expert-parallel weights live on one EP rank each; they are gathered over the EP group. A sharded
    pool's column slices are gathered over the expert-data-parallel group: the file holds it whole.
    """
    n_local = cfg.moe.num_experts // groups.ep_size if cfg.moe.enabled else 0
    pool = _pool_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        local = p.detach()
        if is_pool_shard(p):
            state[canonical_name(name, 0)] = pool.gather_full(p).cpu().contiguous()
        elif is_expert_parallel(p) and groups.ep_size > 1:
            parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
            dist.all_gather(parts, local.contiguous(), group=groups.ep_group)
            for ep_rank, part in enumerate(parts):
                state[canonical_name(name, ep_rank * n_local)] = part.cpu().contiguous()
        else:
            state[canonical_name(name, groups.ep_rank * n_local)] = local.cpu().contiguous()
    return state


@torch.no_grad()
def load_consolidated_state(model: torch.nn.Module, cfg: RunConfig, groups, state: dict[str, torch.Tensor],
                            source: str) -> None:
    """Copy a consolidated state into this rank's (possibly expert-sharded) model."""
    n_local = cfg.moe.num_experts // groups.ep_size if cfg.moe.enabled else 0
    wanted = {canonical_name(name, groups.ep_rank * n_local): p for name, p in model.named_parameters()}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} weights this model has (first: {missing[0]}): "
                          f"it was written for another model; check --num-experts/--samoe-pool-size")
    pool = _pool_of(model)
    for name, p in wanted.items():
        if pool is not None and id(p) in pool.parameter_names():
            try:
                pool.load_full(p, state[name])
            except ValueError as exc:
                raise ConfigError(f"{source}: weight {name}: {exc}") from None
            continue
        if tuple(state[name].shape) != tuple(p.shape):
            raise ConfigError(f"{source}: weight {name} has shape {tuple(state[name].shape)}, the model "
                              f"expects {tuple(p.shape)}")
        p.copy_(state[name].to(device=p.device, dtype=p.dtype))


def rng_state() -> dict:
    """Every random state a training step draws from on this rank (see set_rng_state)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def set_rng_state(state) -> None:
    """Restore rng_state(); a bare tensor (checkpoints written before the dict) is the CPU state."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            logger.warning("the checkpoint holds a CUDA RNG state and this run has no GPU: dropout will not "
                           "continue the saved run's random stream exactly")
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(trainer, world: int) -> dict:
    """What the optimizer state's partitioning depends on: world, EP size, pool shards (if sharded)."""
    layout = {"world_size": world, "ep_size": trainer.groups.ep_size}
    pool = _pool_of(trainer.model)
    if pool is not None and pool.shard is not None:
        layout["pool_shards"] = pool.shard.size
    return layout


def _per_rank_optimizer_state(trainer) -> bool:
    """True when each rank must keep its own optimizer state file (module docstring)."""
    pool = _pool_of(trainer.model)
    return pool is not None and pool.shard is not None and trainer.engine.zero_optimization_stage() == 0


def _load_rank_optimizer_state(trainer, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a sharded-pool checkpoint without ZeRO keeps each rank's "
                                f"optimizer state there; the checkpoint is incomplete (resume from an earlier one)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    opt = trainer.engine.optimizer
    if trainer.engine.bfloat16_enabled():  # DeepSpeed's mixed-precision wrappers take this flag
        opt.load_state_dict(state, load_optimizer_states=True)
    else:
        opt.load_state_dict(state)


def _pool_of(model: torch.nn.Module):
    gpt = getattr(model, "gpt", model)
    return getattr(gpt, "samoe_pool", None)


def check_config(saved: dict, cfg: RunConfig, source: str) -> list[str]:
    """Raise ConfigError listing every shape-defining field that differs from the checkpoint."""
    now = cfg.to_dict()
    diffs = []
    for group, fields in SHAPE_FIELDS.items():
        for name in fields:
            a, b = saved.get(group, {}).get(name), now[group].get(name)
            if a != b:
                diffs.append(f"--{name.replace('_', '-')}: checkpoint {a}, now {b}")
    if diffs:
        raise ConfigError(f"checkpoint {source} does not match this model: " + "; ".join(diffs)
                          + " (use the checkpoint's values, or start without --load)")
    return diffs


def read_config(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {tag_dir} is not a complete samoe checkpoint")
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(save_dir: str, tag: str) -> None:
    tmp = os.path.join(save_dir, f"latest.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, "latest"))


def save(trainer, save_dir: str, keep: Optional[int] = None) -> str:
    """Write a complete checkpoint of ``trainer`` atomically; returns its tag (all ranks call it)."""
    from safetensors.torch import save_file

    rank, world = _world()
    tag = f"iter_{trainer.iteration:07d}"
    partial_tag = tag + PARTIAL
    partial_dir = os.path.join(save_dir, partial_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)  # a crashed earlier attempt
    _barrier()
    trainer.engine.save_checkpoint(save_dir, tag=partial_tag, save_latest=False,
                                   client_state={"iteration": trainer.iteration,
                                                 "consumed_samples": trainer.consumed_samples})
    state = consolidated_state(trainer.model, trainer.cfg, trainer.groups)
    torch.save(rng_state(), os.path.join(partial_dir, f"rng_rank{rank}.pt"))
    if _per_rank_optimizer_state(trainer):
        torch.save(trainer.engine.optimizer.state_dict(), os.path.join(partial_dir, f"optim_rank{rank}.pt"))
    if rank == 0:
        save_file(state, os.path.join(partial_dir, WEIGHTS), metadata={"format": "samoe"})
        _write_json(os.path.join(partial_dir, CONFIG),
                    {**trainer.cfg.to_dict(), "layout": _layout(trainer, world)})
        _write_json(os.path.join(partial_dir, CLIENT),
                    {"iteration": trainer.iteration, "consumed_samples": trainer.consumed_samples})
    _barrier()
    if os.environ.get(FAULT_KILL_IN_SAVE) == str(trainer.iteration):  # fault injection (tests)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        final_dir = os.path.join(save_dir, tag)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        _write_latest(save_dir, tag)  # only now does the new checkpoint count
        if keep:
            _prune(save_dir, keep)
    _barrier()
    return tag


def _prune(save_dir: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(save_dir) if t.startswith("iter_") and not t.endswith(PARTIAL))
    for old in tags[:-keep]:
        shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


def latest_tag_dir(load_dir: str) -> str:
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"--load {load_dir}: no 'latest' file there, so no checkpoint to resume; "
                                f"check the path or drop --load to start from scratch")
    with open(latest) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"--load {load_dir}: 'latest' names {tag!r} but {tag_dir} does not exist")
    return tag_dir


def load(trainer, load_dir: str) -> None:
    """Resume ``trainer`` from the newest complete checkpoint in ``load_dir`` (all ranks call it)."""
    from safetensors.torch import load_file

    rank, world = _world()
    tag_dir = latest_tag_dir(load_dir)
    saved = read_config(tag_dir)
    check_config(saved, trainer.cfg, tag_dir)
    weights_only = not os.path.isfile(os.path.join(tag_dir, CLIENT))
    layout = saved.get("layout", {})
    same_layout = layout == _layout(trainer, world)
    if not weights_only and not same_layout:
        now = _layout(trainer, world)
        raise ConfigError(
            f"checkpoint {tag_dir} was written by {layout.get('world_size')} processes with expert-parallel "
            f"size {layout.get('ep_size')} and the pool in {layout.get('pool_shards', 1)} column shard(s); this run "
            f"has {world}, {trainer.groups.ep_size} and {now.get('pool_shards', 1)}. Convert it: "
            f"python tools/convert_checkpoint.py reshard --load {load_dir} --save NEW_DIR (weights only, "
            f"fresh optimizer), then --load NEW_DIR")
    if not weights_only:
        path, _ = trainer.engine.load_checkpoint(load_dir, tag=os.path.basename(tag_dir))
        if path is None:
            raise FileNotFoundError(f"--load {load_dir}: DeepSpeed found no loadable state in {tag_dir}")
        with open(os.path.join(tag_dir, CLIENT)) as f:
            client = json.load(f)
        trainer.iteration = int(client["iteration"])
        trainer.consumed_samples = int(client["consumed_samples"])
        rng = os.path.join(tag_dir, f"rng_rank{rank}.pt")
        if os.path.isfile(rng):
            set_rng_state(torch.load(rng, weights_only=False))
        if _per_rank_optimizer_state(trainer):
            _load_rank_optimizer_state(trainer, os.path.join(tag_dir, f"optim_rank{rank}.pt"))
    # DeepSpeed's module file holds one EP rank's experts only: the consolidated weights are the truth.
    load_consolidated_state(trainer.model, trainer.cfg, trainer.groups, load_file(os.path.join(tag_dir, WEIGHTS)),
                            os.path.join(tag_dir, WEIGHTS))
    if weights_only:
        _sync_optimizer_masters(trainer)
        source = saved.get("converted_from", {})
        if "iteration" in source and "consumed_samples" in source:
            # a resharded training checkpoint: continue its data stream and LR schedule
            _continue_from(trainer, int(source["iteration"]), int(source["consumed_samples"]))
    logger.info("loaded %s%s at iteration %d (%d samples consumed)", tag_dir,
                " (weights only, fresh optimizer)" if weights_only else "", trainer.iteration,
                trainer.consumed_samples)


def _continue_from(trainer, iteration: int, consumed_samples: int) -> None:
    """Set the counters of a weights-only load and move the LR schedule to that iteration."""
    import warnings

    trainer.iteration = iteration
    trainer.consumed_samples = consumed_samples
    sched = trainer.engine.lr_scheduler
    if sched is not None and iteration > 0:
        sched.last_epoch = iteration - 1
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore")
            sched.step()


def _sync_optimizer_masters(trainer) -> None:
    """After overwriting module weights, make DeepSpeed's fp32 master copies (bf16/ZeRO) follow."""
    opt = trainer.engine.optimizer
    refresh = getattr(opt, "refresh_fp32_params", None) or getattr(opt, "_restore_from_bit16_weights", None)
    if refresh is not None:
        refresh()
