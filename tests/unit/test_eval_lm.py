"""The lm-eval model class computes what it claims, checked against the model's logits directly.

A plain model (dense, standard MoE, SaMoE; random weights, a 16-token context so that truncation
and several windows happen) and the tiny corpus's tokenizer. Each request type is compared with a
direct, unbatched computation that shares no code with ``samoe_dist.evaluation.scoring``:

- loglikelihood: the tokens lm-eval's Hugging Face model would score, one forward pass each;
- loglikelihood_rolling: lm-eval's own rolling windows (``get_rolling_token_windows``);
- generate_until: the plain model's greedy ``generate``, cut at the stop string.
"""

from __future__ import annotations

import math

import pytest
import torch

import lm_eval  # noqa: E402,F401  lm-eval is a pinned test dependency (setup.py [dev]): missing, these tests fail

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from samoe_dist.data.tokenizer import Tokenizer  # noqa: E402
from samoe_dist.evaluation.lm import SamoeLM  # noqa: E402
from samoe_dist.evaluation.loading import LoadedModel  # noqa: E402
from samoe_dist.evaluation.scoring import windows  # noqa: E402
from samoe_dist.export import PlainGPT, PlainGPTConfig  # noqa: E402

CONTEXT = 16
KINDS = {
    "dense": {},
    "moe": {"moe_layers": [1], "num_experts": 4, "moe_router_topk": 2},
    "samoe": {"moe_layers": [0, 1], "num_experts": 4, "moe_router_topk": 2, "samoe_pool_size": 3},
}


