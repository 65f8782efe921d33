"""Per-expert GEMMs on tokens grouped by expert: ``torch.nn.functional.grouped_mm`` or a loop.

Tokens arrive sorted by local expert (``counts[g]`` rows for expert g, in order, as megatron's
dispatchers hand them to the experts). Two products are needed:

- :func:`grouped_matmul`  ``y[rows of g] = x[rows of g] @ w[g]``        (forward, input grads)
- :func:`grouped_weight_grad`  ``dw[g] = x[rows of g].T @ dy[rows of g]``  (weight grads)

torch's grouped GEMM runs on the CPU in torch 2.13 for fp32/bf16/fp16 when both feature sizes
are 16-byte aligned; other cases (fp64 for gradcheck, odd sizes, a device or build without it)
take the loop over experts that megatron's SequentialMLP uses. Whether the grouped kernel works
for a (device, dtype, K, N) is probed once, on a tiny case, and cached.

Row padding (CPU, bf16/fp16): oneDNN builds a kernel for every new per-group row count it sees in
half precision and caches it; a fresh shape costs about ten cached calls. Token counts per expert
change every micro-batch, so early in a run nearly every call pays. Rounding each group's rows up to
a multiple of ``PAD_ROWS[dtype]`` (zero rows, which add nothing to either product) bounds the
shapes to T / PAD_ROWS per group, which the cache then holds. It costs one copy of the inputs in and
of the output out. fp32 (no per-shape cost measured) and non-CPU devices (the offsets are a device
tensor; no per-shape build) are not padded.

Equal groups: when every group has the same row count, as under
``--moe-pad-expert-input-to-capacity`` (each expert gets exactly its capacity), both products are
one ``torch.bmm`` on views of the inputs: fixed shapes, no offsets, no padding copies, on any device
and dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set to False to force the loop (tests compare both paths).
ENABLE_GROUPED_MM = True
# Rows per group are rounded up to this multiple on the CPU (module docstring); {} turns it off.
PAD_ROWS = {torch.bfloat16: 32, torch.float16: 32}


def _offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 end offsets of the groups on ``device``. The counts are host values (megatron's
    dispatchers hand them over on the host); on an accelerator they go through pinned memory with
    a non-blocking copy, so the host does not wait for the device."""
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    if torch.device(device).type == "cpu":
        return offs
    return offs.pin_memory().to(device=device, non_blocking=True)


class GroupLayout:
    """The per-group row counts of one layer call, with their device offsets built once and reused
    by every grouped GEMM of the call, forward and backward (pass it where counts are taken)."""

    __slots__ = ("counts", "_offsets", "uniform")

    def __init__(self, counts: Sequence[int]):
        self.counts = tuple(int(c) for c in counts)
        self._offsets: dict = {}
        # The common row count when all groups have the same (nonzero) one, else None.
        first = self.counts[0] if self.counts else 0
        self.uniform = first if first > 0 and all(c == first for c in self.counts) else None

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self):
        return iter(self.counts)

    def offsets(self, device: torch.device, counts: Optional[tuple] = None) -> torch.Tensor:
        key = (str(device), counts or self.counts)
        if key not in self._offsets:
            self._offsets[key] = _offsets(key[1], device)
        return self._offsets[key]


