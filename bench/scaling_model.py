#!/usr/bin/env python
"""Analytic per-step communication, memory and materialisation cost, per GPU, of SaMoE (pool
replicated or sharded) against a standard MoE at paper scale.

    python bench/scaling_model.py [--micro-batch SEQS] [--markdown FILE]

Setting (DESIGN.md sections 3, 4 and 6): bf16 weights, fp32 gradient communication and Adam
states, DeepSpeed ZeRO-1, ring collectives, world W = EDP x EP with TP = PP = 1. EP groups are
contiguous ranks; EDP = W / EP is the expert-data-parallel group. Each MoE layer has N experts,
n = N / EP of them on each rank, top-k routing, and L_moe = layers / moe_every MoE layers. An
expert holds |E| = 2 h f weights (w1 [h, f], w2 [f, h]; gelu, not gated). The SaMoE pool holds
P such experts; the combination logits C_l are [N, P] per layer (L_moe N P in all).

Batch. Every GPU is a data-parallel replica of the dense part, so it sees T = B_global s / W tokens
per step (s the sequence length). ``Shape.micro_batch`` is the micro-batch size in sequences per
GPU; the number of micro-batches (gradient accumulation) per step is GA = B_global / (W mb). The
default (``micro_batch=None``) puts the whole per-GPU batch in one micro-batch, GA = 1 (at W = 512
and B_global = 256 that is half a sequence, 1024 tokens, per GPU: the model counts tokens).

Ring costs per rank, for a payload of S bytes over a group of g ranks: all-reduce 2 (g-1)/g S;
all-gather (g-1)/g S (S the gathered output); reduce-scatter (g-1)/g S (S the input).

DeepSpeed ZeRO-1/2 sync (``zero_sync_bytes``): with ``use_multi_rank_bucket_allreduce`` (on by
default) the engine all-reduces the gradient buckets (fp32: 2 (g-1)/g x 4 bytes per parameter)
and then all-gathers the updated parameter partitions ((g-1)/g x 2 bytes, bf16): 1.5x an
all-reduce's bytes at equal dtypes. bench/comm_volume.py measures this on the real engine. It runs
once per optimizer step, whatever GA is (the gradients accumulate locally in between). ZeRO's
parameter all-gather is counted HERE, in the sync column, for every system; the column "weight
gathers" holds only the extra, per-micro-batch gathers of the sharded pool.

(a) Expert gradient sync bytes per GPU per step.

- standard MoE: a rank's L_moe n experts are reduced over its EDP group:
      sync_moe = zero_sync(L_moe n |E|, EDP).
- SaMoE, replicated pool: pool and combination are replicated, reduced over the world like dense
  parameters, once per step however many layers use them (DESIGN.md section 4):
      sync_rep = zero_sync(P |E| + L_moe N P, W).
- SaMoE, sharded pool (DESIGN.md section 6): a rank stores the [P, D/EDP] column slice of each pool
  tensor (D = h f; the slices of w1 and w2 hold P |E| / EDP weights). Per MoE layer and
  micro-batch the backward reduce-scatters the weight gradient dW [n, D] of each pool tensor over
  the EDP group (input: n |E| weights in all, in the model's dtype, ``weight_bytes``):
      rs = GA L_moe (EDP-1)/EDP n |E| weight_bytes.
  Once per step DeepSpeed reduces the slice over the EP group (the ranks holding the same columns;
  its MoE-parameter machinery, group "samoe_pool_1") and the replicated combination logits over
  the world:
      pool_ep = zero_sync(P |E| / EDP, EP),   comb = zero_sync(L_moe N P, W),
      sync_sh = rs + pool_ep + comb.
  The reduce-scatter grows with GA while sync_moe does not: sync_sh <= sync_moe exactly while
      GA <= (sync_moe - pool_ep - comb) / rs(GA=1)       (``sharded_sync_break_even_ga``).

(b) Expert weight gathers per GPU per step (beyond ZeRO's parameter all-gather, in (a)).

- standard MoE and replicated SaMoE: none (0).
- sharded SaMoE: each pool tensor's [n, D] local experts are all-gathered over the EDP group in the
  forward, and again in the backward (the weights are rematerialised, not kept): 2 all-gathers of
  n |E| weights per MoE layer and micro-batch,
      gathers_sh = 2 GA L_moe (EDP-1)/EDP n |E| weight_bytes.
- sharded SaMoE materialised once per step (``--samoe-materialize-once-per-step``): each layer's
  experts are gathered at their first use in the step and kept for every forward and backward:
      gathers_sh_once = L_moe (EDP-1)/EDP n |E| weight_bytes,   whatever GA is.
  The reduce-scatter of the weight gradient stays per micro-batch (rs above).

(c) Expert memory per GPU (bytes): bf16 weight (2) + bf16 gradient (2) per stored parameter, plus
fp32 master weight and two Adam moments (12) partitioned by ZeRO-1 over the group that reduces the
parameter.

- standard MoE: L_moe n |E| (2 + 2 + 12 / EDP).
- replicated SaMoE: (P |E| + L_moe N P)(2 + 2 + 12 / W) + mat.
- sharded SaMoE: (P |E| / EDP)(2 + 2 + 12 / EP) + L_moe N P (2 + 2 + 12 / W) + mat.
- mat = n |E| (2 + 2): one layer's materialised (for sharded: gathered) [n, D] weights and their
  gradient, as if alive together, one layer at a time. This is an upper bound: the code frees each
  weight before computing its gradient and handles one pool tensor (n |E| / 2 weights) at a time;
  the bound also covers the sharded gather's and reduce-scatter's transient copy of one [n, D]
  tensor.
- materialised once per step: every MoE layer's materialised weights are kept for the step, plus
  one layer's gradient: mat_once = L_moe n |E| 2 + n |E| 2 (the standard MoE's bf16 expert weights
  and one layer's gradient), in place of mat.

(d) Materialisation FLOPs per GPU per step. Per MoE layer and micro-batch, per pool tensor: the
forward GEMM A_l[own rows] [n, P] @ pool [P, D] (2 n P D FLOPs), and in the backward three GEMMs
of the same size: the rematerialisation for the token gradient, dpool = A^T dW and dA = dW pool^T
(DESIGN.md section 3). Summed over w1 and w2 (|E| = 2 D):
      mat_rep = 4 x 2 n P |E| L_moe GA.
Sharded, every GEMM runs on the D/EDP local columns (the reduce-scatter comes before dpool and dA):
      mat_sh = mat_rep / EDP.
Materialised once per step: the forward GEMM once per step, no rematerialisation, dpool and dA per
micro-batch:
      mat_once = (1 + 2 GA) x 2 n P |E| L_moe   (sharded: / EDP).
Replicated, it is the same on every rank whatever W is, while the tokens per GPU shrink as 1/W;
sharded, it shrinks as 1/EDP, i.e. in step with the tokens at fixed EP. Both are reported as a
fraction of the step's model FLOPs per GPU, 6 x (dense parameters active per token) x T +
12 L h s T (attention scores) + 6 L_moe k |E| T (experts; "expert FLOPs"), and of the expert FLOPs.
It is per micro-batch, so at fixed T it grows with GA.

all-to-all: each MoE layer sends each token's hidden vector to its k experts' ranks and back, in
forward and in backward (4 all-to-alls); a fraction (EP-1)/EP leaves the rank. Same for all three
(same routing, N, k).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Optional


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
    # Micro-batch size in sequences per GPU; None: the whole per-GPU batch in one micro-batch (GA = 1).
    micro_batch: Optional[float] = None

    @property
    def moe_layers(self) -> int:
        return self.layers // self.moe_every

    @property
    def expert_size(self) -> int:  # |E| = 2 h f (gelu FFN)
        return 2 * self.hidden * self.ffn

    def per_gpu_batch(self, world: int) -> float:
        """Sequences per GPU per step (may be fractional: the model counts tokens)."""
        return self.global_batch / world

    def grad_accum(self, world: int) -> int:
        """Micro-batches per optimizer step on ``world`` GPUs."""
        if self.micro_batch is None:
            return 1
        ga = self.per_gpu_batch(world) / self.micro_batch
        if ga < 1 or abs(ga - round(ga)) > 1e-9:
            raise ValueError(f"{self.name}: a per-GPU batch of {self.per_gpu_batch(world)} sequences on {world} GPUs "
                             f"is not a whole number of micro-batches of {self.micro_batch}")
        return int(round(ga))


def ring_allreduce_bytes(size_bytes: float, n: int) -> float:
    return 2.0 * (n - 1) / n * size_bytes if n > 1 else 0.0


def zero_sync_bytes(params: float, n: int, grad_bytes: int = 4, weight_bytes: int = 2) -> float:
    """Bytes per rank DeepSpeed ZeRO-1/2 moves for ``params`` parameters synced over ``n`` ranks:
    gradient all-reduce plus all-gather of the updated partitions."""
    if n <= 1:
        return 0.0
    return ring_allreduce_bytes(grad_bytes * params, n) + (n - 1) / n * weight_bytes * params


def per_gpu(shape: Shape, world: int, act_bytes: int = 2, weight_bytes: int = 2) -> dict:
    """Per-GPU, per-step numbers (module docstring). ``act_bytes``/``weight_bytes``: bytes per
    activation element sent by the all-to-all and per weight all-gathered or reduce-scattered in
    the model's dtype (2: bf16; bench/comm_volume.py passes 4 for its fp32 CPU runs). Keys with
    ``samoe`` and no suffix are the replicated pool; ``samoe_sharded`` the sharded one."""
    s = shape
    if world % s.ep:
        raise ValueError(f"world {world} is not a multiple of EP {s.ep}")
    ga = s.grad_accum(world)
    edp = world // s.ep
    n = s.experts // s.ep
    tokens_per_gpu = s.global_batch * s.seq / world
    a2a = 4 * s.moe_layers * s.topk * tokens_per_gpu * s.hidden * act_bytes * (s.ep - 1) / s.ep
    local_experts = s.moe_layers * n
    moe_expert_params = local_experts * s.expert_size
    pool_params = s.pool * s.expert_size
    combination = s.moe_layers * s.experts * s.pool
    # (a) gradient and parameter sync
    moe_ar = zero_sync_bytes(moe_expert_params, edp, weight_bytes=weight_bytes)
    samoe_ar = zero_sync_bytes(pool_params + combination, world, weight_bytes=weight_bytes)
    layer_local = n * s.expert_size  # one MoE layer's n experts, all pool tensors
    rs_per_micro_batch = s.moe_layers * (edp - 1) / edp * layer_local * weight_bytes
    sh_rs = ga * rs_per_micro_batch
    sh_pool = zero_sync_bytes(pool_params / edp, s.ep, weight_bytes=weight_bytes)
    sh_comb = zero_sync_bytes(combination, world, weight_bytes=weight_bytes)
    sh_sync = sh_rs + sh_pool + sh_comb
    # (b) per-micro-batch weight all-gathers (forward + backward rematerialisation)
    sh_gather = 2 * ga * s.moe_layers * (edp - 1) / edp * layer_local * weight_bytes
    sh_gather_once = s.moe_layers * (edp - 1) / edp * layer_local * weight_bytes  # --samoe-materialize-once-per-step
    # (c) memory: bf16 weight + bf16 grad, 12 bytes of fp32 master + Adam moments split over the reducing group
    moe_mem = moe_expert_params * (2 + 2 + 12 / edp)
    materialised = layer_local * (2 + 2)  # one layer's local experts + grad (upper bound)
    samoe_mem = (pool_params + combination) * (2 + 2 + 12 / world) + materialised
    sh_mem = pool_params / edp * (2 + 2 + 12 / s.ep) + combination * (2 + 2 + 12 / world) + materialised
    materialised_once = local_experts * s.expert_size * 2 + layer_local * 2  # every layer's weights kept + one grad
    # (d) FLOPs
    expert_flops_per_token = 6 * s.moe_layers * s.topk * s.expert_size  # expert part of 6*N_active
    step_expert_flops = expert_flops_per_token * tokens_per_gpu
    active = s.layers * 4 * s.hidden ** 2 + (s.layers - s.moe_layers) * 2 * s.hidden * s.ffn
    step_flops = (6 * active + 12 * s.layers * s.hidden * s.seq) * tokens_per_gpu + step_expert_flops
    # forward GEMM + rematerialisation + dpool + dA, per layer and micro-batch
    materialise_flops = ga * 4 * 2 * s.moe_layers * n * s.pool * s.expert_size
    sh_materialise_flops = materialise_flops / edp
    materialise_flops_once = (1 + 2 * ga) * 2 * s.moe_layers * n * s.pool * s.expert_size
    rs1 = rs_per_micro_batch
    break_even = (moe_ar - sh_pool - sh_comb) / rs1 if rs1 > 0 else float("inf")
    return {
        "model": s.name, "gpus": world, "ep": s.ep, "expert_dp": edp, "pool": s.pool,
        "micro_batch_sequences": s.per_gpu_batch(world) / ga, "grad_accum": ga,
        "expert_params_total_moe": s.moe_layers * s.experts * s.expert_size,
        "expert_params_total_samoe": pool_params + combination,
        "all_to_all_GB_per_gpu": a2a / 1e9,
        "expert_sync_GB_per_gpu_moe": moe_ar / 1e9,
        "expert_sync_GB_per_gpu_samoe": samoe_ar / 1e9,
        "expert_sync_GB_per_gpu_samoe_sharded": sh_sync / 1e9,
        "samoe_sharded_reduce_scatter_GB_per_gpu": sh_rs / 1e9,
        "samoe_sharded_pool_ep_sync_GB_per_gpu": sh_pool / 1e9,
        "samoe_sharded_combination_world_sync_GB_per_gpu": sh_comb / 1e9,
        "sharded_sync_break_even_ga": break_even,
        "expert_gather_GB_per_gpu_moe": 0.0,
        "expert_gather_GB_per_gpu_samoe": 0.0,
        "expert_gather_GB_per_gpu_samoe_sharded": sh_gather / 1e9,
        "expert_gather_GB_per_gpu_samoe_sharded_once": sh_gather_once / 1e9,
        "expert_memory_GB_per_gpu_moe": moe_mem / 1e9,
        "expert_memory_GB_per_gpu_samoe": samoe_mem / 1e9,
        "expert_memory_GB_per_gpu_samoe_sharded": sh_mem / 1e9,
        "expert_memory_GB_per_gpu_samoe_once": (samoe_mem - materialised + materialised_once) / 1e9,
        "expert_memory_GB_per_gpu_samoe_sharded_once": (sh_mem - materialised + materialised_once) / 1e9,
        "materialisation_flops_vs_expert_flops": materialise_flops / step_expert_flops,
        "materialisation_flops_vs_step_flops": materialise_flops / step_flops,
        "materialisation_flops_vs_expert_flops_sharded": sh_materialise_flops / step_expert_flops,
        "materialisation_flops_vs_step_flops_sharded": sh_materialise_flops / step_flops,
        "materialisation_flops_vs_step_flops_once": materialise_flops_once / step_flops,
        "materialisation_flops_vs_step_flops_sharded_once": materialise_flops_once / edp / step_flops,
    }


SHAPES = [Shape("350M+128e", layers=24, hidden=1024, ffn=4096), Shape("1.3B+128e", layers=24, hidden=2048, ffn=8192)]
WORLDS = (64, 512)


def _markdown(columns: list[str], rows: list[dict], cells) -> str:
    """A Markdown table: ``columns`` as the header, ``cells(row)`` (a list of strings) per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    columns = ["model", "GPUs", "EP x EDP", "micro-batch (seqs/GPU) x GA", "expert params MoE / SaMoE (B)",
               "all-to-all GB/GPU (all)", "expert sync GB/GPU MoE / SaMoE repl. / SaMoE sharded",
               "expert weight gathers GB/GPU MoE / repl. / sharded", "expert memory GB/GPU MoE / repl. / sharded",
               "materialisation / step FLOPs repl. / sharded"]
    return _markdown(columns, rows, lambda r: [
        r["model"], str(r["gpus"]), f"{r['ep']} x {r['expert_dp']}",
        f"{r['micro_batch_sequences']:g} x {r['grad_accum']}",
        f"{r['expert_params_total_moe'] / 1e9:.2f} / {r['expert_params_total_samoe'] / 1e9:.2f}",
        f"{r['all_to_all_GB_per_gpu']:.2f}",
        f"{r['expert_sync_GB_per_gpu_moe']:.2f} / {r['expert_sync_GB_per_gpu_samoe']:.2f} / "
        f"{r['expert_sync_GB_per_gpu_samoe_sharded']:.2f}",
        f"{r['expert_gather_GB_per_gpu_moe']:.0f} / {r['expert_gather_GB_per_gpu_samoe']:.0f} / "
        f"{r['expert_gather_GB_per_gpu_samoe_sharded']:.2f}",
        f"{r['expert_memory_GB_per_gpu_moe']:.2f} / {r['expert_memory_GB_per_gpu_samoe']:.2f} / "
        f"{r['expert_memory_GB_per_gpu_samoe_sharded']:.2f}",
        f"{r['materialisation_flops_vs_step_flops']:.3f} / {r['materialisation_flops_vs_step_flops_sharded']:.3f}"])


