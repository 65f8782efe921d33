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
        if it % 5 == 0:  # gradient flow at the log interval: a pool's P values, or L x N experts'
            rec["expert_tokens_received"] = [[10.0 * it, 20.0], [5.0, 1.0 + it]]
            if entropy:
                rec["pool_grad_norm"], rec["pool_tokens"] = [0.1, 0.2, 0.3], [12.0, 7.0, 30.0]
            else:
                rec["expert_grad_norm"] = [[0.01, 0.02], [0.03, 0.04 * it]]
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
    assert names == ["combination_entropy.png", "gradient_flow.png", "loss_vs_params.png", "loss_vs_tokens.png"]
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


def test_flow_quantiles_follow_the_records():
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    grads, tokens = plot_metrics.flow_of({"expert_grad_norm": [[3.0, 1.0], [2.0, 4.0]],
                                          "expert_tokens_received": [[5.0, 6.0], [7.0, 8.0]]})
    assert grads == [3.0, 1.0, 2.0, 4.0] and tokens == [5.0, 6.0, 7.0, 8.0]
    grads, tokens = plot_metrics.flow_of({"pool_grad_norm": [0.5, 0.25], "pool_tokens": [9.0, 1.0],
                                          "expert_tokens_received": [[5.0, 6.0]]})
    assert grads == [0.5, 0.25] and tokens == [9.0, 1.0]  # a pool: its own experts' tokens
    assert plot_metrics.quantiles(list(range(11))) == [0, 1, 5, 9, 10]
    assert plot_metrics.flow_of({"expert_tokens_received": [[1.0]]}) is None
