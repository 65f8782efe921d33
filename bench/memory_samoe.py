"""Peak memory of one forward+backward step: SaMoE MoE layers against megatron's standard MoE layers.

Both sides are megatron-core MoELayers (same router, dispatcher and aux losses) in a stack of
``--num-layers`` layers on a residual stream; only the experts differ (SequentialMLP with N
experts per layer vs SaMoEExperts materialising N experts per layer from a shared pool of P).

How the peak is measured (each kind in a fresh subprocess, after one warm-up step):

- ``peak_step_bytes``: torch's allocator accounting under ``torch.profiler`` with
  ``profile_memory=True``: the maximum of the "Total Allocated" counter over the profiled step,
  i.e. the peak of tensor bytes allocated above the resting state (parameters, inputs) during
  forward + backward, parameter gradients included. Exact for tensors, blind to allocator slack.
- ``rss_delta_bytes``: peak resident set (``ru_maxrss``) of the process during its first step
  minus its RSS just before it: what the OS saw, including allocator caching and noise.

Prints one JSON line per kind and a final line with the ratios SaMoE/standard (and the step time
ratio, best of 5 unprofiled steps). On the CPU the time ratio depends on glibc: SaMoE's expert
activations are one [T*k, f] buffer per layer (megatron's are N smaller ones) and by default
buffers that large are mmap'ed and page-faulted afresh every step; with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` in the environment the
two are at parity.

    .venv/bin/python bench/memory_samoe.py [--pool-size 8] [--tokens 4096] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=1024, help="expert FFN size f")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2, help="MoE layers in each stack")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (seq 512 x batch)")
    p.add_argument("--samoe-pool-size", type=int, default=8, help="pool size P of the SaMoE stack")
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "allgather"), default="alltoall")
    p.add_argument("--worker", choices=("standard", "samoe"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_total_allocated(prof) -> int:
    """Max of the profiler's "Total Allocated" counter (bytes above the state when it started)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def worker(args) -> dict:
    import torch
    import torch.distributed as dist

    from samoe_dist import cpu_compat, ports

    cpu_compat.apply()
    port = ports.free_port()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1, create_gloo_process_groups=False)
    cpu_compat.seed_model_parallel(1234)

    from samoe_dist.config import SaMoEConfig
    from samoe_dist.samoe.pool import ExpertPool, PoolRef, attach_pool
    from samoe_dist.samoe.testing import build_samoe_layer, build_standard_layer, moe_transformer_config

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h = args.hidden_size
    cfg = moe_transformer_config(
        hidden_size=h, ffn_hidden_size=args.ffn_hidden_size, num_experts=args.num_experts,
        topk=args.moe_router_topk, num_layers=args.num_layers, gated=args.swiglu,
        aux_loss_coeff=0.01, dispatcher=args.moe_token_dispatcher_type, dtype=dtype,
    )
    model = torch.nn.Module()
    if args.worker == "samoe":
        pool = ExpertPool.from_transformer_config(cfg, args.samoe_pool_size)
        samoe = SaMoEConfig(samoe_pool_size=args.samoe_pool_size)
        ref = PoolRef(pool)
        model.layers = torch.nn.ModuleList(
            build_samoe_layer(cfg, ref, j, samoe, layer_number=j + 1) for j in range(args.num_layers)
        )
        attach_pool(model, pool)
    else:
        model.layers = torch.nn.ModuleList(
            build_standard_layer(cfg, layer_number=j + 1) for j in range(args.num_layers)
        )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    batch = max(1, args.tokens // 512)
    x = torch.randn(args.tokens // batch, batch, h, dtype=dtype)
    G = torch.randn_like(x)

    def step():
        for p in model.parameters():
            p.grad = None
        hidden = x
        for layer in model.layers:
            y, _ = layer(hidden)
            hidden = hidden + y
        (hidden.float() * G.float()).sum().backward()

    rss_before = _rss_bytes()
    step()  # warm-up, and the RSS measurement of a first step
    rss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = _peak_total_allocated(prof)

    itemsize = torch.empty((), dtype=dtype).element_size()
    E = (3 if args.swiglu else 2) * h * args.ffn_hidden_size
    return {
        "kind": args.worker,
        "hidden_size": h, "ffn_hidden_size": args.ffn_hidden_size, "num_experts": args.num_experts,
        "topk": args.moe_router_topk, "num_layers": args.num_layers, "tokens": args.tokens,
        "pool_size": args.samoe_pool_size if args.worker == "samoe" else None,
        "dtype": args.dtype, "dispatcher": args.moe_token_dispatcher_type,
        "param_bytes": param_bytes,
        "one_layer_experts_bytes": args.num_experts * E * itemsize,
        "peak_step_bytes": peak,
        "rss_delta_bytes": rss_delta,
        "step_s_min": min(times),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = {}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for kind in ("standard", "samoe"):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *passthrough, "--worker", kind],
            check=True, capture_output=True, text=True, env=env, cwd=REPO,
        ).stdout
        line = [l for l in out.splitlines() if l.startswith("{")][-1]
        results[kind] = json.loads(line)
        print(line, flush=True)
    s, m = results["samoe"], results["standard"]
    print(json.dumps({
        "ratio": "samoe/standard",
        "peak_step_bytes": round(s["peak_step_bytes"] / m["peak_step_bytes"], 3),
        "rss_delta_bytes": round(s["rss_delta_bytes"] / m["rss_delta_bytes"], 3),
        "param_bytes": round(s["param_bytes"] / m["param_bytes"], 3),
        "step_time": round(s["step_s_min"] / m["step_s_min"], 3),
    }), flush=True)


if __name__ == "__main__":
    main()
