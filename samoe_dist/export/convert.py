"""Checkpoint conversion: reshard (weights-only copy for another layout), export, import.

A training checkpoint (``samoe_dist.checkpoint``) keeps, next to DeepSpeed's per-rank files, a
layout-free ``model.safetensors`` (every weight once, canonical names) and ``config.json`` (the
RunConfig and the layout that wrote it). These functions only read and write those two files:

- :func:`reshard`: a weights-only checkpoint (the two files, ``latest`` naming it) that
  ``--load`` accepts at any expert-parallel size and world size, with a fresh optimizer;
- :func:`export`: the plain model's weights and ``.json`` config (``samoe_dist.export.plain_gpt``);
- :func:`import_plain`: the reverse of export, a weights-only checkpoint.

Everything is checked before anything is written (the config against the weights' names and
shapes, the target layout), and every output appears atomically: written under a temporary name,
then renamed. Nothing existing is overwritten unless asked. Errors are :class:`ConversionError`
with one message naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from samoe_dist.export.names import ConversionError, check_weights, plain_config, run_config, to_plain, to_training
from samoe_dist.export.plain_gpt import PlainGPTConfig, paths

logger = logging.getLogger("samoe")

WEIGHTS = "model.safetensors"  # = samoe_dist.checkpoint.WEIGHTS / CONFIG (kept import-light here)
CONFIG = "config.json"
METADATA = {"format": "samoe"}  # what samoe_dist.checkpoint.save writes


# -- reading ----------------------------------------------------------------------------------------
def find_tag_dir(load: str) -> Path:
    """The checkpoint to read: ``DIR/<latest>`` of a --save directory, or a tag directory itself."""
    root = Path(load)
    if not root.is_dir():
        raise ConversionError(f"--load {load}: no such directory")
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (root / tag).is_dir():
            raise ConversionError(f"--load {load}: 'latest' names {tag!r}, which is not a directory there: the "
                                  f"checkpoint is incomplete; point --load at a complete tag directory inside it")
        return root / tag
    if (root / WEIGHTS).exists() or (root / CONFIG).exists():
        return root
    raise ConversionError(f"--load {load}: no 'latest' file and no {WEIGHTS}: not a samoe checkpoint "
                          f"(pass the --save directory of a run, or one of its iter_* directories)")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} is missing: {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): the file is corrupt; use another checkpoint") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds {type(data).__name__}, not a JSON object: the file is corrupt")
    return data


def weight_shapes(path: Path) -> dict:
    """{name: shape} from a safetensors header (no tensor is read); a clear error when unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise ConversionError(f"{path} is missing: the checkpoint is incomplete; use another one")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/garbage files
        raise ConversionError(f"{path} is not a readable safetensors file ({e}): the checkpoint is corrupt or "
                              f"truncated; use another one") from None


def inspect_checkpoint(tag_dir: Path) -> tuple[dict, PlainGPTConfig]:
    """(config.json dict, plain config) of a checkpoint whose weights match its config."""
    run = read_json(tag_dir / CONFIG, "the checkpoint is incomplete (written by an interrupted save?)")
    cfg = plain_config(run)
    check_weights(cfg, weight_shapes(tag_dir / WEIGHTS), "training", str(tag_dir / WEIGHTS), str(tag_dir / CONFIG))
    return run, cfg


# -- writing ----------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _check_new_dir(save: Path, load: Optional[Path] = None) -> None:
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ConversionError(f"--save {save} already exists and is not empty: choose a new directory "
                              f"(nothing was written)")
    if load is not None and save.resolve() == load.resolve():
        raise ConversionError(f"--save {save} is the --load directory: choose a new one")


