"""megatron's MoELayer with SaMoE experts against the for-loop oracle: outputs and every gradient.

float64 parameters and tokens; megatron computes the router softmax in fp32 whatever the dtype
(``softmax(..., dtype=torch.float32)`` in moe_utils), so agreement is to ~1e-6, not 1e-12.
megatron injects the aux and z losses' gradients in backward (MoEAuxLossAutoScaler, scale 1):
its backward of ``(y * G).sum()`` is compared with the oracle's gradient of
``(y * G).sum() + aux + z``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from samoe_dist.config import SaMoEConfig
from samoe_dist.samoe.pool import ExpertPool, PoolRef
from samoe_dist.samoe.reference import reference_materialize, reference_samoe_layer, reference_combination_weights

H, FFN, N, P = 8, 6, 4, 3
SEQ, BATCH = 6, 2
DT = torch.float64
RTOL, ATOL = 1e-5, 1e-6
AUX, ZLOSS = 0.1, 0.01


def _cases():
    # cf "1.0p": capacity 1.0 with every expert's input padded to its capacity (zero-weight tokens):
    # the same kept tokens, so the same oracle. At 1.0 some experts drop and others are padded.
    for top_m, k, cf, disp, gated, pre in itertools.product(
        (0, 2), (1, 2), (None, 0.5, "1.0p"), ("alltoall", "allgather"), (False, True), (True, False)
    ):
        if k == 1 and not pre:
            continue  # megatron rejects it ("Please use --moe-router-pre-softmax when topk is 1")
        if cf == "1.0p" and (top_m, gated) != (2, True):
            continue  # padding is the dispatcher's and the GEMMs' business: one expert form suffices
        yield pytest.param(top_m, k, cf, disp, gated, pre,
                           id=f"m{top_m}-k{k}-cf{cf}-{disp}-{'glu' if gated else 'gelu'}-{'pre' if pre else 'post'}")


def build(top_m, k, cf, disp, gated, pre, seed=0):
    pad = cf == "1.0p"
    cf = 1.0 if pad else cf
    from samoe_dist.samoe.testing import build_samoe_layer, moe_transformer_config

    torch.manual_seed(seed)
    cfg = moe_transformer_config(
        hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=k, gated=gated, pre_softmax=pre,
        capacity_factor=cf, aux_loss_coeff=AUX, z_loss_coeff=ZLOSS, dispatcher=disp, dtype=DT,
        moe_pad_expert_input_to_capacity=pad,
    )
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_top_m=top_m, samoe_temperature=0.7, samoe_init="random")
    pool = ExpertPool(P, H, FFN, gated=gated, init_method_std=0.5, dtype=DT)
    layer = build_samoe_layer(cfg, PoolRef(pool), 0, samoe)
    with torch.no_grad():
        layer.router.weight.normal_()  # routing that depends on the token, not near-uniform
    return cfg, samoe, pool, layer


def oracle_grads(x_SBH, G, layer, pool, samoe, cfg, gated):
    leaves = {
        "x": x_SBH.detach().reshape(-1, H).clone().requires_grad_(),
        "router": layer.router.weight.detach().clone().requires_grad_(),
        "C": layer.experts.combination_logits.detach().clone().requires_grad_(),
        "w1": pool.w1.detach().clone().requires_grad_(),
        "w2": pool.w2.detach().clone().requires_grad_(),
    }
    if gated:
        leaves["w3"] = pool.w3.detach().clone().requires_grad_()
    y, aux, z, kept = reference_samoe_layer(
        leaves["x"], leaves["router"], leaves["C"], (leaves["w1"], leaves["w2"], leaves.get("w3")),
        samoe.samoe_temperature, samoe.samoe_top_m, cfg.moe_router_topk, cfg.moe_router_pre_softmax,
        cfg.moe_expert_capacity_factor, AUX, ZLOSS, cfg.activation_func, gated, return_kept=True,
    )
    grads = torch.autograd.grad((y * G.reshape(-1, H)).sum() + aux + z, list(leaves.values()))
    return y, dict(zip(leaves, grads)), kept


@pytest.mark.parametrize("top_m,k,cf,disp,gated,pre", list(_cases()))
def test_samoe_layer_matches_oracle(seeded, top_m, k, cf, disp, gated, pre):
    cfg, samoe, pool, layer = build(top_m, k, cf, disp, gated, pre)
    seen = []
    experts_forward = layer.experts.forward
    layer.experts.forward = lambda h, counts, probs: seen.append([int(c) for c in counts]) or experts_forward(h, counts, probs)
    x = torch.randn(SEQ, BATCH, H, dtype=DT, requires_grad=True)
    y, bias = layer(x)
    assert bias is None and y.shape == x.shape
    G = torch.randn_like(y)
    (y * G).sum().backward()

    y_ref, ref, kept = oracle_grads(x, G, layer, pool, samoe, cfg, gated)
    if cf is not None:
        assert len(kept) < SEQ * BATCH * k, "the capacity-bounded case dropped no token"
    if cf == "1.0p":  # every expert got exactly its capacity, more rows than were kept
        capacity = math.ceil(SEQ * BATCH * k / N * 1.0)
        assert seen == [[capacity] * N] and N * capacity > len(kept)
    torch.testing.assert_close(y.reshape(-1, H), y_ref, rtol=RTOL, atol=ATOL)
    got = {
        "x": x.grad.reshape(-1, H),
        "router": layer.router.weight.grad,
        "C": layer.experts.combination_logits.grad,
        "w1": pool.w1.grad,
        "w2": pool.w2.grad,
    }
    if gated:
        got["w3"] = pool.w3.grad
    for name, want in ref.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got[name], want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_materialized_experts_and_entropy(seeded):
    cfg, samoe, pool, layer = build(2, 2, None, "alltoall", True, True)
    W1, W2, W3 = layer.experts.materialized_experts()
    A = reference_combination_weights(layer.experts.combination_logits.detach(), 0.7, 2)
    for e, (w1, w2, w3) in enumerate(reference_materialize(A, pool.tensors())):
        torch.testing.assert_close(W1[e], w1)
        torch.testing.assert_close(W2[e], w2)
        torch.testing.assert_close(W3[e], w3)
    entropy = layer.experts.combination_entropy().item()
    assert 0 < entropy <= torch.log(torch.tensor(2.0)).item() + 1e-9  # top-2 rows


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


class _PGs:
    def __init__(self, ep_rank, ep_size):
        self.ep = _Group(ep_rank, ep_size)
        self.expt_tp = _Group(0, 1)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_local_experts_are_the_rows_of_this_ep_rank(seeded, ep_rank):
    """With EP=2, rank r runs global experts 2r, 2r+1 and only their rows of C get gradient."""
    from samoe_dist.samoe.experts import SaMoEExperts
    from samoe_dist.samoe.testing import moe_transformer_config

    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=2, dtype=DT)
    pool = ExpertPool(P, H, FFN, init_method_std=0.5, dtype=DT)
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_init="random")
    experts = SaMoEExperts(2, cfg, pg_collection=_PGs(ep_rank, 2), pool_ref=PoolRef(pool),
                           moe_layer_index=0, samoe=samoe)
    x = torch.randn(5, H, dtype=DT)
    probs = torch.rand(5, dtype=DT)
    y, _ = experts(x, torch.tensor([2, 3]), probs)
    W1, W2 = experts.materialized_experts()
    owned = [2 * ep_rank, 2 * ep_rank + 1]
    y_ref = torch.cat([
        (F.gelu(x[:2] @ W1[owned[0]]) * probs[:2, None]) @ W2[owned[0]],
        (F.gelu(x[2:] @ W1[owned[1]]) * probs[2:, None]) @ W2[owned[1]],
    ])
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    grad_rows = experts.combination_logits.grad.abs().sum(-1)
    assert (grad_rows[owned] > 0).all()
    assert (grad_rows[[e for e in range(N) if e not in owned]] == 0).all()


def test_unsupported_options_fail_with_the_flag_name(seeded):
    from samoe_dist.samoe.experts import SaMoEExperts
    from samoe_dist.samoe.testing import moe_transformer_config

    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=2,
                                 add_bias_linear=True)
    with pytest.raises(NotImplementedError, match="add_bias_linear"):
        SaMoEExperts(N, cfg, pg_collection=_PGs(0, 1), pool_ref=PoolRef(None), moe_layer_index=0,
                     samoe=SaMoEConfig(samoe_pool_size=P))
    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=2)
    with pytest.raises(ValueError, match="pool shape"):
        SaMoEExperts(N, cfg, pg_collection=_PGs(0, 1), pool_ref=PoolRef(ExpertPool(P, H, FFN + 1)),
                     moe_layer_index=0, samoe=SaMoEConfig(samoe_pool_size=P))


@pytest.mark.parametrize("gated", [False, True])
def test_float32_layer_on_the_grouped_gemm_path_matches_oracle(seeded, gated):
    """fp32 with 16-byte-aligned sizes: the experts take torch's grouped GEMM on the CPU."""
    from samoe_dist.samoe import grouped_gemm
    from samoe_dist.samoe.testing import build_samoe_layer, moe_transformer_config

    h, f = 16, 32
    cfg = moe_transformer_config(hidden_size=h, ffn_hidden_size=f, num_experts=N, topk=2, gated=gated,
                                 aux_loss_coeff=AUX, z_loss_coeff=ZLOSS, dtype=torch.float32)
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_top_m=0, samoe_temperature=0.7, samoe_init="random")
    pool = ExpertPool(P, h, f, gated=gated, init_method_std=0.3)
    layer = build_samoe_layer(cfg, PoolRef(pool), 0, samoe)
    with torch.no_grad():
        layer.router.weight.normal_()
    if grouped_gemm._GROUPED_MM is not None:
        assert grouped_gemm._use_grouped(torch.zeros(1, h), h, f)
    x = torch.randn(SEQ, BATCH, h, requires_grad=True)
    y, _ = layer(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()

    leaves = [t.detach().double().requires_grad_() for t in
              (x.reshape(-1, h), layer.router.weight, layer.experts.combination_logits, *pool.tensors()) if t is not None]
    pool64 = tuple(leaves[3:]) + ((None,) if not gated else ())
    y_ref, aux, z = reference_samoe_layer(leaves[0], leaves[1], leaves[2], pool64, 0.7, 0, 2, True, None,
                                          AUX, ZLOSS, cfg.activation_func, gated)
    grads = torch.autograd.grad((y_ref * G.double().reshape(-1, h)).sum() + aux + z, leaves)
    got = [x.grad.reshape(-1, h), layer.router.weight.grad, layer.experts.combination_logits.grad,
           *[w.grad for w in pool.tensors() if w is not None]]
    torch.testing.assert_close(y.double().reshape(-1, h), y_ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(got, grads):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)


def test_moe_apply_probs_on_input_scales_the_tokens_like_sequential_mlp(seeded):
    from samoe_dist.samoe.experts import SaMoEExperts
    from samoe_dist.samoe.testing import moe_transformer_config

    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=2, topk=1, dtype=DT,
                                 moe_apply_probs_on_input=True)
    pool = ExpertPool(P, H, FFN, init_method_std=0.5, dtype=DT)
    experts = SaMoEExperts(2, cfg, pg_collection=_PGs(0, 1), pool_ref=PoolRef(pool), moe_layer_index=0,
                           samoe=SaMoEConfig(samoe_pool_size=P, samoe_init="random"))
    x, probs = torch.randn(5, H, dtype=DT), torch.rand(5, dtype=DT)
    y, _ = experts(x, torch.tensor([3, 2]), probs)
    W1, W2 = experts.materialized_experts()
    xs = probs[:, None] * x
    y_ref = torch.cat([F.gelu(xs[:3] @ W1[0]) @ W2[0], F.gelu(xs[3:] @ W1[1]) @ W2[1]])
    torch.testing.assert_close(y, y_ref)