def sharded_breakdown(rows: list[dict]) -> str:
    columns = ["model", "GPUs", "GA", "dW reduce-scatter (EDP group)", "pool slice sync (EP group)",
               "combination sync (world)", "sharded sync total", "MoE sync", "GA where sharded sync = MoE sync"]
    return _markdown(columns, rows, lambda r: [
        r["model"], str(r["gpus"]), str(r["grad_accum"]), f"{r['samoe_sharded_reduce_scatter_GB_per_gpu']:.2f}",
        f"{r['samoe_sharded_pool_ep_sync_GB_per_gpu']:.2f}", f"{r['samoe_sharded_combination_world_sync_GB_per_gpu']:.4f}",
        f"{r['expert_sync_GB_per_gpu_samoe_sharded']:.2f}", f"{r['expert_sync_GB_per_gpu_moe']:.2f}",
        f"{r['sharded_sync_break_even_ga']:.2f}"])


def once_per_step(rows: list[dict]) -> str:
    columns = ["model", "GPUs", "GA", "sharded weight gathers GB/GPU default / once",
               "materialisation / step FLOPs repl. default / once", "sharded default / once",
               "expert memory GB/GPU MoE / sharded default / sharded once"]
    return _markdown(columns, rows, lambda r: [
        r["model"], str(r["gpus"]), str(r["grad_accum"]),
        f"{r['expert_gather_GB_per_gpu_samoe_sharded']:.2f} / {r['expert_gather_GB_per_gpu_samoe_sharded_once']:.2f}",
        f"{r['materialisation_flops_vs_step_flops']:.3f} / {r['materialisation_flops_vs_step_flops_once']:.3f}",
        f"{r['materialisation_flops_vs_step_flops_sharded']:.3f} / "
        f"{r['materialisation_flops_vs_step_flops_sharded_once']:.3f}",
        f"{r['expert_memory_GB_per_gpu_moe']:.2f} / {r['expert_memory_GB_per_gpu_samoe_sharded']:.2f} / "
        f"{r['expert_memory_GB_per_gpu_samoe_sharded_once']:.2f}"])


