"""The materialise-and-run autograd Function against plain autograd, and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samoe_dist.samoe import grouped_gemm
from samoe_dist.samoe.expert_ffn import materialize, materialized_expert_ffn, reference_expert_ffn
from tests.helpers import bf16_worst_case


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(T, h, f, P, counts, gated, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    x = rnd(T, h).requires_grad_()
    probs = torch.rand(T, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    A = torch.softmax(torch.randn(len(counts), P, generator=gen, dtype=torch.float64), -1).to(dtype)
    A.requires_grad_()
    w1 = rnd(P, h, f).requires_grad_()
    w2 = rnd(P, f, h).requires_grad_()
    w3 = rnd(P, h, f).requires_grad_() if gated else None
    return x, probs, A, w1, w2, w3


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("counts", [(3, 0, 4), (0, 7, 0), (2, 2, 3), (3, 3, 3)])  # (3, 3, 3): equal groups
def test_gradcheck_float64(gated, counts):
    x, probs, A, w1, w2, w3 = make_inputs(sum(counts), 4, 5, 3, counts, gated, torch.float64)
    act = F.silu if gated else F.gelu

    def fn(x, probs, A, w1, w2, *w3):
        return materialized_expert_ffn(x, probs, counts, A, w1, w2, w3[0] if w3 else None, act)

    inputs = (x, probs, A, w1, w2) + ((w3,) if gated else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_expert_with_zero_tokens_gets_zero_weight_gradient():
    counts = (4, 0)
    x, probs, A, w1, w2, _ = make_inputs(4, 4, 5, 2, counts, False, torch.float64)
    A = torch.eye(2, dtype=torch.float64).requires_grad_()  # layer expert e is pool expert e
    y = materialized_expert_ffn(x, probs, counts, A, w1, w2, None, F.gelu)
    y.square().sum().backward()
    assert w1.grad[1].abs().max() == 0 and w2.grad[1].abs().max() == 0
    assert w1.grad[0].abs().max() > 0 and A.grad[1].abs().max() == 0
    # no tokens at all: empty output, zero gradients
    x0, p0 = x[:0].detach().requires_grad_(), probs[:0].detach().requires_grad_()
    y0 = materialized_expert_ffn(x0, p0, (0, 0), A, w1, w2, None, F.gelu)
    assert y0.shape == (0, 4)
    w1.grad = None
    y0.sum().backward()
    assert w1.grad.abs().max() == 0


def _compare_to_autograd(dtype, gated, counts, h, f, P, rtol, atol):
    inputs = make_inputs(sum(counts), h, f, P, counts, gated, dtype, scale=0.5)
    x, probs, A, w1, w2, w3 = inputs
    act = F.silu if gated else F.gelu
    leaves = [t for t in inputs if t is not None]
    y = materialized_expert_ffn(x, probs, counts, A, w1, w2, w3, act)
    G = torch.randn_like(y)
    grads = torch.autograd.grad((y * G).sum(), leaves)
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    xr, pr, Ar, w1r, w2r, w3r = ref_inputs
    y_ref = reference_expert_ffn(xr, pr, counts, Ar, w1r, w2r, w3r, act)
    ref_grads = torch.autograd.grad((y_ref * G.double()).sum(), [t for t in ref_inputs if t is not None])
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("gated", [False, True])
def test_float32_grouped_and_loop_paths_match_autograd(use_grouped, gated, monkeypatch):
    counts, h, f, P = (5, 0, 9, 2), 16, 32, 3  # 16-byte aligned: grouped_mm is eligible on CPU
    monkeypatch.setattr(grouped_gemm, "ENABLE_GROUPED_MM", use_grouped)
    x = torch.zeros(1, h)
    assert grouped_gemm._use_grouped(x, h, f) == (use_grouped and grouped_gemm._GROUPED_MM is not None)
    _compare_to_autograd(torch.float32, gated, counts, h, f, P, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_float32_equal_groups_match_autograd(gated):
    """Equal groups (every expert padded to its capacity): one batched GEMM per product, and in fp32
    the activation and its derivative on oneDNN's kernel (expert_ffn._activation_kernels), against
    float64 autograd at the tolerance of the ragged fp32 case above."""
    _compare_to_autograd(torch.float32, gated, (6, 6, 6, 6), 16, 32, 3, rtol=1e-5, atol=1e-5)


# bf16 against a float64 oracle on the same bf16-valued inputs: only the bf16 run rounds. The longest
# path is the combination weights' gradient dA: dhidden = dy @ W2^T with W2 = A @ w2 (2), the prob
# scale (1), times z3 = x @ (A @ w3) (3), through silu' at z1 = x @ (A @ w1) (3), dW1 = x^T dz1 (1),
# dA = dW1 @ w1^T (1), summed over w1, w2 and w3 (2): 13 roundings. Worst case for the largest error;
# inputs and weights are of order 1 (scale 0.5), so the bound also serves as the absolute tolerance
# where sums cancel.
BF16_FFN_TOL = bf16_worst_case(13)


def test_bfloat16_runs_close_to_float64():
    _compare_to_autograd(torch.bfloat16, True, (6, 3, 0, 7), 16, 32, 3, rtol=BF16_FFN_TOL, atol=BF16_FFN_TOL)


def _saved_bytes(fn) -> tuple:
    """(total bytes, shapes) of the tensors autograd saves for backward while running fn()."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_materialized_weights_are_not_saved_for_backward():
    n, T, h, f, P = 4, 12, 16, 32, 3
    counts = (3, 4, 0, 5)
    x, probs, A, w1, w2, w3 = make_inputs(T, h, f, P, counts, True, torch.float32)
    pool_ptrs = {w.data_ptr() for w in (w1, w2, w3)}
    materialized_bytes = 3 * n * h * f * 4  # W1, W2, W3 of the n local experts, fp32
    materialized_shapes = {(n, h, f), (n, f, h)}

    def non_pool_bytes(saved):
        kept = [t for t in saved if t is not None and t.data_ptr() not in pool_ptrs]
        return sum(t.numel() * t.element_size() for t in kept)

    _, saved = _saved_bytes(lambda: materialized_expert_ffn(x, probs, counts, A, w1, w2, w3, F.silu))
    assert not any(tuple(t.shape) in materialized_shapes for t in saved if t is not None)
    nbytes = non_pool_bytes(saved)
    assert 0 < nbytes < materialized_bytes / 2, nbytes

    # the same math in plain autograd keeps (slices of) the materialised weights: the hook sees them
    _, saved_ref = _saved_bytes(lambda: reference_expert_ffn(x, probs, counts, A, w1, w2, w3, F.silu))
    assert non_pool_bytes(saved_ref) > materialized_bytes / 2


