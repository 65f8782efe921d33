"""Perplexity and bits-per-byte: the exported model's equal the training model's on the same text.

The training model (megatron-core, built in-process as tests/unit/test_export.py does) computes its
own lm loss (``GPTLM.forward``, the trainer's loss) on the windows the evaluation scores; the
evaluation, run on the checkpoint (converted in memory) and on the exported files, must report the
same loss, perplexity and bits per byte. Also: the tokenizer is taken from the checkpoint's config,
and a missing or mismatched one is refused with one clear message.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from samoe_dist.data.tokenizer import Tokenizer
from samoe_dist.evaluation.loading import EvaluationError, load
from samoe_dist.evaluation.perplexity import evaluate_texts
from samoe_dist.evaluation.scoring import windows
from samoe_dist.export.convert import export
from tests.helpers import build_training_model, write_checkpoint

CONTEXT, STRIDE = 16, 6  # BASE's --seq-length; a stride < context overlaps the windows
KINDS = {"dense": [], "moe": ["--num-experts", "4", "--moe-layer-freq", "2"],
         "samoe": ["--num-experts", "4", "--samoe-pool-size", "3", "--samoe-init", "random"]}


def documents(corpus, n: int = 5) -> list[str]:
    with open(corpus) as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@torch.no_grad()
def training_model_loss(model, tokenizer: Tokenizer, texts: list[str]) -> tuple[float, int]:
    """(the trainer's lm loss, scored tokens) on the evaluation's windows: labels are each window's
    targets, the loss mask selects the targets the evaluation scores."""
    rows = [w for t in texts for w in windows([tokenizer.eod] + tokenizer.encode(t), 1, CONTEXT, STRIDE)]
    width = max(len(w.tokens) for w in rows) - 1
    tokens, labels, mask = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
    for i, w in enumerate(rows):
        n = len(w.tokens) - 1
        tokens[i, :n] = torch.tensor(w.tokens[:-1])
        labels[i, :n] = torch.tensor(w.tokens[1:])
        mask[i, n - w.scored:n] = 1
    _, parts = model(tokens, labels, mask.float())
    return float(parts["lm loss"]), int(mask.sum())


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_model_perplexity_equals_training_model(seeded, tmp_path, tiny_corpus, kind):
    corpus, tok_path = tiny_corpus
    tokenizer = Tokenizer(tok_path)
    model, cfg, groups = build_training_model([*KINDS[kind], "--vocab-size", str(tokenizer.vocab_size),
                                               "--tokenizer-model", str(tok_path)])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    texts = documents(corpus)
    want_loss, want_tokens = training_model_loss(model, tokenizer, texts)

    from_checkpoint = load(tmp_path / "ckpt")  # tokenizer: the --tokenizer-model in config.json
    assert from_checkpoint.tokenizer_path == str(tok_path) and from_checkpoint.max_length == CONTEXT
    got = evaluate_texts(from_checkpoint.model, from_checkpoint.tokenizer, texts, CONTEXT, STRIDE, batch_size=4)
    assert got.documents == len(texts) and got.tokens == want_tokens
    assert got.tokens == sum(len(tokenizer.encode(t)) for t in texts)  # every token once, no EOD
    assert abs(got.loss - want_loss) <= 1e-5 * want_loss, (got.loss, want_loss)
    assert got.perplexity == pytest.approx(math.exp(want_loss), rel=1e-5)
    assert got.bytes == sum(len(t.encode()) for t in texts)
    assert got.bits_per_byte == pytest.approx(want_loss * want_tokens / (got.bytes * math.log(2)), rel=1e-5)

    weights, _ = export(str(tmp_path / "ckpt"), str(tmp_path / "plain.safetensors"))
    exported = load(weights)  # the export's model.json keeps the training config: same tokenizer
    again = evaluate_texts(exported.model, exported.tokenizer, texts, CONTEXT, STRIDE, batch_size=2)
    assert again.tokens == got.tokens and again.bytes == got.bytes
    assert abs(again.nll - got.nll) <= 1e-6 * got.nll  # same weights; only the batching differs


def test_tokenizer_missing_or_mismatched_is_refused(seeded, tmp_path, tiny_corpus):
    corpus, tok_path = tiny_corpus
    vocab = Tokenizer(tok_path).vocab_size
    model, cfg, groups = build_training_model(["--vocab-size", str(vocab), "--tokenizer-model", str(tok_path)])
    tag = write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    saved = json.loads((tag / "config.json").read_text())

    (tag / "config.json").write_text(json.dumps({**saved, "data": {**saved["data"], "tokenizer_model": "gone.model"}}))
    with pytest.raises(EvaluationError, match="trained with --tokenizer-model gone.model, which is not found"):
        load(tmp_path / "ckpt")
    assert load(tmp_path / "ckpt", tokenizer_model=str(tok_path)).tokenizer.vocab_size == vocab  # the override

    (tag / "config.json").write_text(json.dumps({**saved, "data": {**saved["data"], "tokenizer_model": None}}))
    with pytest.raises(EvaluationError, match="records no tokenizer"):
        load(tmp_path / "ckpt")

    from samoe_dist.data.tokenizer import train_tokenizer

    other = train_tokenizer([corpus], tmp_path / "other", vocab_size=vocab + 20, byte_fallback=False)
    with pytest.raises(EvaluationError, match=f"has {vocab + 20} pieces but the model's vocabulary is {vocab}"):
        load(tmp_path / "ckpt", tokenizer_model=str(other))
    with pytest.raises(EvaluationError, match="no such file or directory"):
        load(tmp_path / "nowhere")
