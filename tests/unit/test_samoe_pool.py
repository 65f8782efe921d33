"""One pool shared by several SaMoE layers: the degenerate case equals megatron's standard MoE, the
pool gradient is the combination-weighted sum of the layer-expert gradients, and the pool is
stored once."""

from __future__ import annotations

import io

import pytest
import torch

from samoe_dist.config import SaMoEConfig
from samoe_dist.samoe.pool import ExpertPool, PoolRef, attach_pool
from samoe_dist.samoe.reference import reference_combination_weights, reference_materialize, reference_moe_layer
from tests.helpers import bf16_worst_case

H, FFN, N, L = 8, 6, 4, 2
SEQ, BATCH = 6, 2
DT = torch.float64
RTOL, ATOL = 1e-5, 1e-6
AUX, ZLOSS = 0.1, 0.01


def _config(gated, k=2, dispatcher="alltoall"):
    from samoe_dist.samoe.testing import moe_transformer_config

    return moe_transformer_config(
        hidden_size=H, ffn_hidden_size=FFN, num_experts=N, topk=k, num_layers=L, gated=gated,
        aux_loss_coeff=AUX, z_loss_coeff=ZLOSS, dispatcher=dispatcher, dtype=DT,
    )


def _samoe_stack(cfg, samoe, pool):
    """L SaMoE MoELayers sharing `pool`, held with the pool attached once (as the model builder does)."""
    from samoe_dist.samoe.testing import build_samoe_layer

    model = torch.nn.Module()
    pool_ref = PoolRef(pool)
    model.layers = torch.nn.ModuleList(
        build_samoe_layer(cfg, pool_ref, j, samoe, layer_number=j + 1) for j in range(L)
    )
    attach_pool(model, pool)
    for layer in model.layers:
        with torch.no_grad():
            layer.router.weight.normal_()
    return model


def _run_stack(layers, x_SBH):
    """h <- h + moe(h) for each layer (a residual stream, as in a transformer)."""
    h = x_SBH
    for layer in layers:
        y, _ = layer(h)
        h = h + y
    return h


