"""tools/convert_checkpoint.py compress, end to end: a trained standard MoE becomes a SaMoE that trains on.

A standard MoE (2 layers x 4 experts) trains 3 steps on 1 process and saves; ``compress`` builds a
pool of 3 from its 8 experts. The trainer loads the SaMoE checkpoint at expert-parallel size 2 on
2 processes and continues at iteration 4 (the source's data stream and LR schedule, a fresh
optimizer); its first logged loss must be the loss the compressed model computes on that batch.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import read_metrics, run_launcher, tiny_model_args
from tests.integration.test_convert_checkpoint import convert, plain_losses

COMMON = ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3"]


def test_compressed_moe_continues_training_as_samoe(tmp_path, tiny_corpus):
    corpus, tok = tiny_corpus
    moe, metrics = tmp_path / "moe", tmp_path / "moe.jsonl"
    run = run_launcher(1, tiny_model_args(tmp_path, corpus, tok, *COMMON, "--train-iters", "3", "--save", str(moe),
                                          "--metrics-file", str(metrics)))
    assert run.returncode == 0, run.stderr[-3000:]
    out = convert("compress", "--load", str(moe), "--pool-size", "3", "--save", str(tmp_path / "samoe"))
    assert out.returncode == 0, out.stderr
    errors = [float(e) for e in out.stdout.split("per MoE layer: ")[1].split(",")]
    assert len(errors) == 2 and all(0 < e < 1 for e in errors)
    tag = tmp_path / "samoe" / "iter_0000000"
    saved = json.loads((tag / "config.json").read_text())
    assert saved["converted_from"]["compress"]["relative_error_per_layer"] == pytest.approx(errors, abs=5e-7)  # %.6f
    assert saved["converted_from"]["iteration"] == 3

    samoe_args = tiny_model_args(tmp_path, corpus, tok, *COMMON, "--samoe-pool-size", "3",
                                 "--expert-model-parallel-size", "2", "--train-iters", "4", "--load",
                                 str(tmp_path / "samoe"), "--metrics-file", str(tmp_path / "samoe.jsonl"))
    run = run_launcher(2, samoe_args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(weights only, fresh optimizer) at iteration 3 (24 samples consumed)" in run.stdout + run.stderr
    first = read_metrics(tmp_path / "samoe.jsonl", "train")[0]
    assert first["iteration"] == 4
    _, train = plain_losses(samoe_args, 2, tmp_path / "samoe", tmp_path, consumed=24)
    assert abs(train - first["lm_loss"]) <= 1e-5 * abs(train), (train, first["lm_loss"])
