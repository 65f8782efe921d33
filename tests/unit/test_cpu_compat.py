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


# 10 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_gelu_is_torch_gelu_on_its_native_kernel(dtype):
    """expert_gelu computes F.gelu and its gradient with torch's own CPU kernel (oneDNN switched
    off): bitwise the values of that kernel, forward and backward, for shapes that change per call;
    the global oneDNN switch is back on afterwards, also when the op inside raises."""
    gen = torch.Generator().manual_seed(0)
    for rows in (3, 517, 1030):
        x = (3 * torch.randn(rows, 64, generator=gen)).to(dtype).requires_grad_()
        g = torch.randn(rows, 64, generator=gen).to(dtype)
        y = cpu_compat.expert_gelu(x)
        (dx,) = torch.autograd.grad(y, x, g)
        assert torch._C._get_mkldnn_enabled()
        with torch.backends.mkldnn.flags(enabled=False):
            x_ref = x.detach().clone().requires_grad_()
            y_ref = torch.nn.functional.gelu(x_ref)
            (dx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_compat.without_onednn(x):
            raise RuntimeError("boom")
    assert torch._C._get_mkldnn_enabled()


def test_expert_activations_use_onednn_only_at_a_fixed_shape():
    """oneDNN (ONEDNN_VERBOSE=1 prints one line per primitive run) runs F.gelu of a CPU tensor
    (the control: so this check can fail), but neither expert_gelu nor SaMoE's expert FFN, forward
    and backward, on row counts that change per call: nothing enters its per-shape cache. With equal
    groups (capacity-padded experts: one shape per layer) the FFN's fp32 activation does run on
    oneDNN, forward, recomputation and derivative, all at that one shape; its bf16 one does not."""
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from samoe_dist import cpu_compat
        from samoe_dist.samoe.expert_ffn import materialized_expert_ffn
        torch.manual_seed(0)
        for rows in (300, 301):
            x = torch.randn(rows, 64, requires_grad=True)
            F.gelu(x).sum().backward()
        print("CONTROL-END", flush=True)
        for rows in (302, 303):
            x = torch.randn(rows, 64, requires_grad=True)
            cpu_compat.expert_gelu(x).sum().backward()
        H, F_, P, n = 32, 64, 4, 2
        w1 = torch.randn(P, H, F_, requires_grad=True)
        w2 = torch.randn(P, F_, H, requires_grad=True)
        A = torch.softmax(torch.randn(n, P), -1).requires_grad_()
        for counts in ((100, 205), (131, 77)):
            x = torch.randn(sum(counts), H, requires_grad=True)
            probs = torch.rand(sum(counts), requires_grad=True)
            materialized_expert_ffn(x, probs, counts, A, w1, w2, None, F.gelu).square().sum().backward()
        print("PATCHED-END", flush=True)
        for dtype in (torch.float32, torch.bfloat16):
            for _ in range(2):  # equal groups: the same shape on both calls
                x = torch.randn(256, H, dtype=dtype, requires_grad=True)
                probs = torch.rand(256, dtype=dtype, requires_grad=True)
                materialized_expert_ffn(x, probs, (128, 128), A.to(dtype), w1.to(dtype), w2.to(dtype), None,
                                        F.gelu).float().square().sum().backward()
            print("EQUAL-END", dtype, flush=True)
    """)
    import os

    env = dict(os.environ, ONEDNN_VERBOSE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "EQUAL-END torch.bfloat16" in out.stdout, out.stderr[-2000:]
    control, rest = out.stdout.split("CONTROL-END")
    patched, rest = rest.split("PATCHED-END")
    equal_fp32, equal_bf16, _ = rest.split("EQUAL-END")

    def gelu_runs(text):
        return [ln for ln in text.splitlines() if "primitive,exec" in ln and "eltwise_gelu" in ln]

    assert len(gelu_runs(control)) >= 2, control[-2000:]  # forward of each shape (and its backward)
    assert gelu_runs(patched) == [], patched[-2000:]
    equal = gelu_runs(equal_fp32)
    assert len(equal) == 2 * 3, equal_fp32[-2000:]  # per call: forward, backward's recomputation, derivative
    assert {ln.split(",")[-2] for ln in equal} == {"256x64"}, equal  # one shape: one cached kernel
    assert gelu_runs(equal_bf16) == [], equal_bf16[-2000:]


def test_megatron_expert_mlps_get_expert_gelu(seeded):
    """A standard MoE built by the project: every local expert MLP of megatron's SequentialMLP
    calls expert_gelu; the dense MLPs keep F.gelu (fixed shapes: oneDNN's cache serves them)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP

    from samoe_dist.arguments import parse_args
    from samoe_dist.model import build_model
    from samoe_dist.config import validate_layout
    from samoe_dist.parallel import init_distributed

    cfg, _ = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                         "--seq-length", "16", "--vocab-size", "64", "--num-experts", "4", "--moe-layer-freq", "2"])
    validate_layout(cfg, 1)
    model = build_model(cfg, init_distributed(1))
    experts = [e for m in model.modules() if isinstance(m, SequentialMLP) for e in m.local_experts]
    dense = [m for m in model.modules() if isinstance(m, MLP) and all(m is not e for e in experts)]
    assert len(experts) == 4 and len(dense) == 1
    assert all(e.activation_func is cpu_compat.expert_gelu for e in experts)
    assert all(m.activation_func is torch.nn.functional.gelu for m in dense)
    x = torch.randn(5, 32, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    y = experts[0](x)[0]
    experts[0].activation_func = torch.nn.functional.gelu  # the same MLP with megatron's own function
    with torch.backends.mkldnn.flags(enabled=False):  # ... on the same kernel
        y_ref = MLP.forward(experts[0], ref)[0]
    assert torch.equal(y, y_ref)  # fp32: no row padding


def test_megatron_expert_mlps_pad_half_precision_rows(seeded, monkeypatch):
    """In bf16 each of megatron's expert MLPs runs on its rows padded with zero rows to a multiple
    of grouped_gemm.PAD_ROWS (one oneDNN kernel per padded row count): its own forward sees the
    padded rows, the caller gets exactly that forward's rows back, the zero rows add nothing to any
    weight gradient (bitwise: the same call on an explicitly padded input), and the result agrees
    with the unpadded MLP within bf16 rounding."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP

    from samoe_dist.arguments import parse_args
    from samoe_dist.config import validate_layout
    from samoe_dist.model import build_model
    from samoe_dist.parallel import init_distributed
    from samoe_dist.samoe.grouped_gemm import PAD_ROWS
    from tests.helpers import bf16_worst_case

    cfg, _ = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
                         "--seq-length", "16", "--vocab-size", "64", "--num-experts", "2"])
    validate_layout(cfg, 1)
    model = build_model(cfg, init_distributed(1)).to(torch.bfloat16)
    (moe,) = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    expert = moe.local_experts[0]
    seen = []
    original = MLP.forward

    def spy(self, hidden, per_token_scale=None, **kw):
        seen.append(hidden.shape[0])
        return original(self, hidden, per_token_scale, **kw)

    monkeypatch.setattr(MLP, "forward", spy)
    multiple = PAD_ROWS[torch.bfloat16]
    rows = multiple + 5
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 32, generator=gen).to(torch.bfloat16)
    probs = torch.rand(rows, generator=gen).to(torch.bfloat16)
    g = torch.randn(rows, 32, generator=gen).to(torch.bfloat16)
    params = [expert.linear_fc1.weight, expert.linear_fc2.weight]

    def run(fn, x_in, p_in):
        x_in = x_in.detach().clone().requires_grad_()
        y = fn(x_in, p_in)[0]
        grads = torch.autograd.grad(y[:rows], [x_in, *params], g)
        return y, grads

    y, grads = run(expert, x, probs)
    assert seen == [2 * multiple] and y.shape == (rows, 32)
    pad = 2 * multiple - rows
    x_pad = torch.cat((x, x.new_zeros(pad, 32)))
    p_pad = torch.cat((probs, probs.new_zeros(pad)))
    y_pad, grads_pad = run(lambda a, b: original(expert, a, b), x_pad, p_pad)
    assert torch.equal(y, y_pad[:rows])
    assert torch.equal(grads[0], grads_pad[0][:rows]) and all(torch.equal(a, b) for a, b in zip(grads[1:], grads_pad[1:]))
    # against the unpadded MLP: 4 bf16 roundings per value (fc1, gelu, the prob scale, fc2), relative to
    # the scale of fc2's terms, |act| @ |W2|, two computations compared
    y_plain, _ = run(lambda a, b: original(expert, a, b), x, probs)
    with torch.no_grad():
        act = torch.nn.functional.gelu(x.double() @ expert.linear_fc1.weight.double().t()) * probs.double()[:, None]
        scale = act.abs() @ expert.linear_fc2.weight.double().abs().t()
    assert ((y.double() - y_plain.double()).abs() <= bf16_worst_case(4, computations=2) * scale + 1e-30).all()
    # fp32 input: no padding
    seen.clear()
    expert.float()(torch.randn(rows, 32), torch.rand(rows))
    assert seen == [rows]


# 11 ------------------------------------------------------------------------------------------
def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma\nbugs\t\t: spectre\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 fma avx512_bf16\n")
    assert cpu_compat.cpu_flags(str(info)) == frozenset({"fpu", "avx2", "fma"})  # the first CPU's line
    (tmp_path / "empty").write_text("processor\t: 0\n")
    assert cpu_compat.cpu_flags(str(tmp_path / "empty")) is None
    assert cpu_compat.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("flags, warned", [
    (frozenset({"avx2", "fma"}), True),  # AVX2 only: generic bf16 kernels
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), False),
    (frozenset({"avx2", "amx_bf16", "amx_tile"}), False),
])
def test_bf16_warning_on_a_cpu_without_bf16_instructions(flags, warned):
    message = cpu_compat.bf16_cpu_warning(True, flags)
    assert (message is not None) == warned
    if warned:
        assert "--bf16" in message and "fp32" in message and "avx512_bf16" in message
    assert cpu_compat.bf16_cpu_warning(False, flags) is None  # fp32 runs are never warned


def test_bf16_warning_is_silent_when_the_flags_cannot_be_read(monkeypatch):
    monkeypatch.setattr(cpu_compat, "cpu_flags", lambda: None)
    assert cpu_compat.bf16_cpu_warning(True) is None
