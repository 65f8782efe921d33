"""scripts/gpu_check.sh's sections that run on a CPU (tools/gpu_check.py --device cpu): the grouped
GEMM probe, the expert function and the one-hot pool against their references, and 3 + 3 steps of
ZeRO-2 with recompute through a save and resume equal to 6 uninterrupted steps. (The bench section
is the quick bench of tests/unit/test_bench_throughput.py; host syncs exist only on a GPU.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_gpu_check_cpu_sections(tmp_path, tiny_corpus):
    corpus, tok = tiny_corpus
    out = tmp_path / "results.json"
    # Not this process's rendezvous: the session fixture's MASTER_PORT is held by pytest's own store.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--skip", "bench",
                           "--output", str(out), "--data-path", str(corpus), "--tokenizer-model", str(tok)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"gpu_check wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], json.dumps(results)[-4000:])
    sections = results["sections"]
    assert set(sections) == {"grouped_gemm", "expert_ffn", "one_hot_pool", "host_syncs", "train"}
    assert all(s["ok"] for s in sections.values())
    assert sections["host_syncs"]["ran"] is False
    assert max(sections["expert_ffn"]["max_relative_difference"].values()) < 1e-4
    assert len(sections["train"]["resumed"]) == 6 and sections["train"]["resumed"] == sections["train"]["uninterrupted"]