def make_lm(tokenizer_path, kind: str, batch_size: int = 3) -> SamoeLM:
    tokenizer = Tokenizer(tokenizer_path)
    cfg = PlainGPTConfig(vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=32, num_attention_heads=4,
                         ffn_hidden_size=48, max_position_embeddings=CONTEXT, **KINDS[kind])
    model = PlainGPT(cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():  # SaMoE's pool starts at zero: give every weight a value
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    loaded = LoadedModel(model.eval(), tokenizer, "in-memory", "exported", {}, str(tokenizer_path))
    return SamoeLM(loaded, batch_size=batch_size, progress=False)


def instances(request_type: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=request_type, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_loglikelihood(lm: SamoeLM, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval's Hugging Face model computes, by hand: one request, one forward pass."""
    tok, model = lm.tok, lm.model
    if context == "":
        ctx, cont = [tok.eod], tok.encode(continuation)
    else:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        assert whole[:len(ctx)] == ctx, "pick requests whose context tokens are a prefix of the whole"
        cont = whole[len(ctx):]
    seq = (ctx + cont)[-(CONTEXT + 1):]  # the last CONTEXT inputs before the final token
    logprobs = torch.log_softmax(model.logits(torch.tensor([seq[:-1]]))[0, -len(cont):].double(), dim=-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


REQUESTS = [
    ("the king", " doth love the crown."),
    ("my lord shall ", "see the stars."),  # trailing space moves to the continuation
    ("", "the queen will call a ghost."),  # empty context: conditioned on the end-of-document token
    ("a fool hath slain his sword. the moon must fear the sea. our army did praise", " her ring."),  # truncated
    ("thy heart", " can hear my friend"),
    ("this night", "."),
]


@pytest.mark.parametrize("kind", list(KINDS))
def test_loglikelihood_matches_direct_computation(tiny_corpus, kind):
    lm = make_lm(tiny_corpus[1], kind)
    assert len(lm.tok.encode(REQUESTS[3][0] + REQUESTS[3][1])) > CONTEXT + 1  # the truncation case truncates
    got = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        want_logprob, want_greedy = direct_loglikelihood(lm, context, continuation)
        assert math.isfinite(logprob) and logprob < 0
        assert abs(logprob - want_logprob) <= 1e-4 * max(1.0, abs(want_logprob)), (context, logprob, want_logprob)
        assert greedy == want_greedy
    # batching does not change the numbers: one request per model call gives the same
    lm.batch_size = 1
    alone = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    for (a, ga), (b, gb) in zip(got, alone):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)) and ga == gb


def test_scored_tokens_spell_the_continuation(tiny_corpus):
    """Also where a token would straddle the boundary (a split inside a word): then the continuation
    is tokenised on its own, instead of taking the whole's tokens past a point that is not a boundary."""
    lm = make_lm(tiny_corpus[1], "dense")
    straddled = 0
    for context, continuation in [("the king", " doth love"), ("the ki", "ng doth"), ("my lo", "rd shall"),
                                  ("a fool h", "ath slain"), ("the moon ", "must fear")]:
        ctx, cont = lm._encode_pair(context, continuation)
        moved = len(context) - len(context.rstrip())
        assert lm.tok.decode(ctx) == context.rstrip() and lm.tok.decode(cont) == context[len(context) - moved:] \
            + continuation
        whole = lm.tok.encode(context + continuation)
        straddled += whole[:len(ctx)] != ctx
    assert straddled >= 1  # the fallback was exercised


def test_greedy_continuation_is_reported_greedy(tiny_corpus):
    lm = make_lm(tiny_corpus[1], "samoe")
    context = lm.tok.encode("the king doth")
    with torch.no_grad():
        greedy = PlainGPT.generate(lm.model, torch.tensor([context]), 4, temperature=0)[0, len(context):].tolist()
    other = [(greedy[0] + 1) % lm.tok.vocab_size] + greedy[1:]
    results = lm._loglikelihood_tokens([(("", ""), context, greedy), (("", ""), context, other)])
    assert results[0][1] is True and results[1][1] is False
    assert results[0][0] > results[1][0]


@pytest.mark.parametrize("kind", ["dense", "samoe"])
def test_loglikelihood_rolling_matches_lm_eval_windows(tiny_corpus, kind):
    lm = make_lm(tiny_corpus[1], kind)
    texts = ["the king doth love the crown.", "my lord shall see the stars.\n" * 4,
             "a fool hath slain his sword. the moon must fear the sea. " * 3]
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, logprob in zip(texts, got):
        tokens = lm.tok.encode(text)
        want, scored = 0.0, 0
        for context, pred in map(make_disjoint_window, get_rolling_token_windows(tokens, lm.tok.eod, CONTEXT, 1)):
            inputs = (context + pred)[:-1]
            with torch.no_grad():
                logprobs = torch.log_softmax(lm.model.logits(torch.tensor([inputs]))[0, -len(pred):].double(), -1)
            want += float(logprobs.gather(-1, torch.tensor(pred)[:, None]).sum())
            scored += len(pred)
        assert scored == len(tokens)
        assert abs(logprob - want) <= 1e-4 * abs(want), (text, logprob, want)
    assert len(lm.tok.encode(texts[2])) > 2 * CONTEXT  # several windows were needed


def test_generate_until_matches_greedy_generation(tiny_corpus):
    lm = make_lm(tiny_corpus[1], "moe", batch_size=4)
    contexts = ["the king", "my lord shall see", "a fool hath slain his sword and"]
    kwargs = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    got = lm.generate_until(instances("generate_until", [(c, dict(kwargs)) for c in contexts]))
    for context, text in zip(contexts, got):
        tokens = lm.tok.encode(context)
        with torch.no_grad():
            new = PlainGPT.generate(lm.model, torch.tensor([tokens]), 8, temperature=0)[0, len(tokens):].tolist()
        if lm.tok.eod in new:
            new = new[:new.index(lm.tok.eod)]
        want = lm.tok.decode(new).split(".")[0]
        assert text == want, (context, text, want)
        assert "." not in text
    # sampling: reproducible from the seed, and not the greedy text
    sampled = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 5.0}
    runs = []
    for _ in range(2):
        lm.generator.manual_seed(3)
        runs.append(lm.generate_until(instances("generate_until", [(c, dict(sampled)) for c in contexts])))
    assert runs[0] == runs[1] and runs[0] != got


def test_windows_score_every_token_once_with_bounded_inputs():
    seq = list(range(100))
    for start, length, stride in [(1, 16, 16), (1, 16, 5), (40, 16, 16), (99, 16, 16), (3, 200, 200), (1, 16, 1)]:
        wins = windows(seq, start, length, stride)
        scored = [t for w in wins for t in w.tokens[len(w.tokens) - w.scored:]]
        assert scored == seq[start:]
        assert all(len(w.tokens) - 1 <= length for w in wins)
        for w in wins[1:]:  # after the first window, every window keeps at least length - stride of context
            assert len(w.tokens) - 1 - w.scored >= length - stride
    assert windows(seq, 100, 16) == []
    last = windows(seq, 90, 16)  # a request that fits in one window gets the most context possible
    assert len(last) == 1 and list(last[0].tokens) == seq[100 - 17:] and last[0].scored == 10