def rows_for(micro_batch: Optional[float] = None, worlds=WORLDS) -> list[dict]:
    out = []
    for shape in SHAPES:
        for world in worlds:
            out.append(per_gpu(dataclasses.replace(shape, micro_batch=micro_batch), world))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=float, default=None,
                        help="sequences per GPU per micro-batch (default: the whole per-GPU batch, GA = 1)")
    parser.add_argument("--markdown", help="also write the tables here")
    args = parser.parse_args(argv)
    rows = rows_for(args.micro_batch)
    # Gradient accumulation: micro-batches of 1 sequence at 64 GPUs (4 per GPU at global batch 256:
    # GA = 4). At 512 GPUs a GPU gets half a sequence per step, so GA > 1 needs a larger global batch.
    rows_ga4 = rows_for(1, worlds=(64,))
    for r in rows + rows_ga4:
        print(json.dumps(r))
    md = "\n\n".join([
        "Per GPU and per step; bf16 weights and collectives, fp32 gradient sync, ZeRO-1 "
        f"(`python bench/scaling_model.py{' --micro-batch %g' % args.micro_batch if args.micro_batch else ''}`).",
        table(rows),
        "The sharded SaMoE's expert sync, by part (GB per GPU per step):",
        sharded_breakdown(rows),
        "With gradient accumulation: micro-batches of 1 sequence at 64 GPUs (GA = 4), same global batch:",
        table(rows_ga4),
        sharded_breakdown(rows_ga4),
        "Materialised once per optimizer step (`--samoe-materialize-once-per-step`) against the default "
        "(per micro-batch, rematerialised in backward), at GA = 1 and GA = 4:",
        once_per_step(rows + rows_ga4),
    ])
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
