"""The pool's other forms: shared routing (--samoe-route-to-pool), the signed linear combination,
and the peaked init given as a mass; each against a hand derivation or the for-loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from samoe_dist.config import ConfigError, SaMoEConfig, peak_logit_for_mass
from samoe_dist.samoe.combination import combination_weights, init_combination_logits, peaked_pool_index
from samoe_dist.samoe.pool import ExpertPool, PoolRef
from samoe_dist.samoe.reference import reference_materialize, reference_moe_layer

H, FFN = 8, 6
DT = torch.float64
AUX, ZLOSS = 0.1, 0.01


# -- the mass init ------------------------------------------------------------------------------

@pytest.mark.parametrize("mass, P, tau", [(0.95, 32, 1.0), (0.95, 4, 1.0), (0.5, 8, 0.5), (0.99, 64, 2.0)])
def test_peak_logit_from_mass_by_hand(mass, P, tau):
    # e^b / (e^b + P - 1) = m  =>  e^b (1 - m) = m (P - 1)  =>  b = ln(m (P - 1) / (1 - m))
    beta = math.log(mass * (P - 1) / (1 - mass))
    assert peak_logit_for_mass(mass, P, tau) == pytest.approx(tau * beta, rel=1e-12)
    # the row the init writes (no noise) has exactly that mass on its peak under softmax(C / tau)
    C = init_combination_logits(3, P, 1, peak=peak_logit_for_mass(mass, P, tau), noise=0.0, dtype=DT)
    A = combination_weights(C, tau)
    peaks = peaked_pool_index(3, P, 1)
    # the init draws in fp32: the offset is rounded by up to 2^-24 of itself, and dm/dbeta = m (1 - m)
    atol = mass * (1 - mass) * abs(beta) * 2.0**-23
    torch.testing.assert_close(A[torch.arange(3), peaks], torch.full((3,), mass, dtype=DT), rtol=0, atol=atol)


def test_fixed_peak_softens_with_the_pool_but_the_mass_does_not():
    """The issue's numbers: beta = 4 puts 95% on the peak at P=4 but 64% at P=32."""
    for P, want in ((4, math.exp(4) / (math.exp(4) + 3)), (32, math.exp(4) / (math.exp(4) + 31))):
        cfg = SaMoEConfig(samoe_pool_size=P, samoe_init_peak=4.0)
        A = combination_weights(init_combination_logits(2, P, 0, peak=cfg.init_peak_logit(), noise=0.0), 1.0)
        assert A.max(-1).values[0].item() == pytest.approx(want, rel=_fp32_softmax_rel(P))
    assert round(math.exp(4) / (math.exp(4) + 3), 2) == 0.95 and round(math.exp(4) / (math.exp(4) + 31), 2) == 0.64
    for P in (4, 32, 256):  # the default is a mass: the same at every pool size
        cfg = SaMoEConfig(samoe_pool_size=P)
        A = combination_weights(init_combination_logits(2, P, 0, peak=cfg.init_peak_logit(), noise=0.0), 1.0)
        assert A.max(-1).values[0].item() == pytest.approx(0.95, rel=_fp32_softmax_rel(P))


def _fp32_softmax_rel(P: int) -> float:
    """Relative error bound of one entry of an fp32 softmax over P logits (u = 2^-24).

    The row sum adds P terms in an order set by the CPU's vector width (the lane holding the
    peak's 1 takes P/8 adds on AVX2, P/16 on AVX-512): at most (P - 1) u in the recursive bound.
    The logit's fp32 rounding, the exp and the division add a few u (4 taken)."""
    return (P - 1 + 4) * 2.0**-24


@pytest.mark.parametrize("kwargs, message", [
    (dict(samoe_pool_size=8, samoe_init_peak=4.0, samoe_init_peak_mass=0.9), "give one of them"),
    (dict(samoe_pool_size=8, samoe_init_peak_mass=1.0), r"must be in \(0, 1\)"),
    (dict(samoe_pool_size=8, samoe_init_peak_mass=0.1), "not above the uniform weight"),
    (dict(samoe_pool_size=8, samoe_combination="linear", samoe_temperature=2.0), "no softmax"),
    (dict(samoe_pool_size=8, samoe_combination="cubic"), "'softmax' or 'linear'"),
    (dict(samoe_pool_size=8, samoe_route_to_pool=True, samoe_top_m=2), "no combination weights"),
    (dict(samoe_route_to_pool=True), "needs --samoe-pool-size"),
])
def test_bad_pool_flags_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SaMoEConfig(**kwargs)