def publish_dir(output: Path, write):
    """Build the folder ``output`` by ``write(tmp)`` in a temporary sibling, then put it in place of
    ``output`` (an existing one is moved aside first and removed after): the folder appears whole or
    not at all, and a crash mid-write leaves the old one. Returns what ``write`` returns."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        result = write(tmp)
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return result


def _publish_checkpoint(save: Path, tag: str, write) -> Path:
    """Build ``save/<tag>/`` (by ``write(tag_dir)``) and ``save/latest`` whole, in place of ``save``."""
    def build(tmp: Path) -> None:
        (tmp / tag).mkdir()
        write(tmp / tag)
        (tmp / "latest").write_text(tag)

    publish_dir(save, build)
    return save / tag


def _refuse_existing(*files: Path) -> None:
    for final in files:
        if final.exists():
            raise ConversionError(f"{final} exists: pass --overwrite to replace it, or choose another --output")


# -- the three conversions -----------------------------------------------------------------------------
def check_target_layout(run: dict, ep: int, world_size: int, tp: int = 1) -> None:
    """The target layout must be possible for this model (the trainer checks the same at start-up)."""
    experts = run["moe"].get("num_experts")
    if ep < 1 or world_size < 1 or tp < 1:
        raise ConversionError(f"--expert-model-parallel-size {ep}, --tensor-model-parallel-size {tp} and --world-size "
                              f"{world_size} must be >= 1")
    if world_size % tp:
        raise ConversionError(f"--tensor-model-parallel-size {tp} does not divide --world-size {world_size}; use a "
                              f"world size that is a multiple of {tp}")
    if tp > 1:
        model = run["model"]
        for field in ("num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if model.get(field) and model[field] % tp:
                raise ConversionError(f"--tensor-model-parallel-size {tp} does not divide the checkpoint's "
                                      f"--{field.replace('_', '-')} {model[field]}")
    if experts is None and ep > 1:
        raise ConversionError(f"--expert-model-parallel-size {ep}: the checkpoint is a dense model (no experts to "
                              f"shard); use 1")
    if experts is not None and experts % ep:
        raise ConversionError(f"--expert-model-parallel-size {ep} does not divide the checkpoint's --num-experts "
                              f"{experts}; use one of {[d for d in range(1, experts + 1) if experts % d == 0]}")
    if world_size % ep:
        raise ConversionError(f"--expert-model-parallel-size {ep} does not divide --world-size {world_size}; use a "
                              f"world size that is a multiple of {ep}")


def reshard(load: str, save: str, ep: int = 1, world_size: Optional[int] = None, tp: int = 1) -> Path:
    """Write the newest checkpoint of ``load`` as a weights-only checkpoint in ``save``.

    The weights file is copied as is (it is already layout-free: whole tensor-parallel weights,
    experts under their global index); config.json records the target layout (EP, TP, world) and
    where the weights came from. Returns the new tag directory.
    """
    world_size = max(ep, tp) if world_size is None else world_size
    tag_dir = find_tag_dir(load)
    run, cfg = inspect_checkpoint(tag_dir)
    check_target_layout(run, ep, world_size, tp)
    _check_new_dir(Path(save), Path(load))
    source = {"checkpoint": str(tag_dir.resolve()), "layout": run.get("layout")}
    client = tag_dir / "client_state.json"
    if client.is_file():
        source.update(read_json(client, ""))
    out = {k: v for k, v in run.items() if k not in ("layout", "converted_from")}
    out["parallel"] = {**out.get("parallel", {}), "expert_model_parallel_size": ep, "tensor_model_parallel_size": tp}
    if tp == 1:
        out["parallel"]["sequence_parallel"] = False
    out["layout"] = {"world_size": world_size, "ep_size": ep, **({"tp_size": tp} if tp > 1 else {})}
    out["converted_from"] = source

    def write(new: Path) -> None:
        shutil.copyfile(tag_dir / WEIGHTS, new / WEIGHTS)
        _write_json(new / CONFIG, out)

    new_tag = _publish_checkpoint(Path(save), tag_dir.name, write)
    logger.info("resharded %s (%s model) into %s for expert-parallel size %d, tensor-parallel size %d, world size "
                "%d (weights only)", tag_dir, cfg.kind, new_tag, ep, tp, world_size)
    return new_tag


def export(load: str, output: str, overwrite: bool = False) -> tuple[Path, Path]:
    """The newest checkpoint of ``load`` as the plain model's ``X.safetensors`` + ``X.json``."""
    from safetensors.torch import load_file, save_file

    tag_dir = find_tag_dir(load)
    run, cfg = inspect_checkpoint(tag_dir)
    if run["moe"].get("moe_expert_capacity_factor") is not None:
        logger.warning("the checkpoint was trained with --moe-expert-capacity-factor %s; the plain model is dropless "
                       "(its outputs differ where training dropped tokens)", run["moe"]["moe_expert_capacity_factor"])
    weights, config = paths(output)
    if not overwrite:
        _refuse_existing(weights, config)  # before any work
    weights.parent.mkdir(parents=True, exist_ok=True)
    plain = to_plain(load_file(str(tag_dir / WEIGHTS)), cfg)
    meta = {**cfg.to_dict(), "training_config": {k: run[k] for k in ("model", "moe", "samoe", "training", "data")
                                                 if k in run}}
    tmp_w, tmp_c = weights.with_name(weights.name + ".tmp"), config.with_name(config.name + ".tmp")
    save_file(plain, str(tmp_w), metadata={"format": "samoe-plain-gpt"})
    _write_json(tmp_c, meta)
    os.replace(tmp_w, weights)  # each file appears whole, never half-written
    os.replace(tmp_c, config)
    logger.info("exported %s (%s model) to %s and %s", tag_dir, cfg.kind, weights, config)
    return weights, config


