"""Perplexity and bits-per-byte of a model on documents of held-out text.

Each document is scored on its own, as the trainer sees a document: after the end-of-document
token, token by token, in windows of the model's context (``stride`` new tokens per window after
the first; the default, the full context, gives disjoint windows as lm-eval's rolling
loglikelihood does). The end-of-document token that training appends after a document is not
scored: it spells no byte of the text.

- ``perplexity`` = exp(total NLL / tokens): depends on the tokenizer.
- ``bits_per_byte`` = total NLL / (UTF-8 bytes of the text * ln 2): the same text costs the same
  number of bytes under any tokenizer, so models with different vocabularies compare.
- ``word_perplexity`` = exp(total NLL / whitespace-separated words), lm-eval's word perplexity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Optional

from tqdm import tqdm

from samoe_dist.evaluation import scoring

logger = logging.getLogger("samoe")

CHUNK_WINDOWS = 512  # windows scored per call (bounded memory; the progress bar moves per chunk)


@dataclasses.dataclass
class PerplexityResult:
    documents: int = 0
    tokens: int = 0  # scored tokens
    bytes: int = 0  # UTF-8 bytes of the scored text
    words: int = 0
    nll: float = 0.0  # summed negative log-likelihood, nats
    lossy_documents: int = 0  # documents the tokenizer does not reproduce exactly (decode(encode(x)) != x)

    @property
    def loss(self) -> float:
        """Mean NLL per token (nats): the trainer's lm loss."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (max(self.bytes, 1) * math.log(2))

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / max(self.words, 1))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "bits_per_token": self.bits_per_token,
                "word_perplexity": self.word_perplexity}


def evaluate_texts(model, tokenizer, texts: Iterable[str], max_length: int, stride: Optional[int] = None,
                   batch_size: int = 16, limit: Optional[int] = None, progress: bool = False) -> PerplexityResult:
    """Perplexity and bits-per-byte of ``model`` (anything with ``logits(tokens)``) on ``texts``,
    each one document; empty documents are skipped, and at most ``limit`` documents are read."""
    stride = max_length if stride is None else stride
    result = PerplexityResult()
    pending: list[tuple[list[int], int]] = []
    pending_windows = 0
    bar = tqdm(total=limit, desc="perplexity", unit="doc", disable=not progress)

    def flush() -> None:
        nonlocal pending, pending_windows
        for s in scoring.score(model, pending, max_length, batch_size, stride):
            result.nll -= s.logprob
            result.tokens += s.tokens
        bar.update(len(pending))
        if result.tokens:
            bar.set_postfix(ppl=f"{result.perplexity:.2f}", bpb=f"{result.bits_per_byte:.3f}")
        pending, pending_windows = [], 0

    for text in texts:
        if limit is not None and result.documents >= limit:
            break
        ids = list(tokenizer.encode(text))
        if not ids:
            continue
        result.documents += 1
        result.bytes += len(text.encode("utf-8"))
        result.words += len(text.split())
        result.lossy_documents += tokenizer.decode(ids) != text
        pending.append(([tokenizer.eod] + ids, 1))
        pending_windows += len(scoring.windows(pending[-1][0], 1, max_length, stride))
        if pending_windows >= CHUNK_WINDOWS:
            flush()
    if pending:
        flush()
    bar.close()
    if result.lossy_documents:
        logger.warning("the tokenizer does not reproduce %d of %d documents exactly (characters outside its "
                       "vocabulary): bits-per-byte is optimistic for them", result.lossy_documents, result.documents)
    return result