def test_shared_routing_needs_as_many_experts_as_the_pool():
    from samoe_dist.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num-experts", "8", "--samoe-pool-size", "4", "--samoe-route-to-pool"])
    cfg, _ = parse_args(["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-route-to-pool"])
    assert cfg.samoe.samoe_route_to_pool and cfg.kind == "samoe"


# -- shared routing and the linear combination in megatron's MoELayer ------------------------------

def _layer(samoe: SaMoEConfig, N: int, k: int, gated: bool, cf=None):
    from samoe_dist.samoe.testing import build_samoe_layer, moe_transformer_config

    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=k, gated=gated,
                                 capacity_factor=cf, aux_loss_coeff=AUX, z_loss_coeff=ZLOSS, dtype=DT)
    pool = ExpertPool(samoe.samoe_pool_size, H, FFN, gated=gated, init_method_std=0.5, dtype=DT)
    layer = build_samoe_layer(cfg, PoolRef(pool), 0, samoe)
    with torch.no_grad():
        layer.router.weight.normal_()
    return cfg, pool, layer


@pytest.mark.parametrize("k, gated, cf", [(1, False, None), (2, True, None), (2, False, 0.5)])
def test_shared_routing_layer_is_a_standard_moe_on_the_pool(seeded, k, gated, cf):
    """N = P, A = I: megatron's MoELayer on the pool's experts as they are. Outputs and every
    gradient equal the for-loop oracle given the pool tensors themselves as the experts."""
    P = 4
    cfg, pool, layer = _layer(SaMoEConfig(samoe_pool_size=P, samoe_route_to_pool=True), P, k, gated, cf)
    assert layer.experts.combination_logits is None
    assert not [n for n, _ in layer.named_parameters() if "combination" in n]
    x = torch.randn(6, 2, H, dtype=DT, requires_grad=True)
    y, _ = layer(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()

    leaves = [x.detach().reshape(-1, H).clone().requires_grad_(), layer.router.weight.detach().clone().requires_grad_()]
    pool_leaves = [w.detach().clone().requires_grad_() for w in pool.tensors() if w is not None]
    experts = [tuple(w[e] for w in pool_leaves) + ((None,) if not gated else ()) for e in range(P)]
    y_ref, aux, z = reference_moe_layer(leaves[0], leaves[1], experts, k, True, cf, AUX, ZLOSS,
                                        cfg.activation_func, gated)
    grads = torch.autograd.grad((y_ref * G.reshape(-1, H)).sum() + aux + z, leaves + pool_leaves)
    torch.testing.assert_close(y.reshape(-1, H), y_ref, rtol=1e-5, atol=1e-6)
    got = [x.grad.reshape(-1, H), layer.router.weight.grad] + [w.grad for w in pool.tensors() if w is not None]
    for name, g, want in zip(["x", "router", "w1", "w2", "w3"], got, grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_shared_routing_materialized_experts_are_the_pool(seeded):
    _, pool, layer = _layer(SaMoEConfig(samoe_pool_size=4, samoe_route_to_pool=True), 4, 1, False)
    W1, W2 = layer.experts.materialized_experts()
    assert torch.equal(W1, pool.w1.detach()) and torch.equal(W2, pool.w2.detach())
    assert torch.equal(layer.experts.combination_weights().cpu(), torch.eye(4))


def test_linear_combination_starts_one_hot_and_is_signed(seeded):
    N, P = 6, 4
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_combination="linear", samoe_init_noise=0.0)
    _, pool, layer = _layer(samoe, N, 2, False)
    A = layer.experts.combination_weights()
    want = torch.zeros(N, P, dtype=DT)
    want[torch.arange(N), peaked_pool_index(N, P, 0)] = 1.0
    assert torch.equal(A, want)  # one-hot rows: each layer expert starts as one pool expert
    assert layer.experts.combination_peak_mass().item() == 1.0
    # A = C as is: negative weights stay negative and the gradient reaches C unchanged
    C = torch.randn(N, P, dtype=DT, requires_grad=True)
    A = combination_weights(C, 1.0, 0, "linear")
    assert A is C
    with torch.no_grad():
        layer.experts.combination_logits.copy_(C)
    W1, W2 = layer.experts.materialized_experts()
    for e, (w1, w2, _) in enumerate(reference_materialize(C.detach(), (pool.w1, pool.w2, None))):
        torch.testing.assert_close(W1[e], w1)
        torch.testing.assert_close(W2[e], w2)


# -- gradient-flow analytics ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--num-experts", "4", "--moe-router-topk", "2"],
    ["--num-experts", "4", "--moe-router-topk", "1", "--moe-expert-capacity-factor", "0.5"],
    ["--num-experts", "4", "--samoe-pool-size", "3", "--moe-router-topk", "2"],
    ["--num-experts", "4", "--samoe-pool-size", "4", "--samoe-route-to-pool", "--moe-router-topk", "1"],
], ids=["moe", "moe-capacity", "samoe", "shared"])
def test_tokens_received_equal_the_routers_counts(seeded, argv):
    """The experts' own count of the tokens they received equals what the routers routed (after
    capacity dropping), layer by layer; a pool expert's tokens are the A-weighted sum of them."""
    from samoe_dist.gradient_flow import expert_grad_sq_norms, pool_grad_norms, pool_tokens
    from tests.helpers import build_training_model

    model, cfg, _ = build_training_model(argv)
    model.train()
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # two forwards accumulate
        loss, _ = model(tokens, tokens, torch.ones_like(tokens, dtype=torch.float32))
        loss.backward()
    routed, received = model.expert_loads()
    assert received.shape == routed.shape == (2, 4)
    assert torch.equal(received, routed)
    k = cfg.moe.moe_router_topk
    if cfg.moe.moe_expert_capacity_factor is None:
        assert torch.equal(routed.sum(-1), torch.full((2,), 2.0 * 4 * 16 * k, dtype=torch.float64))
    else:
        assert (routed.sum(-1) < 2.0 * 4 * 16 * k).all()  # tokens were dropped, and not counted
    if cfg.samoe.enabled:
        served = pool_tokens(model.samoe_experts, received)
        assert served.sum().item() == pytest.approx(received.sum().item(), rel=1e-12)
        if cfg.samoe.samoe_route_to_pool:
            assert torch.equal(served, received.sum(0))  # A = I: exact counts
        norms = pool_grad_norms(model.gpt.samoe_pool)
        by_hand = sum(w.grad.reshape(w.shape[0], -1).double().pow(2).sum(1)
                      for w in model.gpt.samoe_pool.tensors() if w is not None).sqrt()
        torch.testing.assert_close(norms, by_hand)
    else:
        sq = expert_grad_sq_norms(model.moe_layers, 4, 0, torch.device("cpu"))
        for i, layer in enumerate(model.moe_layers):
            for e, expert in enumerate(layer.experts.local_experts):
                want = sum(p.grad.double().pow(2).sum() for p in expert.parameters())
                assert sq[i, e].item() == pytest.approx(float(want), rel=1e-12)
                assert (sq[i, e] > 0) == (received[i, e] > 0)  # gradient exactly where tokens went
    assert model.expert_loads()[1].sum() == 0  # read once


