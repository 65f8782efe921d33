"""Measured communication per training step against the analytic model (bench/scaling_model.py).

Runs the real Trainer (DeepSpeed engine, ZeRO from the ds_config, megatron's alltoall dispatcher)
in ``--world`` gloo processes with ``--ep`` expert parallelism, for the standard MoE, SaMoE with a
replicated pool, SaMoE with a sharded pool (``--samoe-pool-sharding sharded``) and the sharded pool
materialised once per optimizer step (``samoe_sharded_once``: ``--samoe-materialize-once-per-step``)
at the same small shape, on synthetic tokens. Every torch.distributed collective is wrapped (from outside the
package, before the engine is built) to count, per rank and per step, the bytes each call moves,
and which process group it ran on:

- all_to_all_single: the bytes this rank sends to OTHER ranks (from the split sizes);
- all_reduce: 2(n-1)/n x payload (ring); reduce / reduce_scatter (list, ``_tensor``, ``_base`` or
  ``_single``): (n-1)/n x input; all_gather (all four forms): (n-1)/n x output; broadcast:
  (n-1)/n x payload (what a ring or tree moves per rank, as the analytic model counts it).

The model's numbers for the same shape (``scaling_model.per_gpu`` with fp32 activations and
weights, as on CPU, and the run's micro-batches per step) are printed beside them. The model counts
expert parameters only; the comparison is of the sums over each group's collectives:

- standard MoE: the gradient-and-parameter sync over the expert-data-parallel group;
- replicated SaMoE: the pool's and the combination's share of the world group's sync;
- sharded SaMoE: the all-gathers and the reduce-scatters over the expert-data-parallel group (the
  pool's only traffic there), the sync over the expert-parallel group (the pool slice, by
  DeepSpeed) and the combination's share of the world group's sync;
- sharded SaMoE materialised once per step: its all-gathers over the expert-data-parallel group (once
  per layer and step instead of twice per layer and micro-batch).

A part's share of the world group's bytes is the bytes times its parameters over all the
replicated parameters (ZeRO moves the same bytes per parameter for all of them).

    .venv/bin/python bench/comm_volume.py [--world 4 --ep 2] [--grad-accum 1] [--systems moe,samoe,samoe_sharded]
        [--output bench/results/comm_volume.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Every collective that may carry bytes. torch >= 2.13 names the flat all-gather / reduce-scatter
# ``all_gather_single`` / ``reduce_scatter_single`` (the sharded pool calls those where they exist,
# DeepSpeed the ``*_tensor`` ones); all are wrapped, and a call made from inside another wrapped
# collective is not counted again.
OPS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single",
       "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single", "all_to_all_single", "broadcast")
ALL_GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single")
REDUCE_SCATTERS = ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single")
SYSTEMS = ("moe", "samoe", "samoe_sharded", "samoe_sharded_once")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--moe-layer-freq", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=256)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (global batch = "
                   "micro-batch x world x this)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    p.add_argument("--ds-config", default=str(REPO / "examples" / "ds_config_cpu.json"))
    p.add_argument("--output", help="write the JSON result here")
    return p.parse_args(argv)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class Counter:
    """Wraps torch.distributed's collectives; counts bytes per (op, group) while ``on``."""

    def __init__(self):
        import inspect

        import torch.distributed as dist

        self.dist = dist
        self.on = False
        self.depth = 0  # > 0 inside a wrapped collective: a nested one is the same transfer
        self.records: dict[str, dict] = {}
        self.originals = {}
        self.signatures = {}
        for op in OPS:
            if hasattr(dist, op):
                self.originals[op] = getattr(dist, op)
                self.signatures[op] = inspect.signature(self.originals[op])
                setattr(dist, op, self._wrap(op, self.originals[op]))

    def _wrap(self, op, fn):
        def wrapped(*args, **kwargs):
            if self.on and self.depth == 0:
                self._count(op, self.signatures[op].bind(*args, **kwargs).arguments)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        wrapped.__wrapped__ = fn
        return wrapped

    def _count(self, op, a: dict) -> None:
        """``a``: the call's arguments by name (torch's signatures, see OPS)."""
        dist = self.dist
        group = a.get("group")
        n = dist.get_world_size(group=group)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(n))
        if op == "all_to_all_single":
            inp = a["input"]
            splits = a.get("input_split_sizes")
            row = _nbytes(inp) // max(inp.shape[0], 1) if inp.dim() else inp.element_size()
            me = dist.get_rank(group=group)
            if splits is None:
                moved = (n - 1) * (inp.shape[0] // n) * row
            else:
                moved = sum(int(s) for j, s in enumerate(splits) if j != me) * row
            payload = _nbytes(inp)
        else:
            if op == "all_gather":
                payload = sum(_nbytes(t) for t in a["tensor_list"])  # the gathered output
            elif op == "reduce_scatter":
                payload = sum(_nbytes(t) for t in a["input_list"])  # the input
            elif op in ALL_GATHERS:
                payload = _nbytes(a["output_tensor"])
            elif op in REDUCE_SCATTERS:
                payload = _nbytes(a["input"])
            else:  # all_reduce, reduce, broadcast
                payload = _nbytes(a["tensor"])
            factor = 2.0 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
            moved = factor * payload
        key = f"{op} over ranks {list(ranks)}"
        rec = self.records.setdefault(key, {"op": op, "ranks": list(ranks), "calls": 0, "payload_bytes": 0,
                                            "moved_bytes": 0.0})
        rec["calls"] += 1
        rec["payload_bytes"] += payload
        rec["moved_bytes"] += moved


def _worker(rank: int, world: int, port: int, system: str, argv: list[str], steps: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        from samoe_dist import cpu_compat

        cpu_compat.apply()
        counter = Counter()
        from throughput_worker import SyntheticData

        from samoe_dist import training
        from samoe_dist.arguments import parse_args
        from samoe_dist.model import is_expert_parallel

        cfg, ds = parse_args(argv)
        training.build_training_data = lambda cfg, groups: SyntheticData(
            cfg.model.vocab_size, cfg.model.seq_length, cfg.training.micro_batch_size, groups.rank)
        trainer = training.Trainer(cfg, ds)
        trainer.train_step()  # warm-up: first-step allocations and lazy initialisation
        counter.on = True
        for _ in range(steps):
            trainer.train_step()
        counter.on = False
        params = {"expert_parallel": 0, "replicated": 0, "pool": 0, "combination": 0}
        for name, p in trainer.model.named_parameters():
            params["expert_parallel" if is_expert_parallel(p) else "replicated"] += p.numel()
            if "samoe_pool" in name:
                params["pool"] += p.numel()
            if "combination" in name:
                params["combination"] += p.numel()
        result.update(records=counter.records, params=params, steps=steps)
    except BaseException:
        result["error"] = traceback.format_exc()
    with open(Path(out_dir) / f"{system}-rank{rank}.json", "w") as f:
        json.dump(result, f)


def run_world(a, system: str, out_dir: str) -> list[dict]:
    import torch.multiprocessing as mp

    from samoe_dist import ports

    argv = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--num-attention-heads", 4,
            "--ffn-hidden-size", a.ffn_hidden_size, "--num-experts", a.num_experts, "--moe-router-topk", a.topk,
            "--moe-layer-freq", a.moe_layer_freq, "--expert-model-parallel-size", a.ep,
            "--seq-length", a.seq_length, "--micro-batch-size", a.micro_batch_size,
            "--global-batch-size", a.micro_batch_size * a.world * a.grad_accum, "--train-iters", 1000,
            "--vocab-size", a.vocab_size, "--ds_config", a.ds_config]
    if system.startswith("samoe"):
        argv += ["--samoe-pool-size", a.pool]
    if system.startswith("samoe_sharded"):
        argv += ["--samoe-pool-sharding", "sharded"]
    if system.endswith("_once"):
        argv.append("--samoe-materialize-once-per-step")
    argv = [str(x) for x in argv]
    # Ranks are forks of one server that has imported torch, DeepSpeed and megatron-core once
    # (samoe_dist/preload.py): the bytes counted are the same, the imports are not paid per rank.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["samoe_dist.preload"])
    port = ports.free_port()
    procs = [ctx.Process(target=_worker, args=(r, a.world, port, system, argv, a.steps, out_dir))
             for r in range(a.world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    results = []
    for r in range(a.world):
        path = Path(out_dir) / f"{system}-rank{r}.json"
        if not path.exists():
            raise SystemExit(f"error: {system} rank {r} died without a result")
        res = json.loads(path.read_text())
        if "error" in res:
            raise SystemExit(f"error: {system} rank {r} failed:\n{res['error']}")
        results.append(res)
    return results


def _group_kind(a, ranks: list) -> str:
    world = list(range(a.world))
    ep_groups = [list(range(g * a.ep, (g + 1) * a.ep)) for g in range(a.world // a.ep)]
    edp_groups = [list(range(e, a.world, a.ep)) for e in range(a.ep)]
    if ranks == world:
        return "world (data parallel)"
    if ranks in ep_groups:
        return "expert-parallel group"
    if ranks in edp_groups:
        return "expert-data-parallel group"
    return f"ranks {ranks}"


def _family(op: str) -> str:
    if op == "all_to_all_single":
        return "all-to-all"
    if op in ALL_GATHERS:
        return "all-gather"
    if op in REDUCE_SCATTERS:
        return "reduce-scatter"
    return op.replace("_", "-")


def summarise(a, results: list[dict]) -> dict:
    """Rank 0's bytes per step, by path and group kind (world / EP group / expert-DP group), and by
    collective family and group kind."""
    r0 = results[0]
    kinds, by_op = {}, {}
    for rec in r0["records"].values():
        kind = _group_kind(a, rec["ranks"])
        fam = _family(rec["op"])
        path = {"all-to-all": "all-to-all", "all-gather": "gradient / parameter sync",
                "reduce-scatter": "gradient / parameter sync", "all-reduce": "gradient / parameter sync",
                "reduce": "gradient / parameter sync"}.get(fam, rec["op"])
        for table, k in ((kinds, f"{path} over {kind}"), (by_op, f"{fam} over {kind}")):
            agg = table.setdefault(k, {"calls": 0, "moved_bytes": 0.0, "ops": set()})
            agg["calls"] += rec["calls"] / r0["steps"]
            agg["moved_bytes"] += rec["moved_bytes"] / r0["steps"]
            agg["ops"].add(rec["op"])
    for table in (kinds, by_op):
        for agg in table.values():
            agg["ops"] = sorted(agg["ops"])
    return {"per_step_rank0": kinds, "per_step_rank0_by_op": by_op, "params_rank0": r0["params"]}


def model_shape(a):
    from scaling_model import Shape

    return Shape("small", layers=a.num_layers, hidden=a.hidden_size, ffn=a.ffn_hidden_size, experts=a.num_experts,
                 moe_every=a.moe_layer_freq, topk=a.topk, seq=a.seq_length,
                 global_batch=a.micro_batch_size * a.world * a.grad_accum, pool=a.pool, ep=a.ep,
                 micro_batch=a.micro_batch_size)


def model_numbers(a) -> dict:
    from scaling_model import per_gpu

    return per_gpu(model_shape(a), a.world, act_bytes=4, weight_bytes=4)


def measured(sys_out: dict, prefix: str, table: str = "per_step_rank0") -> float:
    """Bytes per step of rank 0 summed over the entries of ``table`` whose name starts with ``prefix``."""
    return sum(v["moved_bytes"] for k, v in sys_out[table].items() if k.startswith(prefix))


def world_share(sys_out: dict, part: str) -> float:
    """The share of the world group's sync that moves the ``part`` parameters (pool, combination).

    The world group's sync moves the replicated parameters: the dense ones (every model) plus, for
    SaMoE, the combination logits and (replicated pool) the pool. ZeRO moves the same bytes per
    parameter for all of them, so a part's share is the world bytes times its parameters over the
    replicated parameters."""
    p = sys_out["params_rank0"]
    parts = sum(p[k] for k in part.split("+"))
    return measured(sys_out, "gradient / parameter sync over world") * parts / p["replicated"]


def compare(out: dict, model: dict) -> dict:
    """{quantity: {"model": bytes, "measured[_system]": bytes}} for the systems in ``out``."""
    GB = 1e9
    c = {}
    a2a = {"model": model["all_to_all_GB_per_gpu"] * GB}
    for system in SYSTEMS:
        if system in out:
            a2a[f"measured_{system}"] = measured(out[system], "all-to-all over expert-parallel")
    c["all_to_all_bytes_per_gpu"] = a2a
    if "moe" in out:
        c["expert_grad_sync_bytes_per_gpu_moe"] = {
            "model": model["expert_sync_GB_per_gpu_moe"] * GB,
            "measured": measured(out["moe"], "gradient / parameter sync over expert-data-parallel")}
    if "samoe" in out:
        c["expert_grad_sync_bytes_per_gpu_samoe"] = {
            "model": model["expert_sync_GB_per_gpu_samoe"] * GB,
            "measured": world_share(out["samoe"], "pool+combination")}
    if "samoe_sharded" in out:
        sh = out["samoe_sharded"]
        by_op = "per_step_rank0_by_op"
        parts = {
            "samoe_sharded_weight_all_gather_bytes_per_gpu (EDP group)": (
                model["expert_gather_GB_per_gpu_samoe_sharded"], measured(sh, "all-gather over expert-data-parallel", by_op)),
            "samoe_sharded_dW_reduce_scatter_bytes_per_gpu (EDP group)": (
                model["samoe_sharded_reduce_scatter_GB_per_gpu"],
                measured(sh, "reduce-scatter over expert-data-parallel", by_op)),
            "samoe_sharded_pool_sync_bytes_per_gpu (EP group)": (
                model["samoe_sharded_pool_ep_sync_GB_per_gpu"],
                measured(sh, "all-reduce over expert-parallel", by_op) + measured(sh, "all-gather over expert-parallel", by_op)),
            "samoe_sharded_combination_sync_bytes_per_gpu (world share)": (
                model["samoe_sharded_combination_world_sync_GB_per_gpu"], world_share(sh, "combination")),
        }
        for name, (m, meas) in parts.items():
            c[name] = {"model": m * GB, "measured": meas}
        c["expert_grad_sync_bytes_per_gpu_samoe_sharded"] = {
            "model": model["expert_sync_GB_per_gpu_samoe_sharded"] * GB,
            "measured": sum(v["measured"] for k, v in c.items() if k.startswith("samoe_sharded_")
                            and "all_gather" not in k)}
    if "samoe_sharded_once" in out:
        once = out["samoe_sharded_once"]
        c["samoe_sharded_once_weight_all_gather_bytes_per_gpu (EDP group)"] = {
            "model": model["expert_gather_GB_per_gpu_samoe_sharded_once"] * GB,
            "measured": measured(once, "all-gather over expert-data-parallel", "per_step_rank0_by_op")}
        c["samoe_sharded_once_dW_reduce_scatter_bytes_per_gpu (EDP group)"] = {
            "model": model["samoe_sharded_reduce_scatter_GB_per_gpu"] * GB,
            "measured": measured(once, "reduce-scatter over expert-data-parallel", "per_step_rank0_by_op")}
    return c


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.world % a.ep:
        raise SystemExit(f"error: --world {a.world} is not a multiple of --ep {a.ep}")
    systems = [x for x in a.systems.split(",") if x]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"error: unknown --systems {unknown}; choose from {', '.join(SYSTEMS)}")
    out = {"config": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        for system in systems:
            out[system] = summarise(a, run_world(a, system, tmp))
    model = model_numbers(a)
    out["model"] = model
    comparison = compare(out, model)
    out["comparison"] = comparison
    text = json.dumps(out, indent=1, default=str)
    print(text)
    print()
    print("| quantity (bytes per GPU per step) | model | measured |")
    print("|---|---|---|")
    for name, c in comparison.items():
        meas = ", ".join(f"{k.replace('measured_', '')} {v:,.0f}" for k, v in c.items() if k.startswith("measured"))
        print(f"| {name} | {c['model']:,.0f} | {meas} |")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
