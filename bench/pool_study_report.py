"""Table, verdict and plots of bench/pool_study.py, from its results file alone (``--report-only``)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import param_efficiency as pe
import plot_metrics

FAMILIES = ("small-moe", "shared", "samoe")  # the runs that hold P experts' parameters


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration: losses per seed (held-out split and second corpus), their mean
    and spread (max - min), parameters, and the combinations' final movement."""
    by_name = pe.by_configuration(results)
    moe = by_name.get("moe")
    moe_expert = moe[0]["params"]["expert"] if moe else None
    rows = []
    for name, runs in by_name.items():
        losses = [r["final_valid_loss"] for r in runs]
        second = [r["second_corpus"]["loss"] for r in runs]
        p = runs[0]["params"]
        expert = p["expert"] + p.get("combination", 0)
        moved = [r["movement"][-1] for r in runs if r.get("movement")]
        rows.append({
            "name": name, "kind": runs[0]["kind"], "pool": runs[0]["pool"], "variant": runs[0].get("variant"),
            "seeds": [r["seed"] for r in runs], "losses": losses, "mean": statistics.fmean(losses),
            "spread": max(losses) - min(losses), "second": second, "second_mean": statistics.fmean(second),
            "total": p["total"], "expert": expert, "active": p["active_per_token"],
            "reduction": moe_expert / expert if moe_expert and expert else None,
            "peak_mass": statistics.fmean(m["peak_mass"] for m in moved) if moved else None,
            "entropy": statistics.fmean(m["entropy"] for m in moved) if moved else None,
            "wall_s": sum(r["wall_s"] for r in runs)})
    return rows


def _row(rows, name):
    return next((r for r in rows if r["name"] == name), None)


def _versus(a: dict, b: dict) -> str:
    """'a - b' in nats, and whether the gap exceeds the seed spread of either."""
    d = a["mean"] - b["mean"]
    noise = max(a["spread"], b["spread"])
    verdict = "within the seed spread" if abs(d) <= noise else ("better" if d < 0 else "worse")
    return f"{d:+.4f} ({verdict}; spread {noise:.4f})"


def verdict(rows: list[dict]) -> list[str]:
    moe, dense = _row(rows, "moe"), _row(rows, "dense")
    if moe is None or dense is None:
        return ["The dense and standard-MoE runs are not in yet: no verdict."]
    gain, noise = dense["mean"] - moe["mean"], max(moe["spread"], dense["spread"])
    out = [f"**Regime check.** Standard MoE {moe['mean']:.4f} against dense {dense['mean']:.4f}: "
           f"{gain:+.4f} nats for the MoE, against seed spreads of {moe['spread']:.4f} / {dense['spread']:.4f}: "
           + ("the MoE clearly beats the dense model, so the regime can test the claim."
              if gain > 2 * noise else
              "the MoE does NOT clearly beat the dense model of the same active compute (the gain is not "
              "above twice the seed spread), so reaching the MoE's loss is a weak bar here; the comparisons at "
              "equal parameters below are what this regime can answer.")]
    pools = sorted({r["pool"] for r in rows if r["pool"] is not None})
    out.append("")
    out.append("**Equal expert parameters** (each P against the standard MoE, and SaMoE against the other two "
               "users of P experts' parameters):")
    for P in pools:
        samoe, small, shared = _row(rows, f"samoe-{P}"), _row(rows, f"small-moe-{P}"), _row(rows, f"shared-{P}")
        parts = [f"- P={P} ({samoe['reduction']:.1f}x fewer expert parameters than the MoE)" if samoe else f"- P={P}"]
        for label, r in (("SaMoE", samoe), ("smaller MoE", small), ("shared routing", shared)):
            if r:
                parts.append(f"{label} {r['mean']:.4f} (vs MoE {_versus(r, moe)})")
        if samoe and small:
            parts.append(f"SaMoE vs smaller MoE {_versus(samoe, small)}")
        if samoe and shared:
            parts.append(f"SaMoE vs shared routing {_versus(samoe, shared)}")
        out.append("; ".join(parts) + ".")
    out.append("")
    out.append("**Reaching the MoE's loss within the seed spread** (mean no more than the larger of the two "
               "spreads above the MoE's), largest reduction per family:")
    for fam, label in (("samoe", "SaMoE (default form)"), ("samoe-", "SaMoE, any form tried (one-seed sweep runs left out)"),
                       ("shared", "shared routing"), ("small-moe", "smaller MoE")):
        if fam == "samoe-":  # every SaMoE variant run with more than one seed
            family = [r for r in rows if r["kind"] == "samoe" and len(r["seeds"]) > 1]
        else:
            family = [r for r in rows if r["name"] == f"{fam}-{r['pool']}"]
        reach = [r for r in family if r["mean"] - moe["mean"] <= max(r["spread"], moe["spread"])]
        best = max(reach, key=lambda r: r["reduction"]) if reach else None
        out.append(f"- {label}: " + (f"{best['reduction']:.1f}x ({best['name']})" if best else
                                     "at no reduction measured"))
    variants = [r for r in rows if r["variant"]]
    if variants:
        out.append("")
        out.append("**Variants of the combination** (against the default SaMoE of the same P, same seeds where both ran):")
        for r in variants:
            base = _row(rows, f"samoe-{r['pool']}")
            same = [s for s in r["seeds"] if base and s in base["seeds"]]
            d = statistics.fmean(r["losses"][r["seeds"].index(s)] - base["losses"][base["seeds"].index(s)] for s in same) if same else None
            moved = f"; rows keep {r['peak_mass']:.3f} of their weight on the initial peak" if r["peak_mass"] is not None else ""
            out.append(f"- {r['name']} ({r['variant']}, seeds {r['seeds']}): {r['mean']:.4f}"
                       + (f", {d:+.4f} vs default SaMoE on the same seeds" if d is not None else "") + moved + ".")
    return out


