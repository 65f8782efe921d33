"""bench/throughput.py runs end to end in its quick mode and prints the records it documents.

Timings are not checked (they depend on the machine and its load); the structure is: one result
per system with its step-time spread, tokens/s, MFU, memory and step breakdown, the matmul peak,
the SaMoE/megatron-MoE headline ratio, the Markdown report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_throughput_bench_prints_its_records(tmp_path):
    out, md = tmp_path / "out.jsonl", tmp_path / "report.md"
    cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), "--quick", "--systems", "samoe,moe",
           "--ep", "1", "--dtypes", "fp32", "--rounds", "1", "--no-malloc-compare",
           "--output", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout_records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == stdout_records
    by_type: dict[str, list[dict]] = {}
    for rec in records:
        by_type.setdefault(rec["type"], []).append(rec)
    assert set(by_type) == {"config", "peak", "result", "ratio", "summary"}
    assert by_type["config"][0]["mode"] == "quick"

    (peak,) = by_type["peak"]
    assert peak["dtype"] == "fp32" and peak["gflops"]["median"] > 0

    results = {r["system"]: r for r in by_type["result"]}
    assert set(results) == {"samoe", "moe"}
    for system, r in results.items():
        assert (r["ep"], r["dtype"], r["processes"], r["malloc_env"]) == (1, "fp32", 1, True)
        st = r["step_s"]
        assert st["n"] == 2  # 1 round x 2 steps
        assert 0 < st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
        assert r["tokens_per_step"] == 4 * 64  # quick: micro-batch 4 x seq 64
        assert abs(r["tokens_per_s"]["median"] * st["median"] - r["tokens_per_step"]) < 1e-6 * r["tokens_per_step"]
        assert 0 < r["mfu"]["median"] < 1
        assert r["flops_per_token"] > 6 * r["params"]["active_per_token"] - 1
        mem = r["memory"]
        assert 0 < mem["peak_step_alloc_bytes"] <= mem["peak_step_alloc_raw_bytes"]
        assert mem["rss_peak_bytes"] > mem["rss_import_bytes"] > 0
        assert set(r["breakdown"]) >= {"materialise fwd", "materialise bwd", "router", "dispatch/permute",
                                       "expert GEMMs", "attention", "optimizer+reduce", "other"}
        assert 0.5 < sum(r["breakdown"].values()) < 1.0 + 1e-6
        assert r["breakdown_ms"].get("router (fwd)", 0) > 0 and r["breakdown_ms"].get("expert GEMM (bwd)", 0) > 0
    # only SaMoE materialises experts from the pool, in forward and again in backward
    assert results["samoe"]["breakdown_ms"].get("materialize (fwd)", 0) > 0
    assert results["samoe"]["breakdown_ms"].get("materialize (bwd)", 0) > 0
    assert results["samoe"]["breakdown_ms"].get("pool/A grad (bwd)", 0) > 0
    assert not any(k.startswith(("materialize", "pool/A")) for k in results["moe"]["breakdown_ms"])
    assert 0 < results["samoe"]["materialise_flops_fraction"] < 1
    assert results["samoe"]["params"]["pool"] > 0 and results["moe"]["params"]["pool"] == 0

    (ratio,) = by_type["ratio"]
    assert (ratio["numerator"], ratio["denominator"], ratio["headline"]) == ("samoe", "moe", True)
    assert ratio["tokens_per_s_ratio"]["n"] == 1 and ratio["tokens_per_s_ratio"]["median"] > 0
    assert ratio["best_step_ratio"] == results["moe"]["step_s"]["min"] / results["samoe"]["step_s"]["min"]
    assert by_type["summary"][0]["samoe_over_moe_tokens_per_s"]["ep1_fp32"] == ratio["tokens_per_s_ratio"]["median"]

    report = md.read_text()
    assert "| 1 | fp32 | samoe |" in report and "| 1 | fp32 | moe |" in report
    assert "Headline: SaMoE / megatron MoE" in report and "Step breakdown" in report
    rerendered = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--report-from", str(out)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
    assert rerendered.returncode == 0, rerendered.stderr[-3000:]
    assert rerendered.stdout == report
