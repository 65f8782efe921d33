"""The weights of a model, by config: training (canonical checkpoint) name, plain name, shape.

A checkpoint's ``model.safetensors`` holds every weight once under the trainer's canonical names
(``samoe_dist.checkpoint``: megatron-core's parameter names, local experts under their global
index). :func:`weight_table` lists them for a config, with the name :mod:`.plain_gpt` gives each
and its shape, so a checkpoint can be checked against its ``config.json`` without building any
model, and converted to and from the plain model by renaming. Every tensor is carried over
unchanged except the fused qkv weight, whose rows are permuted (exactly) between megatron's
per-head interleaving and the plain ``[q; k; v]`` order.

Pure torch: nothing here imports megatron-core or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from samoe_dist.export.plain_gpt import PlainGPTConfig

# Values the trainer never changes from megatron-core 0.16.1's defaults (samoe_dist/model.py sets
# none of them): TransformerConfig.layernorm_epsilon, GPTModel's rotary_base and rotary_percent.
NORM_EPSILON = 1e-5
ROTARY_BASE = 10000
ROTARY_PERCENT = 1.0
_RUN_GROUPS = ("model", "moe", "samoe")


class ConversionError(ValueError):
    """A checkpoint or model file that cannot be converted; the message names it and the fix."""


class Weight(NamedTuple):
    training: str  # canonical name in a training checkpoint
    plain: str  # name in the plain model's state dict
    shape: tuple


def plain_config(run: dict) -> PlainGPTConfig:
    """The plain model's config from a checkpoint's ``config.json`` (a RunConfig dict)."""
    missing = [g for g in _RUN_GROUPS if not isinstance(run.get(g), dict)]
    if missing:
        raise ConversionError(f"config.json lacks the {missing} sections of a samoe RunConfig")
    m, moe, s = run["model"], run["moe"], run["samoe"]
    try:
        experts = moe.get("num_experts")
        freq = moe.get("moe_layer_freq", 1)
        return PlainGPTConfig(
            vocab_size=m["vocab_size"], num_layers=m["num_layers"], hidden_size=m["hidden_size"],
            num_attention_heads=m["num_attention_heads"], ffn_hidden_size=m["ffn_hidden_size"],
            max_position_embeddings=m["max_position_embeddings"],
            position_embedding_type=m["position_embedding_type"], rotary_base=ROTARY_BASE,
            rotary_percent=ROTARY_PERCENT, normalization=m["normalization"], norm_epsilon=NORM_EPSILON,
            activation="swiglu" if m["swiglu"] else "gelu",
            tie_word_embeddings=not m["untie_embeddings_and_output_weights"],
            moe_layers=[i for i in range(m["num_layers"]) if i % freq == 0] if experts else [],
            num_experts=experts, moe_ffn_hidden_size=moe.get("moe_ffn_hidden_size") if experts else None,
            moe_router_topk=moe.get("moe_router_topk", 2),
            moe_router_pre_softmax=moe.get("moe_router_pre_softmax", True),
            samoe_pool_size=s.get("samoe_pool_size") if experts else None,
            samoe_temperature=s.get("samoe_temperature", 1.0), samoe_top_m=s.get("samoe_top_m", 0),
            samoe_combination=s.get("samoe_combination", "softmax"),
            samoe_route_to_pool=bool(s.get("samoe_route_to_pool", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json does not describe a model: {e}") from None


def run_config(plain: PlainGPTConfig, base: Optional[dict] = None) -> dict:
    """A full RunConfig dict (``config.json`` without ``layout``) for a plain config.

    ``base`` (the ``training_config`` export keeps in model.json) supplies what the plain config
    does not hold (sequence length, init, aux-loss coefficients, ...); the rest are defaults. The
    result is validated by the RunConfig dataclasses, so the trainer will accept it.
    """
    from samoe_dist.config import (ConfigError, DataConfig, MoEConfig, ModelConfig, ParallelConfig, RunConfig,
                                   SaMoEConfig, TrainingConfig)

    fixed = {"rotary_base": (plain.rotary_base, ROTARY_BASE), "rotary_percent": (plain.rotary_percent, ROTARY_PERCENT),
             "norm_epsilon": (plain.norm_epsilon, NORM_EPSILON)}
    for name, (got, want) in fixed.items():
        if got != want:
            raise ConversionError(f"{name} {got}: the trainer builds megatron-core's default {want} only")
    L, moe_layers = plain.num_layers, plain.moe_layers
    freq = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else L
    if moe_layers and moe_layers != list(range(0, L, freq)):
        raise ConversionError(f"moe_layers {moe_layers}: the trainer places MoE layers at every k-th layer from 0 "
                              f"(--moe-layer-freq), e.g. {list(range(0, L, 2))}")
    base = base or {}
    model = {**base.get("model", {}), **dict(
        num_layers=L, hidden_size=plain.hidden_size, num_attention_heads=plain.num_attention_heads,
        ffn_hidden_size=plain.ffn_hidden_size, vocab_size=plain.vocab_size,
        max_position_embeddings=plain.max_position_embeddings, position_embedding_type=plain.position_embedding_type,
        normalization=plain.normalization, swiglu=plain.gated,
        untie_embeddings_and_output_weights=not plain.tie_word_embeddings)}
    model.setdefault("seq_length", plain.max_position_embeddings)
    moe = {**base.get("moe", {}), **dict(
        num_experts=plain.num_experts if moe_layers else None, moe_router_topk=plain.moe_router_topk,
        moe_layer_freq=freq if moe_layers else 1, moe_ffn_hidden_size=plain.moe_ffn_hidden_size if moe_layers else None,
        moe_router_pre_softmax=plain.moe_router_pre_softmax)}
    samoe = {**base.get("samoe", {}), **dict(
        samoe_pool_size=plain.samoe_pool_size, samoe_temperature=plain.samoe_temperature,
        samoe_top_m=plain.samoe_top_m, samoe_combination=plain.samoe_combination,
        samoe_route_to_pool=plain.samoe_route_to_pool)}
    try:
        run = RunConfig(ModelConfig(**model), MoEConfig(**moe), SaMoEConfig(**samoe),
                        ParallelConfig(), TrainingConfig(**base.get("training", {})), data=None)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"the model cannot be trained by samoe_dist: {e}") from None
    out = run.to_dict()
    out["data"] = base.get("data") or {f.name: _default(f) for f in dataclasses.fields(DataConfig)}
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def weight_table(cfg: PlainGPTConfig) -> list[Weight]:
    """Every weight of a model with this config (tied output weights once, the pool once)."""
    h, V, f = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size
    fc1 = 2 if cfg.gated else 1
    norm = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    rows = [Weight("gpt.embedding.word_embeddings.weight", "embed_tokens.weight", (V, h))]
    if cfg.position_embedding_type == "learned_absolute":
        rows.append(Weight("gpt.embedding.position_embeddings.weight", "embed_positions.weight",
                           (cfg.max_position_embeddings, h)))
    for i in range(cfg.num_layers):
        t, p = f"gpt.decoder.layers.{i}.", f"layers.{i}."
        rows += [Weight(f"{t}input_layernorm.{n}", f"{p}attn_norm.{n}", (h,)) for n in norm]
        rows += [Weight(f"{t}self_attention.linear_qkv.weight", f"{p}attn.qkv.weight", (3 * h, h)),
                 Weight(f"{t}self_attention.linear_proj.weight", f"{p}attn.proj.weight", (h, h))]
        rows += [Weight(f"{t}pre_mlp_layernorm.{n}", f"{p}mlp_norm.{n}", (h,)) for n in norm]
        if i not in cfg.moe_layers:
            rows += [Weight(f"{t}mlp.linear_fc1.weight", f"{p}mlp.fc1.weight", (fc1 * f, h)),
                     Weight(f"{t}mlp.linear_fc2.weight", f"{p}mlp.fc2.weight", (h, f))]
            continue
        N, fm = cfg.num_experts, cfg.moe_ffn_hidden_size
        rows.append(Weight(f"{t}mlp.router.weight", f"{p}mlp.router.weight", (N, h)))
        if cfg.samoe_pool_size is not None:
            if not cfg.samoe_route_to_pool:  # shared routing has no combination logits
                rows.append(Weight(f"{t}mlp.experts.combination_logits", f"{p}mlp.combination_logits",
                                   (N, cfg.samoe_pool_size)))
            continue
        for e in range(N):
            te, pe = f"{t}mlp.experts.experts.{e}.", f"{p}mlp.experts.{e}."
            rows += [Weight(f"{te}linear_fc1.weight", f"{pe}fc1.weight", (fc1 * fm, h)),
                     Weight(f"{te}linear_fc2.weight", f"{pe}fc2.weight", (h, fm))]
    rows += [Weight(f"gpt.decoder.final_layernorm.{n}", f"final_norm.{n}", (h,)) for n in norm]
    if not cfg.tie_word_embeddings:
        rows.append(Weight("gpt.output_layer.weight", "lm_head.weight", (V, h)))
    if cfg.samoe_pool_size is not None:
        P, fm = cfg.samoe_pool_size, cfg.moe_ffn_hidden_size
        pool = [("w1", (P, h, fm)), ("w2", (P, fm, h))] + ([("w3", (P, h, fm))] if cfg.gated else [])
        rows += [Weight(f"gpt.samoe_pool.{n}", f"pool.{n}", shape) for n, shape in pool]
    return rows


def check_weights(cfg: PlainGPTConfig, found: dict, naming: str, weights: str, config: str) -> None:
    """Raise ConversionError unless ``found`` ({name: shape}) holds exactly the config's weights.

    ``naming`` is 'training' or 'plain'; ``weights`` and ``config`` name the files for the message.
    """
    want = {getattr(w, naming): w.shape for w in weight_table(cfg)}
    missing = sorted(set(want) - set(found))
    extra = sorted(set(found) - set(want))
    shapes = [f"{k} {tuple(found[k])} (config: {want[k]})" for k in sorted(want) if k in found
              and tuple(found[k]) != want[k]]
    problems = [f"{len(missing)} weights missing (first: {missing[0]})"] if missing else []
    problems += [f"{len(extra)} unexpected weights (first: {extra[0]})"] if extra else []
    problems += [f"{len(shapes)} with another shape (first: {shapes[0]})"] if shapes else []
    if problems:
        raise ConversionError(f"{weights} does not match {config} ({cfg.kind} model): " + "; ".join(problems)
                              + ". The two files come from different models: use the config written with the weights")


def qkv_to_plain(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """megatron's rows [q0 k0 v0 | q1 k1 v1 | ...] (per head) -> [q0 q1 ... | k0 k1 ... | v0 v1 ...]."""
    three_h, h = w.shape
    return w.view(num_heads, 3, three_h // (3 * num_heads), h).transpose(0, 1).reshape(three_h, h).contiguous()


def qkv_to_training(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of :func:`qkv_to_plain`."""
    three_h, h = w.shape
    return w.view(3, num_heads, three_h // (3 * num_heads), h).transpose(0, 1).reshape(three_h, h).contiguous()


def _renamed(state: dict, cfg: PlainGPTConfig, src: str, dst: str, qkv) -> dict:
    """``state`` keyed by the weight table's ``src`` names, re-keyed by its ``dst`` names, with the
    fused QKV weights re-laid out by ``qkv``."""
    out = {}
    for w in weight_table(cfg):
        t = state[getattr(w, src)]
        out[getattr(w, dst)] = qkv(t, cfg.num_attention_heads) if w.plain.endswith("attn.qkv.weight") else t
    return out


def to_plain(state: dict, cfg: PlainGPTConfig) -> dict:
    """A checkpoint's consolidated state (canonical names) as the plain model's state dict."""
    return _renamed(state, cfg, "training", "plain", qkv_to_plain)


def to_training(state: dict, cfg: PlainGPTConfig) -> dict:
    """The plain model's state dict under the trainer's canonical names (inverse of :func:`to_plain`)."""
    return _renamed(state, cfg, "plain", "training", qkv_to_training)
