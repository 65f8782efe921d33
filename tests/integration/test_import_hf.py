"""A Hugging Face Mixtral trains in samoe and goes back to transformers.

A tiny random ``MixtralForCausalLM`` (built here, on the tiny corpus' vocabulary) is imported with
``convert_checkpoint.py import-hf``; the trainer loads the weights-only checkpoint at expert-parallel
size 2 on 2 processes and trains 2 steps. Its first logged loss must be the loss the imported model
computes on that batch (the weights arrived unchanged; a fresh optimizer changes only the update),
and ``export-hf --format mixtral`` of the trained checkpoint must load in transformers' own
MixtralForCausalLM with the plain model's logits.
"""

from __future__ import annotations

import json

import torch

from tests.helpers import read_metrics, run_launcher, tiny_model_args
from tests.integration.test_convert_checkpoint import convert, plain_losses
from tests.unit.test_export_hf import tiny_mixtral

MODEL = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--normalization", "RMSNorm",
         "--no-moe-router-pre-softmax", "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "48",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3"]


def test_mixtral_imports_trains_at_ep2_and_exports_back(tmp_path, tiny_corpus):
    from transformers import MixtralForCausalLM

    from samoe_dist.export import PlainGPT
    from samoe_dist.export.convert import export

    corpus, tok = tiny_corpus
    mixtral = tiny_mixtral(tmp_path / "mixtral", vocab=160, max_positions=32)
    out = convert("import-hf", "--input", str(tmp_path / "mixtral"), "--save", str(tmp_path / "imported"))
    assert out.returncode == 0, out.stderr
    # before any training: the imported checkpoint is the Mixtral
    plain = PlainGPT.from_pretrained(export(str(tmp_path / "imported"), str(tmp_path / "imported.safetensors"))[0])
    x = torch.randint(0, 160, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mixtral(x).logits
        torch.testing.assert_close(plain.logits(x), want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)

    metrics, trained = tmp_path / "train.jsonl", tmp_path / "trained"
    args = tiny_model_args(tmp_path, corpus, tok, *MODEL, "--expert-model-parallel-size", "2", "--train-iters", "2",
                           "--load", str(tmp_path / "imported"), "--save", str(trained), "--metrics-file", str(metrics))
    run = run_launcher(2, args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(weights only, fresh optimizer) at iteration 0" in run.stdout + run.stderr
    first = read_metrics(metrics, "train")[0]
    assert first["iteration"] == 1
    _, train_loss = plain_losses(args, 2, tmp_path / "imported", tmp_path, consumed=0)
    assert abs(train_loss - first["lm_loss"]) <= 1e-5 * abs(train_loss), (train_loss, first["lm_loss"])

    out = convert("export-hf", "--load", str(trained), "--output", str(tmp_path / "back"), "--format", "mixtral")
    assert out.returncode == 0, out.stderr
    back = MixtralForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    trained_plain = PlainGPT.from_pretrained(export(str(trained), str(tmp_path / "trained.safetensors"))[0])
    with torch.no_grad():
        want = trained_plain.logits(x)
        torch.testing.assert_close(back(x).logits, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
        assert not torch.allclose(want, mixtral(x).logits, atol=1e-3)  # it did train
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 1
