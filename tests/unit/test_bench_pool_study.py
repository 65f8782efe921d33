"""bench/pool_study.py: a shrunken study runs end to end (training, second corpus, gradient flow),
reports, and resumes; its runs hold the parameters the study says they hold.

Losses are not checked against numbers (they depend on the tiny corpus): the structure is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_runs_hold_equal_expert_parameters_at_each_pool():
    """small-moe-P, shared-P and samoe-P all hold P experts' weights (SaMoE plus its logits), the
    standard MoE L*N, at the same active compute (top-k of same-size experts)."""
    import pool_study

    from samoe_dist.arguments import parse_args

    a = pool_study.parse_args(["--variants"])
    runs = {r["name"]: r for r in pool_study.study_runs(a)}
    L, N = a.num_layers, a.num_experts
    for P in (16, 32, 64):
        cfgs = {fam: parse_args(runs[f"{fam}-{P}"]["flags"] + ["--num-layers", str(L)])[0]
                for fam in ("small-moe", "shared", "samoe")}
        assert cfgs["small-moe"].moe.num_experts * L == P and cfgs["small-moe"].kind == "moe"
        assert cfgs["shared"].samoe.samoe_route_to_pool and cfgs["shared"].moe.num_experts == P
        assert cfgs["samoe"].moe.num_experts == N and cfgs["samoe"].samoe.samoe_pool_size == P
        assert {c.moe.moe_router_topk for c in cfgs.values()} == {a.topk}
    assert parse_args(runs["moe"]["flags"])[0].moe.num_experts == N
    assert runs["samoe-32-linear"]["variant"] == "signed linear combination"
    assert runs["samoe-32-m0.99"]["seeds"] == [1234] and runs["samoe-32"]["seeds"] == [1234, 1235]


def _study(tmp_path, corpus, tokenizer, *extra):
    cmd = [sys.executable, str(REPO / "bench" / "pool_study.py"),
           "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "32", "--num-experts", "4",
           "--num-attention-heads", "4", "--seq-length", "32", "--batch-size", "4", "--train-iters", "4",
           "--warmup", "1", "--eval-interval", "2", "--eval-iters", "1", "--pools", "2,4", "--seeds", "1",
           "--jobs", "2", "--data-path", str(corpus), "--tokenizer-model", str(tokenizer),
           "--second-corpus", str(corpus), "--second-corpus-docs", "3",
           "--run-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "ps.jsonl"),
           "--markdown", str(tmp_path / "ps.md"), "--figures", str(tmp_path / "fig"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_small_study_runs_reports_and_resumes(tmp_path, tiny_corpus):
    corpus, tokenizer = tiny_corpus
    only = ("--only", "dense,moe,small-moe-2,shared-2,samoe-2")
    proc = _study(tmp_path, corpus, tokenizer, *only)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    by = {r["name"]: r for r in map(json.loads, (tmp_path / "ps.jsonl").read_text().splitlines())}
    assert sorted(by) == ["dense", "moe", "samoe-2", "shared-2", "small-moe-2"]
    expert = 2 * 32 * 32
    assert by["moe"]["params"]["expert"] == 2 * 4 * expert
    assert by["small-moe-2"]["params"]["expert"] == by["shared-2"]["params"]["pool"] == 2 * expert
    assert by["samoe-2"]["params"]["pool"] == 2 * expert and by["samoe-2"]["params"]["combination"] == 2 * 4 * 2
    for name in ("moe", "small-moe-2", "shared-2", "samoe-2"):
        flow = by[name]["flow"]
        assert [f["iteration"] for f in flow] == [4]  # the log interval (50) is past the end: the last step
        assert len(flow[0]["grad_norm"]) == 5 and flow[0]["tokens"][-1] > 0
    assert by["samoe-2"]["movement"][0]["peak_mass"] > 0.5 and not by["shared-2"]["movement"]
    second = by["moe"]["second_corpus"]
    assert second["docs"] == 3 and second["tokens"] > 0 and second["loss"] > 0
    assert not (tmp_path / "runs" / "moe-s1" / "checkpoints").exists()  # scored, then removed
    md = (tmp_path / "ps.md").read_text()
    assert "| samoe-2 |" in md and "Regime check" in md and "Gradient flow" in md
    assert f"{by['shared-2']['final_valid_loss']:.4f}" in md
    for png in ("pool_study_params.png", "pool_study_gradient_flow.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:4] == b"\x89PNG"

    again = _study(tmp_path, corpus, tokenizer, *only)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 runs to do (5 already in" in again.stdout


def test_a_missing_second_corpus_is_one_clear_error(tmp_path, tiny_corpus):
    corpus, tokenizer = tiny_corpus
    proc = _study(tmp_path, corpus, tokenizer, "--second-corpus", str(tmp_path / "nope.jsonl"))
    assert proc.returncode != 0 and "second corpus" in proc.stderr and "fetch_corpus.py kjv" in proc.stderr
