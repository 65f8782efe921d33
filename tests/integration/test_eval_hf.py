"""lm-eval's own Hugging Face model on an exported folder scores as tools/eval_zeroshot.py does.

A tiny SaMoE model (the tiny corpus' byte-fallback tokenizer recorded in its checkpoint, a
64-token context that some COPA requests overflow) is exported with ``export-hf``. lm-eval runs
COPA offline (this package's task config and local data) once with ``--model samoe`` on the
checkpoint (what eval_zeroshot.py runs) and once with ``--model hf``
(``pretrained=DIR,trust_remote_code=True``) on the folder: the metrics must be the same numbers and
every request's log-likelihood the same to fp32 rounding.
"""

from __future__ import annotations

import torch

import lm_eval  # noqa: F401  a pinned test dependency (setup.py [dev]): missing, this test fails

from samoe_dist.evaluation import zeroshot
from tests.helpers import build_training_model, write_checkpoint

LIMIT = 12


def test_lm_eval_hf_model_matches_eval_zeroshot(seeded, tmp_path, tiny_corpus):
    zeroshot.offline()
    from lm_eval.tasks import TaskManager

    from samoe_dist.data.tokenizer import train_tokenizer
    from samoe_dist.evaluation.loading import load
    from samoe_dist.export.hf.convert import export_hf

    corpus, _ = tiny_corpus
    tok = train_tokenizer([corpus], tmp_path / "byte", vocab_size=320, byte_fallback=True)
    model, cfg, groups = build_training_model(["--num-experts", "4", "--samoe-pool-size", "3", "--swiglu",
                                               "--vocab-size", "320", "--seq-length", "64",
                                               "--tokenizer-model", str(tok)])
    write_checkpoint(tmp_path / "ckpt", model, cfg, groups)
    folder = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf_copa"))  # the tokenizer the checkpoint records

    common = dict(tasks=["copa"], limit=LIMIT, batch_size=8, log_samples=True, bootstrap_iters=1000)
    ours = zeroshot.evaluate(load(str(tmp_path / "ckpt")), **common, progress=False)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
                                 task_manager=TaskManager(include_path=str(zeroshot.TASK_DIR), include_defaults=False),
                                 random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                                 fewshot_random_seed=1234, device="cpu", **common)
    assert hf["config"]["model"] == "hf" and ours["config"]["model"] == "samoe"
    metrics = {k: v for k, v in hf["results"]["copa"].items() if k != "alias"}
    assert metrics == {k: v for k, v in ours["results"]["copa"].items() if k != "alias"}
    assert hf["n-samples"]["copa"]["effective"] == LIMIT
    ours_ll = [[r[0] for r in s["resps"]] for s in ours["samples"]["copa"]]
    hf_ll = [[r[0] for r in s["resps"]] for s in hf["samples"]["copa"]]
    assert [[greedy for _, greedy in s] for s in hf_ll] == [[greedy for _, greedy in s] for s in ours_ll]
    got = torch.tensor([[lp for lp, _ in s] for s in hf_ll], dtype=torch.float64)
    want = torch.tensor([[lp for lp, _ in s] for s in ours_ll], dtype=torch.float64)
    assert got.shape == (LIMIT, 2) and bool(want.lt(-10).all())  # whole continuations, not one token
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # fp32 logits summed: the tolerance of the exports
    from samoe_dist.data.tokenizer import Tokenizer

    lengths = [len(Tokenizer(tok).encode(ctx + cont)) for s in hf["samples"]["copa"] for ctx, cont in s["arguments"]]
    assert max(lengths) > 65  # some requests did not fit the context: both kept their last 64 inputs
