"""tools/plot_metrics.py turns metrics files into PNG curves, and refuses a file that is not one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = str(REPO / "tools" / "plot_metrics.py")


def _write_run(path: Path, kind: str, expert: int, final_loss: float, entropy: bool) -> None:
    recs = [{"type": "config", "iteration": 0, "kind": kind, "config": {"model": {"seq_length": 64}},
             "params": {"total": 1000 + expert, "expert": expert}}]
    for it in range(1, 21):
        rec = {"type": "train", "iteration": it, "consumed_samples": 8 * it, "lm_loss": 6.0 - 0.1 * it}
        if entropy:
            rec["combination_entropy"] = 1.0 / it
        recs.append(rec)
        if it % 10 == 0:
            recs.append({"type": "valid", "iteration": it, "lm_loss": 6.1 - 0.1 * it})
    recs.append({"type": "final", "iteration": 20, "final_valid_loss": final_loss,
                 "params": {"total": 1000 + expert, "expert": expert}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_plots_written(tmp_path):
    _write_run(tmp_path / "moe" / "metrics.jsonl", "moe", 4096, 4.2, entropy=False)
    _write_run(tmp_path / "samoe" / "metrics.jsonl", "samoe", 512, 4.1, entropy=True)
    out = subprocess.run([sys.executable, TOOL, str(tmp_path / "moe" / "metrics.jsonl"),
                          f"pool8={tmp_path / 'samoe' / 'metrics.jsonl'}", "--output", str(tmp_path / "plots")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = sorted(Path(p).name for p in out.stdout.split())
    assert names == ["combination_entropy.png", "loss_vs_params.png", "loss_vs_tokens.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json\n", "is not JSON"),
    ('{"type": "valid", "iteration": 1, "lm_loss": 1.0}\n', "no config/train records"),
])
def test_bad_metrics_file(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    out = subprocess.run([sys.executable, TOOL, str(path), "--output", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
