"""The trainer's view of the data: ``micro_batch(split, consumed, mbs, dp_rank, dp_size, step)``.

Backed by megatron-core's GPTDataset / BlendedDataset (:mod:`samoe_dist.data.gpt_data`) over
Megatron indexed datasets. ``--data-path`` is one prefix, a weighted blend ``W1 P1 W2 P2 ...``,
or, for convenience, a .jsonl (or text) corpus that rank 0 preprocesses once into
``--data-cache-path`` while the other ranks wait. Everything a user can get wrong (a missing or
truncated file, a tokenizer that does not match the data or ``--vocab-size``, a split without
documents) stops every rank with the same one-line error, before any index is built.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from samoe_dist.config import ConfigError, RunConfig
from samoe_dist.data.errors import DataError

logger = logging.getLogger(__name__)


class TrainingData(Protocol):
    def micro_batch(self, split: str, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int, micro_step: int) -> dict: ...


def _is_text_file(path: str) -> bool:
    return os.path.isfile(path) and not path.endswith((".bin", ".idx"))


def _rank0_then_share(fn, is_main: bool):
    """Run `fn` on rank 0 only; every rank gets its result or raises its (one-line) error."""
    result = error = None
    if is_main:
        try:
            result = fn()
        except (DataError, FileNotFoundError, FileExistsError) as e:
            error = (type(e).__name__, str(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [(result, error)]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared[0]
    if error is not None:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else DataError)(error[1])
    return result


def preprocessed_prefix(text_path: str, tokenizer, cache_dir: str | None) -> str:
    """Where a corpus file is preprocessed to: one dataset per (file, tokenizer)."""
    stem = Path(text_path).name.split(".")[0]
    folder = cache_dir or os.path.dirname(os.path.abspath(text_path))
    tag = hashlib.sha256(f"{os.path.abspath(text_path)}|{tokenizer.sha256}".encode()).hexdigest()[:10]
    return os.path.join(folder, f"{stem}-{tag}_text_document")


def _preprocess_once(text_path: str, spec, tokenizer, cache_dir: str | None) -> str:
    """Preprocess `text_path` (rank 0) unless an up-to-date dataset for it exists; returns its prefix."""
    from samoe_dist.data.indexed import inspect_prefix, preprocess

    prefix = preprocessed_prefix(text_path, tokenizer, cache_dir)
    src = Path(text_path)
    try:
        meta = inspect_prefix(prefix).meta or {}
        fresh = meta.get("tokenizer_sha256") == tokenizer.sha256 and meta.get("sources") == [
            {"path": str(src.resolve()), "bytes": src.stat().st_size, "mtime_ns": src.stat().st_mtime_ns}]
    except (FileNotFoundError, DataError):
        fresh = False
    if fresh:
        logger.info("data: %s is already preprocessed in %s", text_path, prefix)
        return prefix
    logger.info("data: preprocessing %s once into %s", text_path, prefix)
    stats = preprocess([text_path], prefix[: -len("_text_document")], spec, ("text",), append_eod=True,
                       workers=1, overwrite=True, progress=False)
    logger.info("data: %d documents, %d tokens in %.1f s", stats.documents, stats.tokens, stats.seconds)
    return stats.outputs[0]


def _resolve(path: str, spec, tokenizer, cache_dir: str | None, is_main: bool) -> str:
    """A --data-path entry as a dataset prefix (a corpus file is preprocessed first)."""
    if path.endswith((".bin", ".idx")) and not os.path.isfile(path[:-4]):
        path = path[:-4]  # the dataset was named by one of its files
    if _is_text_file(path):
        if tokenizer is None:
            raise ConfigError(f"--data-path {path} is a text corpus: pass --tokenizer-model (or --vocab-file "
                              f"and --merge-file) to tokenize it, or preprocess it with tools/preprocess_data.py")
        return _rank0_then_share(lambda: _preprocess_once(path, spec, tokenizer, cache_dir), is_main)
    if path.endswith((".jsonl", ".json", ".ndjson", ".txt", ".gz")):
        raise FileNotFoundError(f"--data-path {path!r} does not exist: make it with `python tools/fetch_corpus.py "
                                f"shakespeare --output {path}` or point to your jsonl")
    return path


def _check_vocab_size(vocab_size: int | None, vocab: int, source: str) -> None:
    if vocab_size is not None and vocab_size != vocab:
        raise ConfigError(f"--vocab-size {vocab_size} does not match the tokenizer {source!r} "
                          f"(vocabulary {vocab}): use --vocab-size {vocab} or drop the flag")


def _vocabulary(cfg: RunConfig, tokenizer, infos) -> dict:
    """Check the tokenizer against the data and --vocab-size; returns the tokenizer identity."""
    from samoe_dist.data.indexed import max_token_id
    from samoe_dist.data.tokenizers import tokenizer_identity

    d = cfg.data
    named = d.tokenizer_model or d.vocab_file
    identity = tokenizer_identity(tokenizer) if tokenizer is not None else None
    recorded = [info for info in infos if info.meta and info.meta.get("tokenizer_sha256")]
    if identity is not None:
        for info in recorded:
            if info.meta["tokenizer_sha256"] != identity["tokenizer_sha256"]:
                raise DataError(f"{info.prefix} was made by another tokenizer ({info.meta.get('tokenizer_type')}, "
                                f"vocabulary {info.meta.get('vocab_size')}) than {named} "
                                f"({identity['tokenizer_type']}, vocabulary {identity['vocab_size']}): pass the "
                                f"tokenizer the data was made with, or preprocess it again with {named}")
    elif recorded:
        if len({info.meta["tokenizer_sha256"] for info in recorded}) > 1:
            raise DataError(f"{recorded[0].prefix} and {recorded[-1].prefix} were made by different tokenizers: "
                            f"preprocess all of --data-path with the same one")
        identity = {k: recorded[0].meta.get(k) for k in ("tokenizer_type", "tokenizer_sha256", "vocab_size", "eod")}
    vocab = identity["vocab_size"] if identity else None
    if cfg.model.vocab_size is None:
        if vocab is None:
            raise ConfigError(f"--vocab-size is needed: {infos[0].prefix} has no .meta.json naming its tokenizer; "
                              f"pass --vocab-size or the tokenizer (--tokenizer-model, or --vocab-file/--merge-file)")
        cfg.model.vocab_size = vocab
    elif vocab is not None:
        _check_vocab_size(cfg.model.vocab_size, vocab, named or f"recorded in {infos[0].prefix}.meta.json")
    for info in infos:
        top = max_token_id(info)
        if top >= cfg.model.vocab_size:
            raise DataError(f"{info.prefix} holds token id {top} but the model's vocabulary is "
                            f"{cfg.model.vocab_size}: the data was made by another tokenizer; pass that "
                            f"tokenizer or --vocab-size {top + 1} or more")
    if identity is None:
        identity = {"tokenizer_type": None, "tokenizer_sha256": None, "vocab_size": cfg.model.vocab_size, "eod": None}
        if d.eod_mask_loss:
            raise ConfigError("--eod-mask-loss needs to know the EOD id: pass the tokenizer (--tokenizer-model, "
                              "or --vocab-file/--merge-file)")
    return identity


def build_training_data(cfg: RunConfig, groups) -> TrainingData:
    """Check the data and tokenizer, set or check --vocab-size, and build the train/valid/test
    datasets sized for this run (train: --train-iters global batches; valid and test:
    --eval-iters global batches, which every evaluation reads from the start)."""
    from samoe_dist.data.gpt_data import DataSizes, GPTData
    from samoe_dist.data.indexed import inspect_prefix
    from samoe_dist.data.tokenizers import TokenizerSpec, megatron_tokenizer

    d, tr = cfg.data, cfg.training
    if not d.data_path:
        raise ConfigError("--data-path is required: a dataset prefix from tools/preprocess_data.py, a blend "
                          "'W1 PREFIX1 W2 PREFIX2', or a .jsonl corpus (tools/fetch_corpus.py makes one)")
    paths, weights = d.blend()
    spec = TokenizerSpec(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file)
    tokenizer = spec.load()
    if tokenizer is not None:  # fail before preprocessing anything
        _check_vocab_size(cfg.model.vocab_size, tokenizer.vocab_size, d.tokenizer_model or d.vocab_file)
    prefixes = [_resolve(p, spec, tokenizer, d.data_cache_path, groups.is_main) for p in paths]
    infos = [inspect_prefix(p) for p in prefixes]
    identity = _vocabulary(cfg, tokenizer, infos)
    global_batch = tr.global_batch_size or tr.micro_batch_size * groups.dp_size
    eval_samples = tr.eval_iters * global_batch
    sizes = DataSizes(train=tr.train_iters * global_batch, valid=eval_samples, test=eval_samples)
    cache_dir = d.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
    return GPTData(infos, weights, megatron_tokenizer(identity, tokenizer), cfg.model.seq_length, d.split,
                   tr.seed, sizes, cache_dir, eod_mask_loss=d.eod_mask_loss)
