#!/usr/bin/env python
"""One-shot check of the system on one device (a GPU; the CPU runs every part it can).

    python tools/gpu_check.py --output results.json [--device cuda|cpu] [--skip bench,train]

Sections, each recorded in the results file with ``ok`` and its numbers:

1. ``grouped_gemm``: torch's grouped GEMM probed on the device, bf16 and fp32, at the shapes used.
2. ``expert_ffn``: SaMoE's expert function (materialised experts, grouped GEMMs, recompute in
   backward) against the plain-autograd reference on the device: output and every gradient, fp32.
3. ``one_hot_pool``: SaMoE layers with a one-hot pool of L*N experts against megatron-core's
   MoELayer (SequentialMLP) loaded with the same weights, on the device.
4. ``host_syncs``: device-to-host synchronisations in one SaMoE layer's forward and backward,
   counted with ``torch.cuda.set_sync_debug_mode`` (CUDA only).
5. ``bench``: bench/throughput.py (dense, megatron MoE, same-kernel MoE, SaMoE; bf16 on a GPU,
   fp32 on the CPU; MFU against the matmul peak measured in the same run; peak memory).
6. ``train``: 3 steps of ZeRO-2 with full recompute and bf16 on a GPU, saved, resumed for 3 more, and
   compared with 6 uninterrupted steps (the launcher, ``pretrain_samoe.py``, as a user runs it).

Exit code 0 when every section that ran is ok. ``scripts/gpu_check.sh`` is the wrapper; the test
suite runs the CPU-capable sections (tests/integration/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _close(a, b) -> float:
    """max |a - b| / max |b| (relative to the tensor's scale)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check_grouped_gemm(device) -> dict:
    import torch

    from samoe_dist.samoe import grouped_gemm

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for k, n in ((256, 1024), (1024, 256)):
            out[f"{dtype}".replace("torch.", "") + f"_{k}x{n}"] = bool(
                grouped_gemm._grouped_mm_works(device.type, device.index, dtype, k, n))
    # the CPU falls back to the per-expert loop where the kernel is missing: not an error there
    return {"ok": all(out.values()) or device.type == "cpu", **out}


def check_expert_ffn(device) -> dict:
    import torch
    import torch.nn.functional as F

    from samoe_dist.samoe.expert_ffn import materialized_expert_ffn, reference_expert_ffn

    gen = torch.Generator().manual_seed(0)
    counts, h, f, P = (37, 0, 64, 91), 256, 512, 6
    mk = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    x, probs = mk(sum(counts), h), torch.rand(sum(counts), generator=gen).to(device)
    A = torch.softmax(mk(len(counts), P), -1)
    w1, w2, w3 = mk(P, h, f) * 0.05, mk(P, f, h) * 0.05, mk(P, h, f) * 0.05
    leaves = [t.clone().requires_grad_() for t in (x, probs, A, w1, w2, w3)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, probs, A, w1, w2, w3)]
    y = materialized_expert_ffn(leaves[0], leaves[1], counts, leaves[2], *leaves[3:], F.silu)
    y_ref = reference_expert_ffn(ref_leaves[0], ref_leaves[1], counts, ref_leaves[2], *ref_leaves[3:], F.silu)
    G = mk(*y.shape)
    (y * G).sum().backward()
    (y_ref * G).sum().backward()
    diffs = {"output": _close(y, y_ref)}
    for name, a, b in zip(("x", "probs", "A", "w1", "w2", "w3"), leaves, ref_leaves):
        diffs[f"grad_{name}"] = _close(a.grad, b.grad)
    # fp32 sums of up to f*P terms in another order (TF32 is off for torch's matmuls by default)
    return {"ok": max(diffs.values()) < 1e-4, "max_relative_difference": diffs}


