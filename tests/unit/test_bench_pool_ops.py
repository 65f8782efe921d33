"""bench/pool_ops.py: the replicated pool's own ops per step, timed with the package's functions.

Timings are not checked; the record's arithmetic is (each per-step part from its per-op time and
the layer and tensor counts), and the all-reduce ran in a real 2-process gloo world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gated", [False, True])
def test_pool_ops_record(tmp_path, gated):
    out = tmp_path / "ops.json"
    cmd = [sys.executable, str(REPO / "bench" / "pool_ops.py"), "--num-layers", "3", "--hidden-size", "32",
           "--ffn-hidden-size", "64", "--num-experts", "4", "--samoe-pool-size", "6", "--ep", "2", "--reps", "3",
           "--output", str(out)] + (["--gated"] if gated else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec == json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["cpu"]["model"]
    tensors = 3 if gated else 2
    assert rec["pool_tensors"] == tensors and rec["pool_grad_elements"] == tensors * 6 * 32 * 64
    ops, step = rec["op_ms"], rec["per_step_ms"]
    assert all(v > 0 for v in ops.values()) and step["pool sync"] > 0
    assert step["materialize (fwd + bwd)"] == pytest.approx(2 * 3 * tensors * ops["materialize"], rel=1e-12)
    assert step["dA"] == pytest.approx(3 * tensors * ops["dA"], rel=1e-12)
    assert step["pool grad"] == pytest.approx(tensors * ops["pool grad (L layers)"], rel=1e-12)
    assert rec["total_ms"] == pytest.approx(sum(step.values()), rel=1e-12)


def test_pool_ops_rejects_bad_shape():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pool_ops.py"), "--num-experts", "6", "--ep", "4"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--num-experts must be divisible by --ep" in proc.stderr
