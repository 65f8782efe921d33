"""Rank-0 outputs: Megatron-style iteration lines, a JSON-lines metrics file, TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy
from typing import Optional

logger = logging.getLogger("samoe")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, one line format for the whole run."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[%(asctime)s] [rank %(rank)s] %(message)s".replace("%(rank)s", str(rank)),
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def iteration_line(rec: dict, train_iters: int) -> str:
    """The Megatron-format line for one logged training record."""
    parts = [
        f" iteration {rec['iteration']:8d}/{train_iters:8d}",
        f"consumed samples: {rec['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {rec['ms_per_iter']:.1f}",
        f"tokens per second: {rec['tokens_per_sec']:.1f}",
        f"learning rate: {rec['lr']:.3E}",
        f"lm loss: {rec['lm_loss']:.6E}",
    ]
    if "load_balancing_loss" in rec:
        parts.append(f"load balancing loss: {rec['load_balancing_loss']:.6E}")
    if "z_loss" in rec:
        parts.append(f"z loss: {rec['z_loss']:.6E}")
    parts.append(f"grad norm: {rec['grad_norm']:.3f}")
    if "combination_entropy" in rec:
        parts.append(f"combination entropy: {rec['combination_entropy']:.3f}")
    return " | ".join(parts) + " |"


class MetricsWriter:
    """Writes records to the metrics file and TensorBoard; does nothing on ranks other than 0."""

    def __init__(self, enabled: bool, metrics_file: Optional[str], tensorboard_dir: Optional[str]):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            step = record.get("iteration", 0)
            prefix = record.get("type", "train")
            for key, value in record.items():
                if key in PER_EXPERT_KEYS:  # distributions over experts: histograms, not 128 scalars
                    self._tb.add_histogram(f"{prefix}/{key}", numpy.asarray(_flat(value), dtype=numpy.float64), step)
                    continue
                for tag, scalar in _scalars(f"{prefix}/{key}", value):
                    self._tb.add_scalar(tag, scalar, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


# Gradient-flow figures (samoe_dist.gradient_flow): one value per expert, logged to TensorBoard as a
# histogram per record (the metrics file keeps every value).
PER_EXPERT_KEYS = ("expert_tokens_received", "pool_tokens", "expert_grad_norm", "pool_grad_norm")


def _flat(value) -> list:
    if isinstance(value, list):
        return [x for item in value for x in _flat(item)]
    return [value]


def _scalars(tag: str, value, depth: int = 0):
    """(tag, number) pairs of a record value: numbers, and per-layer lists (``tag/layer<i>``) or
    per-layer-per-expert lists of lists (``tag/layer<i>/expert<j>``). Deeper values (per-rank
    token counts) stay in the metrics file only."""
    if isinstance(value, bool) or tag.endswith("/iteration"):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield tag, value
    elif isinstance(value, list) and depth < 2 and not tag.endswith("_per_rank"):
        for i, item in enumerate(value):
            yield from _scalars(f"{tag}/{'layer' if depth == 0 else 'expert'}{i}", item, depth + 1)
