"""Evaluating a trained model: zero-shot tasks through lm-eval, perplexity, bits-per-byte.

- :mod:`.loading`     a training checkpoint or an exported model as the plain model, with its tokenizer
- :mod:`.scoring`     batched log-likelihoods in context windows, and batched generation
- :mod:`.lm`          the lm-eval model class (``samoe``): loglikelihood, loglikelihood_rolling, generate_until
- :mod:`.zeroshot`    lm-eval on the local task configs (``task_configs/``) and data; the summary table
- :mod:`.perplexity`  perplexity and tokenizer-independent bits-per-byte of held-out text

Used by ``tools/eval_zeroshot.py`` and ``tools/eval_ppl.py``. Only :mod:`.lm` and :mod:`.zeroshot`
need lm-eval (the ``eval`` extra); nothing here needs megatron-core, DeepSpeed or process groups.
"""

from samoe_dist.evaluation.loading import EvaluationError, LoadedModel, load

__all__ = ["EvaluationError", "LoadedModel", "load"]
