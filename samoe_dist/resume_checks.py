"""What a resumed run must agree on with its checkpoint, and what it may change.

A checkpoint's ``config.json`` records the run that wrote it. On ``--load`` (samoe_dist.checkpoint):

- the shape-defining flags (:data:`SHAPE_FIELDS`) must match: :func:`check_config` names every one
  that differs, with the fix;
- the optimizer and schedule flags (:data:`OPT_SCHEDULE_FIELDS`) may differ only when the user says
  which side wins, megatron's ``--override-opt-param-scheduler`` (the command line) or
  ``--use-checkpoint-opt-param-scheduler`` (the checkpoint): :func:`resolve_opt_schedule` before the
  load, :func:`apply_opt_schedule` after it;
- the data stream (:func:`data_fingerprint`: data files and their sizes, split, seed, sequence length,
  tokenizer hash) must be the same unless ``--allow-data-change``: :func:`check_data`.
"""

from __future__ import annotations

import logging
import os

from samoe_dist.config import ConfigError, RunConfig, flag_name

logger = logging.getLogger("samoe")

# Fields that change the shape or meaning of the weights: a checkpoint must agree on all of them.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
              "max_position_embeddings", "position_embedding_type", "normalization", "swiglu",
              "untie_embeddings_and_output_weights"),
    "moe": ("num_experts", "moe_router_topk", "moe_layer_freq", "moe_ffn_hidden_size"),
    "samoe": ("samoe_pool_size",),
}

# Flags whose values live on in the restored optimizer and LR-scheduler state (Megatron's
# --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler choice).
OPT_SCHEDULE_FIELDS = {
    "training": ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters", "weight_decay",
                 "adam_beta1", "adam_beta2", "adam_eps"),
    "samoe": ("samoe_combination_lr_mult",),
}


def _field_diffs(saved: dict, cfg: RunConfig, fields: dict) -> list[tuple]:
    """(group, field, checkpoint value, command-line value) of each of ``fields`` ({group: names})
    whose value in the saved config differs from ``cfg``'s."""
    now = cfg.to_dict()
    return [(group, name, saved.get(group, {}).get(name), now[group].get(name))
            for group, names in fields.items() for name in names
            if saved.get(group, {}).get(name) != now[group].get(name)]


def opt_schedule_diffs(saved: dict, cfg: RunConfig) -> list[tuple]:
    """The optimizer/schedule flags that differ from the checkpoint's (fields it does not record
    are not compared)."""
    return [d for d in _field_diffs(saved, cfg, OPT_SCHEDULE_FIELDS) if d[2] is not None]


def resolve_opt_schedule(trainer, diffs: list[tuple], source: str) -> None:
    """Before loading: refuse a silent difference, or adopt the checkpoint's values (which the
    restored optimizer and scheduler carry anyway) into the config the schedule reads."""
    if not diffs:
        return
    tr = trainer.cfg.training
    listing = "; ".join(f"{flag_name(name)} checkpoint {a}, now {b}" for _, name, a, b in diffs)
    if tr.use_checkpoint_opt_param_scheduler:
        for group, name, a, _ in diffs:
            setattr(getattr(trainer.cfg, group), name, a)
        logger.info("--use-checkpoint-opt-param-scheduler: keeping the checkpoint's %s", listing)
    elif tr.override_opt_param_scheduler:
        logger.info("--override-opt-param-scheduler: applying %s", listing)
    else:
        raise ConfigError(f"--load {source}: the optimizer and schedule state in the checkpoint would override "
                          f"{listing}; pass --override-opt-param-scheduler to apply the new values or "
                          f"--use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def apply_opt_schedule(trainer) -> None:
    """After loading: the command line's values into every optimizer group and the LR scheduler
    (the Trainer always gives the engine one, samoe_dist.optim.make_scheduler)."""
    from samoe_dist.optim import lr_at

    cfg, tr = trainer.cfg, trainer.cfg.training
    sched = trainer.engine.lr_scheduler
    for i, g in enumerate(trainer.engine.optimizer.param_groups):
        mult = cfg.samoe.samoe_combination_lr_mult if str(g.get("name", "")).startswith("combination") else 1.0
        base = tr.lr * mult
        if g.get("weight_decay", 0.0) > 0.0 or str(g.get("name", "")).startswith("decay"):
            g["weight_decay"] = tr.weight_decay
        g["betas"] = (tr.adam_beta1, tr.adam_beta2)
        g["eps"] = tr.adam_eps
        g["initial_lr"] = sched.base_lrs[i] = base
        g["lr"] = base * lr_at(sched.last_epoch, tr) / tr.lr


def data_fingerprint(cfg: RunConfig) -> dict:
    """What the data stream of a run depends on: data prefixes (with the sizes of their files), split,
    seed, sequence length, and a hash of the tokenizer files."""
    import hashlib

    d = cfg.data
    files = {}
    for item in d.data_path or []:
        try:
            float(item)
            continue  # a blend weight
        except (TypeError, ValueError):
            pass
        paths = [item + ext for ext in (".bin", ".idx") if os.path.isfile(item + ext)] or [item]
        files[item] = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    tok = hashlib.sha256()
    for path in (d.tokenizer_model, d.vocab_file, d.merge_file):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                tok.update(f.read())
    return {"data_path": list(d.data_path or []), "file_bytes": files, "split": d.split, "seed": cfg.training.seed,
            "seq_length": cfg.model.seq_length, "tokenizer_sha256": tok.hexdigest()}


def check_data(saved: dict, cfg: RunConfig, source: str) -> None:
    want = saved.get("data_fingerprint")
    if want is None:
        return  # written before fingerprints existed
    now = data_fingerprint(cfg)
    diffs = [k for k in sorted(set(want) | set(now)) if want.get(k) != now.get(k)]
    if not diffs:
        return
    listing = "; ".join(f"{k}: checkpoint {want.get(k)}, now {now.get(k)}" for k in diffs)
    if cfg.training.allow_data_change:
        logger.warning("--allow-data-change: continuing on different data (%s)", listing)
        return
    raise ConfigError(f"--load {source}: the data differs from the checkpoint's ({listing}); resuming would "
                      f"continue another data stream. Use the checkpoint's data, or pass --allow-data-change")


def check_config(saved: dict, cfg: RunConfig, source: str) -> list[str]:
    """Raise ConfigError listing every shape-defining field that differs from the checkpoint."""
    diffs = [f"{flag_name(name)}: checkpoint {a}, now {b}" for _, name, a, b in _field_diffs(saved, cfg, SHAPE_FIELDS)]
    if diffs:
        raise ConfigError(f"checkpoint {source} does not match this model: " + "; ".join(diffs)
                          + " (use the checkpoint's values, or start without --load)")
    return diffs
