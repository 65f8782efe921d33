"""Each CPU breakage listed in samoe_dist/cpu_compat.py, exercised through megatron-core's real code.

Every test here runs a megatron-core or DeepSpeed code path that fails on a machine without CUDA
unless the corresponding patch is in place. (The suite runs on CPU machines; on a GPU machine
the patches are not applied and these CPU-behaviour tests do not apply.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from samoe_dist import cpu_compat

def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                add_bias_linear=False, **cpu_compat.cpu_safe_config_overrides())
    base.update(kw)
    return TransformerConfig(**base)


def test_current_device_resolves_to_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    # megatron's own helper built on it places tensors on the CPU
    x = torch.ones(2, device=torch.cuda.current_device())
    assert x.device.type == "cpu"


def test_rope_runs_on_cpu(single_process_world):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    emb = rope(16)  # calls torch.cuda.current_device() to place its frequencies
    assert emb.shape == (16, 1, 1, 8) and emb.device.type == "cpu"
    assert torch.isfinite(emb).all()


def test_rng_tracker_fork_on_cpu(single_process_world):
    from megatron.core import tensor_parallel

    cpu_compat.seed_model_parallel(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    cpu_compat.seed_model_parallel(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(a, b)  # reproducible from the seed


def test_router_gating_linear_without_transformer_engine(single_process_world):
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    assert moe_utils.te_general_gemm is None  # the missing name is defined
    cfg = _config(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01,
                  moe_router_dtype="fp32")  # fp32 router dtype takes the router_gating_linear path
    from megatron.core.process_groups_config import ProcessGroupCollection

    router = TopKRouter(config=cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    x = torch.randn(5, 2, 32, requires_grad=True)
    probs, routing_map = router(x)
    assert probs.shape == (10, 4) and routing_map.sum(dim=1).eq(2).all()
    probs.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_token_dispatchers_forward_backward(single_process_world, dispatcher):
    """The alltoall dispatcher creates CUDA streams and passes tensor split sizes upstream."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    cpu_compat.seed_model_parallel(3)
    cfg = _config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
                  moe_aux_loss_coeff=0.0)
    spec = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    layer = build_module(spec, config=cfg)
    x = torch.randn(6, 2, 32, requires_grad=True)
    out, _ = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_both_dispatchers_agree(single_process_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    outs = []
    for dispatcher in ("alltoall", "allgather"):
        cpu_compat.seed_model_parallel(5)
        cfg = _config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
                      moe_aux_loss_coeff=0.0)
        layer = build_module(get_gpt_layer_local_spec(num_experts=4).submodules.mlp, config=cfg)
        torch.manual_seed(0)
        outs.append(layer(torch.randn(6, 2, 32))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_attention_default_causal_mask_on_cpu(single_process_world):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cpu_compat.seed_model_parallel(1)
    model = GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=50, max_sequence_length=16, position_embedding_type="rope")
    model.eval()  # no dropout
    tokens = torch.randint(0, 50, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    logits = model(tokens, pos, None)  # no mask given: megatron builds its default causal mask
    # causality: changing a later token does not change earlier logits
    tokens2 = tokens.clone()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % 50
    logits2 = model(tokens2, pos, None)
    torch.testing.assert_close(logits[:, :-1], logits2[:, :-1])
    assert not torch.allclose(logits[:, -1], logits2[:, -1])


def test_fusions_are_off_on_cpu():
    over = cpu_compat.cpu_safe_config_overrides()
    for name in ("gradient_accumulation_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                 "persist_layer_norm", "bias_dropout_fusion", "apply_rope_fusion", "moe_grouped_gemm"):
        assert over[name] is False, name
    assert over["use_cpu_initialization"] is True


def test_deepspeed_shm_op_is_not_built():
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    assert ds_comm_torch.build_shm_op() is None  # upstream would JIT-compile with g++


def test_fused_adam_config_is_refused_on_cpu():
    with pytest.raises(ValueError, match="torch_adam"):
        cpu_compat.check_ds_config_for_cpu({"optimizer": {"type": "AdamW", "params": {}}})
    cpu_compat.check_ds_config_for_cpu({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})


def test_apply_is_a_noop_when_cuda_is_present():
    """With CUDA reported available, apply() patches nothing that CUDA provides."""
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from samoe_dist import cpu_compat
        from megatron.core.transformer.moe import token_dispatcher
        original_sync = token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize
        assert cpu_compat.apply() is False
        assert torch.cuda.current_device is original
        assert token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize is original_sync
        assert cpu_compat.cpu_safe_config_overrides() == {}
        print("NOOP-OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NOOP-OK" in out.stdout, out.stderr[-2000:]
