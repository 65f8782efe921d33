"""What megatron-core 0.16.1 and DeepSpeed 0.19.8 need to run on a machine without CUDA.

Every patch here is small, targeted at one breakage documented below, and
applied once by :func:`apply`, which is a no-op when CUDA is available. The numbered list matches
the breakages it fixes:

1. ``torch.cuda.current_device()`` is called by RoPE, the router and ~175 other megatron sites to
   place new tensors; on CPU it resolves to the CPU device.
2. ``model_parallel_cuda_manual_seed`` needs CUDA RNG state: :func:`seed_model_parallel` uses
   megatron's pass-through tracker on CPU instead, so forks keep the seeded CPU generator.
3. ``te_general_gemm`` is referenced by the router's gating linear without TransformerEngine
   (``NameError``, also on GPU): the name is defined as ``None`` so the torch path is taken. This
   one is applied on GPU too, where TransformerEngine is absent, since it is a missing-name bug.
4. The ``alltoall`` token dispatcher creates a ``torch.cuda.Stream`` and synchronises a
   device-to-host copy with streams and events: on CPU there is nothing to copy, so the
   synchronisation step only converts the split sizes.
5. Split sizes of that dispatcher stay tensors on CPU (upstream converts only CUDA tensors to host
   lists) and ``all_to_all_single`` rejects them: CPU tensors are converted the same way.
6. Fusions (bias-gelu, masked softmax, rope, ...) need CUDA kernels: :func:`cpu_safe_config_overrides`
   lists the TransformerConfig fields the model builder must set on CPU.
7. DeepSpeed's ``init_distributed`` JIT-compiles a shared-memory comm op with g++ (about a minute,
   and a failure where no compiler exists): on CPU it is skipped and gloo is used as is.
8. DeepSpeed's fused Adam JIT-compiles a C++ op: the ds_config for CPU uses ``torch_adam``, and
   :func:`check_ds_config_for_cpu` turns a config that would compile into one clear error.
9. Attention without an explicit mask builds its default causal mask with ``device="cuda"``
   hard-coded (``megatron.core.transformer.utils.get_default_causal_mask``): on CPU it is built on
   the CPU.
10. torch runs the exact GELU of a contiguous fp32/bf16 CPU tensor, and its gradient, through
   oneDNN, which builds and caches a primitive for every new shape (up to 1024). An expert's
   activation has a new row count on almost every call (dropless routing; at EP > 1 also the
   number of tokens received): the measured cache entry is about 4.5 MB in fp32 and 1.5 MB in bf16,
   so a process grows by tens of MB a step up to gigabytes, and every page of that fresh memory is
   faulted in, which slowed EP = 2 steps by 100-200 ms on the development VMs (docs/RESULTS.md
   section 2). :func:`without_onednn` runs such an op on torch's own kernel instead (no cache; slower per
   element at a fixed shape, 2.2 against 1.2 ms for 4 M fp32 elements). SaMoE's expert FFN uses it
   for its activation, forward and backward, except where every expert is padded to its capacity
   (one shape per layer: fp32 keeps oneDNN there, ``expert_ffn._activation_kernels``);
   :func:`patch_expert_mlps` gives megatron's per-expert MLPs the same (:func:`expert_gelu`).
   A no-op for tensors not on the CPU.
   In bf16/fp16 oneDNN also runs the matmuls, with one cached kernel per row count: SaMoE's grouped
   GEMM pads each expert's rows to a multiple (``grouped_gemm.PAD_ROWS``), and
   :func:`patch_expert_mlps` pads the rows of each of megatron's expert MLPs the same way,
   with zero rows as megatron does for fp8 (``SequentialMLP._pad_tensor_for_quantization``): a zero
   row adds nothing to any weight gradient and is cut from the output. Without it the standard MoE
   grew about 60 MiB a step in bf16 at EP = 2.
11. Not a patch but a warning: on a CPU without bf16 instructions (AVX512-BF16 or AMX-BF16) torch
   runs bf16 matmuls on slow generic kernels. Measured on an AMD EPYC with AVX2 only (one thread):
   a [1024, 256] x [256, 1024] matmul takes 475 ms in bf16 against 10 ms in fp32.
   :func:`bf16_cpu_warning` gives the message the trainer logs when ``--bf16`` is asked for there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

_APPLIED = False


def on_cpu() -> bool:
    """True when this process has no usable CUDA device (the patches below are then needed)."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Apply every CPU patch once. Returns True when patches were applied (no CUDA)."""
    global _APPLIED
    # megatron-core warns at import that it falls back to torch without Apex/TransformerEngine:
    # expected for the local layer spec, and noise in every user-facing message.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*")
    warnings.filterwarnings("ignore", message=r"moe_ffn_hidden_size is not set")
    if on_cpu():
        # DeepSpeed would detect the CPU accelerator by itself, with a warning on every import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _patch_te_general_gemm()  # a missing name, on any device
    if not on_cpu():
        return False
    if _APPLIED:
        return True
    _patch_current_device()
    _patch_alltoall_dispatcher()
    _patch_deepspeed_shm_op()
    _patch_default_causal_mask()
    _APPLIED = True
    logger.debug("samoe_dist.cpu_compat: CPU patches applied")
    return True


