"""Where a training step's time goes: torch.profiler ranges added from outside the package.

:func:`install_ranges` wraps (on the live objects, nothing in ``samoe_dist`` is edited) the parts
of a model and its DeepSpeed engine in ``torch.profiler.record_function`` ranges named
``bench/<label>``:

=================  ==========================================================================
label              what is wrapped
=================  ==========================================================================
forward            the engine's forward (phase marker)
backward           ``engine.backward`` (phase marker: everything under it counts as backward)
grad all-reduce    ``engine.allreduce_gradients`` (DeepSpeed's gradient reduction)
optimizer          ``engine.step``
attention          every layer's ``self_attention`` module
dense MLP          megatron's MLP of a dense layer
router             megatron's router module (``MoELayer.router``); DeepSpeed's ``TopKGate``
permute            megatron's token dispatcher ``dispatch_preprocess``, ``dispatch_postprocess``,
                   ``combine_preprocess``, ``combine_postprocess``; DeepSpeed's
                   ``_route_slots``, ``_sparse_encode``, ``_sparse_decode``
all-to-all         the dispatcher's ``token_dispatch`` and ``token_combine``; DeepSpeed's
                   ``_AllToAll``
experts            the experts module (SequentialMLP, SaMoEExperts, DeepSpeed's Experts)
expert GEMM        megatron's and DeepSpeed's expert ``linear_fc1``/``linear_fc2``/``fc1``/``fc2``;
                   SaMoE's ``grouped_matmul`` and ``grouped_weight_grad`` (expert_ffn module)
materialize        SaMoE's ``materialize`` and ``materialize_many`` (``A_own @ pool``; the sharded
                   pool's local columns), forward and its recomputation in backward
pool collectives   the sharded pool's all-gather of a layer call's weights (``gather_columns``,
                   ``gather_columns_many``) and reduce-scatter of their gradients
                   (``reduce_scatter_columns_many``), with their packing copies
pool/A grad        SaMoE's ``_map_weight_grad`` (dW_l -> dW_pool, dA) and the pool-gradient
                   sink's deferred sums (``PoolGradSink._flush``), backward only
combination        ``SaMoEExperts.combination_weights`` (softmax of C_l)
lm head / loss     GPTModel's ``output_layer`` / ``compute_language_model_loss``
embedding          GPTModel's ``embedding``
=================  ==========================================================================

:func:`attribute` turns a profile of one step into milliseconds per ``label (fwd|bwd)``: every
event's SELF time goes to its innermost ``bench/`` range; work that autograd runs in backward is
mapped back to the range of the forward op that created its graph node (the profiler gives both
the same sequence number), so e.g. the backward of the router's GEMM counts as ``router (bwd)``.
Time inside a range not covered by a finer one stays with that range (``experts (bwd)`` is the
expert work that is neither GEMM nor materialisation: activation, prob scaling, copies).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict

import torch

PREFIX = "bench/"
PHASES = ("forward", "backward", "optimizer", "grad all-reduce")
_EVAL = "autograd::engine::evaluate_function: "


def ranged(fn, label: str):
    """``fn`` inside a ``bench/<label>`` profiler range."""
    if getattr(fn, "_bench_label", None) == label:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(PREFIX + label):
            return fn(*args, **kwargs)

    wrapper._bench_label = label
    return wrapper


def _wrap_method(obj, name: str, label: str) -> None:
    if hasattr(obj, name):
        setattr(obj, name, ranged(getattr(obj, name), label))


def install_ranges(engine, model) -> None:
    """Wrap the engine's and the model's parts in profiler ranges (see module docstring)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    _wrap_method(engine, "forward", "forward")
    _wrap_method(engine, "backward", "backward")
    _wrap_method(engine, "allreduce_gradients", "grad all-reduce")
    _wrap_method(engine, "step", "optimizer")
    gpt = model.gpt
    _wrap_method(gpt, "compute_language_model_loss", "loss")
    for name, label in (("output_layer", "lm head"), ("embedding", "embedding")):
        if getattr(gpt, name, None) is not None:
            _wrap_method(getattr(gpt, name), "forward", label)
    for module in gpt.modules():
        if isinstance(module, TransformerLayer):
            _wrap_method(module.self_attention, "forward", "attention")
            if isinstance(module.mlp, MLP):
                _wrap_method(module.mlp, "forward", "dense MLP")
        if isinstance(module, MoELayer):
            _wrap_method(module.router, "forward", "router")
            d = module.token_dispatcher
            for method in ("dispatch_preprocess", "dispatch_postprocess", "combine_preprocess", "combine_postprocess"):
                _wrap_method(d, method, "permute")
            for method in ("token_dispatch", "token_combine"):
                _wrap_method(d, method, "all-to-all")
            _wrap_method(module.experts, "forward", "experts")
            if isinstance(module.experts, SequentialMLP):
                for expert in module.experts.local_experts:
                    _wrap_method(expert.linear_fc1, "forward", "expert GEMM")
                    _wrap_method(expert.linear_fc2, "forward", "expert GEMM")
            if hasattr(module.experts, "combination_weights"):
                _wrap_method(module.experts, "combination_weights", "combination")
        if type(module).__name__ == "DeepSpeedMoEMLP":
            ds = module.moe.deepspeed_moe
            _wrap_method(ds.gate, "forward", "router")
            _wrap_method(ds.experts, "forward", "experts")
            for expert in ds.experts.deepspeed_experts:
                _wrap_method(expert.fc1, "forward", "expert GEMM")
                _wrap_method(expert.fc2, "forward", "expert GEMM")
    _install_function_ranges()