def check_one_hot_pool(device) -> dict:
    import torch

    from samoe_dist.config import SaMoEConfig
    from samoe_dist.samoe.pool import ExpertPool, PoolRef, attach_pool
    from samoe_dist.samoe.testing import (build_samoe_layer, build_standard_layer, load_pool_experts_into_standard,
                                          moe_transformer_config)

    H, FFN, N, L = 64, 128, 4, 2
    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=2, num_layers=L,
                                 aux_loss_coeff=0.0, z_loss_coeff=None, use_cpu_initialization=True)
    samoe = SaMoEConfig(samoe_pool_size=L * N, samoe_top_m=1, samoe_init="peaked", samoe_init_peak=4.0)
    pool = ExpertPool(L * N, H, FFN, init_method_std=0.05)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(build_samoe_layer(cfg, PoolRef(pool), j, samoe, layer_number=j + 1)
                                        for j in range(L))
    attach_pool(holder, pool)
    standard = torch.nn.ModuleList(build_standard_layer(cfg, layer_number=j + 1) for j in range(L))
    for j in range(L):
        with torch.no_grad():
            holder.layers[j].router.weight.normal_()
        load_pool_experts_into_standard(standard[j], pool, [j * N + e for e in range(N)])
        with torch.no_grad():
            standard[j].router.weight.copy_(holder.layers[j].router.weight)
    holder.to(device)
    standard.to(device)
    x = torch.randn(16, 2, H, generator=torch.Generator().manual_seed(1)).to(device)

    def run(layers, inp):
        h = inp
        for layer in layers:
            h = h + layer(h)[0]
        return h

    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, ym = run(holder.layers, xs), run(standard, xm)
    ys.square().sum().backward()
    ym.square().sum().backward()
    diffs = {"output": _close(ys, ym), "grad_x": _close(xs.grad, xm.grad)}
    for j in range(L):
        diffs[f"grad_router_{j}"] = _close(holder.layers[j].router.weight.grad, standard[j].router.weight.grad)
    return {"ok": max(diffs.values()) < 1e-4, "max_relative_difference": diffs}


def check_host_syncs(device) -> dict:
    if device.type != "cuda":
        return {"ok": True, "ran": False, "reason": "host-device synchronisation exists only on an accelerator"}
    import torch
    import torch.nn.functional as F

    from samoe_dist.samoe.expert_ffn import materialized_expert_ffn

    gen = torch.Generator().manual_seed(0)
    counts, h, f, P = (300, 0, 200, 524), 256, 512, 8
    x = torch.randn(sum(counts), h, generator=gen).to(device).requires_grad_()
    probs = torch.rand(sum(counts), generator=gen).to(device).requires_grad_()
    A = torch.softmax(torch.randn(len(counts), P, generator=gen), -1).to(device).requires_grad_()
    w1 = (torch.randn(P, h, f, generator=gen) * 0.05).to(device).requires_grad_()
    w2 = (torch.randn(P, f, h, generator=gen) * 0.05).to(device).requires_grad_()
    materialized_expert_ffn(x, probs, counts, A, w1, w2, None, F.gelu).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            materialized_expert_ffn(x, probs, counts, A, w1, w2, None, F.gelu).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"ok": len(syncs) == 0, "ran": True, "syncs": len(syncs), "messages": syncs[:10]}


def run_bench(device, out_dir: str) -> dict:
    out = os.path.join(out_dir, "bench.jsonl")
    cmd = [sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--systems", "dense,moe,gmoe,samoe",
           "--layouts", "1x1", "--dtypes", "bf16" if device.type == "cuda" else "fp32", "--no-malloc-compare",
           "--output", out, "--markdown", os.path.join(out_dir, "bench.md")]
    if device.type != "cuda":
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        return {"ok": False, "stderr": proc.stderr[-3000:]}
    records = [json.loads(line) for line in open(out)]
    results = {r["name"]: {"tokens_per_s": r["tokens_per_s"]["median"], "mfu": r["mfu"]["median"],
                           "peak_step_alloc_bytes": r["memory"].get("peak_step_alloc_bytes")}
               for r in records if r["type"] == "result"}
    ratios = {f"{r['numerator']}/{r['denominator']}": r["tokens_per_s_ratio"]["median"]
              for r in records if r["type"] in ("ratio", "policy_ratio")}
    return {"ok": True, "results": results, "ratios": ratios, "report": "bench.md"}