def flow_stats(results: list[dict], name: str):
    """(median per-expert gradient norm, median per-expert tokens per log interval) of a run, each
    averaged over the second half of training and over its seeds; None if the run is not in."""
    runs = [r for r in results if r["name"] == name and r.get("flow")]
    if not runs:
        return None
    def late(r, key):
        half = r["flow"][-1]["iteration"] / 2
        return statistics.fmean(f[key][2] for f in r["flow"] if f["iteration"] > half)
    return (statistics.fmean(late(r, "grad_norm") for r in runs), statistics.fmean(late(r, "tokens") for r in runs))


def flow_verdict(results: list[dict], layers: int) -> list[str]:
    """What the per-expert figures say: tokens and gradient of the MoE's experts against the pools'.

    A pool expert gathers the gradient of every layer that uses it. If the layers' contributions
    pointed the same way its norm would grow like L (layers) times one layer's; if they were
    orthogonal, like sqrt(L). The smaller MoE's experts see as many tokens as a pool expert of the
    same P but from one layer only: the ratio of the two medians measures the layers' agreement.
    """
    moe = flow_stats(results, "moe")
    if moe is None:
        return []
    out = ["", "**Gradient flow** (median over experts, averaged over the second half of training and the seeds):",
           f"- standard MoE: {moe[1]:.0f} tokens per expert per log interval, gradient norm {moe[0]:.2e}."]
    pools = sorted({r["pool"] for r in results if r["pool"]})
    for P in pools:
        small, shared, samoe = (flow_stats(results, f"{fam}-{P}") for fam in FAMILIES)
        if not (small and shared):
            continue
        line = (f"- P={P}: a pool expert serves {shared[1] / moe[1]:.1f}x the tokens of an MoE expert and its "
                f"gradient is {shared[0] / moe[0]:.1f}x as large (shared routing"
                + (f"; SaMoE {samoe[0] / moe[0]:.1f}x" if samoe else "") + "). A smaller-MoE expert with as many "
                f"tokens ({small[1]:.0f}) from one layer has {small[0] / moe[0]:.1f}x: the pool's gradient is "
                f"{shared[0] / small[0]:.2f} of it (1 if the {layers} layers' gradients agreed, "
                f"1/sqrt({layers}) = {layers ** -0.5:.2f} if they were orthogonal).")
        out.append(line)
    out.append("- Caveat: the gradient also scales with the routing prob that gates the expert (Switch-style "
               "top-1), and a shared-routing router spreads its softmax over P experts where the smaller MoE's "
               "spreads it over P/L; the ratio above mixes that with the layers' agreement.")
    return out


