"""Our model as an lm-eval language model: ``--model samoe`` in lm-evaluation-harness terms.

:class:`SamoeLM` implements lm-eval's three request types on top of the plain model and the run's
tokenizer, batched (:mod:`.scoring`), with a progress bar:

- ``loglikelihood(context, continuation)``: log P(continuation | context) and whether it is the
  greedy continuation. Tokenised as lm-eval's Hugging Face model does it: the context's trailing
  whitespace moves to the continuation, ``context + continuation`` is tokenised whole and split
  where the context's own tokens end; when the context's tokens are not a prefix of the whole (a
  token merged across the boundary) the continuation is tokenised on its own instead, so the
  scored tokens always spell the continuation. An empty context conditions on the end-of-document
  token, which precedes every document in training.
- ``loglikelihood_rolling(text)``: log P(text) after the end-of-document token, in disjoint
  windows of the model's context (lm-eval's rolling windows).
- ``generate_until(context, gen_kwargs)``: greedy (or, with ``do_sample``, sampled) tokens until a
  stop string, the end-of-document token, or ``max_gen_toks``.

Contexts longer than the model's ``max_position_embeddings`` keep their last tokens.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from samoe_dist.evaluation import scoring
from samoe_dist.evaluation.loading import LoadedModel, load

logger = logging.getLogger("samoe")

DEFAULT_MAX_GEN_TOKS = 256


@register_model("samoe")
class SamoeLM(TemplateLM):
    """lm-eval's LM interface over a :class:`LoadedModel` (or a path, for ``model_args``)."""

    def __init__(self, loaded: Optional[LoadedModel] = None, pretrained: Optional[str] = None,
                 batch_size: int | str = 32, device: str = "cpu", dtype: str = "float32",
                 tokenizer_model: Optional[str] = None, seed: int = 1234, max_length: Optional[int] = None,
                 progress: bool = True, **_ignored) -> None:
        super().__init__()
        if loaded is None:
            if pretrained is None:
                raise ValueError("SamoeLM needs a loaded model or pretrained=PATH")
            loaded = load(pretrained, device=device, dtype=dtype, tokenizer_model=tokenizer_model)
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.batch_size = int(batch_size)
        self._max_length = min(int(max_length or loaded.max_length), loaded.max_length)
        self.progress = progress
        self.generator = torch.Generator().manual_seed(int(seed))

    # -- what lm-eval reads ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.tokenizer_path

    def get_model_info(self) -> dict:
        return {"samoe": self.loaded.info()}

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, context_enc = self.tok_encode(context + continuation), self.tok_encode(context)
        if whole[:len(context_enc)] == context_enc:
            return context_enc, whole[len(context_enc):]
        return context_enc, self.tok_encode(continuation)

    # -- the three request types ----------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context tokens, continuation tokens)."""
        seqs = [(list(ctx) + list(cont), len(ctx)) for _, ctx, cont in requests]
        scores = scoring.score(self.model, seqs, self.max_length, self.batch_size,
                               progress=self.progress and not disable_tqdm, desc="loglikelihood")
        results = []
        for (key, _, _), s in zip(requests, scores):
            results.append((s.logprob, s.greedy))
            self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs = [([self.eot_token_id] + self.tok_encode(req.args[0]), 1) for req in requests]
        scores = scoring.score(self.model, seqs, self.max_length, self.batch_size,
                               progress=self.progress and not disable_tqdm, desc="loglikelihood_rolling")
        for req, s in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, s.logprob)
        return [s.logprob for s in scores]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings batch together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self.progress or disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = [s for s in kwargs["until"] if s]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            top_k = kwargs.get("top_k")
            contexts = {i: self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in members}
            members = sorted(members, key=lambda i: -len(contexts[i]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b:b + self.batch_size]

                def done(row: int, new: list[int]) -> bool:
                    return new[-1] == self.eot_token_id or any(s in self.tok_decode(new) for s in until)

                new = scoring.generate(self.model, [contexts[i] for i in batch], kwargs["max_gen_toks"],
                                       self.max_length, temperature, top_k, self.generator, done)
                for i, tokens in zip(batch, new):
                    text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]