@pytest.mark.parametrize("gated", [False, True])
def test_one_hot_pool_of_L_times_N_is_megatrons_standard_moe(seeded, gated):
    """P = L*N, A one-hot with layer l expert e on pool expert l*N+e (top_m=1 makes A exactly
    one-hot): SaMoE layers equal megatron's standard MoELayers loaded with the same weights."""
    from samoe_dist.samoe.testing import build_standard_layer, load_pool_experts_into_standard

    cfg = _config(gated)
    samoe = SaMoEConfig(samoe_pool_size=L * N, samoe_top_m=1, samoe_init="peaked", samoe_init_peak=4.0)
    pool = ExpertPool(L * N, H, FFN, gated=gated, init_method_std=0.5, dtype=DT)
    model = _samoe_stack(cfg, samoe, pool)
    standard = torch.nn.ModuleList(build_standard_layer(cfg, layer_number=j + 1) for j in range(L))
    for j in range(L):
        A = model.layers[j].experts.combination_weights()
        assert torch.equal(A, torch.eye(L * N, dtype=DT)[j * N:(j + 1) * N])  # exactly one-hot
        load_pool_experts_into_standard(standard[j], pool, [j * N + e for e in range(N)])
        with torch.no_grad():
            standard[j].router.weight.copy_(model.layers[j].router.weight)

    x = torch.randn(SEQ, BATCH, H, dtype=DT)
    x_samoe, x_std = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_samoe, out_std = _run_stack(model.layers, x_samoe), _run_stack(standard, x_std)
    G = torch.randn_like(out_std)
    (out_samoe * G).sum().backward()
    (out_std * G).sum().backward()

    torch.testing.assert_close(out_samoe, out_std, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_samoe.grad, x_std.grad, rtol=RTOL, atol=ATOL)
    for j in range(L):
        torch.testing.assert_close(model.layers[j].router.weight.grad, standard[j].router.weight.grad,
                                   rtol=RTOL, atol=ATOL)
        assert (model.layers[j].experts.combination_logits.grad == 0).all()  # one-hot: no signal
        for e in range(N):
            expert = standard[j].experts.local_experts[e]
            p = j * N + e
            fc1_grad = expert.linear_fc1.weight.grad
            torch.testing.assert_close(pool.w1.grad[p], fc1_grad[:FFN].t(), rtol=RTOL, atol=ATOL)
            if gated:
                torch.testing.assert_close(pool.w3.grad[p], fc1_grad[FFN:].t(), rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(pool.w2.grad[p], expert.linear_fc2.weight.grad.t(), rtol=RTOL, atol=ATOL)
    assert pool.w1.grad.abs().max() > 0


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_pool_gradient_is_the_combination_weighted_sum_of_layer_expert_gradients(seeded, dispatcher):
    """dLoss/dW_pool[p] = sum_l sum_e A_l[e, p] * dLoss/dW_l[e] (DESIGN.md §2), on 2 layers in sequence."""
    P = 3
    cfg = _config(gated=False, dispatcher=dispatcher)
    samoe = SaMoEConfig(samoe_pool_size=P, samoe_temperature=0.8, samoe_init="random")
    pool = ExpertPool(P, H, FFN, init_method_std=0.5, dtype=DT)
    model = _samoe_stack(cfg, samoe, pool)
    x = torch.randn(SEQ, BATCH, H, dtype=DT)
    out = _run_stack(model.layers, x)
    G = torch.randn_like(out)
    (out * G).sum().backward()

    # Oracle: each layer's materialised experts are independent leaves; their gradients are taken
    # separately, then combined with A_l by the formula.
    A = [reference_combination_weights(l.experts.combination_logits.detach(), 0.8) for l in model.layers]
    experts = [
        [tuple(w.detach().clone().requires_grad_() if w is not None else None for w in ex)
         for ex in reference_materialize(A_l, pool.tensors())]
        for A_l in A
    ]
    h = x.reshape(-1, H)
    extra_losses = 0.0
    for j, layer in enumerate(model.layers):
        y, aux, z = reference_moe_layer(h, layer.router.weight.detach(), experts[j], 2, True, None,
                                        AUX, ZLOSS, cfg.activation_func, False)
        h = h + y
        extra_losses = extra_losses + aux + z
    leaves = [w for layer_experts in experts for ex in layer_experts for w in ex[:2]]
    grads = torch.autograd.grad((h * G.reshape(-1, H)).sum() + extra_losses, leaves)
    dW1 = [[grads[2 * (j * N + e)] for e in range(N)] for j in range(L)]
    dW2 = [[grads[2 * (j * N + e) + 1] for e in range(N)] for j in range(L)]

    want_w1 = sum(A[j][e, :, None, None] * dW1[j][e][None] for j in range(L) for e in range(N))
    want_w2 = sum(A[j][e, :, None, None] * dW2[j][e][None] for j in range(L) for e in range(N))
    torch.testing.assert_close(out.reshape(-1, H), h.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pool.w1.grad, want_w1, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pool.w2.grad, want_w2, rtol=RTOL, atol=ATOL)
    # both layers contribute: dropping either one's term changes the result
    layer0_only = sum(A[0][e, :, None, None] * dW1[0][e][None] for e in range(N))
    assert not torch.allclose(pool.w1.grad, layer0_only, rtol=1e-3, atol=1e-6)


def test_state_dict_holds_the_pool_once_and_round_trips(seeded):
    cfg = _config(gated=True)
    samoe = SaMoEConfig(samoe_pool_size=5, samoe_init="peaked")

    def make(seed):
        torch.manual_seed(seed)
        return _samoe_stack(cfg, samoe, ExpertPool(5, H, FFN, gated=True, init_method_std=0.5, dtype=DT))

    model = make(1)
    pool = model.samoe_pool
    sd = model.state_dict()
    for name, w in (("w1", pool.w1), ("w2", pool.w2), ("w3", pool.w3)):
        holders = [k for k, v in sd.items() if v.data_ptr() == w.data_ptr()]
        assert holders == [f"samoe_pool.{name}"], holders
    n_params = sum(1 for _ in model.parameters())
    assert n_params == 3 + L * 2  # pool w1/w2/w3 once; per layer: router weight, combination logits
    assert sorted(k for k in sd if "combination_logits" in k) == [
        f"layers.{j}.experts.combination_logits" for j in range(L)
    ]

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = make(2)
    x = torch.randn(SEQ, BATCH, H, dtype=DT)
    with torch.no_grad():
        before = _run_stack(fresh.layers, x)
        expected = _run_stack(model.layers, x)
    assert not torch.allclose(before, expected)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with torch.no_grad():
        after = _run_stack(fresh.layers, x)
    assert torch.equal(after, expected)
    # the layers of the loaded model still use the loaded (model-level) pool
    assert all(l.experts.pool is fresh.samoe_pool for l in fresh.layers)


def test_attach_pool_refuses_a_second_pool():
    model = torch.nn.Module()
    ref = attach_pool(model, ExpertPool(2, 4, 4))
    assert ref.pool is model.samoe_pool
    with pytest.raises(ValueError, match="already holds"):
        attach_pool(model, ExpertPool(2, 4, 4))


def test_one_hot_degenerate_case_in_bfloat16_on_the_grouped_gemm_path(seeded):
    """The same equivalence in bf16 with 16-byte-aligned sizes (torch's grouped GEMM on the CPU):
    agreement to bf16 rounding, the routing being identical (same router, same ops)."""
    from samoe_dist.samoe.testing import (
        build_samoe_layer, build_standard_layer, load_pool_experts_into_standard, moe_transformer_config,
    )

    h, f, bf16 = 16, 32, torch.bfloat16
    cfg = moe_transformer_config(hidden_size=h, ffn_hidden_size=f, num_experts=N, topk=2, gated=True,
                                 aux_loss_coeff=AUX, dtype=bf16)
    samoe = SaMoEConfig(samoe_pool_size=N, samoe_top_m=1, samoe_init="peaked")
    pool = ExpertPool(N, h, f, gated=True, init_method_std=0.3, dtype=bf16)
    layer = build_samoe_layer(cfg, PoolRef(pool), 0, samoe)
    standard = build_standard_layer(cfg)
    load_pool_experts_into_standard(standard, pool, list(range(N)))
    with torch.no_grad():
        layer.router.weight.normal_()
        standard.router.weight.copy_(layer.router.weight)
    x = torch.randn(SEQ, BATCH, h, dtype=bf16)
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_a, _ = layer(x_a)
    y_b, _ = standard(x_b)
    G = torch.randn_like(y_a)
    (y_a * G).sum().backward()
    (y_b * G).sum().backward()

    # Two bf16 computations whose GEMM kernels differ (SaMoE's grouped GEMMs, fc1 split in two, vs
    # megatron's per-expert linear layers); the one-hot A copies the pool exactly and the elementwise
    # ops are the same. Roundings that can differ, on the longer path: y: z1, z3, fc2, the sum over
    # the k experts (4); the input and router gradients add dy @ W2^T, fc1's input gradient (two
    # GEMMs and their sum), or the gate's dot product, softmax and router GEMM (6); the weight
    # gradients: the activations or their gradients (3) plus the weight-gradient GEMM (4). Worst
    # case for the largest error, relative to the tensor's scale (the GEMMs' sums cancel).
    def close(a, b, roundings):
        tol = bf16_worst_case(roundings, computations=2)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())

    close(y_a, y_b, 4)
    close(x_a.grad, x_b.grad, 6)
    close(layer.router.weight.grad, standard.router.weight.grad, 6)
    for e in range(N):
        expert = standard.experts.local_experts[e]
        close(pool.w1.grad[e], expert.linear_fc1.weight.grad[:f].t(), 4)
        close(pool.w3.grad[e], expert.linear_fc1.weight.grad[f:].t(), 4)
        close(pool.w2.grad[e], expert.linear_fc2.weight.grad.t(), 4)


