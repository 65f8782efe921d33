"""Hugging Face folders: export a checkpoint (samoe's own format, or Mixtral), import a Mixtral.

- :func:`export_hf` ``format='samoe'``: ``config.json`` (with ``auto_map``), ``configuration_samoe.py``
  and ``modeling_samoe.py`` (copied from this package: torch + transformers only),
  ``model.safetensors`` (the plain model's weights under ``model.``; the pool and the combination
  logits as trained), ``generation_config.json`` and the tokenizer. Loads with
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.
- :func:`export_hf` ``format='mixtral'``: the same folder for transformers' own
  ``MixtralForCausalLM`` (no remote code), when the model is one Mixtral can express
  (:func:`mixtral_differences`); SaMoE experts are materialised, ``W_l = A_l @ pool``.
- :func:`import_hf`: a Mixtral folder as a weights-only standard-MoE training checkpoint.

The tokenizer is the run's (the checkpoint's config records it; flags override): a SentencePiece
model becomes a ``tokenizer.json`` (the fast tokenizer transformers builds from the model's own
settings, checked against SentencePiece on probe strings before anything is written), GPT-2's BPE
files become a GPT-2 tokenizer. Outputs appear whole: written in a temporary sibling folder, then
renamed. Errors are :class:`ConversionError` with one message naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from samoe_dist.export.names import ConversionError, to_plain
from samoe_dist.export.plain_gpt import PlainGPTConfig, combination_weights

logger = logging.getLogger("samoe")

HERE = Path(__file__).resolve().parent
MODEL_FILES = ("configuration_samoe.py", "modeling_samoe.py")
FORMATS = ("samoe", "mixtral")
INSTALL = "pip install -c constraints.txt -e '.[hf]'"
# Text the exported tokenizer must encode exactly as the training tokenizer does.
PROBES = ("To be, or not to be: that is the question.", "  two  spaces\n\n\tand a tab   ", "digits 12345 and 3.14",
          "unicode: naïve café, 漢字, emoji 😀", " leading space", "\n")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConversionError(f"transformers is not installed ({e}): install it with `{INSTALL}`") from None
    return transformers


# -- the tokenizer -----------------------------------------------------------------------------------
def _tokenizer(run: dict, vocab_size: int, flags: dict):
    """(samoe tokenizer, its spec) as evaluation loads it: recorded in the checkpoint, or the flags."""
    from samoe_dist.evaluation.loading import EvaluationError, load_tokenizer, tokenizer_spec

    try:
        tokenizer, _ = load_tokenizer(run, vocab_size, **flags)
        spec, _ = tokenizer_spec(run, **flags)
    except EvaluationError as e:
        raise ConversionError(str(e)) from None
    return tokenizer, spec


def hf_tokenizer(tokenizer, spec, max_length: int):
    """A transformers fast tokenizer that encodes as ``tokenizer`` (samoe's) does."""
    _transformers()
    from transformers import PreTrainedTokenizerFast

    if spec.kind == "GPT2BPETokenizer":
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        from samoe_dist.data.gpt2_bpe import EOD_TOKEN

        backend = Tokenizer(BPE.from_file(str(spec.vocab_file), str(spec.merge_file)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=EOD_TOKEN, eos_token=EOD_TOKEN,
                                     pad_token=EOD_TOKEN, split_special_tokens=True, clean_up_tokenization_spaces=False,
                                     model_max_length=max_length)
    else:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto.FromString(Path(spec.tokenizer_model).read_bytes())
        if proto.trainer_spec.model_type == 2:  # BPE
            vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        else:  # unigram
            vocab = [(p.piece, p.score) for p in proto.pieces]
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
        if backend is None:
            raise ConversionError(f"{spec.tokenizer_model}: a SentencePiece model of type "
                                  f"{proto.trainer_spec.model_type} (only BPE and unigram convert); retrain it with "
                                  f"tools/train_tokenizer.py")
        eos = proto.pieces[proto.trainer_spec.eos_id].piece
        # split_special_tokens: the text '</s>' is characters, as SentencePiece encodes it
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
                                     eos_token=eos, pad_token=eos, split_special_tokens=True,
                                     clean_up_tokenization_spaces=False, model_max_length=max_length)
    for text in PROBES:
        want, got = list(tokenizer.encode(text)), hf.encode(text, add_special_tokens=False)
        if want != got:
            raise ConversionError(f"the Hugging Face tokenizer made from {spec.tokenizer_model or spec.vocab_file} "
                                  f"encodes {text!r} as {got[:12]}, the training tokenizer as {want[:12]}: this "
                                  f"tokenizer cannot be exported exactly; export with another --tokenizer-model")
    if hf.eos_token_id != tokenizer.eod:
        raise ConversionError(f"the exported tokenizer's end-of-sequence id {hf.eos_token_id} is not the training "
                              f"tokenizer's end-of-document id {tokenizer.eod}")
    return hf


# -- configs and weights ------------------------------------------------------------------------------
def samoe_config(cfg: PlainGPTConfig, eod: int, dtype: torch.dtype) -> dict:
    """config.json of the samoe format."""
    _transformers()
    from samoe_dist.export.hf.configuration_samoe import SamoeConfig

    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("format", "version", "kind", "num_layers")}
    config = SamoeConfig(num_hidden_layers=cfg.num_layers, eos_token_id=eod, pad_token_id=eod, **fields)
    config.architectures = ["SamoeForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_samoe.SamoeConfig",
                       "AutoModel": "modeling_samoe.SamoeModel",
                       "AutoModelForCausalLM": "modeling_samoe.SamoeForCausalLM"}
    out = config.to_dict()
    out["dtype"] = str(dtype).replace("torch.", "")
    return out


