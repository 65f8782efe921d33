"""Training samples from megatron-core's GPTDataset/BlendedDataset: the pretraining-sampler layout
(same global batches for any data-parallel size, exact resume), blends in their proportions and
deterministic, and the trainer-facing adapter's checks of data, tokenizer and --vocab-size."""

from __future__ import annotations

import logging
import shutil
import types

import numpy as np
import pytest
import torch

from samoe_dist.arguments import parse_args
from samoe_dist.config import ConfigError
from samoe_dist.data.errors import DataError
from samoe_dist.data.gpt_data import DataSizes, GPTData, dataset_ids, split_document_ranges
from samoe_dist.data.indexed import inspect_prefix, meta_path, preprocess
from samoe_dist.data.testing import synthetic_documents, write_jsonl
from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer
from samoe_dist.data.tokenizers import TokenizerSpec, megatron_tokenizer, tokenizer_identity
from samoe_dist.data_adapter import build_training_data

A_WORDS = ("the king queen lord crown sword heart").split()
B_WORDS = ("alpha beta gamma delta omega sigma theta").split()
SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, single_process_world) -> dict:
    """Two prefixes with disjoint words (A, B), one tokenizer for both, and a tiny prefix."""
    root = tmp_path_factory.mktemp("gpt")
    docs_a = synthetic_documents(400, seed=1, words=A_WORDS)
    docs_b = synthetic_documents(400, seed=2, words=B_WORDS)
    jsonl_a, jsonl_b = write_jsonl(root / "a.jsonl", docs_a), write_jsonl(root / "b.jsonl", docs_b)
    model = train_tokenizer([jsonl_a, jsonl_b], root / "spm", vocab_size=120, byte_fallback=False)
    spec = TokenizerSpec(tokenizer_model=str(model))
    tiny = write_jsonl(root / "tiny.jsonl", docs_a[:5])
    prefixes = {name: preprocess([path], root / name, spec, append_eod=True, progress=False).outputs[0]
                for name, path in (("a", jsonl_a), ("b", jsonl_b), ("tiny", tiny))}
    return {"root": root, "model": model, "tokenizer": Tokenizer(model), "jsonl": jsonl_a, **prefixes}


def make_data(corpus, names=("a",), weights=None, seed=1234, split="969,30,1", cache=None, eod_mask_loss=False,
              sizes=DataSizes(400, 64, 64)) -> GPTData:
    tok = corpus["tokenizer"]
    return GPTData([inspect_prefix(corpus[n]) for n in names], weights, megatron_tokenizer(tokenizer_identity(tok), tok),
                   SEQ, split, seed, sizes, str(cache or corpus["root"] / "cache"), eod_mask_loss=eod_mask_loss)


def rows(batch: dict) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch["tokens"].tolist()]


def test_same_global_batches_for_any_data_parallel_size(corpus):
    data = make_data(corpus)
    mbs, gbs = 2, 16
    for consumed in (0, 48):
        expected = [tuple(data.sample("train", consumed + i)["tokens"].tolist()) for i in range(gbs)]
        for dp in (1, 2, 4):
            steps = gbs // (mbs * dp)
            got = {(rank, step): rows(data.micro_batch("train", consumed, mbs, rank, dp, step))
                   for rank in range(dp) for step in range(steps)}
            # rank r, micro-step m holds global indices consumed + m*mbs*dp + r*mbs + [0, mbs)
            for (rank, step), r in got.items():
                first = step * mbs * dp + rank * mbs
                assert r == expected[first:first + mbs]
    assert len(set(expected)) == gbs  # distinct samples


