"""Measured communication per training step against the analytic model (bench/scaling_model.py).

Runs the real Trainer (DeepSpeed engine, ZeRO from the ds_config, megatron's alltoall dispatcher)
in ``--world`` gloo processes with ``--ep`` expert parallelism, for the standard MoE and for SaMoE
at the same small shape, on synthetic tokens. Every torch.distributed collective is wrapped (from
outside the package, before the engine is built) to count, per rank and per step, the bytes each
call moves, and which process group it ran on:

- all_to_all_single: the bytes this rank sends to OTHER ranks (from the split sizes);
- all_reduce: 2(n-1)/n x payload (ring); reduce / reduce_scatter: (n-1)/n x input; all_gather:
  (n-1)/n x output; broadcast: (n-1)/n x payload (what a ring or tree moves per rank, as the
  analytic model counts it).

The model's numbers for the same shape (``scaling_model.per_gpu`` with fp32 activations and
gradients, as on CPU) are printed beside them. The model counts expert parameters only; the
comparison is of the sums over the gradient-and-parameter path of each group: the expert-data-parallel group's for the standard MoE's experts, the
data-parallel (whole world) group's for SaMoE's pool, minus the dense parameters' share.

    .venv/bin/python bench/comm_volume.py [--world 4 --ep 2] [--output bench/results/comm_volume.json]
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

OPS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_gather",
       "all_gather_into_tensor", "_all_gather_base", "all_to_all_single", "broadcast")


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
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ds-config", default=str(REPO / "examples" / "ds_config_cpu.json"))
    p.add_argument("--output", help="write the JSON result here")
    return p.parse_args(argv)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class Counter:
    """Wraps torch.distributed's collectives; counts bytes per (op, group size) while ``on``."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.on = False
        self.records: dict[str, dict] = {}
        self.originals = {}
        for op in OPS:
            if hasattr(dist, op):
                self.originals[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self.originals[op]))

    def _wrap(self, op, fn):
        def wrapped(*args, **kwargs):
            if self.on:
                self._count(op, args, kwargs)
            return fn(*args, **kwargs)
        wrapped.__wrapped__ = fn
        return wrapped

    def _count(self, op, args, kwargs) -> None:
        dist = self.dist
        group = kwargs.get("group")
        n = dist.get_world_size(group=group)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(n))
        moved = payload = 0
        if op == "all_to_all_single":
            out, inp = (list(args) + [None, None])[:2]
            out = kwargs.get("output", out)
            inp = kwargs.get("input", inp)
            splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
            row = _nbytes(inp) // max(inp.shape[0], 1) if inp.dim() else inp.element_size()
            me = dist.get_rank(group=group)
            if splits is None:
                per = inp.shape[0] // n
                moved = (n - 1) * per * row
            else:
                splits = [int(s) for s in splits]
                moved = sum(s for j, s in enumerate(splits) if j != me) * row
            payload = _nbytes(inp)
        else:
            tensor = kwargs.get("tensor", kwargs.get("input", kwargs.get("output_tensor", args[0] if args else None)))
            if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
                tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
            if op in ("all_gather_into_tensor", "_all_gather_base"):
                tensor = kwargs.get("output_tensor", args[0] if args else None)
            if op == "reduce_scatter":
                lst = kwargs.get("input_list", args[1] if len(args) > 1 else [])
                payload = sum(_nbytes(t) for t in lst)
            elif op == "all_gather":
                lst = kwargs.get("tensor_list", args[0] if args else [])
                payload = sum(_nbytes(t) for t in lst)
            else:
                payload = _nbytes(tensor)
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

    from throughput import _free_port

    argv = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--num-attention-heads", 4,
            "--ffn-hidden-size", a.ffn_hidden_size, "--num-experts", a.num_experts, "--moe-router-topk", a.topk,
            "--moe-layer-freq", a.moe_layer_freq, "--expert-model-parallel-size", a.ep,
            "--seq-length", a.seq_length, "--micro-batch-size", a.micro_batch_size,
            "--global-batch-size", a.micro_batch_size * a.world, "--train-iters", 1000,
            "--vocab-size", a.vocab_size, "--ds_config", a.ds_config]
    if system == "samoe":
        argv += ["--samoe-pool-size", a.pool]
    argv = [str(x) for x in argv]
    ctx = mp.get_context("spawn")
    port = _free_port()
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


