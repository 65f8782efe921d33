"""The GPU ds_configs accumulate bf16 gradients in fp32 (``data_types.grad_accum_dtype``): the pool's
gradient is a sum over every MoE layer and micro-batch, and a bf16 running sum loses its low bits
(one rounding of 2^-8 relative per add). Checked on the engine DeepSpeed actually builds from each
file, with the same bf16 run on 1 process: ZeRO-1 takes DeepSpeed's BF16_Optimizer (fp32 gradient
buffers), ZeRO-2 its ZeRO optimizer with an fp32 accumulation dtype; and the pool's accumulated
gradient after 2 micro-batches is held in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import run_world
from tests.helpers import REPO


def engine_accumulation(trainer) -> dict:
    """Which optimizer path the engine took, and the dtype of the pool's accumulated gradient."""
    from deepspeed.utils import safe_get_full_grad

    opt = trainer.engine.optimizer
    pool = trainer.model.gpt.samoe_pool
    # one more micro-batch's backward without a step: the gradient as accumulated so far
    batch = trainer._to_device(trainer.data.micro_batch("train", 0, 2, 0, 1, 0))
    loss, _ = trainer.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
    trainer.engine.backward(loss)
    grad = safe_get_full_grad(pool.w1)
    accum = getattr(opt, "gradient_accumulation_dtype", None)
    fp32_groups = getattr(opt, "fp32_groups_gradients_flat", None)
    return {"optimizer": type(opt).__name__, "accum_dtype": str(accum),
            "fp32_grad_buffers": str(fp32_groups[0].dtype) if fp32_groups else None,
            "grad_dtype": str(grad.dtype) if grad is not None else None}


@pytest.mark.parametrize("config, optimizer", [("ds_config_gpu_zero1_bf16.json", "BF16_Optimizer"),
                                               ("ds_config_gpu_zero2_bf16.json", "DeepSpeedZeroOptimizer")])
def test_gpu_configs_accumulate_bf16_gradients_in_fp32(tmp_path, tiny_corpus, config, optimizer):
    user = json.loads((REPO / "examples" / config).read_text())
    assert user["data_types"]["grad_accum_dtype"] == "fp32" and user["bf16"]["enabled"]
    user["zero_optimization"]["overlap_comm"] = False  # a CPU run: no side stream
    ds = tmp_path / config
    ds.write_text(json.dumps(user))
    corpus, tok = tiny_corpus
    argv = ["--ds_config", str(ds), "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--data-path", str(corpus), "--tokenizer-model", str(tok),
            "--data-cache-path", str(tmp_path), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "10", "--num-experts", "4", "--samoe-pool-size", "3", "--bf16"]
    (res,) = run_world(1, argv, 1, tmp_path / "out", probe=engine_accumulation)
    info = res["extra"][0]
    assert info["optimizer"] == optimizer, info
    if optimizer == "BF16_Optimizer":
        assert info["fp32_grad_buffers"] == str(torch.float32), info
    else:
        assert info["accum_dtype"] == str(torch.float32), info
    assert info["grad_dtype"] == str(torch.float32), info
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in res["losses"])