def test_layers_accumulate_the_pool_gradient_into_one_buffer(seeded, monkeypatch):
    """Every layer's backward adds its A^T dW into the forward's sink and returns no pool gradient;
    autograd hands the pool tensors their gradient once per backward (one post-accumulate hook
    call each), and it is the same as without the sink (checked by the test above's oracle)."""
    from samoe_dist.samoe import expert_ffn
    from samoe_dist.samoe.pool import PoolGradSink

    cfg = _config(gated=True)
    samoe = SaMoEConfig(samoe_pool_size=3, samoe_init="random")
    pool = ExpertPool(3, H, FFN, gated=True, init_method_std=0.5, dtype=DT)
    model = _samoe_stack(cfg, samoe, pool)
    returned, adds = [], []
    backward = expert_ffn.MaterializedExpertFFN.backward
    monkeypatch.setattr(expert_ffn.MaterializedExpertFFN, "backward",
                        staticmethod(lambda ctx, dy: returned.append(backward(ctx, dy)) or returned[-1]))
    add_mm = PoolGradSink.add_mm
    monkeypatch.setattr(PoolGradSink, "add_mm", lambda self, *a: adds.append(a[0]) or add_mm(self, *a))
    hooks = {name: 0 for name in ("w1", "w2", "w3")}
    for name in hooks:
        getattr(pool, name).register_post_accumulate_grad_hook(lambda p, n=name: hooks.__setitem__(n, hooks[n] + 1))
    x = torch.randn(SEQ, BATCH, H, dtype=DT)
    _run_stack(model.layers, x).square().sum().backward()
    assert len(returned) == L
    assert all(r[3] is None and r[4] is None and r[5] is None for r in returned)  # no [P, h, f] per layer
    assert sorted(adds) == sorted([0, 1, 2] * L)  # w1, w2, w3 of every layer went into the sink
    assert hooks == {"w1": 1, "w2": 1, "w3": 1}
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in pool.tensors())


