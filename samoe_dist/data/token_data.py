"""Minimal token-sample data path: one flat token file, fixed-length samples, Megatron's layout.

This is the interface a later issue replaces with megatron-core indexed datasets, so it keeps
Megatron's conventions: `--split` weights "969,30,1" cut the samples into contiguous train / valid /
test ranges, and the pretraining sampler's layout (each micro-step takes
micro_batch_size * dp_size consecutive samples; data-parallel rank r takes the r-th slice), which
makes a 1-process and a 2-process run see the same samples per global batch.

    python -m samoe_dist.data.token_data --input data/shakespeare.jsonl \\
        --tokenizer data/spm.model --output data/shakespeare.npy
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from samoe_dist.data.corpus import atomic_path, iter_jsonl_texts
from samoe_dist.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
ENCODE_BATCH = 64  # documents per SentencePiece call


def meta_path(token_path: str | Path) -> Path:
    """The sidecar JSON next to a token file: which tokenizer and source made it."""
    return Path(f"{token_path}.json")


def prepare_command(token_path: str | Path, jsonl_path: str = "data/shakespeare.jsonl",
                    model_path: str = "data/spm.model") -> str:
    return (f"python -m samoe_dist.data.token_data --input {jsonl_path} --tokenizer {model_path} "
            f"--output {token_path}")


def prepare_token_file(jsonl_path: str | Path, tokenizer: Tokenizer, out_path: str | Path,
                       json_key: str = "text") -> dict:
    """Tokenize every document of `jsonl_path`, append EOD after each, and save the flat id stream
    as `out_path` (.npy, uint16 when the vocab fits, else int32) plus a sidecar JSON.

    Skips the work when `out_path` is newer than the JSON lines and its sidecar names the same
    tokenizer (sha256 of the model file) and vocab size. Returns the sidecar's contents.
    """
    jsonl_path, out_path = Path(jsonl_path), Path(out_path)
    if not jsonl_path.is_file():
        raise FileNotFoundError(f"{jsonl_path} not found; make it with: python tools/fetch_corpus.py "
                                f"shakespeare --output {jsonl_path}")
    wanted = {"tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
              "eod": tokenizer.eod, "source": str(jsonl_path.resolve()), "json_key": json_key}
    old = _read_meta(out_path)
    if (out_path.is_file() and out_path.stat().st_mtime >= jsonl_path.stat().st_mtime
            and old is not None and all(old.get(k) == v for k, v in wanted.items())):
        logger.info("%s is up to date (%d tokens)", out_path, old.get("num_tokens", -1))
        return old

    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    chunks: list[np.ndarray] = []  # one [doc_tokens + 1] array per document
    with open(jsonl_path, "rb") as f:
        num_lines = sum(1 for _ in f)
    texts = iter_jsonl_texts(jsonl_path, json_key)
    with tqdm(total=num_lines, unit="doc", disable=None, desc=f"tokenizing {jsonl_path.name}") as bar:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            for ids in tokenizer.encode_batch(batch):
                chunks.append(np.asarray(ids + [tokenizer.eod], dtype=dtype))
            bar.update(len(batch))
    num_documents = len(chunks)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)  # [num_tokens]

    meta_path(out_path).unlink(missing_ok=True)  # a stale sidecar must never vouch for new tokens
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    meta = {**wanted, "num_documents": num_documents, "num_tokens": int(tokens.size),
            "dtype": np.dtype(dtype).name}
    with atomic_path(meta_path(out_path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %s: %d documents, %d tokens", out_path, num_documents, tokens.size)
    return meta


def _read_meta(token_path: Path) -> dict | None:
    try:
        return json.loads(meta_path(token_path).read_text())
    except (OSError, ValueError):
        return None


def parse_split(split: str) -> list[float]:
    """Megatron's --split: "969,30,1" (or "969/30/1") -> normalised [train, valid, test] fractions."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} must be up to three non-negative weights with a positive "
                         f"sum, like '969,30,1'")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_ranges(fractions: list[float], num_samples: int) -> dict[str, tuple[int, int]]:
    """Contiguous [start, stop) sample ranges per split, rounded the way Megatron rounds them."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_samples)))
    excess = bounds[-1] - num_samples
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLIT_NAMES)}


class TokenSamples:
    """Samples of `seq_length + 1` tokens cut from a flat token file.

    Sample j is tokens[j*seq_length : j*seq_length + seq_length + 1] (consecutive samples overlap
    by the one token that is both the last label of one and the first input of the next). Train
    indices visit a seeded permutation of the train range, a fresh one each epoch (epoch e uses
    seed + e); valid and test indices run in order. Indices past a split's size wrap around.
    """

    def __init__(self, token_path: str | Path, seq_length: int, split: str = "969,30,1",
                 seed: int = 1234) -> None:
        self.token_path = Path(token_path)
        if not self.token_path.is_file():
            raise FileNotFoundError(f"token file {self.token_path} not found; make it with: "
                                    f"{prepare_command(self.token_path)}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.tokens = np.load(self.token_path, mmap_mode="r")  # [num_tokens]
        if self.tokens.ndim != 1 or self.tokens.dtype.kind not in "iu":
            raise ValueError(f"token file {self.token_path} holds a {self.tokens.dtype} array of shape "
                             f"{self.tokens.shape}, not a flat integer one; remake it with: "
                             f"{prepare_command(self.token_path)}")
        self.meta = _read_meta(self.token_path) or {}
        self.seq_length, self.split, self.seed = seq_length, split, seed
        self.fractions = parse_split(split)
        self.total_samples = max(0, (self.tokens.size - 1) // seq_length)
        if self.total_samples == 0:
            raise ValueError(f"token file {self.token_path} has {self.tokens.size} tokens; "
                             f"--seq-length {seq_length} needs at least {seq_length + 1}")
        self.ranges = split_ranges(self.fractions, self.total_samples)
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> [num_train] sample order

    def num_samples(self, split: str) -> int:
        start, stop = self._range(split)
        return stop - start

    def get(self, split: str, global_index: int) -> np.ndarray:
        """Sample `global_index` of `split` (wrapping into later epochs): int64 [seq_length + 1]."""
        start, _ = self._range(split)
        n = self._nonempty(split)
        epoch, local = divmod(int(global_index), n)
        if split == "train":
            local = int(self._permutation(epoch)[local])
        first = (start + local) * self.seq_length
        return np.asarray(self.tokens[first : first + self.seq_length + 1], dtype=np.int64)

    def check_vocab(self, vocab_size: int) -> None:
        """Fail if the file holds ids the model's embedding (`vocab_size` rows) cannot look up."""
        max_id = int(self.tokens.max()) if self.tokens.size else -1
        if max_id >= vocab_size:
            use = self.meta.get("vocab_size", max_id + 1)
            raise ValueError(f"token file {self.token_path} holds token id {max_id} but --vocab-size is "
                             f"{vocab_size}: the tokenizer's vocab does not match --vocab-size; "
                             f"use --vocab-size {use}")

    def _range(self, split: str) -> tuple[int, int]:
        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
        return self.ranges[split]

    def _nonempty(self, split: str) -> int:
        n = self.num_samples(split)
        if n == 0:
            fraction = self.fractions[SPLIT_NAMES.index(split)]
            need = (f"about {math.ceil(1 / fraction) * self.seq_length + 1} tokens" if fraction > 0
                    else "a non-zero weight for it in --split")
            raise ValueError(f"split {split!r} has 0 samples: token file {self.token_path} has "
                             f"{self.tokens.size} tokens ({self.total_samples} samples of "
                             f"--seq-length {self.seq_length} + 1) and --split {self.split!r} "
                             f"gives {split} {fraction:.4f} of them; one {split} sample needs {need}")
        return n

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            n = self.num_samples("train")
            self._permutations[epoch] = np.random.RandomState(self.seed + epoch).permutation(n)
        return self._permutations[epoch]


