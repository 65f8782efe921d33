"""One layer's expert function alone, at the capacity shape: SaMoE's, the same-kernel MoE's and
DeepSpeed's, forward and backward, timed in paired rounds on one thread.

At a capacity factor with every expert padded to its capacity (DeepSpeed MoE's token policy; in
``bench/throughput.py`` the ``dsmoe``, ``gmoe-cf`` and ``samoe-cf`` systems) each of a rank's n
local experts gets exactly C rows. The arms run the experts of one layer on those n*C rows:

- ``deepspeed``: ``deepspeed.moe.experts.Experts`` over ``bench/ds_moe_adapter.ExpertFFN``, the
  ``dsmoe`` peer's experts: per expert fc1, ``F.gelu`` (oneDNN on the CPU), fc2, through autograd.
  Its gate's weights are applied outside the experts (DeepSpeed's combine), on [T, h];
- ``same-kernel``: ``samoe_dist``'s expert function with per-layer weights (no pool): one batched
  GEMM per product, megatron's per-token prob scale on [T, f] and its gradient, the activation
  recomputed in backward (nothing of [T, f] saved but fc1's output), on the kernels of
  ``expert_ffn._activation_kernels`` (oneDNN in fp32 at equal groups);
- ``same-kernel-torch-gelu``: the same, with the activation and its derivative forced onto torch's
  own kernel, as every call ran before 2026-12-08;
- ``samoe``: SaMoE's: the same-kernel function on weights materialised from a pool of P (``A @
  pool`` in forward and again in backward), plus the pool's and ``A``'s gradients.

Each round runs every arm once, in an order that rotates from round to round; per round each arm's
time is divided by ``same-kernel``'s, and the median of those ratios is reported with a
distribution-free 95% confidence interval (``throughput.median_ci``, 6 rounds or more). One
thread: the experts of a rank run on one core in ``bench/throughput.py`` at EP = 2 on 2 cores. The
process runs with ``bench/throughput.py``'s glibc settings (``MALLOC_ENV``; it restarts itself with
them where they are not set), as the bench's worlds do.

    .venv/bin/python bench/expert_ffn.py [--rounds 40] [--dtype fp32|bf16] [--output results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "same-kernel"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--local-experts", type=int, default=4, help="n: experts on the rank (N / EP)")
    p.add_argument("--capacity", type=int, default=1024,
                   help="C: rows per local expert (bench/throughput.py's default shape at capacity factor 1.0 and "
                        "EP = 2: each rank routes 2048 tokens x top-2 to 8 experts, 512 rows per expert, and each "
                        "local expert receives them from both ranks: 1024)")
    p.add_argument("--samoe-pool-size", type=int, default=16)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each arm first")
    p.add_argument("--output", help="also write the JSON record here")
    a = p.parse_args(argv)
    if min(a.hidden_size, a.ffn_hidden_size, a.local_experts, a.capacity, a.samoe_pool_size, a.rounds) < 1 or a.warmup < 0:
        p.error("sizes and --rounds must be >= 1, --warmup >= 0")
    return a


def build_arms(a) -> dict:
    """{arm: a callable running one forward and backward of that arm's experts}."""
    import torch
    import torch.nn.functional as F
    from deepspeed.moe.experts import Experts

    from ds_moe_adapter import ExpertFFN
    from samoe_dist.cpu_compat import without_onednn
    from samoe_dist.samoe import expert_ffn

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    n, C, h, f, P = a.local_experts, a.capacity, a.hidden_size, a.ffn_hidden_size, a.samoe_pool_size
    leaf = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, probs = leaf(n * C, h), torch.rand(n * C, generator=gen).to(dtype).requires_grad_()
    w1, w2 = leaf(n, h, f, scale=h ** -0.5), leaf(n, f, h, scale=f ** -0.5)  # same-kernel: per-layer weights
    A = torch.softmax(torch.randn(n, P, generator=gen), -1).to(dtype).requires_grad_()
    pool1, pool2 = leaf(P, h, f, scale=h ** -0.5), leaf(P, f, h, scale=f ** -0.5)
    experts = Experts(ExpertFFN(h, f, F.gelu, False, dtype), n)
    x_ds = leaf(1, n, C, h)  # DeepSpeed's layout after its dispatch: [ep, local experts, capacity, h]
    counts = (C,) * n

    def backward(y):
        y.backward(torch.ones_like(y))

    def same_kernel():
        backward(expert_ffn.materialized_expert_ffn(x, probs, counts, None, w1, w2, None, F.gelu))

    def same_kernel_torch_gelu():
        kernels = expert_ffn._activation_kernels
        expert_ffn._activation_kernels = lambda z, c: without_onednn(z)
        try:
            same_kernel()
        finally:
            expert_ffn._activation_kernels = kernels

    return {
        "deepspeed": lambda: backward(experts(x_ds)),
        BASE: same_kernel,
        "same-kernel-torch-gelu": same_kernel_torch_gelu,
        "samoe": lambda: backward(expert_ffn.materialized_expert_ffn(x, probs, counts, A, pool1, pool2, None, F.gelu)),
    }


def time_rounds(arms: dict, rounds: int, warmup: int) -> dict:
    """{arm: [seconds per round]}: each round runs every arm once, the order rotating by one a round."""
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    names = list(arms)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            arms[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict) -> dict:
    """Median ms per arm, and each arm's time over ``same-kernel``'s, paired per round."""
    from throughput import median_ci, spread

    out = {"median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "time_over_same_kernel": {}}
    for k, v in times.items():
        if k == BASE:
            continue
        ratios = [t / b for t, b in zip(v, times[BASE])]
        ci = median_ci(ratios)
        out["time_over_same_kernel"][k] = {**spread(ratios), "median_ci95": None if ci is None else list(ci[:2])}
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    times = time_rounds(build_arms(a), a.rounds, a.warmup)
    from throughput import MALLOC_ENV, cpu_info, emit_record

    rec = {"type": "expert_ffn", "cpu": cpu_info(), "dtype": a.dtype, "rounds": a.rounds,
           "shape": {k: getattr(a, k) for k in ("hidden_size", "ffn_hidden_size", "local_experts", "capacity",
                                                 "samoe_pool_size")},
           "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
           **summarize(times), "seconds": times}
    return emit_record(rec, a.output)


if __name__ == "__main__":
    sys.path[:0] = [REPO, os.path.join(REPO, "bench")]
    from throughput import MALLOC_ENV

    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # glibc reads them at start: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    main()