def _within_gemm_bound(got: torch.Tensor, factors, extra=None) -> bool:
    """``got`` equals sum_l A_l^T dW_l (+ ``extra``) up to the rounding of a GEMM of contraction
    length K (all the summed rows): |error| <= gamma_K * (|A|^T |dW|), gamma_K = K u / (1 - K u),
    u the unit roundoff of got's dtype (a bound for any summation order, one rounding per add)."""
    u = torch.finfo(got.dtype).eps / 2
    K = sum(A.shape[0] for A, _ in factors) + (1 if extra is not None else 0)
    gamma = K * u / (1 - K * u)
    exact = sum(A.double().t() @ dW.double() for A, dW in factors)
    scale = sum(A.double().abs().t() @ dW.double().abs() for A, dW in factors)
    if extra is not None:
        exact, scale = exact + extra.double(), scale + extra.double().abs()
    return bool(((got.double() - exact).abs() <= gamma * scale + 1e-300).all())


def test_sink_allocates_its_buffer_late_and_sums_the_factors():
    """The sink keeps each layer's factors (A [n, P], dW [n, D]) while they hold no more than P
    rows, so no [P, D] buffer exists at the start of backward; once one more layer would exceed P
    rows (or the gate takes the gradient) it sums the kept factors with one GEMM (later ones into
    the buffer in place). The sum is checked against float64 within the GEMM rounding bound."""
    from samoe_dist.samoe.pool import PoolGradSink

    P, D, n, layers = 8, 6, 3, 5
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(n, P, generator=g), torch.randn(n, D, generator=g)) for _ in range(layers)]

    sink = PoolGradSink(1, P)
    for k, (A, dW) in enumerate(factors):
        sink.add_mm(0, A, dW)
        kept_rows = (k + 1) * n
        assert (sink.grads[0] is None) == (kept_rows <= P), k  # late: only once P rows are exceeded
    assert not sink.pending[0] or sink.grads[0] is not None
    out = sink.take(0)
    assert out.shape == (P, D) and _within_gemm_bound(out, factors)
    assert sink.grads[0] is None and not sink.pending[0]

    few = PoolGradSink(1, P)  # fewer rows than P in all: the buffer appears only when taken
    for A, dW in factors[:2]:
        few.add_mm(0, A, dW)
    assert few.grads[0] is None
    assert _within_gemm_bound(few.take(0), factors[:2])

    mixed = PoolGradSink(1, P)  # kept factors are summed before rows are added: backward's order
    mixed.add_mm(0, *factors[0])
    rows = torch.randn(2, D, generator=g)
    mixed.add_rows(0, 1, rows, like=torch.empty(P, D))
    placed = torch.zeros(P, D)
    placed[1:3] = rows
    assert _within_gemm_bound(mixed.take(0), factors[:1], extra=placed)

    # bf16 factors: a bf16 buffer within bf16's bound (any accumulation order: Intel and AMD differ)
    bf = [(A.bfloat16(), dW.bfloat16()) for A, dW in factors]
    sink16 = PoolGradSink(1, P)
    for A, dW in bf:
        sink16.add_mm(0, A, dW)
    out16 = sink16.take(0)
    assert out16.dtype == torch.bfloat16 and _within_gemm_bound(out16, bf)


