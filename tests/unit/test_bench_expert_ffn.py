"""bench/expert_ffn.py: the expert function's arms, timed in paired rounds in a real process.

Timings are not checked; the record's arithmetic is (each arm's ratio over the same-kernel arm is
the median of its per-round ratios, with an interval between their extremes), and the process ran
with the throughput bench's glibc settings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "expert_ffn.py"


def test_expert_ffn_record(tmp_path):
    out = tmp_path / "ffn.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, str(BENCH), "--rounds", "6", "--warmup", "1", "--capacity", "16",
                           "--hidden-size", "32", "--ffn-hidden-size", "64", "--samoe-pool-size", "3",
                           "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec == json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["malloc_env"] == {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    arms = ("deepspeed", "same-kernel", "same-kernel-torch-gelu", "samoe")
    assert sorted(rec["seconds"]) == sorted(arms) and all(len(v) == 6 for v in rec["seconds"].values())
    base = rec["seconds"]["same-kernel"]
    for arm in arms:
        assert rec["median_ms"][arm] == pytest.approx(1e3 * statistics.median(rec["seconds"][arm]), rel=1e-12)
        if arm == "same-kernel":
            assert arm not in rec["time_over_same_kernel"]
            continue
        ratios = [t / b for t, b in zip(rec["seconds"][arm], base)]
        got = rec["time_over_same_kernel"][arm]
        assert got["median"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert got["median_ci95"] == [min(ratios), max(ratios)]  # 6 rounds: the sign test's widest interval


def test_expert_ffn_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, str(BENCH), "--capacity", "0"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "sizes and --rounds must be >= 1" in proc.stderr