def test_per_expert_values_go_to_tensorboard_as_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from samoe_dist.metrics import MetricsWriter

    writer = MetricsWriter(True, str(tmp_path / "m.jsonl"), str(tmp_path / "tb"))
    writer.write({"type": "train", "iteration": 5, "lm_loss": 3.0, "pool_grad_norm": [0.5, 1.5, 2.0],
                  "expert_tokens_received": [[1.0, 3.0], [2.0, 4.0]]})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    hist = {tag: acc.Histograms(tag)[0].histogram_value for tag in acc.Tags()["histograms"]}
    assert sorted(hist) == ["train/expert_tokens_received", "train/pool_grad_norm"]
    assert hist["train/pool_grad_norm"].num == 3 and hist["train/pool_grad_norm"].max == 2.0
    assert hist["train/expert_tokens_received"].sum == 10.0
    assert acc.Scalars("train/lm_loss")[0].value == 3.0


@pytest.mark.parametrize("k, cf, pre_softmax", [(1, None, True), (2, 0.5, True), (2, None, False)])
def test_the_trainers_router_matches_the_oracle_with_its_losses(seeded, k, cf, pre_softmax):
    """ExplicitLossRouter, the router the trainer builds (samoe_dist.model), in megatron's MoELayer
    with SaMoE experts: the output, the load-balancing and z losses it hands over (pop_losses), and
    the gradients of tokens, router weight, pool and combination logits through output AND losses
    equal the for-loop oracle's."""
    from megatron.core.transformer.spec_utils import build_module

    from samoe_dist.model import _with_explicit_router
    from samoe_dist.router import ExplicitLossRouter
    from samoe_dist.samoe.reference import reference_combination_weights, reference_materialize
    from samoe_dist.samoe.spec import samoe_moe_spec
    from samoe_dist.samoe.testing import moe_transformer_config

    N, P, tau = 4, 3, 0.7
    cfg = moe_transformer_config(hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=k, capacity_factor=cf,
                                 aux_loss_coeff=AUX, z_loss_coeff=ZLOSS, dtype=DT, pre_softmax=pre_softmax)
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_temperature=tau, samoe_init="random")
    pool = ExpertPool(P, H, FFN, init_method_std=0.5, dtype=DT)
    layer = build_module(_with_explicit_router(samoe_moe_spec(PoolRef(pool), 0, samoe)), config=cfg, layer_number=1)
    assert type(layer.router) is ExplicitLossRouter
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(6, 2, H, dtype=DT, requires_grad=True)
    y, _ = layer(x)
    losses = layer.router.pop_losses()
    assert set(losses) == {"load_balancing_loss", "z_loss"}
    G = torch.randn_like(y)
    ((y * G).sum() + losses["load_balancing_loss"] + losses["z_loss"]).backward()

    C = layer.experts.combination_logits
    leaves = [x.detach().reshape(-1, H).clone().requires_grad_(), layer.router.weight.detach().clone().requires_grad_(),
              pool.w1.detach().clone().requires_grad_(), pool.w2.detach().clone().requires_grad_(),
              C.detach().clone().requires_grad_()]
    experts = reference_materialize(reference_combination_weights(leaves[4], tau), (leaves[2], leaves[3], None))
    y_ref, aux, z = reference_moe_layer(leaves[0], leaves[1], experts, k, pre_softmax, cf, AUX, ZLOSS,
                                        cfg.activation_func, False)
    torch.testing.assert_close(y.reshape(-1, H), y_ref, rtol=1e-5, atol=1e-6)
    # megatron computes the aux losses in fp32 (its router dtype) from fp64 logits: a sum of ~T*N
    # fp32-rounded terms, relative error under T*N*2^-24 ~ 3e-6 here
    torch.testing.assert_close(losses["load_balancing_loss"].double(), aux, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(losses["z_loss"].double(), z, rtol=1e-5, atol=1e-9)
    assert aux > 0 and z > 0
    no_loss = torch.autograd.grad((y_ref * G.reshape(-1, H)).sum(), leaves[1], retain_graph=True)[0]
    grads = torch.autograd.grad((y_ref * G.reshape(-1, H)).sum() + aux + z, leaves)
    got = [x.grad.reshape(-1, H), layer.router.weight.grad, pool.w1.grad, pool.w2.grad, C.grad]
    for name, g, want in zip(["x", "router", "w1", "w2", "C"], got, grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the losses' own share of the router gradient is there: without them it differs
    assert not torch.allclose(no_loss, layer.router.weight.grad, rtol=1e-3, atol=1e-6)
