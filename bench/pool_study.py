"""Pool study: for a fixed expert-parameter budget, SaMoE, a smaller standard MoE, or shared routing?

The regime the method is meant for: many experts per MoE layer (N = 32), top-1 routing, every one
of L = 4 layers MoE, fine-grained experts (f = h = 128). Pools P in {N/2, N, 2N} = {16, 32, 64},
that is 8x, 4x and 2x fewer expert parameters than the standard MoE's L*N = 128 experts.

The runs (each a real ``pretrain_samoe.py`` run, DeepSpeed ZeRO-1 fp32, one process, one thread;
``bench/param_efficiency.py``'s runner, so the same corpus, split, schedule and token order):

| name | what it is |
|---|---|
| ``dense`` | FFN k*f wide: the same active compute |
| ``moe`` | standard MoE, N experts per layer (L*N experts) |
| ``small-moe-P`` | standard MoE with P/L experts per layer: the pool's expert parameters, same k |
| ``shared-P`` | shared routing (``--samoe-route-to-pool``): each layer's router picks among the P pool experts |
| ``samoe-P`` | SaMoE, N experts per layer combined from the pool (softmax, peak-mass init) |
| variants (``--variants``) | ``samoe-P-linear`` (signed linear combination, one-hot rows), a temperature / combination-lr sweep at ``--sweep-pool``, the init mass at ``--sweep-pool`` |

Validation: the held-out split of the training corpus (every ``--eval-interval`` steps and at the
end), plus a second corpus no run trains on (``--second-corpus``, default the King James Bible
from ``tools/fetch_corpus.py kjv``), scored by ``tools/eval_ppl.py`` on the final checkpoint.
Gradient flow: every run logs per-expert tokens and gradient norms (samoe_dist.gradient_flow); the
record keeps their quantiles per log step, and how far the combinations moved (peak mass, entropy).

    .venv/bin/python bench/pool_study.py                   # the main table (22 runs)
    .venv/bin/python bench/pool_study.py --variants        # plus the SaMoE variants
    .venv/bin/python bench/pool_study.py --report-only     # table, verdict and plots again

Resumable: runs already in ``--output`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tools"))
import param_efficiency as pe  # noqa: E402  (the runner and common flags)
import plot_metrics  # noqa: E402  (the per-expert reading and quantiles of the gradient flow)

REPO = pe.REPO
SECOND_CORPUS = REPO / "data" / "kjv.jsonl"


def parse_args(argv=None):
    """This study's flags; every other flag (--seq-length, --batch-size, --lr, --eval-iters,
    --data-path, --tokenizer-model, ...) is bench/param_efficiency.py's, with its defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--ffn-hidden-size", type=int, default=128, help="f: expert FFN size (dense: k*f)")
    p.add_argument("--num-experts", type=int, default=32, help="N experts per MoE layer")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--pools", default="16,32,64")
    p.add_argument("--seeds", default="1234,1235")
    p.add_argument("--variants", action="store_true", help="also the SaMoE variants")
    p.add_argument("--sweep-pool", type=int, default=32, help="pool of the temperature/lr and init-mass sweeps")
    p.add_argument("--sweep-seeds", default="1234", help="seeds of the sweep runs")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    p.add_argument("--second-corpus", default=str(SECOND_CORPUS), help="jsonl no run trains on")
    p.add_argument("--second-corpus-docs", type=int, default=64, help="documents of it to score")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--run-dir", default=str(REPO / "runs" / "pool_study"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "pool_study.jsonl"))
    p.add_argument("--markdown", default=str(REPO / "bench" / "results" / "pool_study.md"))
    p.add_argument("--figures", default=str(REPO / "docs" / "figures"))
    p.add_argument("--report-only", action="store_true")
    own, rest = p.parse_known_args(argv)
    a = pe.parse_args(rest)  # the shared flags: schedule, corpus, evaluation
    for k, v in vars(own).items():
        setattr(a, k.replace("-", "_"), v)
    return a


