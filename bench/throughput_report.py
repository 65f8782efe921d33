"""The Markdown report of bench/throughput.py, from its JSON records (also of an earlier run)."""

from __future__ import annotations

import json
import types
from typing import Optional

from step_breakdown import CATEGORIES

EXPERT_LABELS = ("router", "permute", "all-to-all", "experts", "expert GEMM", "materialize", "pool/A grad",
                 "combination")


def _best_ratio(group: dict, ratio: dict) -> float:
    res = group["results"]
    return res[ratio["denominator"]]["step_s"]["min"] / res[ratio["numerator"]]["step_s"]["min"]


def _ci(t: dict) -> str:
    """The ratio's 95% confidence interval of the median, or why there is none (records written
    before it existed; fewer than 6 rounds)."""
    if "median_ci95" not in t:
        return "not recorded"
    ci = t["median_ci95"]
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"- ({t['n']} rounds)"


def _layout(r: dict) -> str:
    """EPxEDP of a record (records of runs before layouts had only the EP size, world = EP)."""
    return r.get("layout", f"{r['ep']}x1")


def _pct(fraction) -> str:
    """A breakdown share in %; "-" for a category the run did not record (records older than it)."""
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.0f}"


def markdown(config: dict, groups: list[dict], run: Optional[tuple] = None) -> str:
    """The Markdown report of one run (its config record and per-(EP, dtype) groups); ``run``
    (k, n): the run's place among the n runs of one records file, added to the title."""
    a = types.SimpleNamespace(**config)
    title = "# Training-step throughput: dense, megatron MoE, same-kernel MoE, DeepSpeed MoE, SaMoE"
    lines = [title + (f" (run {run[0]} of {run[1]})" if run else ""), "",
             f"Shape: L={a.num_layers} h={a.hidden_size} heads={a.num_attention_heads} f={a.ffn_hidden_size} "
             f"N={a.num_experts} k={a.moe_router_topk} P={a.samoe_pool_size} (SaMoE) seq={a.seq_length} "
             f"micro-batch={a.micro_batch_size} per rank, vocab={a.vocab_size}; dense f={a.moe_router_topk * a.ffn_hidden_size}; "
             f"DeepSpeed MoE capacity factor {a.capacity_factor}; ds_config {a.ds_config}.",
             f"Machine: {config.get('cpu', {}).get('model', 'CPU not recorded')} "
             f"({', '.join(config.get('cpu', {}).get('bf16_isa', [])) or 'no bf16/AVX ISA recorded'}), "
             f"{config['cores']} cores, load average {config['loadavg_start']} at start, "
             f"{config['loadavg_end']} at end; {a.rounds} rounds x {a.steps_per_round} steps after {a.warmup} "
             f"warm-up steps, systems interleaved round-robin. Layout EPxEDP is EP x EDP gloo processes, "
             f"cores / processes threads each (at least 1); the micro-batch is per rank, so the tokens per step "
             f"grow with the processes.", "",
             "| layout | dtype | system | tokens/s (median) | step ms median [min, max] | tokens/s vs megatron MoE "
             "(paired, median [min, max]) | MFU | peak step alloc MiB (profiler) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        ratios = {r["numerator"]: r for r in g["ratios"] if r["denominator"] == "moe"}
        for name, r in g["results"].items():
            if "/" in name:
                continue
            st, rat = r["step_s"], ratios.get(name)
            rtxt = "1 (peer)" if name == "moe" else (
                f"{rat['tokens_per_s_ratio']['median']:.3f} [{rat['tokens_per_s_ratio']['min']:.3f}, "
                f"{rat['tokens_per_s_ratio']['max']:.3f}]" if rat else "-")
            mem = r["memory"]
            lines.append(f"| {_layout(r)} | {r['dtype']} | {name} | {r['tokens_per_s']['median']:.0f} | "
                         f"{1e3 * st['median']:.0f} [{1e3 * st['min']:.0f}, {1e3 * st['max']:.0f}] | {rtxt} | "
                         f"{100 * r['mfu']['median']:.1f}% | {_mib(mem.get('peak_step_alloc_bytes'))} | "
                         f"{_mib(mem.get('rss_peak_bytes'))} |")
    lines += ["", "## SaMoE against the peers of its token policy (per-round paired tokens/s ratios)", "",
              "Dropless: megatron MoE (moe), the same-kernel MoE (gmoe). Capacity factor "
              f"{a.capacity_factor}: DeepSpeed MoE (dsmoe), the same-kernel MoE with megatron's capacity (gmoe-cf). "
              "**bold**: the fastest peer of that policy in the layout.", "",
              "| layout | dtype | policy | SaMoE | over | tokens/s ratio median [min, max] | 95% CI of the median "
              "| ratio of the best steps | peak step alloc ratio | peak total (resting + step) ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        for r in g.get("policy_ratios", []):
            t = r["tokens_per_s_ratio"]
            peer = f"**{r['denominator']}**" if r["fastest_peer"] else r["denominator"]
            alloc = "-" if r.get("peak_step_alloc_ratio") is None else f"{r['peak_step_alloc_ratio']:.2f}"
            total = "-" if r.get("peak_total_ratio") is None else f"{r['peak_total_ratio']:.2f}"
            lines.append(f"| {_layout(r)} | {r['dtype']} | {r['policy']} | {r['numerator']} | {peer} | "
                         f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}] | {_ci(t)} | {r['best_step_ratio']:.3f} "
                         f"| {alloc} | {total} |")
    lines += ["", "## Headline: SaMoE / megatron MoE tokens/s (per-round paired ratios)", "",
              "| layout | dtype | glibc malloc env | median | min | max | ratio of the best steps |",
              "|---|---|---|---|---|---|---|"]
    for g in groups:
        for r in g["ratios"]:
            pair = (r["numerator"], r["denominator"])
            if pair in (("samoe", "moe"), ("samoe/no-malloc-env", "moe/no-malloc-env")):
                t = r["tokens_per_s_ratio"]
                env = "set" if pair[0] == "samoe" else "not set"
                lines.append(f"| {_layout(r)} | {r['dtype']} | {env} | {t['median']:.3f} | {t['min']:.3f} | "
                             f"{t['max']:.3f} | {_best_ratio(g, r):.3f} |")
    lines += ["", "Ratio of the best steps: fastest step of megatron MoE / fastest step of SaMoE over the "
              "whole run; other processes on the machine only ever add time, so it is the estimate least "
              "affected by their load."]
    for g in groups:
        for r in g["ratios"]:
            if r["denominator"].endswith("no-malloc-env") and "/" not in r["numerator"]:
                t = r["tokens_per_s_ratio"]
                lines.append(f"\n{r['numerator']} with / without the malloc env ({_layout(r)} {r['dtype']}): "
                             f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}], best steps {_best_ratio(g, r):.3f}")
    lines += ["", "## Matmul peak (MFU denominator; all cores, best of "
              f"{a.matmul_reps} {a.matmul_size}^3 matmuls per round)", "", "| layout | dtype | GFLOP/s median [min, max] |",
              "|---|---|---|"]
    for g in groups:
        p, any_r = g["peak"], next(iter(g["results"].values()))
        lines.append(f"| {_layout(any_r)} | {any_r['dtype']} | {p['median']:.1f} [{p['min']:.1f}, {p['max']:.1f}] |")
    phases = ("forward", "backward", "grad_reduce", "optimizer", "other")
    if any("skew" in r.get("phase_ms", {}) for g in groups for r in g["results"].values()):
        phases = phases[:3] + ("skew",) + phases[3:]  # --phase-barrier: the wait before the reduction
    lines += ["", "## Step phases by wall clock (timed steps, no profiler; median ms, mean over ranks)", "",
              "| layout | dtype | system | step | " + " | ".join(phases) + " |", "|---|---|---|---|" + "---|" * len(phases)]
    for g in groups:
        for name, r in g["results"].items():
            if r.get("phase_ms") and "/" not in name:
                lines.append(f"| {_layout(r)} | {r['dtype']} | {name} | {1e3 * r['step_s']['median']:.0f} | " +
                             " | ".join(f"{r['phase_ms'].get(p, 0):.0f}" for p in phases) + " |")
    if any(r.get("phase_minor_faults") for g in groups for r in g["results"].values()):
        lines += ["", "Minor page faults per step by phase (median over steps, mean over ranks; thousands), and the "
                  "largest rank's RSS growth per step over the timed rounds:", "",
                  "| layout | dtype | system | " + " | ".join(phases) + " | RSS growth MiB/step |",
                  "|---|---|---|" + "---|" * (len(phases) + 1)]
        for g in groups:
            for name, r in g["results"].items():
                if r.get("phase_minor_faults") and "/" not in name:
                    growth = r.get("memory", {}).get("rss_growth_bytes_per_step")
                    lines.append(f"| {_layout(r)} | {r['dtype']} | {name} | " +
                                 " | ".join(f"{r['phase_minor_faults'].get(p, 0) / 1e3:.1f}" for p in phases) +
                                 (f" | {growth / 2 ** 20:.1f} |" if growth is not None else " | - |"))
    cats = list(CATEGORIES) + ["other"]
    lines += ["", "## Step breakdown (torch.profiler, % of one profiled step, rank 0; ranges in "
              "bench/step_breakdown.py)", "", "| layout | dtype | system | " + " | ".join(cats) + " |",
              "|---|---|---|" + "---|" * len(cats)]
    for g in groups:
        for name, r in g["results"].items():
            if "breakdown" in r and "/" not in name:
                lines.append(f"| {_layout(r)} | {r['dtype']} | {name} | " +
                             " | ".join(_pct(r["breakdown"].get(c)) for c in cats) + " |")
    lines += ["", "## Expert-path time per step, ms (median of the profiled steps, rank 0; fwd / bwd)", ""]
    for g in groups:
        rs = {n: r for n, r in g["results"].items() if "/" not in n and "breakdown_ms" in r and n != "dense"}
        if not rs:
            continue
        any_r = next(iter(rs.values()))
        lines += [f"{_layout(any_r)} {any_r['dtype']}:", "", "| label | " + " | ".join(rs) + " |",
                  "|---|" + "---|" * len(rs)]
        for label in EXPERT_LABELS:
            cells = [f"{r['breakdown_ms'].get(label + ' (fwd)', 0):.1f} / {r['breakdown_ms'].get(label + ' (bwd)', 0):.1f}"
                     for r in rs.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("| profiled step | " + " | ".join(f"{r['profiled_step_ms']:.0f}" for r in rs.values()) + " |")
        lines.append("")
    samoe = [r for g in groups for n, r in g["results"].items() if n.startswith("samoe") and "/" not in n]
    if samoe:
        lines += ["", "SaMoE materialisation FLOPs / model FLOPs per step: " + ", ".join(
            f"{r['name']} {_layout(r)} {r['dtype']}: {100 * r['materialise_flops_fraction']:.1f}%" for r in samoe) +
            f"; torch grouped GEMM used: {samoe[0].get('grouped_mm')}."]
    return "\n".join(lines) + "\n"


def load_runs(path: str) -> list[tuple[dict, list[dict]]]:
    """[(config, groups)] of every run in a JSON-lines file, for :func:`markdown`. A file may hold
    several runs appended one after another; each begins with its config record, and its records
    (results, ratios, its summary) stay with it, so no run's rows replace another's."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {number} is not a JSON record ({exc}): a run cut short? "
                                     "Remove the line or rerun") from None
                if not isinstance(record, dict) or "type" not in record:
                    raise ValueError(f"{path} line {number} has no record type: not a records file of "
                                     "bench/throughput.py (its --output)")
                records.append(record)
    if not records or records[0]["type"] != "config":
        raise ValueError(f"{path}: no throughput run (its first record must be a run's config record)")
    runs: list[tuple[dict, dict]] = []
    for r in records:
        if r["type"] == "config":
            config = dict(r)
            config.setdefault("matmul_reps", 3)
            runs.append((config, {}))
            continue
        config, groups = runs[-1]
        if r["type"] == "summary":
            config.setdefault("loadavg_end", r.get("loadavg_end", "?"))
        elif r["type"] in ("peak", "result", "ratio", "policy_ratio"):
            g = groups.setdefault((_layout(r), r["dtype"]),
                                  {"results": {}, "ratios": [], "policy_ratios": [], "peak": None})
            if r["type"] == "peak":
                g["peak"] = r["gflops"]
            elif r["type"] == "result":
                g["results"][r["name"]] = r
            elif r["type"] == "ratio":
                g["ratios"].append(r)
            else:
                g["policy_ratios"].append(r)
    for config, _ in runs:
        config.setdefault("loadavg_end", "?")
    return [(config, list(groups.values())) for config, groups in runs]


def report(path: str) -> str:
    """The Markdown of every run in ``path``: one run's report as :func:`markdown` writes it; with
    several runs, each run's report in file order, titled with its place."""
    runs = load_runs(path)
    if len(runs) == 1:
        return markdown(*runs[0])
    return "\n".join(markdown(config, groups, run=(k, len(runs))) for k, (config, groups) in enumerate(runs, 1))