def samoe_state(plain: dict) -> dict:
    """The plain model's state dict under the Hugging Face model's names."""
    return {k if k == "lm_head.weight" else f"model.{k}": v for k, v in plain.items()}


def mixtral_differences(cfg: PlainGPTConfig) -> list[str]:
    """What keeps this model from being a Mixtral, each as the flag that differs (empty: it is one)."""
    out = []
    if not cfg.moe_layers:
        return ["a dense model (no --num-experts): Mixtral has experts in every layer"]
    if cfg.moe_layers != list(range(cfg.num_layers)):
        out.append(f"MoE layers {cfg.moe_layers} of {cfg.num_layers} (Mixtral: every layer, --moe-layer-freq 1)")
    if cfg.normalization != "RMSNorm":
        out.append(f"--normalization {cfg.normalization} (Mixtral: RMSNorm)")
    if cfg.activation != "swiglu":
        out.append("no --swiglu (Mixtral's experts are SwiGLU)")
    if cfg.position_embedding_type != "rope" or cfg.rotary_percent != 1.0:
        out.append(f"--position-embedding-type {cfg.position_embedding_type} (Mixtral: rope on every head dim)")
    if cfg.moe_router_pre_softmax and cfg.moe_router_topk != cfg.num_experts:
        if cfg.moe_router_topk == 1:  # the trainer needs pre-softmax gates at top-1; Mixtral's top-1 gate is 1
            out.append("--moe-router-topk 1 with pre-softmax gates (Mixtral's top-1 gate is always 1: train with "
                       "--moe-router-topk 2 or more and --no-moe-router-pre-softmax)")
        else:
            out.append("--moe-router-pre-softmax, the default (Mixtral: softmax over the top-k logits, "
                       "--no-moe-router-pre-softmax)")
    return out