def run_train(device, out_dir: str, data: str, tokenizer: str) -> dict:
    ds = os.path.join(out_dir, "ds.json")
    cfg = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": device.type == "cuda",
                                 "reduce_scatter": True},
           "optimizer": {"type": "AdamW", "params": {}}}
    if device.type == "cuda":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    with open(ds, "w") as f:
        json.dump(cfg, f)
    common = ["--ds_config", ds, "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "64", "--data-path", data, "--tokenizer-model", tokenizer,
              "--data-cache-path", out_dir, "--micro-batch-size", "2", "--global-batch-size", "4",
              "--num-experts", "4", "--samoe-pool-size", "3", "--recompute-granularity", "full",
              "--train-iters", "6", "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
              "--hidden-dropout", "0.1", "--log-interval", "1"]
    if device.type == "cuda":
        common.append("--bf16")
    from samoe_dist import ports

    port = ports.free_port()  # the launcher's own rendezvous port, not its default 29500
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1",
                "--master_port", str(port), os.path.join(REPO, "pretrain_samoe.py")]

    def launch(name, *extra):
        metrics = os.path.join(out_dir, f"{name}.jsonl")
        proc = subprocess.run([*launcher, *common, "--metrics-file", metrics, *extra], capture_output=True, text=True,
                              cwd=REPO, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        with open(metrics) as f:
            return [r for r in map(json.loads, f) if r.get("type") == "train"]

    ckpt = os.path.join(out_dir, "ckpt")
    full = launch("full")
    first = launch("first", "--save", ckpt, "--save-interval", "3", "--exit-interval", "3")
    second = launch("second", "--load", ckpt)
    keys = ("iteration", "lm_loss", "grad_norm")
    want = [tuple(r[k] for k in keys) for r in full]
    got = [tuple(r[k] for k in keys) for r in first + second]
    return {"ok": got == want, "uninterrupted": want, "resumed": got}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="results JSON file")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--data-path", default=os.path.join(REPO, "data", "shakespeare_text_document"))
    p.add_argument("--tokenizer-model", default=os.path.join(REPO, "data", "spm.model"))
    a = p.parse_args(argv)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port, not a guessed one: other jobs may hold 29500 and up
        from samoe_dist import ports

        os.environ["MASTER_PORT"] = str(ports.free_port())
    import torch

    from samoe_dist import cpu_compat

    cpu_compat.apply()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(0)
    from samoe_dist.parallel import init_distributed

    init_distributed(1)
    cpu_compat.seed_model_parallel(1)
    skip = {s for s in a.skip.split(",") if s}
    results = {"device": str(device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "sections": {}}
    work = tempfile.mkdtemp(prefix="gpu_check_")
    sections = [("grouped_gemm", lambda: check_grouped_gemm(device)), ("expert_ffn", lambda: check_expert_ffn(device)),
                ("one_hot_pool", lambda: check_one_hot_pool(device)), ("host_syncs", lambda: check_host_syncs(device)),
                ("bench", lambda: run_bench(device, work)),
                ("train", lambda: run_train(device, work, a.data_path, a.tokenizer_model))]
    for name, fn in sections:
        if name in skip:
            continue
        t0 = time.time()
        try:
            res = fn()
        except Exception:  # recorded, and the other sections still run
            res = {"ok": False, "error": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.time() - t0, 1)
        results["sections"][name] = res
        print(f"[gpu_check] {name}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']} s)", flush=True)
        with open(a.output, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["ok"] for r in results["sections"].values())
    print(f"[gpu_check] {'all ok' if ok else 'FAILED'}: {a.output}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
