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
import types
from typing import Optional

import torch
import torch.distributed as dist

from samoe_dist.config import ConfigError, RunConfig
from samoe_dist.init import canonical_name
from samoe_dist.model import is_expert_parallel, is_pool_shard
from samoe_dist.resume_checks import (apply_opt_schedule, check_config, check_data, data_fingerprint,
                                      opt_schedule_diffs, resolve_opt_schedule)
from samoe_dist.tensor_parallel import full_shape, is_tp_sharded, tp_shard, tp_unshard

logger = logging.getLogger("samoe")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CLIENT = "client_state.json"
PARTIAL = ".partial"
# Fault injection for tests: SIGKILL in the middle of the save of an iteration (_fault_kill).
FAULT_KILL_IN_SAVE = "SAMOE_FAULT_KILL_IN_SAVE"

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
    Tensor-parallel weights are gathered over the TP group (samoe_dist.tensor_parallel).
    """
    n_local = cfg.moe.num_experts // groups.ep_size if cfg.moe.enabled else 0
    pool = _pool_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        local = p.detach()
        if groups.tp_size > 1 and is_tp_sharded(p):
            state[canonical_name(name, 0)] = tp_unshard(local, name, p, groups.tp_size, cfg.model.swiglu,
                                                        groups.tp_group).cpu().contiguous()
        elif is_pool_shard(p):
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
        if tuple(state[name].shape) != full_shape(name, p, groups.tp_size):
            raise ConfigError(f"{source}: weight {name} has shape {tuple(state[name].shape)}, the model "
                              f"expects {full_shape(name, p, groups.tp_size)}")
        value = tp_shard(state[name], name, p, groups.tp_rank, groups.tp_size, cfg.model.swiglu)
        p.copy_(value.to(device=p.device, dtype=p.dtype))


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


def check_save_dir(cfg: RunConfig) -> None:
    """Refuse to let --save overwrite another run's checkpoints: a directory with a 'latest' that this
    run does not resume from (--load of the same directory) needs --overwrite-checkpoints."""
    tr = cfg.training
    if not tr.save or tr.overwrite_checkpoints:
        return
    latest = os.path.join(tr.save, "latest")
    if not os.path.isfile(latest):
        return
    if tr.load and os.path.realpath(tr.load) == os.path.realpath(tr.save):
        return  # resuming it: the new checkpoints continue the same run
    with open(latest) as f:
        tag = f.read().strip()
    what = tag
    try:
        saved = read_config(os.path.join(tr.save, tag))
        kind = "samoe" if saved.get("samoe", {}).get("samoe_pool_size") else (
            "moe" if saved.get("moe", {}).get("num_experts") else "dense")
        what = f"{tag}, a {kind} model with hidden size {saved.get('model', {}).get('hidden_size')}"
    except (OSError, ValueError):
        pass
    raise ConfigError(f"--save {tr.save} holds another run's checkpoints (latest {what}) and this run does not "
                      f"resume from it: resume with --load {tr.save}, choose another --save, or pass "
                      f"--overwrite-checkpoints to replace them")


def check_shared_filesystem(path: str, what: str, create: bool = True) -> None:
    """All ranks must see the files rank 0 writes under ``path`` (checkpoints, data caches): rank 0
    writes a token file, every rank looks for it, and all fail together, naming the ranks that did not
    see it. A collective; a no-op on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import socket
    import uuid

    rank, world = _world()
    usable = create or os.path.isdir(path)  # rank 0's view decides for all (a missing --load fails later)
    token = [f".samoe_fs_check_{uuid.uuid4().hex}" if rank == 0 and usable else None]
    dist.broadcast_object_list(token, src=0)
    if token[0] is None:
        return
    probe = os.path.join(path, token[0])
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write(socket.gethostname())
            f.flush()
            os.fsync(f.fileno())
    _barrier()
    everyone = [None] * world
    dist.all_gather_object(everyone, (os.path.isfile(probe), socket.gethostname()))  # every rank has looked
    if rank == 0:
        os.remove(probe)
    _barrier()  # the probe is gone when any rank returns
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        raise ConfigError(f"{what} {path} is not on a filesystem every node shares: {', '.join(blind)} cannot see "
                          f"a file rank 0 wrote there. Put it on a shared filesystem (NFS, Lustre, ...) mounted at "
                          f"the same path on every node")


def expected_files(trainer, load_dir: str, tag_dir: str, world: int) -> list[str]:
    """Every file a full checkpoint of this layout holds (any rank's loading reads from all of them:
    DeepSpeed merges every ZeRO partition file), named as DeepSpeed's engine names them: per
    tensor-parallel rank (its "model-parallel" rank) and, for ZeRO partitions, per data-parallel rank."""
    engine, tag = trainer.engine, os.path.basename(tag_dir)
    tp = trainer.groups.tp_size
    dp = world // tp
    files = [os.path.join(tag_dir, name) for name in (WEIGHTS, CONFIG, CLIENT)]
    files += [os.path.join(tag_dir, f"rng_rank{r}.pt") for r in range(world)]
    for mp in range(tp):
        files.append(engine._get_ckpt_name(load_dir, tag, mp_placeholder=f"{mp:02d}"))  # module and engine state
        if engine.zero_optimization_stage() > 0:
            files += [engine._get_rank_zero_ckpt_name(load_dir, tag, mp, r, engine.bfloat16_enabled())
                      for r in range(dp)]
    files += _expert_files(engine, load_dir, tag, world, tp)
    if engine.zero_optimization_stage() == 0 and engine.has_moe_layers:
        # one optimizer file per (TP rank, EP rank of the largest EP group) that some rank holds
        from deepspeed.utils import groups as ds_groups

        ep = ds_groups._get_expert_parallel_world_size(ds_groups._get_max_expert_size_name())
        # the engine's own naming method, which reads the TP rank from the engine: called for every
        # TP rank with a stand-in holding just that attribute
        name = type(engine)._get_optimizer_ckpt_name
        files += [name(types.SimpleNamespace(checkpoint_mp_rank=mp), load_dir, tag, e)
                  for mp, e in _tp_ep_pairs(world, tp, ep)]
    if _per_rank_optimizer_state(trainer):
        files += [os.path.join(tag_dir, f"optim_rank{r}.pt") for r in range(world)]
    return files