def materialised_experts(plain: dict, cfg: PlainGPTConfig, layer: int) -> list[tuple]:
    """[(gate [f, h], up [f, h], down [h, f])] of one MoE layer's N experts (SaMoE: W_l = A_l @ pool)."""
    p = f"layers.{layer}.mlp."
    if cfg.samoe_pool_size is None:
        f = cfg.moe_ffn_hidden_size
        return [(plain[f"{p}experts.{e}.fc1.weight"][:f], plain[f"{p}experts.{e}.fc1.weight"][f:],
                 plain[f"{p}experts.{e}.fc2.weight"]) for e in range(cfg.num_experts)]
    w1, w2, w3 = plain["pool.w1"], plain["pool.w2"], plain["pool.w3"]
    P = w1.shape[0]
    if cfg.samoe_route_to_pool:
        A_NP = torch.eye(P, dtype=w1.dtype)
    else:
        A_NP = combination_weights(plain[f"{p}combination_logits"], cfg.samoe_temperature, cfg.samoe_top_m,
                                   cfg.samoe_combination).to(w1.dtype)
    gate, down, up = ((A_NP @ w.reshape(P, -1)).view(-1, *w.shape[1:]) for w in (w1, w2, w3))
    return [(gate[e].t().contiguous(), up[e].t().contiguous(), down[e].t().contiguous())
            for e in range(A_NP.shape[0])]


def mixtral_state(plain: dict, cfg: PlainGPTConfig) -> dict:
    """Mixtral's (hub layout) state dict of a Mixtral-compatible plain model."""
    h = cfg.hidden_size
    out = {"model.embed_tokens.weight": plain["embed_tokens.weight"], "model.norm.weight": plain["final_norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = plain["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        qkv = plain[f"{p}attn.qkv.weight"]
        out.update({f"{m}self_attn.q_proj.weight": qkv[:h].contiguous(),
                    f"{m}self_attn.k_proj.weight": qkv[h:2 * h].contiguous(),
                    f"{m}self_attn.v_proj.weight": qkv[2 * h:].contiguous(),
                    f"{m}self_attn.o_proj.weight": plain[f"{p}attn.proj.weight"],
                    f"{m}input_layernorm.weight": plain[f"{p}attn_norm.weight"],
                    f"{m}post_attention_layernorm.weight": plain[f"{p}mlp_norm.weight"],
                    f"{m}block_sparse_moe.gate.weight": plain[f"{p}mlp.router.weight"]})
        for e, (gate, up, down) in enumerate(materialised_experts(plain, cfg, i)):
            x = f"{m}block_sparse_moe.experts.{e}."
            out.update({f"{x}w1.weight": gate, f"{x}w3.weight": up, f"{x}w2.weight": down})
    return out


def mixtral_config(cfg: PlainGPTConfig, eod: int, dtype: torch.dtype) -> dict:
    _transformers()
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        bos_token_id=None, eos_token_id=eod, pad_token_id=eod, tie_word_embeddings=cfg.tie_word_embeddings,
        num_experts_per_tok=cfg.moe_router_topk, num_local_experts=cfg.num_experts, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)})
    config.architectures = ["MixtralForCausalLM"]
    out = config.to_dict()
    out["dtype"] = str(dtype).replace("torch.", "")
    return out


# -- writing a folder -----------------------------------------------------------------------------------
def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file: give a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"--output {output} exists and is not empty: pass --overwrite to replace it, or "
                              f"choose another directory")


