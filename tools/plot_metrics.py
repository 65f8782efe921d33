#!/usr/bin/env python
"""Plot the metrics files (--metrics-file) of several runs side by side.

    python tools/plot_metrics.py runs/moe/metrics.jsonl samoe=runs/samoe/metrics.jsonl --output plots/

Writes PNGs to --output:
  loss_vs_tokens.png      training lm loss (smoothed) and validation loss against tokens seen
  loss_vs_params.png      final validation loss against total and expert parameters (one point per run)
  combination_entropy.png mean row entropy of the SaMoE combinations A_l over training (SaMoE runs)
  gradient_flow.png       per-expert gradient norm and tokens received over training: median and
                          10-90% band over the experts (a standard MoE's L*N experts, a pool's P)
A run is LABEL=PATH, or PATH (labelled by its directory name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_run(path: Path) -> dict:
    """Records of one metrics file grouped by type; a clear error for a missing or broken file."""
    if not path.is_file():
        raise SystemExit(f"plot_metrics.py: error: {path} does not exist (a --metrics-file of pretrain_samoe.py)")
    run: dict = {"train": [], "valid": [], "config": None, "final": None}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"plot_metrics.py: error: {path}:{lineno} is not JSON: is it a metrics file?") from None
            kind = rec.get("type")
            if kind in ("train", "valid"):
                run[kind].append(rec)
            elif kind in ("config", "final"):
                run[kind] = rec
    if run["config"] is None or not run["train"]:
        raise SystemExit(f"plot_metrics.py: error: {path} has no config/train records: is it a metrics file?")
    return run


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _tokens_per_sample(run: dict) -> int:
    return int(run["config"]["config"]["model"]["seq_length"])


def plot_loss_vs_tokens(runs: dict[str, dict], out: Path, smooth: int) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, run in runs.items():
        tps = _tokens_per_sample(run)
        x = [r["consumed_samples"] * tps for r in run["train"]]
        line, = ax.plot(x, _smooth([r["lm_loss"] for r in run["train"]], smooth), alpha=0.6, label=f"{label} train")
        valid = run["valid"]
        if valid:
            vx = [_valid_tokens(run, r) for r in valid]
            ax.plot(vx, [r["lm_loss"] for r in valid], "o-", color=line.get_color(), label=f"{label} valid")
    ax.set_xlabel("tokens")
    ax.set_ylabel("lm loss")
    ax.set_title("loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "loss_vs_tokens.png")


def _valid_tokens(run: dict, rec: dict) -> int:
    by_iter = {r["iteration"]: r["consumed_samples"] for r in run["train"]}
    return by_iter.get(rec["iteration"], 0) * _tokens_per_sample(run)


def plot_loss_vs_params(runs: dict[str, dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for label, run in runs.items():
        final = run["final"]
        if not final:
            continue
        params = final["params"]
        for ax, key in zip(axes, ("total", "expert")):
            ax.scatter([params[key]], [final["final_valid_loss"]])
            ax.annotate(label, (params[key], final["final_valid_loss"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    for ax, key in zip(axes, ("total", "expert")):
        ax.set_xscale("symlog")
        ax.set_xlabel(f"{key} parameters")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation loss")
    fig.suptitle("final validation loss vs parameters")
    return _save(fig, out / "loss_vs_params.png")


def plot_entropy(runs: dict[str, dict], out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for label, run in runs.items():
        recs = [r for r in run["train"] if "combination_entropy" in r]
        if recs:
            ax.plot([r["iteration"] for r in recs], [r["combination_entropy"] for r in recs], label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean row entropy of A_l (nats)")
    ax.set_title("how sharp the SaMoE combinations are")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "combination_entropy.png")


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def quantiles(values: list[float]) -> list[float]:
    """min, 10%, median, 90%, max of ``values`` (nearest rank)."""
    xs = sorted(values)
    return [xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] for q in QUANTILES]


def flow_of(rec: dict) -> tuple[list, list] | None:
    """(per-expert gradient norms, per-expert tokens) of one logged record: the pool's experts for a
    pool model (tokens: the A-weighted ones), the layers' experts for a standard MoE."""
    grads = rec.get("pool_grad_norm") or rec.get("expert_grad_norm")
    if not grads or "expert_tokens_received" not in rec:
        return None
    flat = lambda v: [x for row in v for x in row] if isinstance(v[0], list) else list(v)  # noqa: E731
    tokens = rec.get("pool_tokens") or rec["expert_tokens_received"]
    return flat(grads), flat(tokens)


def plot_flow_bands(ax, iterations: list, qs: list, label: str, color=None) -> None:
    """The median of per-expert values over training, with the 10-90% band shaded."""
    line, = ax.plot(iterations, [q[2] for q in qs], label=label, color=color)
    ax.fill_between(iterations, [q[1] for q in qs], [q[3] for q in qs], color=line.get_color(), alpha=0.2)


def plot_gradient_flow(runs: dict[str, dict], out: Path) -> Path | None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for label, run in runs.items():
        recs = [(r["iteration"], flow_of(r)) for r in run["train"]]
        recs = [(it, f) for it, f in recs if f is not None]
        if not recs:
            continue
        drawn = True
        its = [it for it, _ in recs]
        kind = "pool" if "pool_grad_norm" in run["train"][-1] else "experts"
        for ax, i in zip(axes, (0, 1)):
            plot_flow_bands(ax, its, [quantiles(f[i]) for _, f in recs], f"{label} ({kind})")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel("per-expert gradient norm")
    axes[1].set_ylabel("tokens per expert per log interval")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("gradient flow: median and 10-90% band over experts")
    return _save(fig, out / "gradient_flow.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=METRICS.jsonl or METRICS.jsonl")
    parser.add_argument("--output", required=True, help="directory for the PNG files")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of the training loss")
    args = parser.parse_args(argv)
    runs: dict[str, dict] = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        path_ = Path(path)
        runs[label or path_.parent.name or path_.stem] = read_run(path_)
    out = Path(args.output)
    os.makedirs(out, exist_ok=True)
    written = [plot_loss_vs_tokens(runs, out, args.smooth), plot_loss_vs_params(runs, out), plot_entropy(runs, out),
               plot_gradient_flow(runs, out)]
    for p in written:
        if p is not None:
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
