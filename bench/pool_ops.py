"""SaMoE's own work per training step, op by op, at a bench shape: what a replicated pool adds to a
standard MoE's step at the same kernel (DESIGN.md sections 3, 4 and 6).

A standard MoE with the same expert kernel runs the same expert GEMMs, all-to-alls and dense
layers. What the replicated pool adds per step (GA = 1), for each of the L MoE layers and each pool
tensor (w1, w2; w3 when gated), all with n = N/EP local experts, P pool experts and D = h*f:

- ``materialize``  ``W = A @ pool`` ([n, P] x [P, D]), in forward and again in backward;
- ``dA``           ``dA = dW pool^T`` ([n, D] x [D, P]), in backward;
- ``pool grad``    the pool-gradient sink's ``+= A^T dW`` ([P, n] x [n, D]), one per layer, plus the
                   buffer's first write;
- ``pool sync``    the pool gradient's all-reduce over the EP group (EDP = 1: a standard MoE's
                   experts have no data-parallel replica there, so it has no such sync).

Each op is the package's own function (``samoe_dist.samoe.expert_ffn.materialize``,
``_map_weight_grad``, ``samoe_dist.samoe.pool.PoolGradSink``), timed alone on one thread (median of
``--reps``); the all-reduce runs in a gloo world of ``--ep`` processes on a tensor of the pool's
gradient size in the run's dtype (DeepSpeed's copies into and out of its gradient buckets are not
included). The sum is a floor of SaMoE's extra time per step: it does not count the optimizer's
work, which the pool changes in the other direction (with ZeRO-1 the pool's optimizer state is
partitioned over all the ranks, the experts' only over the expert-data-parallel group), nor cache
effects on the surrounding work.

    .venv/bin/python bench/pool_ops.py [--ep 2] [--dtype fp32|bf16] [--output results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4, help="MoE layers")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--samoe-pool-size", type=int, default=16)
    p.add_argument("--gated", action="store_true", help="SwiGLU experts (three pool tensors)")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (the all-reduce's world)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--output", help="also write the JSON record here")
    a = p.parse_args(argv)
    if a.num_experts % a.ep or min(a.num_layers, a.hidden_size, a.ffn_hidden_size, a.samoe_pool_size, a.reps) < 1:
        p.error("--num-experts must be divisible by --ep, and sizes and --reps must be >= 1")
    return a


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_ops(a) -> dict:
    """Milliseconds of each op for one pool tensor and one layer (the sink: for all L layers)."""
    import torch

    from samoe_dist.samoe.expert_ffn import _map_weight_grad, materialize
    from samoe_dist.samoe.pool import PoolGradSink

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    n, P, h, f, L = a.num_experts // a.ep, a.samoe_pool_size, a.hidden_size, a.ffn_hidden_size, a.num_layers
    pool = torch.randn(P, h, f, generator=gen).to(dtype)
    layer_factors = [(torch.softmax(torch.randn(n, P, generator=gen), dim=-1).to(dtype),
                      torch.randn(n, h * f, generator=gen).to(dtype)) for _ in range(L)]  # (A, dW) per layer
    A, dW = layer_factors[0]  # one layer's, for the per-layer ops

    def sink_step():
        sink = PoolGradSink(1, P)
        for A_l, dW_l in layer_factors:
            sink.add_mm(0, A_l, dW_l)
        return sink.take(0)

    return {
        "materialize": _median_ms(lambda: materialize(A, pool), a.reps),
        "dA": _median_ms(lambda: _map_weight_grad(dW, A, pool, need_pool=False, need_A=True), a.reps),
        "pool grad (L layers)": _median_ms(sink_step, a.reps),
    }


def _allreduce_worker(rank: int, world: int, port: int, numel: int, dtype: str, reps: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = torch.ones(numel, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            queue.put(1e3 * statistics.median(times))
    finally:
        dist.destroy_process_group()


def time_allreduce(a, numel: int) -> float:
    import torch.multiprocessing as mp

    from samoe_dist import ports

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = ports.free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, a.ep, port, numel, a.dtype, a.reps, queue))
             for r in range(a.ep)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"error: an all-reduce process failed (exit codes {[p.exitcode for p in procs]})")
    return queue.get(timeout=10)


def main(argv=None) -> dict:
    a = parse_args(argv)
    tensors = 3 if a.gated else 2
    ops = time_ops(a)
    numel = tensors * a.samoe_pool_size * a.hidden_size * a.ffn_hidden_size
    sync = time_allreduce(a, numel) if a.ep > 1 else 0.0
    per_step = {
        "materialize (fwd + bwd)": 2 * a.num_layers * tensors * ops["materialize"],
        "dA": a.num_layers * tensors * ops["dA"],
        "pool grad": tensors * ops["pool grad (L layers)"],
        "pool sync": sync,
    }
    from throughput import cpu_info, emit_record

    rec = {"type": "pool_ops", "cpu": cpu_info(), "shape": {k: getattr(a, k) for k in (
               "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "samoe_pool_size", "gated", "ep")},
           "dtype": a.dtype, "pool_tensors": tensors, "pool_grad_elements": numel,
           "op_ms": ops, "per_step_ms": per_step, "total_ms": sum(per_step.values())}
    return emit_record(rec, a.output)


if __name__ == "__main__":
    sys.path[:0] = [REPO, os.path.join(REPO, "bench")]
    main()