# 1 -------------------------------------------------------------------------------------------
def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _patch_current_device() -> None:
    torch.cuda.current_device = _cpu_current_device


# 2 -------------------------------------------------------------------------------------------
def seed_model_parallel(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker, on CPU or GPU.

    On GPU this is megatron's own ``model_parallel_cuda_manual_seed``. On CPU (tensor-parallel
    size 1, so no rank needs a separate dropout stream) megatron's tracker is created in its
    pass-through form, whose ``fork()`` keeps the default CPU generator seeded here: dropout and
    init code that forks the tracker runs unchanged and is reproducible from ``seed``.
    """
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    if not on_cpu():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


# 3 -------------------------------------------------------------------------------------------
def _patch_te_general_gemm() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# 4, 5 ----------------------------------------------------------------------------------------
class _NoStream:
    """Stands in for the dispatcher's class-level CUDA stream so none is created."""


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
    """CPU version of ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``.

    Upstream copies split sizes to the host on a side stream and waits on an event. On CPU the
    tensors are already on the host: convert the split sizes to numpy (as upstream does for CUDA
    tensors) at the same point, and there is nothing to wait for.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _host_splits(self.input_splits)
        self.output_splits = _host_splits(self.output_splits)
        self.output_splits_tp = _host_splits(self.output_splits_tp)
    return tokens_per_expert


def _host_splits(splits: Any) -> Any:
    if torch.is_tensor(splits):
        return splits.numpy()
    return splits


def _patch_alltoall_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    cls = token_dispatcher.MoEAlltoAllTokenDispatcher
    cls.cuda_dtoh_stream = _NoStream()
    cls._maybe_dtoh_and_synchronize = _cpu_dtoh_and_synchronize


# 6 -------------------------------------------------------------------------------------------
def cpu_safe_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields to set when running without CUDA (fusions need CUDA kernels)."""
    if not on_cpu():
        return {}
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
    )


# 7 -------------------------------------------------------------------------------------------
def _no_shm_op():
    return None


def _patch_deepspeed_shm_op() -> None:
    # `import deepspeed.comm.torch as m` would bind the real `torch` package (deepspeed.comm
    # imports torch under that name), so the module is taken from sys.modules.
    import deepspeed.comm  # noqa: F401  (imports deepspeed.comm.torch)

    ds_torch_comm = sys.modules["deepspeed.comm.torch"]
    ds_torch_comm.build_shm_op = _no_shm_op


# 8 -------------------------------------------------------------------------------------------
def check_ds_config_for_cpu(ds_config: dict) -> None:
    """Raise ValueError when a ds_config would JIT-compile fused Adam on a CPU machine."""
    if not on_cpu():
        return
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params = opt.get("params") or {}
        if not params.get("torch_adam", False):
            raise ValueError(
                "ds_config optimizer 'Adam'/'AdamW' on a machine without CUDA would JIT-compile "
                "DeepSpeed's fused Adam: set \"torch_adam\": true in optimizer.params "
                "(see examples/ds_config_cpu.json)"
            )


# 9 -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_default_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    utils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask  # bound by name at import