def export_hf(load: str, output: str, overwrite: bool = False, fmt: str = "samoe", **tokenizer_flags) -> Path:
    """The newest checkpoint of ``load`` as a Hugging Face folder ``output`` (``fmt``: samoe or mixtral).

    ``tokenizer_flags``: tokenizer_model, vocab_file, merge_file, tokenizer_type (override the
    tokenizer the checkpoint's config records).
    """
    from safetensors.torch import load_file, save_file

    from samoe_dist.export.convert import WEIGHTS, _write_json, find_tag_dir, inspect_checkpoint, publish_dir

    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    tag_dir = find_tag_dir(load)
    run, cfg = inspect_checkpoint(tag_dir)
    if fmt == "mixtral" and (diff := mixtral_differences(cfg)):
        raise ConversionError(f"{tag_dir} is not a Mixtral model: " + "; ".join(diff)
                              + ". Export it with --format samoe (loads with trust_remote_code=True)")
    out = Path(output)
    _check_output(out, overwrite)
    if run["moe"].get("moe_expert_capacity_factor") is not None:
        logger.warning("the checkpoint was trained with --moe-expert-capacity-factor %s; the exported model is "
                       "dropless (its outputs differ where training dropped tokens)",
                       run["moe"]["moe_expert_capacity_factor"])
    tokenizer, spec = _tokenizer(run, cfg.vocab_size, {k: v for k, v in tokenizer_flags.items() if v})
    hf_tok = hf_tokenizer(tokenizer, spec, cfg.max_position_embeddings)
    plain = to_plain(load_file(str(tag_dir / WEIGHTS)), cfg)
    dtype = plain["embed_tokens.weight"].dtype
    eod = tokenizer.eod
    if fmt == "samoe":
        config, state = samoe_config(cfg, eod, dtype), samoe_state(plain)
    else:
        config, state = mixtral_config(cfg, eod, dtype), mixtral_state(plain, cfg)

    from transformers import GenerationConfig

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        if fmt == "samoe":
            for name in MODEL_FILES:
                shutil.copyfile(HERE / name, tmp / name)
        GenerationConfig(eos_token_id=eod, pad_token_id=eod, do_sample=False).save_pretrained(str(tmp))
        hf_tok.save_pretrained(str(tmp))
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
        # the class name every transformers version knows (5.x saves its new alias, TokenizersBackend)
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "samoe_export.json", {"source": str(tag_dir.resolve()), "format": fmt, "kind": cfg.kind,
                                                "training_config": {k: run[k] for k in
                                                                    ("model", "moe", "samoe", "training", "data")
                                                                    if k in run}})

    publish_dir(out, write)
    logger.info("exported %s (%s model) to %s (%s format)", tag_dir, cfg.kind, out, fmt)
    return out