def summarise(a, results: list[dict]) -> dict:
    """Rank 0's bytes per step by collective and group kind (world / EP group / expert-DP group)."""
    r0 = results[0]
    world = list(range(a.world))
    ep_groups = [list(range(g * a.ep, (g + 1) * a.ep)) for g in range(a.world // a.ep)]
    kinds = {}
    for rec in r0["records"].values():
        ranks = rec["ranks"]
        if ranks == world:
            kind = "world (data parallel)"
        elif ranks in ep_groups:
            kind = "expert-parallel group"
        elif len(ranks) == a.world // a.ep:
            kind = "expert-data-parallel group"
        else:
            kind = f"ranks {ranks}"
        if rec["op"] == "all_to_all_single":
            path = "all-to-all"
        elif rec["op"] in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
                           "all_gather", "all_gather_into_tensor", "_all_gather_base"):
            path = "gradient / parameter sync"
        else:
            path = rec["op"]
        k = f"{path} over {kind}"
        agg = kinds.setdefault(k, {"calls": 0, "moved_bytes": 0.0, "ops": set()})
        agg["calls"] += rec["calls"] / r0["steps"]
        agg["moved_bytes"] += rec["moved_bytes"] / r0["steps"]
        agg["ops"].add(rec["op"])
    for agg in kinds.values():
        agg["ops"] = sorted(agg["ops"])
    return {"per_step_rank0": kinds, "params_rank0": r0["params"]}


def model_numbers(a) -> dict:
    from scaling_model import Shape, per_gpu

    shape = Shape("small", layers=a.num_layers, hidden=a.hidden_size, ffn=a.ffn_hidden_size, experts=a.num_experts,
                  moe_every=a.moe_layer_freq, topk=a.topk, seq=a.seq_length,
                  global_batch=a.micro_batch_size * a.world, pool=a.pool, ep=a.ep)
    return per_gpu(shape, a.world, act_bytes=4, weight_bytes=4)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.world % a.ep:
        raise SystemExit(f"error: --world {a.world} is not a multiple of --ep {a.ep}")
    out = {"config": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        for system in ("moe", "samoe"):
            out[system] = summarise(a, run_world(a, system, tmp))
    model = model_numbers(a)
    out["model"] = model
    moe, samoe = out["moe"], out["samoe"]

    def measured(sys_out, prefix):
        return sum(v["moved_bytes"] for k, v in sys_out["per_step_rank0"].items() if k.startswith(prefix))

    a2a_moe = measured(moe, "all-to-all over expert-parallel")
    a2a_samoe = measured(samoe, "all-to-all over expert-parallel")
    edp = "gradient / parameter sync over expert-data-parallel"
    wrld = "gradient / parameter sync over world"
    # The world group's sync moves the replicated parameters: dense ones (both models) plus, for
    # SaMoE, the pool and the combination. Its per-parameter cost is the same for all of them, so
    # the expert share is the world bytes times (pool + combination) / replicated parameters.
    sp = samoe["params_rank0"]
    samoe_expert_sync = measured(samoe, wrld) * (sp["pool"] + sp["combination"]) / sp["replicated"]
    comparison = {
        "all_to_all_bytes_per_gpu": {"model": model["all_to_all_GB_per_gpu"] * 1e9,
                                     "measured_moe": a2a_moe, "measured_samoe": a2a_samoe},
        "expert_grad_sync_bytes_per_gpu_moe": {"model": model["expert_sync_GB_per_gpu_moe"] * 1e9,
                                               "measured": measured(moe, edp)},
        "expert_grad_sync_bytes_per_gpu_samoe": {"model": model["expert_sync_GB_per_gpu_samoe"] * 1e9,
                                                 "measured": samoe_expert_sync},
    }
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
