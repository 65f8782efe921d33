"""The trainer's view of the data: ``micro_batch(split, consumed, mbs, dp_rank, dp_size, step)``.

This is the interface the Megatron indexed-dataset pipeline replaces; today it is backed by the
minimal token loader of ``samoe_dist.data`` (a jsonl corpus tokenized once with SentencePiece
into a flat token file).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch.distributed as dist

from samoe_dist.config import ConfigError, RunConfig


class TrainingData(Protocol):
    def micro_batch(self, split: str, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int, micro_step: int) -> dict: ...


class TokenFileData:
    """Samples of one tokenized corpus, split train/valid/test."""

    def __init__(self, samples) -> None:
        self.samples = samples

    def micro_batch(self, split, consumed_samples, micro_batch_size, dp_rank, dp_size, micro_step):
        from samoe_dist.data.token_data import micro_batch

        return micro_batch(self.samples, split, consumed_samples, micro_batch_size, dp_rank, dp_size, micro_step)


def token_cache_path(data_path: str, cache_dir: str | None) -> str:
    stem = os.path.splitext(os.path.basename(data_path))[0]
    return os.path.join(cache_dir or os.path.dirname(os.path.abspath(data_path)), f"{stem}.tokens.npy")


def build_training_data(cfg: RunConfig, groups) -> TrainingData:
    """Tokenize the corpus once (rank 0; the others wait) and set/check --vocab-size."""
    from samoe_dist.data.token_data import TokenSamples, prepare_token_file
    from samoe_dist.data.tokenizer import Tokenizer

    d = cfg.data
    if not d.data_path:
        raise ConfigError("--data-path is required (a .jsonl corpus; tools/fetch_corpus.py makes one)")
    if len(d.data_path) != 1:
        raise ConfigError(f"--data-path takes one corpus for now, got {len(d.data_path)}: {d.data_path}")
    data_path = d.data_path[0]
    if data_path.endswith(".npy"):
        token_file = data_path
    else:
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"--data-path {data_path!r} does not exist: make it with "
                                    f"`python tools/fetch_corpus.py shakespeare --output {data_path}` or point to your jsonl")
        if not d.tokenizer_model:
            raise ConfigError("--tokenizer-model is required to tokenize a .jsonl --data-path "
                              "(tools/train_tokenizer.py makes one)")
        token_file = token_cache_path(data_path, d.data_cache_path)
        if groups.is_main:
            prepare_token_file(data_path, Tokenizer(d.tokenizer_model), token_file)
        if dist.is_initialized():
            dist.barrier()
    vocab = None
    if d.tokenizer_model:
        vocab = Tokenizer(d.tokenizer_model).vocab_size
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size != vocab:
            raise ConfigError(f"--vocab-size {cfg.model.vocab_size} does not match the tokenizer "
                              f"{d.tokenizer_model!r} (vocabulary {vocab}): use --vocab-size {vocab} or drop the flag")
    if cfg.model.vocab_size is None:
        raise ConfigError("--vocab-size is required when no --tokenizer-model is given")
    samples = TokenSamples(token_file, cfg.model.seq_length, d.split, cfg.training.seed)
    samples.check_vocab(cfg.model.vocab_size)
    return TokenFileData(samples)