# -- import -----------------------------------------------------------------------------------------------
def _mixtral_plain(config: dict, weights: dict, where: str) -> tuple[PlainGPTConfig, dict]:
    """(plain config, plain state dict) of a Mixtral folder's config.json and weights."""
    from samoe_dist.export.names import NORM_EPSILON, ROTARY_BASE

    h, nh = config.get("hidden_size"), config.get("num_attention_heads")
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 1e6))
    checks = [
        (config.get("num_key_value_heads", nh) == nh,
         f"num_key_value_heads {config.get('num_key_value_heads')} != num_attention_heads {nh} (grouped-query "
         f"attention; the trainer has one key/value head per query head)"),
        (config.get("head_dim") in (None, h // nh if h and nh else None),
         f"head_dim {config.get('head_dim')} != hidden_size / num_attention_heads"),
        (config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')} (the trainer: silu)"),
        (float(theta) == ROTARY_BASE, f"rope_theta {theta} (the trainer builds RoPE with base {ROTARY_BASE})"),
        (rope.get("rope_type", "default") == "default" and not config.get("rope_scaling"),
         f"RoPE scaling {rope.get('rope_type')} (the trainer: plain RoPE)"),
        (config.get("rms_norm_eps", 1e-5) == NORM_EPSILON, f"rms_norm_eps {config.get('rms_norm_eps')} "
                                                           f"(the trainer: {NORM_EPSILON})"),
        (config.get("sliding_window") is None, f"sliding_window {config.get('sliding_window')} (the trainer: full "
                                               f"causal attention)"),
    ]
    bad = [message for ok, message in checks if not ok]
    if bad:
        raise ConversionError(f"{where} cannot be trained by samoe_dist: " + "; ".join(bad))
    L, N, f = config["num_hidden_layers"], config["num_local_experts"], config["intermediate_size"]
    tied = bool(config.get("tie_word_embeddings", False))
    try:
        cfg = PlainGPTConfig(vocab_size=config["vocab_size"], num_layers=L, hidden_size=h, num_attention_heads=nh,
                             ffn_hidden_size=f, max_position_embeddings=config["max_position_embeddings"],
                             position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                             tie_word_embeddings=tied, moe_layers=list(range(L)), num_experts=N,
                             moe_ffn_hidden_size=f, moe_router_topk=config.get("num_experts_per_tok", 2),
                             moe_router_pre_softmax=False)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not a Mixtral config ({e})") from None

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ConversionError(f"{where}: weight {name} is missing: the folder is incomplete or not a Mixtral")
        return weights.pop(name)

    plain = {"embed_tokens.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    if not tied:
        plain["lm_head.weight"] = take("lm_head.weight")
    else:
        weights.pop("lm_head.weight", None)
    fused = any(".mlp.experts.gate_up_proj" in k for k in weights)  # transformers 5's own layout
    for i in range(L):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        plain[f"{p}attn.qkv.weight"] = torch.cat([take(f"{m}self_attn.{x}_proj.weight") for x in "qkv"])
        plain[f"{p}attn.proj.weight"] = take(f"{m}self_attn.o_proj.weight")
        plain[f"{p}attn_norm.weight"] = take(f"{m}input_layernorm.weight")
        plain[f"{p}mlp_norm.weight"] = take(f"{m}post_attention_layernorm.weight")
        if fused:
            plain[f"{p}mlp.router.weight"] = take(f"{m}mlp.gate.weight")
            gate_up, down = take(f"{m}mlp.experts.gate_up_proj"), take(f"{m}mlp.experts.down_proj")
            for e in range(N):
                plain[f"{p}mlp.experts.{e}.fc1.weight"] = gate_up[e]  # [gate; up], as megatron's SwiGLU fc1
                plain[f"{p}mlp.experts.{e}.fc2.weight"] = down[e]
        else:
            plain[f"{p}mlp.router.weight"] = take(f"{m}block_sparse_moe.gate.weight")
            for e in range(N):
                x = f"{m}block_sparse_moe.experts.{e}."
                plain[f"{p}mlp.experts.{e}.fc1.weight"] = torch.cat([take(f"{x}w1.weight"), take(f"{x}w3.weight")])
                plain[f"{p}mlp.experts.{e}.fc2.weight"] = take(f"{x}w2.weight")
    if weights:
        raise ConversionError(f"{where}: {len(weights)} weights Mixtral does not have (first: {sorted(weights)[0]}): "
                              f"not a MixtralForCausalLM folder")
    return cfg, {k: v.contiguous() for k, v in plain.items()}


def read_hf_weights(folder: Path) -> dict:
    """Every tensor of a Hugging Face folder (model.safetensors, or its index and shards)."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise ConversionError(f"{folder} has no model.safetensors (or model.safetensors.index.json): save the model "
                              f"with save_pretrained(..., safe_serialization=True)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error type for truncated files
            raise ConversionError(f"{f} is not a readable safetensors file ({e}): the folder is corrupt") from None
    return state


def import_hf(input_dir: str, save: str, tag: str = "iter_0000000") -> Path:
    """A Mixtral folder as a weights-only standard-MoE training checkpoint in ``save``."""
    from samoe_dist.export.convert import _check_new_dir, read_json
    from samoe_dist.export.convert import write_weights_only

    folder = Path(input_dir)
    if not folder.is_dir():
        raise ConversionError(f"--input {input_dir}: no such directory (give a Hugging Face model folder)")
    config = read_json(folder / "config.json", "a Hugging Face model folder holds its config.json")
    if config.get("model_type") != "mixtral":
        raise ConversionError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r}; import-hf reads "
                              f"Mixtral folders (model_type 'mixtral')")
    _check_new_dir(Path(save))
    cfg, plain = _mixtral_plain(config, read_hf_weights(folder), str(folder))
    return write_weights_only(plain, cfg, save, None, {"hf_model": str(folder.resolve())}, tag)