def micro_batch(samples: TokenSamples, split: str, consumed_samples: int, micro_batch_size: int,
                dp_rank: int, dp_size: int, micro_step: int) -> dict[str, torch.Tensor]:
    """This rank's micro-batch `micro_step` of the global batch starting at `consumed_samples`.

    Global indices: consumed_samples + micro_step*micro_batch_size*dp_size
    + dp_rank*micro_batch_size + arange(micro_batch_size). Returns tokens and labels (int64 [b, s],
    labels = tokens shifted left by one) and loss_mask (float32 [b, s], all ones).
    """
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0 \
            or micro_step < 0:
        raise ValueError(f"bad micro-batch position: micro_batch_size={micro_batch_size}, "
                         f"dp_rank={dp_rank}, dp_size={dp_size}, consumed_samples={consumed_samples}, "
                         f"micro_step={micro_step}")
    first = consumed_samples + micro_step * micro_batch_size * dp_size + dp_rank * micro_batch_size
    rows = np.stack([samples.get(split, first + i) for i in range(micro_batch_size)])  # [b, s + 1]
    tokens_BS = torch.from_numpy(rows[:, :-1].copy())
    labels_BS = torch.from_numpy(rows[:, 1:].copy())
    return {"tokens": tokens_BS, "labels": labels_BS,
            "loss_mask": torch.ones(tokens_BS.shape, dtype=torch.float32)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenize a JSON-lines corpus into a flat .npy token file.")
    parser.add_argument("--input", required=True, help="JSON-lines file, e.g. data/shakespeare.jsonl")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece model, e.g. data/spm.model")
    parser.add_argument("--output", required=True, help="token file to write, e.g. data/shakespeare.npy")
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare_token_file(args.input, Tokenizer(args.tokenizer), args.output, args.json_key)
    except (FileNotFoundError, ValueError) as e:
        logger.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