def test_materialize_is_the_einsum_of_the_spec():
    A = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    w = torch.randn(5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(materialize(A, w), torch.einsum("np,phf->nhf", A, w))


def test_bad_counts_are_rejected():
    x, probs, A, w1, w2, _ = make_inputs(5, 4, 5, 2, (2, 3), False, torch.float64)
    with pytest.raises(ValueError, match="sum to 4"):
        materialized_expert_ffn(x, probs, (2, 2), A, w1, w2, None, F.gelu)
    with pytest.raises(ValueError, match="local experts"):
        materialized_expert_ffn(x, probs, (5,), A, w1, w2, None, F.gelu)


def test_bf16_row_padding_changes_no_result_beyond_one_rounding(monkeypatch):
    """On the CPU, bf16 grouped GEMMs pad each group's rows to a multiple of PAD_ROWS (zero rows):
    each output element is still one fp32-accumulated dot product rounded once to bf16, so padded
    and unpadded results differ by at most one bf16 rounding (2^-8 relative) of an fp32 sum that may
    be accumulated in another order (relative 1e-6 of the sum of |terms|)."""
    if not grouped_gemm._use_grouped(torch.empty(1, dtype=torch.bfloat16), 32, 48):
        pytest.fail("torch's grouped GEMM is not available for bf16 on this CPU (torch 2.13 has it)")
    gen = torch.Generator().manual_seed(0)
    counts = (5, 0, 37, 32, 3)
    x = torch.randn(sum(counts), 32, generator=gen).bfloat16()
    w = torch.randn(len(counts), 32, 48, generator=gen).bfloat16()
    dy = torch.randn(sum(counts), 48, generator=gen).bfloat16()
    padded = (grouped_gemm.grouped_matmul(x, w, counts), grouped_gemm.grouped_weight_grad(x, dy, counts))
    assert grouped_gemm._padding(x, counts) is not None  # this call was padded
    monkeypatch.setattr(grouped_gemm, "PAD_ROWS", {})
    plain = (grouped_gemm.grouped_matmul(x, w, counts), grouped_gemm.grouped_weight_grad(x, dy, counts))
    exact = (grouped_gemm._loop_matmul(x.float(), w.float(), counts),
             grouped_gemm._loop_weight_grad(x.float(), dy.float(), counts))
    magnitude = (grouped_gemm._loop_matmul(x.float().abs(), w.float().abs(), counts),
                 grouped_gemm._loop_weight_grad(x.float().abs(), dy.float().abs(), counts))
    for got, want, ref, mag in zip(padded, plain, exact, magnitude):
        assert got.shape == want.shape
        bound = 2.0 ** -8 * ref.abs() + 1e-6 * mag
        assert bool(((got.float() - want.float()).abs() <= 2 * bound).all())  # each within one rounding of exact
        assert bool(((got.float() - ref).abs() <= bound).all())


def test_group_offsets_are_built_once_per_layer_call(monkeypatch):
    """The grouped GEMMs of one call (3 in forward, 6 in backward here) share one offsets tensor:
    on an accelerator building it is a host-to-device copy, so it happens once per layer call."""
    gen = torch.Generator().manual_seed(0)
    counts, h, f, P = (5, 0, 9, 2), 16, 32, 3
    x = torch.randn(sum(counts), h, generator=gen, requires_grad=True)
    probs = torch.rand(sum(counts), generator=gen, requires_grad=True)
    A = torch.softmax(torch.randn(len(counts), P, generator=gen), -1).requires_grad_()
    w1, w2 = torch.randn(P, h, f, generator=gen, requires_grad=True), torch.randn(P, f, h, generator=gen, requires_grad=True)

    def run():
        materialized_expert_ffn(x, probs, counts, A, w1, w2, None, F.gelu).square().sum().backward()

    run()  # the kernel probes (once per shape, cached) are not part of a call
    assert grouped_gemm._use_grouped(x, h, f) and grouped_gemm._use_grouped(x, f, h)  # the path taking offsets
    calls = []
    real = grouped_gemm._offsets
    monkeypatch.setattr(grouped_gemm, "_offsets", lambda c, device: calls.append(c) or real(c, device))
    run()
    assert calls == [(5, 0, 9, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_groups_are_one_batched_gemm(dtype, monkeypatch):
    """Equal row counts (every expert padded to its capacity) take one torch.bmm for both products:
    no offsets are built, and the results are the exact products up to an fp32 accumulation of at
    most K = 32 terms (K * 2^-24 of the sum of |terms|; bf16 accumulates in fp32) and one rounding to
    the dtype (2^-24 fp32, 2^-8 bf16, relative)."""
    gen = torch.Generator().manual_seed(0)
    counts, K, N = (8, 8, 8), 32, 48
    x = torch.randn(sum(counts), K, generator=gen).to(dtype)
    w = torch.randn(len(counts), K, N, generator=gen).to(dtype)
    dy = torch.randn(sum(counts), N, generator=gen).to(dtype)
    layout = grouped_gemm.GroupLayout(counts)
    assert layout.uniform == 8 and grouped_gemm.GroupLayout((8, 0, 8)).uniform is None
    monkeypatch.setattr(grouped_gemm, "_offsets", lambda *a: pytest.fail("equal groups built offsets"))
    got = (grouped_gemm.grouped_matmul(x, w, layout), grouped_gemm.grouped_matmul(x, w.transpose(1, 2).contiguous().transpose(1, 2), layout),
           grouped_gemm.grouped_weight_grad(x, dy, layout))
    exact = (grouped_gemm._loop_matmul(x.double(), w.double(), counts),) * 2 + (
        grouped_gemm._loop_weight_grad(x.double(), dy.double(), counts),)
    magnitude = (grouped_gemm._loop_matmul(x.double().abs(), w.double().abs(), counts),) * 2 + (
        grouped_gemm._loop_weight_grad(x.double().abs(), dy.double().abs(), counts),)
    unit = torch.finfo(dtype).eps / 2
    for g, ref, mag in zip(got, exact, magnitude):
        assert g.shape == ref.shape and g.dtype == dtype
        assert bool(((g.double() - ref).abs() <= unit * ref.abs() + K * 2.0 ** -24 * mag).all())


@pytest.mark.parametrize("gated", [False, True])
def test_step_cache_materialises_once_and_changes_no_value(gated, monkeypatch):
    """With a step cache (--samoe-materialize-once-per-step) a layer's experts are materialised at its
    first call only, then reused by every forward and backward: two micro-batches give bitwise the
    same outputs and gradients (accumulated) as without the cache, with one materialisation per pool
    tensor instead of two per call (forward and backward's rematerialisation)."""
    from samoe_dist.samoe import expert_ffn
    from samoe_dist.samoe.expert_ffn import PoolAccess

    counts = (3, 0, 4)
    act = F.silu if gated else F.gelu
    _, _, A, w1, w2, w3 = make_inputs(sum(counts), 8, 16, 3, counts, gated, torch.float32)
    batches = [make_inputs(sum(counts), 8, 16, 3, counts, gated, torch.float32, seed=s)[:2] for s in (1, 2)]
    calls = []
    real = expert_ffn.materialize
    monkeypatch.setattr(expert_ffn, "materialize", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))

    def micro_batches(cache):
        calls.clear()
        for leaf in (A, w1, w2, w3):
            if leaf is not None:
                leaf.grad = None
        ys, dxs = [], []
        for x, probs in batches:
            x = x.detach().requires_grad_()
            y = materialized_expert_ffn(x, probs.detach(), counts, A, w1, w2, w3, act, PoolAccess(cache=cache))
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            ys.append(y.detach())
            dxs.append(x.grad)
        return ys, dxs, [t.grad.clone() for t in (A, w1, w2, w3) if t is not None], len(calls)

    plain = micro_batches(None)
    cache = {}
    cached = micro_batches(cache)
    tensors = 3 if gated else 2
    assert plain[3] == 2 * len(batches) * tensors  # forward + backward rematerialisation, per call
    assert cached[3] == tensors and sorted(cache) == list(range(tensors))
    for got, want in zip(cached[:3], plain[:3]):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