# 10 ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def without_onednn(t: torch.Tensor):
    """Run the ops inside on torch's native CPU kernels, not oneDNN's per-shape cached primitives,
    when ``t`` is a CPU tensor (item 10 above; the switch is torch's global ``mkldnn`` flag, put
    back on exit). Nothing changes for tensors on other devices."""
    if t.device.type != "cpu" or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


class _ExpertGelu(torch.autograd.Function):
    """Exact GELU whose forward and backward run :func:`without_onednn` (CPU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        with without_onednn(x):
            return torch.ops.aten.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with without_onednn(x):
            return torch.ops.aten.gelu_backward(grad, x)


def expert_gelu(x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.gelu`` for inputs whose shape changes from call to call (experts):
    the same function, computed without oneDNN's per-shape cache on the CPU (item 10)."""
    if x.device.type != "cpu":
        return torch.nn.functional.gelu(x)
    return _ExpertGelu.apply(x)


def _rows_padded_forward(self, hidden_states, per_token_scale=None, **kwargs):
    """The expert MLP's own ``forward`` with the rows of a CPU half-precision input padded by zero
    rows to a multiple (``grouped_gemm.PAD_ROWS``) and the output cut back: one oneDNN kernel per
    padded row count instead of one per row count. Bound to each patched expert (a method, so a
    copied module calls its own forward)."""
    from samoe_dist.samoe.grouped_gemm import PAD_ROWS

    forward = type(self).forward
    rows = hidden_states.shape[0]
    multiple = PAD_ROWS.get(hidden_states.dtype) if hidden_states.device.type == "cpu" else None
    pad = -rows % multiple if multiple else 0
    if not pad:
        return forward(self, hidden_states, per_token_scale, **kwargs)
    hidden_states = torch.cat((hidden_states, hidden_states.new_zeros(pad, *hidden_states.shape[1:])))
    if per_token_scale is not None:
        per_token_scale = torch.cat((per_token_scale, per_token_scale.new_zeros(pad, *per_token_scale.shape[1:])))
    output, output_bias = forward(self, hidden_states, per_token_scale, **kwargs)
    return output[:rows], output_bias


def patch_expert_mlps(module: torch.nn.Module) -> int:
    """Give megatron's per-expert MLPs (``SequentialMLP.local_experts``) :func:`expert_gelu` in
    place of ``torch.nn.functional.gelu``, and pad their rows in half precision (item 10). Only the
    plain, unfused activation is replaced (the one those MLPs call as ``self.activation_func``).
    Returns how many expert MLPs were patched."""
    import types

    from megatron.core.transformer.moe.experts import SequentialMLP

    n = 0
    for sub in module.modules():
        if not isinstance(sub, SequentialMLP):
            continue
        for expert in sub.local_experts:
            if (getattr(expert, "activation_func", None) is torch.nn.functional.gelu
                    and not expert.config.gated_linear_unit and not expert.config.bias_activation_fusion):
                expert.activation_func = expert_gelu
            if getattr(expert.forward, "__func__", None) is not _rows_padded_forward:
                expert.forward = types.MethodType(_rows_padded_forward, expert)
            n += 1
    return n


# 11 ------------------------------------------------------------------------------------------
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The CPU's feature flags from the first ``flags`` line of ``cpuinfo`` (Linux); None when the
    file is missing or has no such line (another OS, a restricted container)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def bf16_cpu_warning(bf16: bool, flags: Optional[frozenset] = None) -> Optional[str]:
    """The warning for a bf16 run on a CPU without bf16 instructions (item 11), or None: when bf16
    is off, CUDA is present, the CPU has AVX512-BF16 or AMX-BF16, or its flags cannot be read
    (``flags`` defaults to :func:`cpu_flags`)."""
    if not bf16 or not on_cpu():
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or flags & set(BF16_CPU_FLAGS):
        return None
    return ("--bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): torch "
            "runs bf16 matmuls on generic kernels here, tens of times slower than fp32 (a 1024x256x1024 "
            "matmul: 475 ms against 10 ms on an AVX2-only EPYC). Train in fp32 on this machine (drop --bf16 "
            "and bf16 from the ds_config); bf16 is for GPUs and CPUs with AVX512-BF16/AMX")
