"""Run the real Trainer in several gloo processes and collect what each rank saw.

Each rank runs ``steps`` optimizer steps and records the world-averaged losses and a snapshot of
its parameters (named with GLOBAL expert indices, so ranks holding different experts merge into
one full model) after every step. A failure on any rank fails the run, with that rank's traceback.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from tests.helpers import free_port, preloaded_context


def _leave_together() -> None:
    """Wait for every rank before this process exits. Rank 0 hosts the rendezvous store: if it left
    while another rank was still building a process group it is not in (through that store), that
    rank's connection would be reset. A rank that failed before joining the world never comes; the
    wait then ends after a minute and the parent reports the failed rank's saved error."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:
            pass


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters under their global names; a sharded pool and tensor-parallel weights
    gathered whole (collectives)."""
    from samoe_dist.init import canonical_name
    from samoe_dist.model import is_pool_shard
    from samoe_dist.tensor_parallel import tp_unshard

    cfg, groups = trainer.cfg, trainer.groups
    offset = groups.ep_rank * (cfg.moe.num_experts // groups.ep_size) if cfg.moe.enabled else 0
    pool = getattr(trainer.model.gpt, "samoe_pool", None)

    def whole(n, p):
        if is_pool_shard(p):
            return pool.gather_full(p)
        return tp_unshard(p.detach(), n, p, groups.tp_size, cfg.model.swiglu, groups.tp_group)

    return {canonical_name(n, offset): whole(n, p).float().clone() for n, p in trainer.model.named_parameters()}


def _worker(rank: int, world: int, port: int, argv: list[str], steps: int, probe, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      SAMOE_CHECK_COLLECTIVE_DEVICES="1")  # every collective's tensors on the engine's device
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        from samoe_dist import cpu_compat

        cpu_compat.apply()
        from samoe_dist.arguments import parse_args
        from samoe_dist.training import Trainer

        cfg, ds = parse_args(argv)
        trainer = Trainer(cfg, ds)
        result.update(losses=[], params=[], extra=[])
        for _ in range(steps):
            result["losses"].append(trainer.train_step())
            result["params"].append(_snapshot(trainer))
            if probe is not None:
                result["extra"].append(probe(trainer))
        result["ep_rank"] = trainer.groups.ep_rank
        result["tp_rank"] = trainer.groups.tp_rank
        result["param_counts"] = trainer.param_counts
        from samoe_dist import collective_check

        result["collectives_checked"] = sorted(collective_check._INSTALLED)
        pool = getattr(trainer.model.gpt, "samoe_pool", None)
        result["pool_w1_numel"] = pool.w1.numel() if pool is not None else None  # this rank's share
    except BaseException:  # reported to the parent, which fails the test
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _leave_together()


def _spawn(world: int, target, args: tuple, out_dir: Path, timeout: float) -> list[dict]:
    """Start ``target(rank, world, port, *args, out_dir)`` in ``world`` processes; returns each rank's
    saved result dict (any rank that failed or died fails here, with its traceback)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = preloaded_context()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    results = []
    for r, p in enumerate(procs):
        path = out_dir / f"rank{r}.pt"
        assert path.exists(), f"rank {r} of {world} died (exit code {p.exitcode}) without a result"
        res = torch.load(path, weights_only=False)
        assert "error" not in res, f"rank {r} of {world} failed:\n{res['error']}"
        assert p.exitcode == 0, f"rank {r} exited with {p.exitcode}"
        results.append(res)
    return results


def run_world(world: int, argv: list[str], steps: int, out_dir: Path, probe=None, timeout: float = 300.0):
    """Run the Trainer in ``world`` processes; returns the per-rank results."""
    return _spawn(world, _worker, (argv, steps, probe), out_dir, timeout)


def merged_params(results: list[dict], step: int) -> dict[str, torch.Tensor]:
    """One full model from all ranks' snapshots after ``step``; replicated tensors must agree."""
    merged: dict[str, torch.Tensor] = {}
    for res in results:
        for name, value in res["params"][step].items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0,
                                           msg=f"{name} differs between ranks after step {step}")
            else:
                merged[name] = value
    return merged


def _fn_worker(rank: int, world: int, port: int, ep: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        from samoe_dist.parallel import init_distributed

        groups = init_distributed(ep)
        result["value"] = fn(groups, *args)
    except BaseException:  # reported to the parent, which fails the test
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _leave_together()


def run_fn(world: int, ep: int, fn, args: tuple, out_dir: Path, timeout: float = 300.0) -> list:
    """Run ``fn(groups, *args)`` on every rank of a gloo world with EP size ``ep``; returns the
    per-rank return values (any rank's exception fails here). ``fn`` must be importable."""
    return [res["value"] for res in _spawn(world, _fn_worker, (ep, fn, args), out_dir, timeout)]
