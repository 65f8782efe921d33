"""bench/param_efficiency.py: a shrunken study runs end to end, resumes, and reports what it ran.

The losses are not checked against any number (they depend on the tiny corpus); the structure is:
one record per (run, seed) with the run's own parameter accounting, the table rows and verdict
derived from those records, the two plots, and a rerun that skips finished runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _study(tmp_path, corpus, tokenizer, *extra):
    cmd = [sys.executable, str(REPO / "bench" / "param_efficiency.py"),
           "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-experts", "4",
           "--seq-length", "32", "--batch-size", "4", "--train-iters", "4", "--warmup", "1",
           "--eval-interval", "2", "--eval-iters", "1", "--pools", "4,2", "--ablation-pool", "2",
           "--ablation-top-m", "1", "--seeds", "1", "--jobs", "2",
           "--data-path", str(corpus), "--tokenizer-model", str(tokenizer),
           "--run-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "pe.jsonl"),
           "--markdown", str(tmp_path / "pe.md"), "--figures", str(tmp_path / "fig"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_small_study_runs_reports_and_resumes(tmp_path, tiny_corpus):
    corpus, tokenizer = tiny_corpus
    proc = _study(tmp_path, corpus, tokenizer, "--only", "moe,samoe-2,samoe-2-top1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "pe.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == ["moe", "samoe-2", "samoe-2-top1"]
    by = {r["name"]: r for r in records}
    # 2 layers x 4 experts of 2*32*64 weights; SaMoE's pool of 2 plus 2*4*2 combination logits.
    assert by["moe"]["params"]["expert"] == 2 * 4 * 2 * 32 * 64
    assert by["samoe-2"]["params"]["pool"] == 2 * 2 * 32 * 64
    assert by["samoe-2"]["params"]["combination"] == 2 * 4 * 2
    assert [p["iteration"] for p in by["moe"]["valid_curve"]][:2] == [2, 4]
    assert by["samoe-2-top1"]["ablation"] == "top-1 combination"
    md = (tmp_path / "pe.md").read_text()
    assert "| samoe-2 |" in md and "4.0x fewer" in md  # 4 experts per layer x 2 layers / pool 2
    assert f"{by['samoe-2']['final_valid_loss']:.4f}" in md
    for png in ("param_efficiency_curves.png", "param_efficiency_params.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:4] == b"\x89PNG"

    again = _study(tmp_path, corpus, tokenizer, "--only", "moe,samoe-2,samoe-2-top1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 runs to do (3 already in" in again.stdout
    assert len((tmp_path / "pe.jsonl").read_text().splitlines()) == 3


def test_bad_inputs_fail_with_one_clear_error(tmp_path, tiny_corpus):
    corpus, tokenizer = tiny_corpus
    proc = _study(tmp_path, tmp_path / "missing.jsonl", tokenizer)
    assert proc.returncode != 0 and "corpus" in proc.stderr and "scripts/setup.sh" in proc.stderr
    proc = _study(tmp_path, corpus, tokenizer, "--only", "moe,nonsense")
    assert proc.returncode != 0 and "unknown runs ['nonsense']" in proc.stderr
    proc = _study(tmp_path, corpus, tokenizer, "--report-only")
    assert proc.returncode != 0 and "no results" in proc.stderr
