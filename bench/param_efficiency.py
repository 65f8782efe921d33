"""Parameter-efficiency study: validation loss of dense, standard MoE and SaMoE against parameters.

Every run is a real ``pretrain_samoe.py`` training run (DeepSpeed engine, ZeRO-1, fp32, one process)
on the built-in corpus made by ``scripts/setup.sh`` (Shakespeare, SentencePiece vocab 2000, the
Megatron-style ``969,30,1`` document split, so validation documents are never trained on).

Same active compute everywhere: L layers of width h, every layer MoE with N experts of FFN size f
and top-k routing; SaMoE builds each layer's N experts from one shared pool of P; the dense model's
FFN is k*f wide (the MoEs' FLOPs per token minus the router). Same tokens: within a seed every run
reads the same batches in the same order (the data order follows ``--seed``).

The runs (``--seeds`` each):
- ``dense``, ``moe`` (L*N experts), ``samoe-P`` for each pool size in ``--pools`` (peaked init);
- ablations at pool ``--ablation-pool``: the combination initialised uniform instead of peaked,
  and top-m sparse combinations (``--ablation-top-m``) instead of dense ones;
- with ``--peak-ablation BETA``, also the peaked init with logit offset BETA instead of 4 at the
  pools ``--peak-ablation-pools``; with ``--lr-mult-ablation MULT``, the combination logits at MULT
  times the learning rate at ``--lr-mult-ablation-pools`` (follow-ups, not in the default study).

Results: one JSON line per finished run in ``--output`` (config, parameter counts from the run's
own accounting, validation curve, final validation loss, wall time). A rerun skips runs already in
that file (``--force`` reruns them), so an interrupted study resumes. ``--markdown`` writes the
table and ``--figures`` the PNG plots; ``--report-only`` re-renders both from ``--output``.

    .venv/bin/python bench/param_efficiency.py                 # the study (about 50 min on 2 cores)
    .venv/bin/python bench/param_efficiency.py --report-only   # table and plots again
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "shakespeare_text_document"
TOKENIZER = REPO / "data" / "spm.model"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=512, help="f: expert FFN size (dense: k*f)")
    p.add_argument("--num-experts", type=int, default=8, help="N experts per MoE layer")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--train-iters", type=int, default=900)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=16, help="validation batches per evaluation")
    p.add_argument("--data-path", default=str(DATA), help="indexed dataset prefix or jsonl (default: built-in corpus)")
    p.add_argument("--tokenizer-model", default=str(TOKENIZER))
    p.add_argument("--pools", default="32,16,8,4", help="SaMoE pool sizes P")
    p.add_argument("--ablation-pool", type=int, default=8)
    p.add_argument("--ablation-top-m", type=int, default=2)
    p.add_argument("--peak-ablation", type=float, default=None, metavar="BETA",
                   help="also run peaked init with logit offset BETA (default 4) at --peak-ablation-pools")
    p.add_argument("--peak-ablation-pools", default="32,8")
    p.add_argument("--lr-mult-ablation", type=float, default=None, metavar="MULT",
                   help="also run the combination logits at MULT x the lr (--samoe-combination-lr-mult) "
                        "at --lr-mult-ablation-pools")
    p.add_argument("--lr-mult-ablation-pools", default="32,8,4")
    p.add_argument("--seeds", default="1234,1235")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at a time, one thread each (default: one per core)")
    p.add_argument("--only", help="comma-separated run names to run (default: all)")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "param_efficiency"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "param_efficiency.jsonl"))
    p.add_argument("--markdown", default=str(REPO / "bench" / "results" / "param_efficiency.md"))
    p.add_argument("--figures", default=str(REPO / "docs" / "figures"))
    p.add_argument("--force", action="store_true", help="rerun runs already in --output")
    p.add_argument("--report-only", action="store_true", help="only re-render --markdown and --figures")
    return p.parse_args(argv)


def study_runs(a) -> list[dict]:
    """Every configuration (name, kind, pool, ablation, extra flags), before seeds."""
    moe = ["--num-experts", str(a.num_experts), "--moe-router-topk", str(a.topk), "--moe-layer-freq", "1"]

    def samoe(pool: int, suffix: str = "", ablation=None, *flags: str) -> dict:
        return {"name": f"samoe-{pool}{suffix}", "kind": "samoe", "pool": pool, "ablation": ablation,
                "flags": moe + ["--samoe-pool-size", str(pool), *flags]}

    def pools(spec: str) -> list[int]:
        return [int(x) for x in spec.split(",")]

    runs = [{"name": "dense", "kind": "dense", "pool": None,
             "flags": ["--ffn-hidden-size", str(a.topk * a.ffn_hidden_size)]},
            {"name": "moe", "kind": "moe", "pool": None, "flags": moe}]
    runs += [samoe(pool) for pool in pools(a.pools)]
    m = a.ablation_top_m
    runs += [samoe(a.ablation_pool, "-uniform", "uniform init", "--samoe-init", "uniform"),
             samoe(a.ablation_pool, f"-top{m}", f"top-{m} combination", "--samoe-top-m", str(m))]
    if a.peak_ablation is not None:
        beta = f"{a.peak_ablation:g}"
        runs += [samoe(pool, f"-peak{beta}", f"peaked init, beta {beta}", "--samoe-init-peak", beta)
                 for pool in pools(a.peak_ablation_pools)]
    if a.lr_mult_ablation is not None:
        mult = f"{a.lr_mult_ablation:g}"
        runs += [samoe(pool, f"-clr{mult}", f"combination lr x{mult}", "--samoe-combination-lr-mult", mult)
                 for pool in pools(a.lr_mult_ablation_pools)]
    return runs


def common_flags(a) -> list[str]:
    return ["--ds_config", str(REPO / "examples" / "ds_config_cpu.json"),
            "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--num-attention-heads", str(a.num_attention_heads), "--ffn-hidden-size", str(a.ffn_hidden_size),
            "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.batch_size),
            "--global-batch-size", str(a.batch_size), "--train-iters", str(a.train_iters),
            "--lr", str(a.lr), "--min-lr", str(a.min_lr), "--lr-warmup-iters", str(a.warmup),
            "--log-interval", "50", "--eval-interval", str(a.eval_interval), "--eval-iters", str(a.eval_iters),
            "--data-path", a.data_path, "--tokenizer-model", a.tokenizer_model]


def run_one(a, run: dict, seed: int, extra_argv: tuple = ()) -> dict:
    """Train one configuration with one seed; return its result record (``extra_argv``: more flags
    for this run that are not part of its configuration, e.g. where to save)."""
    out = Path(a.run_dir) / f"{run['name']}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    # The later --ffn-hidden-size (the dense model's k*f) wins over the common one (argparse).
    argv = [sys.executable, str(REPO / "pretrain_samoe.py"), *common_flags(a), *run["flags"],
            "--seed", str(seed), "--metrics-file", str(metrics), "--data-cache-path", str(out / "index_cache"),
            *extra_argv]
    from samoe_dist import ports

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(ports.free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296")
    start = time.time()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    wall = time.time() - start
    if rc != 0:
        tail = (out / "log.txt").read_text().splitlines()[-20:]
        raise RuntimeError(f"run {run['name']} seed {seed} failed (exit {rc}); log {out / 'log.txt'}:\n"
                           + "\n".join(tail))
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    final = next(r for r in records if r["type"] == "final")
    tokens_per_step = a.batch_size * a.seq_length
    valid = [{"iteration": r["iteration"], "tokens": r["iteration"] * tokens_per_step, "loss": r["lm_loss"]}
             for r in records if r["type"] == "valid"]
    train = [r for r in records if r["type"] == "train"]
    return {"type": "run", "name": run["name"], "kind": run["kind"], "pool": run["pool"],
            "ablation": run.get("ablation"), "seed": seed, "flags": run["flags"],
            "params": final["params"], "final_valid_loss": final["final_valid_loss"],
            "final_train_loss": statistics.fmean(r["lm_loss"] for r in train[-5:]),
            "valid_curve": valid, "tokens": final["iteration"] * tokens_per_step,
            "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d")}


def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("type") == "run"]


# ---------------------------------------------------------------------------------------------
# report


def by_configuration(results: list[dict]) -> dict[str, list[dict]]:
    """Result records grouped by run name (in the order first seen), each group sorted by seed."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    return {name: sorted(runs, key=lambda r: r["seed"]) for name, runs in by_name.items()}


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration, in the study's order: seeds' losses, mean and spread."""
    by_name = by_configuration(results)
    moe = by_name.get("moe")
    moe_expert = moe[0]["params"]["expert"] if moe else None
    rows = []
    for name, runs in by_name.items():
        losses = [r["final_valid_loss"] for r in runs]
        p = runs[0]["params"]
        expert = p.get("pool", 0) + p.get("combination", 0) if runs[0]["kind"] == "samoe" else p.get("expert", 0)
        rows.append({"name": name, "kind": runs[0]["kind"], "pool": runs[0]["pool"],
                     "ablation": runs[0]["ablation"], "seeds": [r["seed"] for r in runs], "losses": losses,
                     "mean": statistics.fmean(losses), "spread": max(losses) - min(losses),
                     "total": p["total"], "expert": expert, "active": p["active_per_token"],
                     "expert_reduction": (moe_expert / expert) if (moe_expert and expert) else None,
                     "tokens": runs[0]["tokens"], "wall_s": sum(r["wall_s"] for r in runs)})
    return rows


def verdict(rows: list[dict]) -> str:
    moe = next((r for r in rows if r["name"] == "moe"), None)
    if moe is None:
        return "No standard-MoE run yet: no verdict."
    samoe = sorted((r for r in rows if r["kind"] == "samoe"), key=lambda r: (-r["expert_reduction"], r["name"]))
    lines = [f"Standard MoE: mean final validation loss {moe['mean']:.4f} (seed spread {moe['spread']:.4f})."]
    for r in samoe:
        d = r["mean"] - moe["mean"]
        what = f"SaMoE P={r['pool']}" + (f" ({r['ablation']})" if r["ablation"] else "")
        lines.append(f"- {what}: {r['expert_reduction']:.1f}x fewer expert parameters, mean loss {r['mean']:.4f} "
                     f"({d:+.4f} vs MoE; {'equal or lower' if d <= 0 else 'higher'}).")
    ok = [r for r in samoe if r["mean"] <= moe["mean"]]
    if ok:
        best = max(ok, key=lambda r: r["expert_reduction"])
        met = best["expert_reduction"] >= 5
        lines.append(f"Largest reduction at equal or lower loss: {best['expert_reduction']:.1f}x ({best['name']}); "
                     f"target >= 5x {'met' if met else 'missed'}.")
    else:
        lines.append("No SaMoE run reached the standard MoE's loss: target missed.")
    return "\n".join(lines)


def write_markdown(a, rows: list[dict], results: list[dict], path: str, figures: dict) -> None:
    cfg = results[0] if results else {}
    lines = ["# Parameter-efficiency study", "",
             f"Generated by `bench/param_efficiency.py` on {cfg.get('date', '?')} "
             f"({len(results)} runs, {sum(r['wall_s'] for r in results) / 60:.0f} minutes of one-thread training in all).", "",
             f"Shape: L={a.num_layers}, h={a.hidden_size}, heads={a.num_attention_heads}, every layer MoE with "
             f"N={a.num_experts} experts of f={a.ffn_hidden_size}, top-{a.topk}; dense FFN {a.topk * a.ffn_hidden_size}; "
             f"seq {a.seq_length}, batch {a.batch_size}, {a.train_iters} steps "
             f"= {a.train_iters * a.batch_size * a.seq_length / 1e6:.2f} M tokens; lr {a.lr} cosine to {a.min_lr}, "
             f"warmup {a.warmup}; validation: {a.eval_iters} batches "
             f"({a.eval_iters * a.batch_size * a.seq_length} tokens) of the held-out split every "
             f"{a.eval_interval} steps.", "",
             "| run | expert params | total params | expert params vs MoE | final valid loss per seed | mean | spread |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        red = f"{r['expert_reduction']:.1f}x fewer" if r["expert_reduction"] and r["kind"] != "moe" else "-"
        lines.append(f"| {r['name']} | {r['expert'] / 1e6:.3f} M | {r['total'] / 1e6:.3f} M | {red} | "
                     + ", ".join(f"{x:.4f}" for x in r["losses"]) + f" | {r['mean']:.4f} | {r['spread']:.4f} |")
    lines += ["", "Expert parameters: the standard MoE's L*N expert FFNs; SaMoE's pool plus its combination "
              "logits (L*N*P). Router parameters are in the total, not here.", "", verdict(rows), ""]
    write_report(path, lines, figures)


def write_report(path: str, lines: list[str], figures: dict) -> None:
    """The Markdown report: ``lines``, then the figures linked relative to the report."""
    lines = lines + [f"![{title}]({os.path.relpath(fig, os.path.dirname(path))})" for title, fig in figures.items()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], results: list[dict], directory: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    Path(directory).mkdir(parents=True, exist_ok=True)
    figures = {}
    # tab20's dark shades first (0, 2, .., 18), then the light ones
    colors = {row["name"]: plt.cm.tab20((2 * i) % 20 + (2 * i // 20) % 2) for i, row in enumerate(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    ablated_pools = {r["pool"] for r in rows if r["ablation"]}
    panels = ((axes[0], "dense, MoE and SaMoE pools", [r for r in rows if not r["ablation"]]),
              (axes[1], "ablations (with their baselines)",
               [r for r in rows if r["ablation"] or r["kind"] == "moe" or (r["kind"] == "samoe" and r["pool"] in ablated_pools)]))
    for ax, title, panel_rows in panels:
        for row in panel_rows:
            runs = [r for r in results if r["name"] == row["name"]]
            curves = [{p["iteration"]: p["loss"] for p in r["valid_curve"]} for r in runs]
            its = sorted(i for i in set().union(*curves) if all(i in c for c in curves) and i > 0)
            per_step = runs[0]["tokens"] / max(p["iteration"] for p in runs[0]["valid_curve"])
            tokens = [i * per_step / 1e6 for i in its]
            mean = [statistics.fmean(c[i] for c in curves) for i in its]
            style = "--" if row["ablation"] else "-"
            ax.plot(tokens, mean, style, label=row["name"], marker=".", color=colors[row["name"]])
            ax.fill_between(tokens, [min(c[i] for c in curves) for i in its], [max(c[i] for c in curves) for i in its],
                            color=colors[row["name"]], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 5.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (mean over seeds; band: min-max)")
    fig.tight_layout()
    figures["validation loss vs tokens"] = os.path.join(directory, "param_efficiency_curves.png")
    fig.savefig(figures["validation loss vs tokens"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "expert", "expert parameters (M)"), (axes[1], "total", "total parameters (M)")):
        for row in rows:
            if row["kind"] == "dense" and key == "expert":
                ax.axhline(row["mean"], color=colors[row["name"]], ls=":", label="dense (no experts)")
                continue
            marker = "x" if row["ablation"] else {"dense": "s", "moe": "D", "samoe": "o"}[row["kind"]]
            x = row[key] / 1e6
            ax.errorbar([x], [row["mean"]], yerr=[[row["mean"] - min(row["losses"])], [max(row["losses"]) - row["mean"]]],
                        fmt=marker, capsize=3, color=colors[row["name"]], label=row["name"])
        # one line through each series of SaMoE runs that differ only in the pool size
        for ablation in dict.fromkeys(r["ablation"] for r in rows if r["kind"] == "samoe"):
            series = sorted((r for r in rows if r["kind"] == "samoe" and r["ablation"] == ablation), key=lambda r: r[key])
            if len(series) > 1:
                ax.plot([r[key] / 1e6 for r in series], [r["mean"] for r in series], "--" if ablation else "-",
                        color="gray" if not ablation else colors[series[0]["name"]], alpha=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({float(f"{r[key] / 1e6:.2g}") for r in rows if r[key] > 0}))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figures["final validation loss vs parameters"] = os.path.join(directory, "param_efficiency_params.png")
    fig.savefig(figures["final validation loss vs parameters"], dpi=110)
    plt.close(fig)
    return figures


def report(a) -> None:
    results = load_results(a.output)
    if not results:
        raise SystemExit(f"error: no results in {a.output}; run bench/param_efficiency.py without --report-only first")
    rows = summarise(results)
    figures = plot(rows, results, a.figures) if a.figures else {}
    write_markdown(a, rows, results, a.markdown, figures)
    print(verdict(rows))
    print(f"wrote {a.markdown}" + (f" and {', '.join(figures.values())}" if figures else ""))


def select(runs: list[dict], only) -> list[dict]:
    """The runs named in ``only`` (comma-separated; all when empty); unknown names are an error."""
    if not only:
        return runs
    wanted = set(only.split(","))
    unknown = wanted - {r["name"] for r in runs}
    if unknown:
        raise SystemExit(f"error: --only names unknown runs {sorted(unknown)}; known: {[r['name'] for r in runs]}")
    return [r for r in runs if r["name"] in wanted]


def run_all(a, todo: list, done: int, runner, describe) -> list[str]:
    """Run the (run, seed) items ``a.jobs`` at a time with ``runner(a, run, seed)``, appending each
    record to ``a.output`` as it finishes (so an interrupted study resumes); returns the failures."""
    print(f"{len(todo)} runs to do ({done} already in {a.output}), {a.jobs} at a time", flush=True)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    failures = []

    def job(item):
        run, seed = item
        try:
            rec = runner(a, run, seed)
        except RuntimeError as e:
            failures.append(str(e))
            print(str(e), file=sys.stderr, flush=True)
            return
        with open(a.output, "a") as f:  # one short append per run: whole lines
            f.write(json.dumps(rec) + "\n")
        print(f"{rec['name']} seed {seed}: {describe(rec)} ({rec['wall_s']:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(job, todo))
    return failures


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.report_only:
        return report(a)
    for path, what in ((a.data_path, "corpus"), (a.tokenizer_model, "tokenizer")):
        if not (os.path.exists(path) or os.path.exists(path + ".bin")):
            raise SystemExit(f"error: the {what} {path} is missing; run `bash scripts/setup.sh` first (it makes "
                             "the built-in one) or pass --data-path/--tokenizer-model")
    runs = select(study_runs(a), a.only)
    seeds = [int(s) for s in a.seeds.split(",")]
    done = {(r["name"], r["seed"]) for r in load_results(a.output)} if not a.force else set()
    todo = [(run, seed) for seed in seeds for run in runs if (run["name"], seed) not in done]
    failures = run_all(a, todo, len(done), run_one,
                       lambda rec: f"final valid loss {rec['final_valid_loss']:.4f}")
    report(a)
    if failures:
        raise SystemExit(f"error: {len(failures)} runs failed (see above); rerun to retry only those")


if __name__ == "__main__":
    main()