def _tp_ep_pairs(world: int, tp: int, ep: int) -> list[tuple]:
    """(TP rank, EP rank) of every rank: TP and EP groups are consecutive ranks (megatron's layout)."""
    return sorted({(r % tp, r % ep) for r in range(world)})


def _expert_files(engine, load_dir: str, tag: str, world: int, tp: int) -> list[str]:
    """DeepSpeed's per-expert files, one per (DeepSpeed MoE module, global expert): a standard MoE at
    EP > 1 has them through its marker (samoe_dist/ds_moe_marker.py). Numbered as the engine numbers
    them at save and load: the MoE modules in named_modules() order, then expert-parallel rank x
    local experts. A sharded pool's marker has no experts, so no files. Each rank reads only its own
    experts' files: without this list a rank whose file is missing would fail alone, in a collective."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as ds_groups

    moe = [m for _, m in engine.module.named_modules() if isinstance(m, MoE)]
    files = []
    for layer, m in enumerate(moe):
        ep = ds_groups._get_expert_parallel_world_size(m.expert_group_name)
        for mp, e in _tp_ep_pairs(world, tp, ep):  # a rank reads its own experts under its own TP rank
            files += [engine._get_expert_ckpt_name(load_dir, layer, e * m.num_local_experts + j, tag,
                                                   checkpoint_mp_rank=mp) for j in range(m.num_local_experts)]
    return files


def _check_complete(trainer, load_dir: str, tag_dir: str, world: int) -> None:
    """Fail before DeepSpeed reads anything, on every rank alike, naming the missing files."""
    missing = [f for f in expected_files(trainer, load_dir, tag_dir, world) if not os.path.isfile(f)]
    if missing:
        names = ", ".join(os.path.relpath(f, tag_dir) for f in missing)
        raise FileNotFoundError(f"--load {load_dir}: checkpoint {tag_dir} is incomplete, {len(missing)} file(s) "
                                f"missing: {names}. Restore them, or move 'latest' in {load_dir} to an earlier "
                                f"complete checkpoint")


def _layout(trainer, world: int) -> dict:
    """What the optimizer state's partitioning depends on: world, EP size, pool shards (if sharded)."""
    layout = {"world_size": world, "ep_size": trainer.groups.ep_size}
    if trainer.groups.tp_size > 1:  # absent at TP = 1: older checkpoints keep their layout
        layout["tp_size"] = trainer.groups.tp_size
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
    _fault_kill(trainer.iteration, rank, all_ranks=False)
    torch.save(rng_state(), os.path.join(partial_dir, f"rng_rank{rank}.pt"))
    if _per_rank_optimizer_state(trainer):
        torch.save(trainer.engine.optimizer.state_dict(), os.path.join(partial_dir, f"optim_rank{rank}.pt"))
    if rank == 0:
        save_file(state, os.path.join(partial_dir, WEIGHTS), metadata={"format": "samoe"})
        _write_json(os.path.join(partial_dir, CONFIG),
                    {**trainer.cfg.to_dict(), "layout": _layout(trainer, world),
                     "data_fingerprint": data_fingerprint(trainer.cfg)})
        _write_json(os.path.join(partial_dir, CLIENT),
                    {"iteration": trainer.iteration, "consumed_samples": trainer.consumed_samples})
    _barrier()
    _fault_kill(trainer.iteration, rank, all_ranks=True)
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


def _fault_kill(iteration: int, rank: int, all_ranks: bool) -> None:
    """Fault injection for tests: ``SAMOE_FAULT_KILL_IN_SAVE=ITER`` SIGKILLs every rank in the save of
    iteration ITER once all its files are written, before the rename (``all_ranks`` point);
    ``ITER:RANK`` SIGKILLs rank RANK alone after DeepSpeed's files, before its own, while the other
    ranks write theirs and wait for it at the next barrier (a node lost in the middle of a save)."""
    spec = os.environ.get(FAULT_KILL_IN_SAVE)
    if not spec:
        return
    when, _, victim = spec.partition(":")
    if int(when) == iteration and (all_ranks if not victim else not all_ranks and int(victim) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


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
            f"size {layout.get('ep_size')}, tensor-parallel size {layout.get('tp_size', 1)} and the pool in "
            f"{layout.get('pool_shards', 1)} column shard(s); this run has {world}, {trainer.groups.ep_size}, "
            f"{trainer.groups.tp_size} and {now.get('pool_shards', 1)}. Convert it: "
            f"python tools/convert_checkpoint.py reshard --load {load_dir} --save NEW_DIR (weights only, "
            f"fresh optimizer), then --load NEW_DIR")
    continues = not weights_only or "iteration" in saved.get("converted_from", {})
    if continues:  # the data stream (and, with optimizer state, the schedule) carries on
        check_data(saved, trainer.cfg, load_dir)
    schedule_diffs = [] if weights_only else opt_schedule_diffs(saved, trainer.cfg)
    resolve_opt_schedule(trainer, schedule_diffs, load_dir)
    if not weights_only:
        _check_complete(trainer, load_dir, tag_dir, world)
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
    if schedule_diffs and trainer.cfg.training.override_opt_param_scheduler:
        apply_opt_schedule(trainer)
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
