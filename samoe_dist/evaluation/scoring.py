"""Scoring token sequences and generating from them with a model that maps tokens [b, s] to logits.

Everything the evaluation tools compute is built from two operations:

- :func:`score`: the summed log-probability of ``seq[start:]`` given what precedes it, for many
  sequences at once. A sequence longer than the model's context is cut into windows
  (:func:`windows`); each window predicts its last tokens with as much preceding context as fits.
  Windows of all sequences are batched, longest first, right-padded (padding after a position
  changes nothing at that position: attention is causal and MoE routing is per token).
- :func:`generate`: greedy or sampled continuations of many contexts, batched with right padding
  (each row reads its logits at its own last position), stopping a row at a condition.

The model is anything with ``logits(tokens_BS) -> [B, S, V]``: the plain model, or the training
model itself (the tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import torch
from tqdm import tqdm

PAD_ID = 0  # any id works: padded positions come after every position that is read


class Window(NamedTuple):
    """One model call's worth of a sequence: inputs ``tokens[:-1]``, targets ``tokens[1:]``, of
    which the last ``scored`` count."""

    tokens: Sequence[int]
    scored: int


class Score(NamedTuple):
    """The scored part of one sequence: summed log-probability (nats), whether every scored token
    is the argmax prediction, and how many tokens were scored."""

    logprob: float
    greedy: bool
    tokens: int


def windows(seq: Sequence[int], start: int, max_length: int, stride: Optional[int] = None) -> list[Window]:
    """Windows that score ``seq[start:]``, each model input at most ``max_length`` tokens.

    The first window reaches as far as it can while its inputs start at ``seq[0]`` (or holds the
    whole scored part when that fits with the context before it); each further window predicts the
    next ``stride`` tokens (default ``max_length``) after the last ``max_length - stride`` or more
    tokens of context. A request whose scored part fits in one window gets the most context possible
    (the last ``max_length`` tokens before its final one), as lm-eval's Hugging Face model does.
    """
    if not 1 <= start <= len(seq):
        raise ValueError(f"start {start} must be in [1, {len(seq)}]: the first token has nothing to condition on")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be in [1, max_length {max_length}]")
    out, p = [], start
    while p < len(seq):
        q = min(len(seq), max(p + stride, max_length + 1))  # score seq[p:q]
        a = max(0, q - 1 - max_length)  # inputs seq[a:q-1]
        out.append(Window(seq[a:q], q - p))
        p = q
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_windows(model, wins: Sequence[Window], batch_size: int, progress: bool = False,
                  desc: str = "scoring") -> list[Score]:
    """Score of each window (in the given order), ``batch_size`` windows per model call."""
    device = _device(model)
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i].tokens))  # longest first: least padding
    out: list[Optional[Score]] = [None] * len(wins)
    bar = tqdm(total=len(wins), desc=desc, unit="seq", disable=not progress)
    for b in range(0, len(order), batch_size):
        batch = [wins[i] for i in order[b:b + batch_size]]
        width = max(len(w.tokens) for w in batch) - 1
        inputs_BS = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        for row, w in enumerate(batch):
            inputs_BS[row, :len(w.tokens) - 1] = torch.as_tensor(w.tokens[:-1], dtype=torch.long)
        logits_BSV = model.logits(inputs_BS.to(device))
        for row, (i, w) in enumerate(zip(order[b:b + batch_size], batch)):
            n = len(w.tokens) - 1  # inputs of this row; the scored targets are its last `scored`
            logprobs_KV = torch.log_softmax(logits_BSV[row, n - w.scored:n].float(), dim=-1)
            targets_K = torch.as_tensor(w.tokens[n - w.scored + 1:], dtype=torch.long, device=logprobs_KV.device)
            picked_K = logprobs_KV.gather(-1, targets_K[:, None])[:, 0]
            greedy = bool((logprobs_KV.argmax(dim=-1) == targets_K).all())
            out[i] = Score(float(picked_K.double().sum()), greedy, w.scored)
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def score(model, requests: Sequence[tuple[Sequence[int], int]], max_length: int, batch_size: int,
          stride: Optional[int] = None, progress: bool = False, desc: str = "scoring") -> list[Score]:
    """Score of ``seq[start:]`` for each ``(seq, start)``; windows of all requests are batched."""
    owner, wins = [], []
    for r, (seq, start) in enumerate(requests):
        for w in windows(seq, start, max_length, stride):
            owner.append(r)
            wins.append(w)
    totals = [[0.0, True, 0] for _ in requests]
    for r, s in zip(owner, score_windows(model, wins, batch_size, progress, desc)):
        totals[r][0] += s.logprob
        totals[r][1] &= s.greedy
        totals[r][2] += s.tokens
    return [Score(*t) for t in totals]


@torch.no_grad()
def generate(model, contexts: Sequence[Sequence[int]], max_new_tokens: int, max_length: int,
             temperature: float = 0.0, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             done: Optional[Callable[[int, list[int]], bool]] = None) -> list[list[int]]:
    """New tokens for each context (at most ``max_new_tokens``; fewer where ``done(i, new_tokens)``
    says row i is finished). ``temperature`` 0 is greedy; otherwise sampling, among the ``top_k``
    most likely tokens when given. Each row sees its last ``max_length`` tokens."""
    device = _device(model)
    rows = [list(c)[-max_length:] for c in contexts]
    if any(not r for r in rows):
        raise ValueError("generate needs a non-empty context for every row")
    new: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not active:
            break
        views = [(rows[i] + new[i])[-max_length:] for i in active]
        inputs_BS = torch.full((len(views), max(map(len, views))), PAD_ID, dtype=torch.long)
        for row, v in enumerate(views):
            inputs_BS[row, :len(v)] = torch.as_tensor(v, dtype=torch.long)
        last_B = torch.as_tensor([len(v) - 1 for v in views], device=device)
        logits_BV = model.logits(inputs_BS.to(device))[torch.arange(len(views), device=device), last_B].float()
        if temperature == 0:
            next_B = logits_BV.argmax(dim=-1)
        else:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
            probs_BV = torch.softmax(logits_BV, dim=-1)
            next_B = torch.multinomial(probs_BV.cpu(), 1, generator=generator)[:, 0]
        still = []
        for i, token in zip(active, next_B.tolist()):
            new[i].append(int(token))
            if done is None or not done(i, new[i]):
                still.append(i)
        active = still
    return new
