#!/usr/bin/env python
"""Analytic per-step communication and per-GPU memory of SaMoE vs a standard MoE at paper scale.

    python bench/scaling_model.py [--markdown FILE]

Model (DESIGN.md sections 3 and 4; bf16 weights, fp32 gradient communication and Adam states,
ZeRO-1 partitioning of the optimizer states, ring collectives, world W = DP x EP, TP = PP = 1):

- all-to-all: each MoE layer sends each token's hidden vector to its k experts' ranks and back, in
  forward and in backward (4 all-to-alls); a fraction (EP-1)/EP leaves the rank. Same for both
  models (same routing, same N, k).
- gradient and parameter sync of expert weights: standard MoE syncs its L_moe*N/EP local experts
  over the expert-data-parallel group (W/EP ranks); SaMoE syncs the replicated pool P*|E| (and the
  combination logits) over all W ranks. DeepSpeed's ZeRO-1/2 (``use_multi_rank_bucket_allreduce``,
  on by default) all-reduces the gradient buckets (ring: 2(n-1)/n x size per rank) and then
  all-gathers the updated parameter partitions ((n-1)/n x size): 1.5x an all-reduce's bytes at
  equal dtypes. bench/comm_volume.py measured exactly this on the real engine (docs/RESULTS.md).
- memory per GPU of expert weights: bf16 weights + bf16 gradients + fp32 master and two Adam
  moments partitioned by ZeRO-1 over the group that reduces them; SaMoE adds one layer's
  materialised local experts (bf16) and their gradient, alive one layer at a time.
- materialisation FLOPs: 2 x (N/EP) x P x |E| per MoE layer forward, twice that backward, on
  EVERY rank: each of the W/EP expert-parallel groups materialises all N experts, so this cost per
  GPU does not shrink as data parallelism grows, while the tokens per GPU do.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    experts: int = 128
    moe_every: int = 2
    topk: int = 1
    seq: int = 2048
    global_batch: int = 256
    pool: int = 256
    ep: int = 8

    @property
    def moe_layers(self) -> int:
        return self.layers // self.moe_every

    @property
    def expert_size(self) -> int:  # |E| = 2 h f (gelu FFN)
        return 2 * self.hidden * self.ffn


def ring_allreduce_bytes(size_bytes: float, n: int) -> float:
    return 2.0 * (n - 1) / n * size_bytes if n > 1 else 0.0


def zero_sync_bytes(params: float, n: int, grad_bytes: int = 4, weight_bytes: int = 2) -> float:
    """Bytes per rank DeepSpeed ZeRO-1/2 moves for ``params`` parameters synced over ``n`` ranks:
    gradient all-reduce plus all-gather of the updated partitions."""
    if n <= 1:
        return 0.0
    return ring_allreduce_bytes(grad_bytes * params, n) + (n - 1) / n * weight_bytes * params


def per_gpu(shape: Shape, world: int, act_bytes: int = 2, weight_bytes: int = 2) -> dict:
    """Per-GPU, per-step numbers. ``act_bytes``/``weight_bytes``: bytes per activation element
    sent by the all-to-all and per weight all-gathered (2: bf16; bench/comm_volume.py passes 4 for
    its fp32 CPU runs)."""
    s = shape
    tokens_per_gpu = s.global_batch * s.seq / world
    a2a = 4 * s.moe_layers * s.topk * tokens_per_gpu * s.hidden * act_bytes * (s.ep - 1) / s.ep
    local_experts = s.moe_layers * s.experts // s.ep
    moe_expert_params = local_experts * s.expert_size
    pool_params = s.pool * s.expert_size
    combination = s.moe_layers * s.experts * s.pool
    edp = world // s.ep
    moe_ar = zero_sync_bytes(moe_expert_params, edp, weight_bytes=weight_bytes)
    samoe_ar = zero_sync_bytes(pool_params + combination, world, weight_bytes=weight_bytes)
    # bf16 weight + bf16 grad, and 12 bytes of fp32 master + Adam moments split over the reducing group
    moe_mem = moe_expert_params * (2 + 2 + 12 / edp)
    materialised = (s.experts // s.ep) * s.expert_size * (2 + 2)  # one layer's local experts + grad
    samoe_mem = (pool_params + combination) * (2 + 2 + 12 / world) + materialised
    expert_flops_per_token = 6 * s.moe_layers * s.topk * s.expert_size  # expert part of 6*N_active
    step_expert_flops = expert_flops_per_token * tokens_per_gpu
    active = s.layers * 4 * s.hidden ** 2 + (s.layers - s.moe_layers) * 2 * s.hidden * s.ffn
    step_flops = (6 * active + 12 * s.layers * s.hidden * s.seq) * tokens_per_gpu + step_expert_flops
    materialise_flops = 3 * 2 * s.moe_layers * (s.experts // s.ep) * s.pool * s.expert_size
    return {
        "model": s.name, "gpus": world, "ep": s.ep, "expert_dp": edp, "pool": s.pool,
        "expert_params_total_moe": s.moe_layers * s.experts * s.expert_size,
        "expert_params_total_samoe": pool_params + combination,
        "all_to_all_GB_per_gpu": a2a / 1e9,
        "expert_sync_GB_per_gpu_moe": moe_ar / 1e9,
        "expert_sync_GB_per_gpu_samoe": samoe_ar / 1e9,
        "expert_memory_GB_per_gpu_moe": moe_mem / 1e9,
        "expert_memory_GB_per_gpu_samoe": samoe_mem / 1e9,
        "materialisation_flops_vs_expert_flops": materialise_flops / step_expert_flops,
        "materialisation_flops_vs_step_flops": materialise_flops / step_flops,
    }


SHAPES = [Shape("350M+128e", layers=24, hidden=1024, ffn=4096), Shape("1.3B+128e", layers=24, hidden=2048, ffn=8192)]


def table(rows: list[dict]) -> str:
    head = ("| model | GPUs | EP | expert params MoE / SaMoE (B) | all-to-all GB/GPU (both) | expert grad all-reduce + "
            "param all-gather GB/GPU MoE / SaMoE | expert memory GB/GPU MoE / SaMoE | materialisation FLOPs / expert FLOPs / step FLOPs |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['ep']} | {r['expert_params_total_moe'] / 1e9:.2f} / "
            f"{r['expert_params_total_samoe'] / 1e9:.2f} | {r['all_to_all_GB_per_gpu']:.2f} | "
            f"{r['expert_sync_GB_per_gpu_moe']:.2f} / {r['expert_sync_GB_per_gpu_samoe']:.2f} | "
            f"{r['expert_memory_GB_per_gpu_moe']:.2f} / {r['expert_memory_GB_per_gpu_samoe']:.2f} | "
            f"{r['materialisation_flops_vs_expert_flops']:.3f} / {r['materialisation_flops_vs_step_flops']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    rows = [per_gpu(shape, world) for shape in SHAPES for world in (64, 512)]
    for r in rows:
        print(json.dumps(r))
    md = table(rows)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
