"""The model to evaluate, from a training checkpoint or an exported plain model, with its tokenizer.

Evaluation always runs the plain model (:mod:`samoe_dist.export.plain_gpt`): a training
checkpoint's layout-free ``model.safetensors`` + ``config.json`` are converted in memory exactly as
``tools/convert_checkpoint.py export`` converts them, so no megatron-core, DeepSpeed or process
group is needed, any training layout loads, and both formats give the same numbers.

The tokenizer is the run's: the checkpoint's config records ``--tokenizer-model`` (or GPT-2's
``--vocab-file``/``--merge-file``) in its data section; a relative path is looked up from the
current directory, then from the repository root (where the trainer is run). Flags override it.
A tokenizer whose vocabulary differs from the model's is refused; one whose file differs from the
tokenizer recorded for the training data (a ``.meta.json`` next to an indexed dataset) is warned
about.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from samoe_dist.export.plain_gpt import PlainGPT

logger = logging.getLogger("samoe")

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvaluationError(ValueError):
    """A bad model path, tokenizer, data file or option; the message names it and the fix."""


@dataclasses.dataclass
class LoadedModel:
    """A plain model ready to evaluate, its tokenizer, and where they came from."""

    model: PlainGPT
    tokenizer: object  # samoe_dist.data Tokenizer or GPT2BPETokenizer: encode, decode, eod, vocab_size
    source: str  # the path given
    format: str  # 'training' (a checkpoint tag directory) or 'exported'
    run_config: dict  # the training config's sections (model, moe, samoe, training, data); may be empty
    tokenizer_path: str

    @property
    def max_length(self) -> int:
        """The longest context the model was built for (its max_position_embeddings)."""
        return self.model.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> dict:
        """What identifies the evaluated model in a results file."""
        cfg = self.model.config
        return {"source": str(self.source), "format": self.format, "kind": cfg.kind,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "vocab_size": cfg.vocab_size, "max_length": self.max_length, "tokenizer": self.tokenizer_path,
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""), "device": str(self.device)}


def _plain_files(path: Path) -> Optional[tuple[Path, Path]]:
    """(weights, config) when ``path`` names an exported plain model, else None."""
    from samoe_dist.export.plain_gpt import paths

    if path.suffix in (".safetensors", ".json") and path.is_file():
        return paths(path.with_suffix(".safetensors"))
    if path.is_dir() and (path / "model.json").is_file():
        return paths(path)
    return None


def _load_plain(weights: Path, config: Path) -> tuple[PlainGPT, dict]:
    try:
        meta = json.loads(config.read_text())
        model = PlainGPT.from_pretrained(weights)
    except (OSError, ValueError, TypeError) as e:  # json, config fields, missing or mismatched weights
        raise EvaluationError(f"{weights}: not a loadable exported model ({e}); re-export it with "
                              f"tools/convert_checkpoint.py export") from None
    return model, meta.get("training_config") or {}


def _load_training(path: Path) -> tuple[PlainGPT, dict, Path]:
    from safetensors.torch import load_file

    from samoe_dist.export.convert import find_tag_dir, inspect_checkpoint
    from samoe_dist.export.names import ConversionError, to_plain

    try:
        tag_dir = find_tag_dir(str(path))
        if not (tag_dir / "config.json").exists() and any(tag_dir.glob("mp_rank_*_model_states.pt")):
            raise EvaluationError(f"{tag_dir} holds only DeepSpeed's files (written by an older trainer): evaluation "
                                  f"reads the model.safetensors + config.json that the trainer now saves with every "
                                  f"checkpoint; save it again with the current pretrain_samoe.py")
        run, cfg = inspect_checkpoint(tag_dir)
    except ConversionError as e:
        raise EvaluationError(str(e)) from None
    if run["moe"].get("moe_expert_capacity_factor") is not None:
        logger.warning("the checkpoint was trained with --moe-expert-capacity-factor %s; evaluation is dropless",
                       run["moe"]["moe_expert_capacity_factor"])
    model = PlainGPT(cfg)
    model.load_state_dict(to_plain(load_file(str(tag_dir / "model.safetensors")), cfg))
    return model.eval(), run, tag_dir


def load_plain_model(path: str | Path) -> tuple[PlainGPT, dict, str]:
    """(plain model on CPU in fp32, training config sections, format) of a training checkpoint (a
    --save directory or one iter_* directory) or an exported model (X.safetensors, or a directory
    holding model.safetensors + model.json)."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or directory; give a checkpoint directory (--save DIR or "
                              f"DIR/iter_N) or an exported model (X.safetensors)")
    plain = _plain_files(path)
    if plain is not None:
        model, run = _load_plain(*plain)
        return model, run, "exported"
    model, run, _ = _load_training(path)
    return model, run, "training"


def _find(recorded: str) -> Optional[Path]:
    """A recorded (possibly relative) path: as given, else from the repository root."""
    for candidate in (Path(recorded), REPO / recorded):
        if candidate.is_file():
            return candidate
    return None