def _layout(counts) -> GroupLayout:
    return counts if isinstance(counts, GroupLayout) else GroupLayout(counts)


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, device_index: Optional[int], dtype: torch.dtype, k: int, n: int) -> bool:
    """Probe both grouped products once for these feature sizes; False on any error or mismatch."""
    if _GROUPED_MM is None or dtype not in _GROUPED_DTYPES:
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (k * itemsize) % 16 or (n * itemsize) % 16:
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        counts = (2, 0, 3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, k, generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(3, k, n, generator=gen).to(device=device, dtype=dtype)
        dy = torch.randn(5, n, generator=gen).to(device=device, dtype=dtype)
        offs = _offsets(counts, device)
        w_t = torch.randn(3, n, k, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        tol = 1e-2 if dtype != torch.float32 else 1e-4
        checks = (
            (_GROUPED_MM(x, w, offs=offs), _loop_matmul(x, w, counts)),
            (_GROUPED_MM(x, w_t, offs=offs), _loop_matmul(x, w_t, counts)),  # a transposed view
            (_GROUPED_MM(x.t(), dy, offs=offs), _loop_weight_grad(x, dy, counts)),
        )
        return all(
            torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * max(k, 5))
            for got, ref in checks
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _use_grouped(x: torch.Tensor, k: int, n: int) -> bool:
    return ENABLE_GROUPED_MM and _grouped_mm_works(x.device.type, x.device.index, x.dtype, k, n)


def _loop_matmul(x_TK: torch.Tensor, w_GKN: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    chunks = torch.split(x_TK, list(counts))
    return torch.cat([xg @ w_GKN[g] for g, xg in enumerate(chunks)], dim=0)


def _loop_weight_grad(x_TK: torch.Tensor, dy_TN: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    xs = torch.split(x_TK, list(counts))
    dys = torch.split(dy_TN, list(counts))
    return torch.stack([xg.t() @ dyg for xg, dyg in zip(xs, dys)], dim=0)


def _padding(x: torch.Tensor, counts: Sequence[int]):
    """(counts, padded counts) when this call is padded (module docstring), else None."""
    multiple = PAD_ROWS.get(x.dtype) if x.device.type == "cpu" else None
    if not multiple:
        return None
    counts = tuple(int(c) for c in counts)
    padded = tuple(-(-c // multiple) * multiple for c in counts)
    return None if padded == counts else (counts, padded)


def _pad(t_TK: torch.Tensor, counts: tuple, padded: tuple) -> torch.Tensor:
    """Rows of group g at the start of its padded block, zeros after (one slice copy per group)."""
    out = t_TK.new_empty(sum(padded), t_TK.shape[1])
    src = dst = 0
    for c, pc in zip(counts, padded):
        out[dst:dst + c].copy_(t_TK[src:src + c])
        out[dst + c:dst + pc].zero_()
        src, dst = src + c, dst + pc
    return out


def _unpad(t_TK: torch.Tensor, counts: tuple, padded: tuple) -> torch.Tensor:
    out = t_TK.new_empty(sum(counts), t_TK.shape[1])
    src = dst = 0
    for c, pc in zip(counts, padded):
        out[dst:dst + c].copy_(t_TK[src:src + c])
        src, dst = src + pc, dst + c
    return out


def grouped_matmul(x_TK: torch.Tensor, w_GKN: torch.Tensor, counts) -> torch.Tensor:
    """y_TN with rows of group g equal to ``x_TK[rows of g] @ w_GKN[g]`` (``counts``: a sequence or
    a :class:`GroupLayout`)."""
    G, K, N = w_GKN.shape
    if x_TK.shape[0] == 0:
        return x_TK.new_zeros(0, N)
    layout = _layout(counts)
    if layout.uniform is not None:  # equal groups: one batched GEMM (module docstring)
        return torch.bmm(x_TK.reshape(G, layout.uniform, K), w_GKN).reshape(-1, N)
    if _use_grouped(x_TK, K, N):
        pad = _padding(x_TK, layout.counts)
        if pad is not None:
            counts, padded = pad
            y_pad = _GROUPED_MM(_pad(x_TK, counts, padded), w_GKN, offs=layout.offsets(x_TK.device, padded))
            return _unpad(y_pad, counts, padded)
        return _GROUPED_MM(x_TK, w_GKN, offs=layout.offsets(x_TK.device))
    return _loop_matmul(x_TK, w_GKN, layout.counts)


def grouped_weight_grad(x_TK: torch.Tensor, dy_TN: torch.Tensor, counts) -> torch.Tensor:
    """dw_GKN with ``dw[g] = x_TK[rows of g].T @ dy_TN[rows of g]`` (zeros for an empty group)."""
    K, N = x_TK.shape[1], dy_TN.shape[1]
    layout = _layout(counts)
    if x_TK.shape[0] == 0:
        return x_TK.new_zeros(len(layout), K, N)
    if layout.uniform is not None:  # equal groups: one batched GEMM (module docstring)
        G, c = len(layout), layout.uniform
        return torch.bmm(x_TK.reshape(G, c, K).transpose(1, 2), dy_TN.reshape(G, c, N))
    if _use_grouped(x_TK, K, N):
        pad = _padding(x_TK, layout.counts)
        if pad is not None:
            counts, padded = pad
            return _GROUPED_MM(_pad(x_TK, counts, padded).t(), _pad(dy_TN, counts, padded),
                               offs=layout.offsets(x_TK.device, padded))
        return _GROUPED_MM(x_TK.t(), dy_TN, offs=layout.offsets(x_TK.device))
    return _loop_weight_grad(x_TK, dy_TN, layout.counts)