def study_runs(a) -> list[dict]:
    """Every configuration before seeds: name, kind, pool, family, variant, flags, seeds."""
    N, k, L = a.num_experts, str(a.topk), a.num_layers
    seeds = [int(s) for s in a.seeds.split(",")]
    sweep_seeds = [int(s) for s in a.sweep_seeds.split(",")]

    def moe(n: int) -> list:
        return ["--num-experts", str(n), "--moe-router-topk", k, "--moe-layer-freq", "1"]

    runs = [dict(name="dense", kind="dense", pool=None, variant=None, seeds=seeds,
                 flags=["--ffn-hidden-size", str(a.topk * a.ffn_hidden_size)]),
            dict(name="moe", kind="moe", pool=None, variant=None, seeds=seeds, flags=moe(N))]
    pools = [int(x) for x in a.pools.split(",")]
    for P in pools:
        if P % L:
            raise SystemExit(f"error: pool {P} is not divisible by --num-layers {L} (the smaller MoE has P/L experts a layer)")
        runs += [dict(name=f"small-moe-{P}", kind="moe", pool=P, variant=None, seeds=seeds, flags=moe(P // L)),
                 dict(name=f"shared-{P}", kind="shared", pool=P, variant=None, seeds=seeds,
                      flags=moe(P) + ["--samoe-pool-size", str(P), "--samoe-route-to-pool"]),
                 dict(name=f"samoe-{P}", kind="samoe", pool=P, variant=None, seeds=seeds,
                      flags=moe(N) + ["--samoe-pool-size", str(P)])]
    if a.variants:
        for P in pools:
            runs.append(dict(name=f"samoe-{P}-linear", kind="samoe", pool=P, variant="signed linear combination",
                             seeds=seeds, flags=moe(N) + ["--samoe-pool-size", str(P), "--samoe-combination", "linear"]))
        P = a.sweep_pool
        sweep = [("t0.5", "temperature 0.5", ["--samoe-temperature", "0.5"]),
                 ("t2", "temperature 2", ["--samoe-temperature", "2"]),
                 ("clr10", "combination lr x10", ["--samoe-combination-lr-mult", "10"]),
                 ("t0.5-clr10", "temperature 0.5, combination lr x10",
                  ["--samoe-temperature", "0.5", "--samoe-combination-lr-mult", "10"]),
                 ("m0.8", "init peak mass 0.8", ["--samoe-init-peak-mass", "0.8"]),
                 ("m0.99", "init peak mass 0.99", ["--samoe-init-peak-mass", "0.99"])]
        runs += [dict(name=f"samoe-{P}-{suffix}", kind="samoe", pool=P, variant=what, seeds=sweep_seeds,
                      flags=moe(N) + ["--samoe-pool-size", str(P), *flags]) for suffix, what, flags in sweep]
    return runs


def flow_summary(metrics_path: Path) -> dict:
    """Gradient-flow quantiles per log step (tools/plot_metrics.py's reading of the per-expert
    values), and how far the combinations moved (peak mass, entropy), from a metrics file."""
    flow, movement = [], []
    with open(metrics_path) as f:
        for rec in map(json.loads, f):
            if rec.get("type") != "train":
                continue
            per_expert = plot_metrics.flow_of(rec)
            if per_expert is not None:
                grads, tokens = per_expert
                flow.append({"iteration": rec["iteration"], "grad_norm": plot_metrics.quantiles(grads),
                             "tokens": plot_metrics.quantiles(tokens), "total_grad_norm": rec["grad_norm"]})
            if "combination_peak_mass" in rec:
                movement.append({"iteration": rec["iteration"], "peak_mass": rec["combination_peak_mass"],
                                 "entropy": rec["combination_entropy"]})
    return {"flow": flow, "movement": movement}


def second_corpus_loss(a, run_dir: Path, ckpt: Path) -> dict:
    """Mean token loss of the final checkpoint on --second-corpus (tools/eval_ppl.py)."""
    out = run_dir / "second_corpus.json"
    argv = [sys.executable, str(REPO / "tools" / "eval_ppl.py"), "--load", str(ckpt), "--input", a.second_corpus,
            "--limit", str(a.second_corpus_docs), "--output", str(out), "--overwrite", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"eval_ppl on {ckpt} failed:\n{res.stderr[-2000:]}")
    return json.loads(out.read_text())


def run_and_score(a, run: dict, seed: int) -> dict:
    run_dir = Path(a.run_dir) / f"{run['name']}-s{seed}"
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt, ignore_errors=True)
    rec = pe.run_one(a, run, seed, extra_argv=("--save", str(ckpt)))
    rec["variant"] = run["variant"]
    rec.update(flow_summary(run_dir / "metrics.jsonl"))
    second = second_corpus_loss(a, run_dir, ckpt)
    rec["second_corpus"] = {"path": os.path.relpath(a.second_corpus, REPO), "docs": a.second_corpus_docs,
                            "loss": second["loss"], "tokens": second["tokens"], "bits_per_byte": second["bits_per_byte"]}
    shutil.rmtree(ckpt, ignore_errors=True)  # a few MB each; the numbers are kept
    return rec


def main(argv=None) -> None:
    a = parse_args(argv)
    import pool_study_report as report

    if a.report_only:
        return report.report(a)
    for path, what in ((a.data_path, "corpus"), (a.tokenizer_model, "tokenizer"), (a.second_corpus, "second corpus")):
        if not (os.path.exists(path) or os.path.exists(path + ".bin")):
            raise SystemExit(f"error: the {what} {path} is missing; run `bash scripts/setup.sh` first (and "
                             "`python tools/fetch_corpus.py kjv --output data/kjv.jsonl` for the second corpus)")
    runs = pe.select(study_runs(a), a.only)
    done = {(r["name"], r["seed"]) for r in pe.load_results(a.output)}
    order = sorted({s for r in runs for s in r["seeds"]})
    todo = [(run, seed) for seed in order for run in runs if seed in run["seeds"] and (run["name"], seed) not in done]
    failures = pe.run_all(a, todo, len(done), run_and_score,
                          lambda rec: f"valid {rec['final_valid_loss']:.4f}, second corpus "
                                      f"{rec['second_corpus']['loss']:.4f}")
    report.report(a)
    if failures:
        raise SystemExit(f"error: {len(failures)} runs failed (see above); rerun to retry only those")


if __name__ == "__main__":
    main()