def write_markdown(a, rows: list[dict], results: list[dict], path: str, figures: dict) -> None:
    lines = ["# Pool study: SaMoE, a smaller MoE and shared routing at equal expert parameters", "",
             f"Generated by `bench/pool_study.py` ({len(results)} runs, "
             f"{sum(r['wall_s'] for r in results) / 60:.0f} minutes of one-thread training in all).", "",
             f"Shape: L={a.num_layers}, h={a.hidden_size}, every layer MoE with N={a.num_experts} experts of "
             f"f={a.ffn_hidden_size}, top-{a.topk}; dense FFN {a.topk * a.ffn_hidden_size}; seq {a.seq_length}, batch "
             f"{a.batch_size}, {a.train_iters} steps = {a.train_iters * a.batch_size * a.seq_length / 1e6:.2f} M tokens; "
             f"lr {a.lr} cosine to {a.min_lr}, warmup {a.warmup}. Held-out: {a.eval_iters} batches of the training "
             f"corpus's validation split; second corpus: the first {a.second_corpus_docs} documents of "
             f"`{os.path.relpath(a.second_corpus, pe.REPO)}` (no run trains on it), scored by `tools/eval_ppl.py`.", "",
             "| run | kind | P | expert params | fewer than MoE | held-out loss per seed | mean | spread | "
             "second corpus (mean) | peak mass at end | entropy at end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red = f"{r['reduction']:.1f}x" if r["reduction"] and r["name"] != "moe" else "-"
        pm = f"{r['peak_mass']:.3f}" if r["peak_mass"] is not None else "-"
        en = f"{r['entropy']:.3f}" if r["entropy"] is not None else "-"
        lines.append(f"| {r['name']} | {r['kind']}{' (' + r['variant'] + ')' if r['variant'] else ''} | "
                     f"{r['pool'] if r['pool'] else '-'} | {r['expert'] / 1e6:.3f} M | {red} | "
                     + ", ".join(f"{x:.4f}" for x in r["losses"]) + f" | {r['mean']:.4f} | {r['spread']:.4f} | "
                     f"{r['second_mean']:.4f} | {pm} | {en} |")
    lines += ["", "Expert parameters: the standard MoE's experts; a pool's experts plus SaMoE's combination "
              "logits. Peak mass: the mean share of each combination row on the pool expert it started on "
              "(1: unmoved); entropy: mean row entropy in nats.", "", *verdict(rows),
              *flow_verdict(results, a.num_layers), ""]
    pe.write_report(path, lines, figures)


def plot(rows: list[dict], results: list[dict], directory: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    Path(directory).mkdir(parents=True, exist_ok=True)
    figures = {}
    colors = {"moe": "black", "small-moe": "tab:blue", "shared": "tab:green", "samoe": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, skey, title in ((axes[0], "mean", "losses", "held-out split"),
                                 (axes[1], "second_mean", "second", "second corpus (never trained on)")):
        dense = _row(rows, "dense")
        if dense:
            ax.axhline(dense[key], color="gray", ls=":", label="dense (same active compute)")
        for fam in FAMILIES:
            series = sorted((r for r in rows if r["name"] == f"{fam}-{r['pool']}"), key=lambda r: r["expert"])
            if series:
                ax.plot([r["expert"] / 1e6 for r in series], [r[key] for r in series], "o-", color=colors[fam], label=fam)
                for r in series:
                    ax.plot([r["expert"] / 1e6] * len(r[skey]), r[skey], ".", color=colors[fam], alpha=0.4)
        for r in rows:
            if r["variant"]:
                ax.plot([r["expert"] / 1e6], [r[key]], "x", label=r["name"], alpha=0.8)
        moe = _row(rows, "moe")
        if moe:
            ax.plot([moe["expert"] / 1e6], [moe[key]], "D", color=colors["moe"], label="standard MoE")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({float(f"{r['expert'] / 1e6:.2g}") for r in rows if r["kind"] == "moe"}))
        ax.set_xlabel("expert parameters (M)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final loss (mean over seeds; dots: seeds)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    figures["loss against expert parameters"] = os.path.join(directory, "pool_study_params.png")
    fig.savefig(figures["loss against expert parameters"], dpi=110)
    plt.close(fig)

    shown = [n for n in ("moe", "small-moe-32", "shared-32", "samoe-32", "shared-64", "samoe-16") if _row(rows, n)]
    seed = min(r["seed"] for r in results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in shown:
        rec = next((r for r in results if r["name"] == name and r["seed"] == seed and r.get("flow")), None)
        if rec is None:
            continue
        its = [f["iteration"] for f in rec["flow"]]
        for ax, key in zip(axes, ("grad_norm", "tokens")):
            plot_metrics.plot_flow_bands(ax, its, [f[key] for f in rec["flow"]], name)
    axes[0].set_ylabel("per-expert gradient norm (median, 10-90% band)")
    axes[1].set_ylabel("tokens per expert per 50 steps (median, 10-90% band)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gradient flow, seed {seed}: the standard MoE's experts against the pools' experts", fontsize=10)
    fig.tight_layout()
    figures["gradient flow"] = os.path.join(directory, "pool_study_gradient_flow.png")
    fig.savefig(figures["gradient flow"], dpi=110)
    plt.close(fig)
    return figures


def report(a) -> None:
    results = pe.load_results(a.output)
    if not results:
        raise SystemExit(f"error: no results in {a.output}; run bench/pool_study.py without --report-only first")
    rows = summarise(results)
    figures = plot(rows, results, a.figures) if a.figures else {}
    write_markdown(a, rows, results, a.markdown, figures)
    print("\n".join(verdict(rows) + flow_verdict(results, a.num_layers)))
    print(f"wrote {a.markdown}" + (f" and {', '.join(figures.values())}" if figures else ""))