def _install_function_ranges() -> None:
    """Module-level functions called by name: SaMoE's expert FFN and DeepSpeed's dispatch."""
    ffn = sys.modules.get("samoe_dist.samoe.expert_ffn")
    if ffn is not None:
        for name, label in (("materialize", "materialize"), ("materialize_many", "materialize"),
                            ("gather_columns", "pool collectives"), ("gather_columns_many", "pool collectives"),
                            ("reduce_scatter_columns_many", "pool collectives"),
                            ("_map_weight_grad", "pool/A grad"),
                            ("grouped_matmul", "expert GEMM"), ("grouped_weight_grad", "expert GEMM")):
            setattr(ffn, name, ranged(getattr(ffn, name), label))
    pool = sys.modules.get("samoe_dist.samoe.pool")
    if pool is not None:  # the sink sums deferred A^T dW factors when the gate takes the gradient
        pool.PoolGradSink._flush = ranged(pool.PoolGradSink._flush, "pool/A grad")
    moe = sys.modules.get("deepspeed.moe.sharded_moe")
    if moe is not None:
        for name in ("_route_slots", "_sparse_encode", "_sparse_decode"):
            if hasattr(moe, name):
                setattr(moe, name, ranged(getattr(moe, name), "permute"))
        a2a = getattr(moe, "_AllToAll", None)
        if a2a is not None and not hasattr(a2a, "_bench_shim"):
            moe._AllToAll = type("_AllToAllRanged", (), {
                "apply": staticmethod(ranged(a2a.apply, "all-to-all")), "_bench_shim": True})


def _label(event) -> str | None:
    name = event.name
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def attribute(events, top_ops: int = 4) -> dict:
    """``{"ms": {label (phase): ms}, "step_ms": total, "top_ops": {label (phase): {op: ms}}}`` from
    the FunctionEvents of one profiled step (``prof.events()``), the step inside a ``bench/step``
    range; ``top_ops`` names the ops (by self time) that make up each label's time."""
    events = list(events)
    steps = [e for e in events if e.name == PREFIX + "step"]
    if not steps:
        raise ValueError("no bench/step range in the profile")
    step_ms = sum(e.cpu_time_total for e in steps) / 1000.0
    thread = steps[0].thread

    def innermost(event):
        """(label or None, seq of the innermost backward node or None, in backward?)."""
        label, node_seq, backward = None, None, False
        e = event
        while e is not None:
            own = _label(e)
            if own == "backward":
                backward = True
            elif label is None and node_seq is None:
                if own is not None and own not in ("forward", "step"):
                    label = own
                elif e.name.startswith(_EVAL):
                    node_seq = e.sequence_nr
            e = e.cpu_parent
        return label, node_seq, backward

    # Forward ops that created graph nodes: sequence number -> label of their range (the latest
    # op to show a number is the one that created the node; earlier ones only peeked at it).
    fwd_label: dict[int, tuple[float, str]] = {}
    for e in events:
        if e.thread != thread or e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith(_EVAL):
            continue
        label, node_seq, backward = innermost(e)
        if backward or node_seq is not None:
            continue
        start = e.time_range.start
        if e.sequence_nr not in fwd_label or start >= fwd_label[e.sequence_nr][0]:
            fwd_label[e.sequence_nr] = (start, label or "other")

    ms: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.thread != thread:
            continue
        label, node_seq, backward = innermost(e)
        if label is None and node_seq is None and not backward and not _in_step(e):
            continue
        if label is None and node_seq is not None:
            label = fwd_label.get(node_seq, (0.0, "other"))[1]
        if label is None:
            label = "other"
        if label in PHASES and label not in ("forward", "backward"):
            key = label
        else:
            key = f"{label} ({'bwd' if backward else 'fwd'})"
        ms[key] += e.self_cpu_time_total / 1000.0
        ops[key][e.name] += e.self_cpu_time_total / 1000.0
    top = {k: {n: round(t, 3) for n, t in sorted(v.items(), key=lambda kv: -kv[1])[:top_ops]} for k, v in ops.items()}
    return {"step_ms": step_ms, "ms": dict(sorted(ms.items(), key=lambda kv: -kv[1])), "top_ops": top}


def _in_step(event) -> bool:
    e = event
    while e is not None:
        if e.name == PREFIX + "step":
            return True
        e = e.cpu_parent
    return False


# Summary categories (fractions of the step) reported in the table, from the labels above.
CATEGORIES = {
    "materialise fwd": ("materialize (fwd)", "combination (fwd)"),
    "materialise bwd": ("materialize (bwd)", "pool/A grad (bwd)", "combination (bwd)"),
    "pool collectives": ("pool collectives (fwd)", "pool collectives (bwd)"),
    "router": ("router (fwd)", "router (bwd)"),
    "dispatch/permute": ("permute (fwd)", "permute (bwd)", "all-to-all (fwd)", "all-to-all (bwd)"),
    "expert GEMMs": ("expert GEMM (fwd)", "expert GEMM (bwd)"),
    "dense MLP": ("dense MLP (fwd)", "dense MLP (bwd)"),
    "expert other": ("experts (fwd)", "experts (bwd)"),
    "attention": ("attention (fwd)", "attention (bwd)"),
    "lm head+loss": ("lm head (fwd)", "lm head (bwd)", "loss (fwd)", "loss (bwd)", "embedding (fwd)", "embedding (bwd)"),
    "optimizer+reduce": ("optimizer", "grad all-reduce"),
}


def summarise(result: dict) -> dict:
    """Fractions of the step per summary category; 'other' is the remainder (norms, residual
    adds, engine bookkeeping, Python between ops)."""
    total = result["step_ms"]
    out = {}
    used = 0.0
    for cat, labels in CATEGORIES.items():
        value = sum(result["ms"].get(label, 0.0) for label in labels)
        used += value
        out[cat] = value / total if total else 0.0
    out["other"] = max(0.0, (total - used) / total) if total else 0.0
    return out