def test_pool_values_do_not_depend_on_the_sharding():
    """Each rank of a column-sharded pool holds exactly its columns of the pool an unsharded run
    draws from the same seed (every expert drawn whole on the CPU from its own generator)."""
    from samoe_dist.samoe.pool import PoolShard

    full = ExpertPool(5, 8, 12, gated=True, init_method_std=0.3, seed=123)
    for S in (2, 4):
        for r in range(S):
            part = ExpertPool(5, 8, 12, gated=True, init_method_std=0.3, seed=123, shard=PoolShard(None, S, r))
            for w_full, w_part in zip(full.tensors(), part.tensors()):
                cols = w_full.shape[1] * w_full.shape[2] // S
                torch.testing.assert_close(w_part, w_full.reshape(5, -1)[:, r * cols:(r + 1) * cols], rtol=0, atol=0)
    other = ExpertPool(5, 8, 12, gated=True, init_method_std=0.3, seed=124)
    assert not torch.equal(other.w1, full.w1)  # the seed matters
    with pytest.raises(ValueError, match="does not split into 5 equal column slices"):
        ExpertPool(5, 8, 12, shard=PoolShard(None, 5, 0), seed=1)


def test_step_cache_is_scoped_and_emptied_on_exit():
    """--samoe-materialize-once-per-step's store exists only inside ExpertPool.step_cache(); leaving
    the block (also by an exception) empties every layer's store, so a finished graph that still
    references one holds no weights; the block does not nest."""
    pool = ExpertPool(pool_size=2, hidden_size=4, ffn_hidden_size=8)
    assert pool.cached_weights("layer0") is None
    with pool.step_cache():
        store = pool.cached_weights("layer0")
        store[0] = torch.ones(3)
        assert pool.cached_weights("layer0") is store and pool.cached_weights("layer1") == {}
        with pytest.raises(RuntimeError, match="already open"):
            with pool.step_cache():
                pass
    assert store == {} and pool.cached_weights("layer0") is None
    with pytest.raises(ValueError):
        with pool.step_cache():
            kept = pool.cached_weights("layer0")
            kept[1] = torch.ones(3)
            raise ValueError("a micro-batch failed")
    assert kept == {} and pool.cached_weights("layer0") is None


def test_layer_prefetch_follows_the_first_forwards_order():
    """--samoe-prefetch-gather's bookkeeping (ExpertPool.layer_prefetch), with gathers that record
    what is started, taken and waited for: the first forward records the order and starts nothing;
    then each layer takes what its predecessor started and starts its successor's; a call past the
    order (recomputation) and a call in the step cache do neither; a gather no layer took is waited
    for when the next forward begins; an unsharded pool or the flag off prefetches nothing."""
    from samoe_dist.samoe.pool import PoolShard, PrefetchedGather

    log = []

    def starter(name):
        def start():
            log.append(f"start {name}")
            return PrefetchedGather(lambda: log.append(f"wait {name}") or {0: name})
        return start

    pool = ExpertPool(2, 4, 8, shard=PoolShard(None, 2, 0), seed=1)
    pool.prefetch_gathers = True
    layers = ["l0", "l1", "l2"]

    def forward(calls=layers):
        pool.begin_forward()
        return [pool.layer_prefetch(name, starter(name)) for name in calls]

    assert forward() == [None, None, None] and log == []  # the order is recorded
    got = forward()
    assert got[0] is None and [g.take() for g in got[1:]] == [{0: "l1"}, {0: "l2"}]
    assert log == ["start l1", "start l2", "wait l1", "wait l2"]
    assert got[1].take() is None  # once: the layer's backward gathers its own
    log.clear()
    # a recomputed forward in backward: calls past the order start and take nothing
    assert [pool.layer_prefetch(name, starter(name)) for name in reversed(layers)] == [None] * 3 and log == []
    # a forward that stops after l0: l1's gather is waited for when the next forward begins
    forward(["l0"])
    assert log == ["start l1"]
    pool.begin_forward()
    assert log == ["start l1", "wait l1"]
    log.clear()
    with pool.step_cache():
        assert forward() == [None] * 3 and log == []
    pool.prefetch_gathers = False
    assert forward() == [None] * 3 and log == []
    plain = ExpertPool(2, 4, 8, seed=1)  # not sharded: nothing to gather
    plain.prefetch_gathers = True
    plain.begin_forward()
    assert plain.layer_prefetch("l0", starter("l0")) is None
    plain.begin_forward()
    assert [plain.layer_prefetch(n, starter(n)) for n in layers] == [None] * 3 and log == []