def tokenizer_spec(run: dict, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                   merge_file: Optional[str] = None, tokenizer_type: Optional[str] = None):
    """The TokenizerSpec to load: the flags given, else the training config's data section."""
    from samoe_dist.data.tokenizers import TokenizerSpec

    if tokenizer_model or vocab_file or merge_file:
        return TokenizerSpec(tokenizer_type, tokenizer_model, vocab_file, merge_file), "given"
    data = run.get("data") or {}
    recorded = {k: data.get(k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")}
    if not any(recorded[k] for k in ("tokenizer_model", "vocab_file")):
        raise EvaluationError("the checkpoint's config records no tokenizer (trained on prepared data without "
                              "--tokenizer-model?): pass --tokenizer-model (or --vocab-file and --merge-file)")
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        if recorded[key]:
            found = _find(recorded[key])
            if found is None:
                flag = "--" + key.replace("_", "-")
                raise EvaluationError(f"the checkpoint was trained with {flag} {recorded[key]}, which is not found "
                                      f"(from here or from {REPO}): pass {flag} PATH")
            recorded[key] = str(found)
    return TokenizerSpec(**recorded), "recorded"


def _data_tokenizer_sha(run: dict) -> Optional[str]:
    """The tokenizer hash recorded next to the run's indexed training data, if any."""
    for prefix in (run.get("data") or {}).get("data_path") or []:
        meta = _find(f"{prefix}.meta.json")
        if meta is not None:
            try:
                return json.loads(meta.read_text()).get("tokenizer_sha256")
            except (OSError, ValueError):
                return None
    return None


def load_tokenizer(run: dict, vocab_size: int, **flags):
    """(tokenizer, its path) for a model of ``vocab_size``; EvaluationError when missing or mismatched."""
    from samoe_dist.data.errors import DataError

    spec, origin = tokenizer_spec(run, **flags)
    try:
        tokenizer = spec.load()
    except (DataError, FileNotFoundError) as e:
        raise EvaluationError(str(e)) from None
    path = spec.tokenizer_model or spec.vocab_file
    if tokenizer.vocab_size != vocab_size:
        hint = "pass the tokenizer the model was trained with" if origin == "given" else \
            "the recorded tokenizer file has changed since training; pass the one the model was trained with"
        raise EvaluationError(f"tokenizer {path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                              f"{vocab_size}: {hint} (--tokenizer-model)")
    trained_sha = _data_tokenizer_sha(run)
    if trained_sha and trained_sha != tokenizer.sha256:
        logger.warning("tokenizer %s is not the one recorded for the training data (sha256 %s...): the results "
                       "are meaningless unless it tokenizes identically", path, trained_sha[:12])
    return tokenizer, str(path)


def load(path: str | Path, device: str = "cpu", dtype: str = "float32", **tokenizer_flags) -> LoadedModel:
    """Model and tokenizer of a checkpoint or exported model, on ``device`` in ``dtype``.

    ``tokenizer_flags``: tokenizer_model, vocab_file, merge_file, tokenizer_type (override the
    tokenizer the config records).
    """
    if dtype not in DTYPES:
        raise EvaluationError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise EvaluationError(f"--device {device!r}: {e}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    model, run, fmt = load_plain_model(path)
    tokenizer, tok_path = load_tokenizer(run, model.config.vocab_size, **tokenizer_flags)
    model = model.to(device=target, dtype=DTYPES[dtype]).eval()
    logger.info("loaded %s (%s %s model, %.2fM parameters, context %d) with tokenizer %s on %s, %s", path, fmt,
                model.config.kind, sum(p.numel() for p in model.parameters()) / 1e6,
                model.config.max_position_embeddings, tok_path, target, dtype)
    return LoadedModel(model, tokenizer, str(path), fmt, run, tok_path)


__all__ = ["EvaluationError", "LoadedModel", "load", "load_plain_model", "load_tokenizer"]


# -- the flags both evaluation tools share ----------------------------------------------------------------
def add_model_arguments(parser, required: bool = True) -> None:
    """--load, the tokenizer overrides, --device, --dtype, --batch-size."""
    parser.add_argument("--load", required=required,
                        help="a training checkpoint (a run's --save directory, or one iter_* directory in it) or an "
                             "exported model (X.safetensors with X.json, or their directory)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece model (default: the --tokenizer-model the checkpoint was trained with)")
    parser.add_argument("--tokenizer-type", default=None, help="Megatron tokenizer name (default: from the files)")
    parser.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json (with --merge-file)")
    parser.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt (with --vocab-file)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weights and activations (log-probabilities are always computed in fp32)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per model call (default 16)")


def load_from_args(args) -> LoadedModel:
    if not args.load:
        raise EvaluationError("--load is required: a checkpoint directory or an exported model")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
    return load(args.load, device=args.device, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
                vocab_file=args.vocab_file, merge_file=args.merge_file, tokenizer_type=args.tokenizer_type)


def check_output(path: str | Path, overwrite: bool) -> Path:
    """``path``, unless it exists and may not be replaced (checked before any work is done)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EvaluationError(f"--output {path} exists: pass --overwrite to replace it, or choose another path")
    return path


def write_json(path: str | Path, obj: dict, overwrite: bool) -> Path:
    """Write ``obj`` to ``path`` whole (temporary name, then rename); an existing file only with ``overwrite``."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(o):
    """JSON for what lm-eval's results hold besides plain values (numpy numbers, sets, functions)."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    return str(o)
