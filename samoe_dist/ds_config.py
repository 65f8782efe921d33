"""The DeepSpeed config: read the user's json, then fill in what the flags decide.

The ds_config owns what is DeepSpeed's (ZeRO stage, bf16 details, optimizer type, communication
options). The Megatron-style flags own batch sizes, clipping, learning rate and its schedule: they
are written into the config here, and a value in the file that contradicts a flag is an error
naming both rather than a silent override.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from samoe_dist import cpu_compat
from samoe_dist.config import ConfigError, RunConfig, gradient_accumulation_steps


def load_ds_config(path: Optional[str]) -> dict:
    if path is None:
        raise ConfigError("no DeepSpeed config given: pass --ds_config FILE (e.g. examples/ds_config_cpu.json)")
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} does not exist: pass --ds_config with an existing file "
                          f"(examples/ds_config_cpu.json is a working one)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON ({exc.msg} at line {exc.lineno}): fix the file") from None


def _agree(ds: dict, key: str, value, flag: str) -> None:
    if key in ds and ds[key] != "auto" and ds[key] != value:
        raise ConfigError(f"ds_config {key}={ds[key]} contradicts {flag} (which gives {value}): "
                          f"remove {key} from the ds_config or change the flag")
    ds[key] = value


def build_ds_config(cfg: RunConfig, user: dict, dp_size: int) -> dict:
    """The final ds_config dict passed to deepspeed.initialize."""
    ds = json.loads(json.dumps(user))  # deep copy
    tr = cfg.training
    _agree(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size, "--micro-batch-size")
    _agree(ds, "train_batch_size", tr.global_batch_size, "--global-batch-size")
    _agree(ds, "gradient_accumulation_steps", gradient_accumulation_steps(cfg, dp_size),
           "--global-batch-size / (--micro-batch-size x data-parallel size)")
    _agree(ds, "gradient_clipping", tr.clip_grad, "--clip-grad")
    if "scheduler" in ds:
        raise ConfigError("ds_config has a 'scheduler' section: remove it; the learning-rate schedule is set by "
                          "--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, --lr-decay-iters")
    if "fp16" in ds and ds["fp16"].get("enabled", False):
        raise ConfigError("ds_config enables fp16: use bf16 (--bf16) or fp32; fp16 loss scaling is not supported")
    bf16_file = ds.get("bf16", {}).get("enabled", None)
    if bf16_file is False and tr.bf16:
        raise ConfigError('ds_config bf16 {"enabled": false} contradicts --bf16: remove one of them (the flag '
                          'alone, or "enabled": true in the file, both ask for bf16)')
    if bf16_file and not tr.bf16:
        tr.bf16 = True  # the file asked for bf16; the flag is the same request
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": tr.bf16}
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params.update(lr=tr.lr, betas=[tr.adam_beta1, tr.adam_beta2], eps=tr.adam_eps, weight_decay=tr.weight_decay)
    if cpu_compat.on_cpu():
        params.setdefault("torch_adam", True)
    cpu_compat.check_ds_config_for_cpu(ds)
    ds.setdefault("steps_per_print", 10**9)  # our own iteration lines replace DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    return ds