def test_resume_continues_with_the_samples_an_uninterrupted_run_sees(corpus, tmp_path):
    mbs, gbs, dp, iters, stop = 2, 8, 2, 10, 4

    def run(data, start_iter, end_iter) -> list:
        seen = []
        for it in range(start_iter, end_iter):
            consumed = it * gbs  # what the checkpoint restores
            for rank in range(dp):
                for step in range(gbs // (mbs * dp)):
                    seen.append(rows(data.micro_batch("train", consumed, mbs, rank, dp, step)))
        return seen

    sizes = DataSizes(iters * gbs, 16, 16)
    uninterrupted = run(make_data(corpus, sizes=sizes, cache=tmp_path / "c1"), 0, iters)
    first = run(make_data(corpus, sizes=sizes, cache=tmp_path / "c2"), 0, stop)
    resumed = run(make_data(corpus, sizes=sizes, cache=tmp_path / "c2"), stop, iters)  # reloads the caches
    assert first + resumed == uninterrupted
    assert len({tuple(r) for batch in uninterrupted for r in batch}) == iters * gbs  # no sample twice


def test_samples_are_shuffled_packed_documents(corpus):
    data = make_data(corpus)
    tok = corpus["tokenizer"]
    sample = data.sample("train", 0)
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    batch = data.micro_batch("valid", 0, 4, 0, 1, 0)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert bool((batch["loss_mask"] == 1).all())  # nothing masked by default
    starts = [int(data.sample("train", i)["tokens"][0]) for i in range(50)]
    assert tok.eod in torch.cat([data.sample("train", i)["tokens"] for i in range(20)]).tolist()  # documents packed
    assert len(set(starts)) > 5
    masked = make_data(corpus, eod_mask_loss=True).micro_batch("train", 0, 8, 0, 1, 0)
    assert torch.equal(masked["loss_mask"] == 0, masked["tokens"] == tok.eod) and bool((masked["loss_mask"] == 0).any())


def test_blend_proportions_and_determinism(corpus, tmp_path):
    sizes = DataSizes(2000, 64, 64)
    data = make_data(corpus, ("a", "b"), [0.7, 0.3], sizes=sizes, cache=tmp_path / "c1")
    ids = dataset_ids(data, "train", 2000)
    assert abs((ids == 0).mean() - 0.7) < 0.01  # Megatron's blending is error-feedback, not random draws
    tok = corpus["tokenizer"]
    for i in range(0, 200, 7):  # each sample really comes from its prefix
        text = tok.decode(data.sample("train", i)["tokens"].tolist()).lower()
        words = set(text.replace(".", " ").replace(",", " ").replace("!", " ").replace("?", " ").split())
        assert words <= set(A_WORDS if ids[i] == 0 else B_WORDS), text
    again = make_data(corpus, ("a", "b"), [0.7, 0.3], sizes=sizes, cache=tmp_path / "c2")
    other = make_data(corpus, ("a", "b"), [0.7, 0.3], sizes=sizes, cache=tmp_path / "c3", seed=99)
    first = [data.sample("train", i)["tokens"] for i in range(100)]
    assert all(torch.equal(x, again.sample("train", i)["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, other.sample("train", i)["tokens"]) for i, x in enumerate(first))
    unweighted = make_data(corpus, ("a", "b"), None, sizes=sizes, cache=tmp_path / "c4")
    assert 0.4 < (dataset_ids(unweighted, "train", 2000) == 0).mean() < 0.6  # by size: the two are alike


def test_split_ranges_and_errors(corpus, caplog):
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("90,10,0", 5)[2] is None
    with pytest.raises(DataError, match=r"--split 100,0,0 gives the valid split weight 0 of .*a_text_document; "
                       r"the trainer evaluates on it: give valid a larger share"):
        make_data(corpus, split="100,0,0")
    with pytest.raises(DataError, match=r"--split 969,30,1 gives the valid split 0 of its 5 documents of "
                       r".*tiny_text_document"):
        make_data(corpus, ("tiny",))
    with caplog.at_level(logging.INFO):
        data = make_data(corpus, ("tiny",), split="60,40,0.1")  # test rounds to no document: left out
    assert data.datasets["test"] is None and "building no test split" in caplog.text
    with pytest.raises(DataError, match="the test split is empty"):
        data.micro_batch("test", 0, 1, 0, 1, 0)
    data = make_data(corpus)
    with pytest.raises(DataError, match=rf"sample {len(data)} of the train split does not exist \({len(data)} were built"):
        data.sample("train", len(data))


# --- the trainer's adapter -----------------------------------------------------------------------

GROUPS = types.SimpleNamespace(is_main=True, dp_size=1)


def config(*flags: str):
    cfg, _ = parse_args(["--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
                         "--train-iters", "5", "--lr-warmup-iters", "1", "--eval-iters", "2", *flags])
    return cfg


def test_adapter_prefixes_blends_and_jsonl(corpus, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    cfg = config("--data-path", "0.5", corpus["a"], "0.5", corpus["b"] + ".bin", "--data-cache-path", cache)
    data = build_training_data(cfg, GROUPS)  # no tokenizer flag: the .meta.json names it
    assert cfg.model.vocab_size == 120 and data.weights == [0.5, 0.5] and data.prefixes[1] == corpus["b"]
    assert data.micro_batch("train", 0, 2, 0, 1, 0)["tokens"].shape == (2, SEQ)

    cfg = config("--data-path", str(corpus["jsonl"]), "--tokenizer-model", str(corpus["model"]), "--data-cache-path", cache)
    first = build_training_data(cfg, GROUPS)
    prefix = first.prefixes[0]
    assert prefix.startswith(cache) and prefix.endswith("_text_document")
    mtime = meta_path(prefix).stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = build_training_data(config("--data-path", str(corpus["jsonl"]), "--tokenizer-model",
                                           str(corpus["model"]), "--data-cache-path", cache), GROUPS)
    assert "already preprocessed" in caplog.text and meta_path(prefix).stat().st_mtime_ns == mtime
    assert torch.equal(first.micro_batch("train", 4, 2, 0, 1, 0)["tokens"], again.micro_batch("train", 4, 2, 0, 1, 0)["tokens"])
    a = build_training_data(config("--data-path", corpus["a"], "--data-cache-path", cache), GROUPS)
    assert torch.equal(a.sample("train", 3)["tokens"], first.sample("train", 3)["tokens"])  # same documents, same samples


def test_adapter_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"--vocab-size 999 does not match the tokenizer '.*spm\.model' "
                       r"\(vocabulary 120\): use --vocab-size 120 or drop the flag"):
        build_training_data(config("--data-path", corpus["a"], "--tokenizer-model", str(corpus["model"]),
                                   "--vocab-size", "999"), GROUPS)
    with pytest.raises(ConfigError, match=r"--vocab-size 999 does not match the tokenizer 'recorded in "):
        build_training_data(config("--data-path", corpus["a"], "--vocab-size", "999"), GROUPS)
    other = train_tokenizer([corpus["jsonl"]], tmp_path / "other", vocab_size=100, byte_fallback=False)
    with pytest.raises(DataError, match=r"a_text_document was made by another tokenizer \(SentencePieceTokenizer, "
                       r"vocabulary 120\) than .*other\.model .*: pass the tokenizer the data was made with"):
        build_training_data(config("--data-path", corpus["a"], "--tokenizer-model", str(other)), GROUPS)
    with pytest.raises(FileNotFoundError, match=r"--data-path '.*nope\.jsonl' does not exist: make it with "
                       r"`python tools/fetch_corpus\.py"):
        build_training_data(config("--data-path", str(tmp_path / "nope.jsonl")), GROUPS)
    with pytest.raises(ConfigError, match=r"is a text corpus: pass --tokenizer-model"):
        build_training_data(config("--data-path", str(corpus["jsonl"])), GROUPS)
    with pytest.raises(FileNotFoundError, match=r"no dataset .*/a\.bin/\.idx; did you mean .*a_text_document"):
        build_training_data(config("--data-path", str(corpus["root"] / "a")), GROUPS)

    bare = str(tmp_path / "bare_text_document")  # Megatron data without our .meta.json
    for ext in (".bin", ".idx"):
        shutil.copy(corpus["a"] + ext, bare + ext)
    with pytest.raises(ConfigError, match=r"--vocab-size is needed: .*bare_text_document has no \.meta\.json"):
        build_training_data(config("--data-path", bare), GROUPS)
    top = int(np.memmap(bare + ".bin", dtype=np.uint16).max())
    with pytest.raises(DataError, match=rf"bare_text_document holds token id {top} but the model's vocabulary is "
                       rf"{top}: the data was made by another tokenizer"):
        build_training_data(config("--data-path", bare, "--vocab-size", str(top)), GROUPS)
    cfg = config("--data-path", bare, "--vocab-size", "120")
    assert build_training_data(cfg, GROUPS).micro_batch("train", 0, 1, 0, 1, 0)["tokens"].max() < 120
    with pytest.raises(ConfigError, match="--eod-mask-loss needs to know the EOD id"):
        build_training_data(config("--data-path", bare, "--vocab-size", "120", "--eod-mask-loss"), GROUPS)