def import_plain(input_path: str, save: str, tag: str = "iter_0000000") -> Path:
    """A plain model's files (``X.safetensors`` + ``X.json``) as a weights-only checkpoint in ``save``."""
    from safetensors.torch import load_file

    weights, config = paths(input_path)
    meta = read_json(config, f"the plain model's config; export writes it next to {weights.name}")
    try:
        cfg = PlainGPTConfig.from_dict(meta)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{config} is not a plain model config: {e}") from None
    check_weights(cfg, weight_shapes(weights), "plain", str(weights), str(config))
    run_config(cfg, meta.get("training_config"))  # refuses a model the trainer cannot build, before any reading
    _check_new_dir(Path(save))
    new_tag = write_weights_only(load_file(str(weights)), cfg, save, meta.get("training_config"),
                                 {"plain_model": str(weights.resolve())}, tag)
    logger.info("imported %s (%s model) into %s (weights only)", weights, cfg.kind, new_tag)
    return new_tag


def write_weights_only(plain: dict, cfg: PlainGPTConfig, save: str, base: Optional[dict], source: dict,
                       tag: str = "iter_0000000", extra: Optional[dict] = None, overwrite: bool = False) -> Path:
    """The plain state dict ``plain`` as a weights-only checkpoint ``save/<tag>`` (config.json from
    ``cfg`` and ``base``, the training config sections to keep; ``source`` recorded as converted_from,
    where an ``iteration`` and ``consumed_samples`` make the trainer continue that data stream;
    ``extra``: more top-level entries, such as the source's ``data_fingerprint``; ``overwrite``: replace
    an existing ``save``, whole, once the new one is written)."""
    from safetensors.torch import save_file

    run = run_config(cfg, base)
    if not overwrite:
        _check_new_dir(Path(save))
    state = to_training(plain, cfg)

    def write(new: Path) -> None:
        save_file(state, str(new / WEIGHTS), metadata=METADATA)
        _write_json(new / CONFIG, {**run, **(extra or {}), "layout": {"world_size": 1, "ep_size": 1},
                                   "converted_from": source})

    return _publish_checkpoint(Path(save), tag, write)
