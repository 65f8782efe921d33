"""Training samples: megatron-core's GPTDataset splits (one prefix or a weighted blend), read in
Megatron's pretraining-sampler layout.

``BlendedMegatronDatasetBuilder`` cuts each prefix's documents into contiguous train / valid / test
ranges by ``--split``, builds a GPTDataset per range (documents shuffled and packed into samples of
``seq_length + 1`` tokens, seeded by ``--seed``) and, for a blend, a BlendedDataset that draws from
the prefixes in the given proportions. Their index caches go to ``cache_dir``; rank 0 builds them
and the other ranks load them after a barrier (the builder does this itself).

Sample layout: micro-step m of the global batch that starts at ``consumed_samples`` takes global
indices ``consumed + m*mbs*dp + dp_rank*mbs + arange(mbs)`` (Megatron's
``MegatronPretrainingSampler``). So every global batch is the same set of samples for any number
of data-parallel ranks, and a run resumed at ``consumed_samples`` reads exactly what an
uninterrupted run would have read next.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from samoe_dist.data.errors import DataError
from samoe_dist.data.indexed import IndexInfo

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class DataSizes:
    """Samples to build per split (Megatron's ``train_valid_test_num_samples``)."""

    train: int
    valid: int
    test: int


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """[start, stop) documents of each split, rounded exactly as megatron-core's builder does."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * num_documents)), int(round(m[1] * num_documents)))
            for m in matrix]


class GPTData:
    """The train / valid / test datasets of one run; ``micro_batch`` is what the trainer calls.

    Build it on every rank (the builder synchronises them). A blend needs torch.distributed to be
    initialised, even with one process: megatron-core's BlendedDataset asks for the rank.
    """

    def __init__(self, infos: Sequence[IndexInfo], weights: Sequence[float] | None, tokenizer,
                 seq_length: int, split: str, seed: int, sizes: DataSizes, cache_dir: str,
                 eod_mask_loss: bool = False) -> None:
        """`infos`: the checked prefixes; `weights`: the blend (None: proportional to tokens);
        `tokenizer`: a megatron-core tokenizer (``tokenizers.megatron_tokenizer``)."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        prefixes = [info.prefix for info in infos]
        if len(infos) > 1 and weights is None:
            weights = [float(info.tokens) for info in infos]  # Megatron's unweighted blend, by size
        if len(infos) == 1:
            weights = None
        self.prefixes, self.weights, self.seq_length = prefixes, weights, seq_length
        drop_test = self._check_splits(infos, split, sizes)
        _writable(cache_dir)
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
            path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False,
            mid_level_dataset_surplus=0.005)
        if drop_test:  # too few documents to give test any: build without it rather than hang
            config.split_matrix[2] = None
        sizes_list = [sizes.train, sizes.valid, 0 if drop_test else sizes.test]
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes_list, lambda: True, config).build()
        self.datasets = dict(zip(SPLITS, built))
        logger.info("data: %s | samples of %d tokens: %s | index caches in %s", self.describe(), seq_length,
                    ", ".join(f"{s} {len(d) if d is not None else 0}" for s, d in self.datasets.items()),
                    cache_dir)

    def describe(self) -> str:
        if self.weights is None:
            return self.prefixes[0]
        total = sum(self.weights)
        return " + ".join(f"{w / total:.3f} x {p}" for w, p in zip(self.weights, self.prefixes))

    @staticmethod
    def _check_splits(infos: Sequence[IndexInfo], split: str, sizes: DataSizes) -> bool:
        """Raise if a prefix gives train or valid no document; True when test must be left out
        because some prefix gives it none (megatron-core would loop forever on an empty split)."""
        drop_test = False
        for info in infos:
            ranges = split_document_ranges(split, info.documents)
            for name, rng, size in zip(SPLITS, ranges, (sizes.train, sizes.valid, sizes.test)):
                empty = rng is None or rng[1] <= rng[0]
                if not empty or size == 0:
                    continue
                if name == "test":
                    drop_test = True
                    logger.info("--split %s gives the test split no document of %s (%d documents); "
                                   "building no test split", split, info.prefix, info.documents)
                    continue
                why = "weight 0" if rng is None else f"0 of its {info.documents} documents"
                raise DataError(f"--split {split} gives the {name} split {why} of {info.prefix}; the trainer "
                                f"{'trains' if name == 'train' else 'evaluates'} on it: give {name} a larger "
                                f"share (e.g. --split 90,10,0) or use more documents")
        return drop_test

    def __len__(self) -> int:
        return len(self.datasets["train"])

    def sample(self, split: str, index: int) -> dict:
        """One sample of `split`: tokens, labels (int64 [s]) and loss_mask (float32 [s])."""
        dataset = self.datasets.get(split)
        if split not in self.datasets:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if dataset is None:
            raise DataError(f"the {split} split is empty: --split gives it no documents")
        if not 0 <= index < len(dataset):
            raise DataError(f"sample {index} of the {split} split does not exist ({len(dataset)} were built "
                            f"for this run's --train-iters, --global-batch-size and --eval-iters)")
        return dataset[int(index)]

    def micro_batch(self, split: str, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int, micro_step: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro_step` of the global batch starting at `consumed_samples`:
        tokens, labels (int64 [b, s]) and loss_mask (float32 [b, s]) as GPTDataset makes them."""
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0 \
                or micro_step < 0:
            raise ValueError(f"bad micro-batch position: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}, consumed_samples={consumed_samples}, "
                             f"micro_step={micro_step}")
        first = consumed_samples + micro_step * micro_batch_size * dp_size + dp_rank * micro_batch_size
        samples = [self.sample(split, first + i) for i in range(micro_batch_size)]
        return {"tokens": torch.stack([s["tokens"] for s in samples]),
                "labels": torch.stack([s["labels"] for s in samples]),
                "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float()}


def _writable(cache_dir: str) -> None:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the index-cache folder {cache_dir} ({e.strerror}): pass "
                        f"--data-cache-path DIR with a folder you can write") from None
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"cannot write index caches to {cache_dir}: pass --data-cache-path DIR with a "
                        f"folder you can write")


def dataset_ids(data: GPTData, split: str, count: int) -> np.ndarray:
    """Which prefix (blend position) each of the first `count` samples of `split` comes from."""
    dataset = data.datasets[split]
    if not hasattr(dataset, "dataset_index"):
        return np.zeros(count, dtype=np.int64)
    return np.asarray(dataset.dataset_index[:count], dtype=np.int64)
