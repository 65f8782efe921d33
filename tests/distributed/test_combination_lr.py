"""--samoe-combination-lr-mult: the combination logits get their own optimizer group at lr * mult.

Derived independently of the code: two runs that differ only in the multiplier (1 and 10) see the
same data and start from the same weights, so after one step every other parameter is bitwise the
same, and AdamW's first update of a logit is lr * g / (|g| + eps), i.e. +-lr per unit multiplier:
the two runs' logits differ by 9 * lr wherever the gradient is well above eps. The schedule keeps
the ratio of the groups' learning rates at every step.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import run_world

LR = 1e-2


def _group_lrs(trainer) -> list[float]:
    return sorted(g["lr"] for g in trainer.engine.optimizer.param_groups)


def _args(tmp, corpus, tok, mult: float) -> list[str]:
    ds = tmp / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1},
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    return ["--ds_config", str(ds), "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--data-path", str(corpus), "--tokenizer-model", str(tok),
            "--data-cache-path", str(tmp), "--micro-batch-size", "4", "--global-batch-size", "4",
            "--train-iters", "10", "--lr", str(LR), "--min-lr", "1e-3", "--lr-warmup-iters", "1", "--clip-grad", "0",
            "--num-experts", "4", "--samoe-pool-size", "3", "--samoe-init", "random",
            "--samoe-combination-lr-mult", str(mult)]


def test_combination_group_moves_at_its_own_rate(tmp_path, tiny_corpus):
    runs = {}
    for mult in (1.0, 10.0):
        tmp = tmp_path / f"mult{mult:g}"
        tmp.mkdir()
        (res,) = run_world(1, _args(tmp, *tiny_corpus, mult), 3, tmp / "out", probe=_group_lrs)
        runs[mult] = res
    base, fast = runs[1.0]["params"][0], runs[10.0]["params"][0]
    logits = [n for n in base if n.endswith("combination_logits")]
    assert len(logits) == 2
    for name in base:
        if name not in logits:
            torch.testing.assert_close(fast[name], base[name], rtol=0, atol=0, msg=name)
    diff = torch.cat([(base[n] - fast[n]).abs().flatten() for n in logits])
    assert diff.max() <= 9 * LR * (1 + 1e-5)
    assert abs(diff.median().item() - 9 * LR) < 1e-3 * 9 * LR, diff
    # The schedule scales both groups alike: the ratio stays 10 while the lr decays.
    for lrs_base, lrs_fast in zip(runs[1.0]["extra"], runs[10.0]["extra"]):
        assert len(set(lrs_base)) == 1
        assert max(lrs_fast) == pytest.approx(10 * min(lrs_fast), rel=1e-12)
        assert min(lrs_fast) == lrs_base[0]
    assert runs[1.0]["extra"][2][0] < runs[1.0]["extra"][0][0]  # and it does decay
