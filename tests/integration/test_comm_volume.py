"""The analytic communication model (bench/scaling_model.py) against the bytes the real engine moves.

bench/comm_volume.py counts every torch.distributed collective of a 4-process, EP=2 training step
of the standard MoE and of SaMoE. The model is derived on paper (ring collectives, DeepSpeed's
ZeRO-1 gradient all-reduce plus parameter all-gather); the measured sync of the expert weights
must equal it up to a few scalars, and the all-to-all up to the routing's imbalance (the model
assumes tokens spread evenly over the ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_measured_communication_matches_the_analytic_model(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [sys.executable, str(REPO / "bench" / "comm_volume.py"), "--world", "4", "--ep", "2", "--steps", "1",
           "--hidden-size", "32", "--ffn-hidden-size", "64", "--seq-length", "32", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    c = res["comparison"]
    for key in ("expert_grad_sync_bytes_per_gpu_moe", "expert_grad_sync_bytes_per_gpu_samoe"):
        assert c[key]["measured"] > 0
        assert abs(c[key]["measured"] - c[key]["model"]) <= 1e-3 * c[key]["model"], (key, c[key])
    a2a = c["all_to_all_bytes_per_gpu"]
    for key in ("measured_moe", "measured_samoe"):
        assert abs(a2a[key] - a2a["model"]) <= 0.2 * a2a["model"], a2a
    # SaMoE syncs its pool once per step over the whole world, not once per layer that uses it:
    # its world-group bytes are those of the replicated parameters, each counted once.
    samoe = res["samoe"]
    world_bytes = samoe["per_step_rank0"]["gradient / parameter sync over world (data parallel)"]["moved_bytes"]
    per_param = 4 * (2 * 3 / 4 + 3 / 4)  # fp32: ring all-reduce + all-gather over 4 ranks
    assert abs(world_bytes - per_param * samoe["params_rank0"]["replicated"]) < 1e-3 * world_bytes
