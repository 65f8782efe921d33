"""The preprocessor: text -> Megatron .bin/.idx -> text again, for every input kind and tokenizer,
byte-identical for any number of workers; and one clear message for each kind of bad input."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest

from samoe_dist.data.errors import DataError
from samoe_dist.data.indexed import inspect_prefix, max_token_id, preprocess, read_meta
from samoe_dist.data.testing import load_tool, synthetic_documents, write_gpt2_files, write_jsonl
from samoe_dist.data.tokenizer import train_tokenizer
from samoe_dist.data.tokenizers import TokenizerSpec

UNICODE_DOCS = ["Café ☃ naïve — “quoted”\n\tindented", "日本語のテキスト", "emoji 🤖 and   spaces  "]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prep")
    docs = synthetic_documents(200, seed=3)
    model = train_tokenizer([write_jsonl(root / "train.jsonl", docs)], root / "spm", vocab_size=150,
                            byte_fallback=False)
    vocab, merges = write_gpt2_files(root / "gpt2", [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")])
    return {"root": root, "docs": docs, "spm": TokenizerSpec(tokenizer_model=str(model)),
            "gpt2": TokenizerSpec("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))}


def read_back(prefix: str, spec: TokenizerSpec, eod: bool = True) -> list[str]:
    """Every document of an indexed dataset, detokenized (read by megatron-core's reader)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = spec.load()
    dataset = IndexedDataset(prefix)
    docs = []
    for i in range(len(dataset)):
        ids = dataset[i]
        assert (ids[-1] == tokenizer.eod) == eod and tokenizer.eod not in ids[:-1]
        docs.append(tokenizer.decode(ids[:-1] if eod else ids))
    return docs


def write_inputs(root, docs: list[str]) -> dict:
    """The same documents as jsonl, jsonl.gz, blank-line text and gzipped text."""
    text = "\n\n".join(docs) + "\n"
    (root / "docs.txt").write_text(text)
    (root / "docs.txt.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return {"jsonl": write_jsonl(root / "docs.jsonl", docs), "jsonl.gz": write_jsonl(root / "docs.jsonl.gz", docs, gz=True),
            "txt": root / "docs.txt", "txt.gz": root / "docs.txt.gz"}


@pytest.mark.parametrize("tokenizer", ["spm", "gpt2"])
def test_round_trip_every_input_kind_and_worker_count(setup, tmp_path, tokenizer):
    spec = setup[tokenizer]
    docs = setup["docs"][:80] + (UNICODE_DOCS if tokenizer == "gpt2" else [])  # SentencePiece: no byte fallback here
    inputs = write_inputs(tmp_path, docs)
    files = {}
    for kind, path in inputs.items():
        for workers in (1, 2):
            out = tmp_path / f"{kind}-w{workers}"
            stats = preprocess([path], out, spec, append_eod=True, workers=workers, text_boundary="blank-line",
                               progress=False)
            prefix = stats.outputs[0]
            assert prefix == f"{out}_text_document" and stats.documents == len(docs)
            assert read_back(prefix, spec) == docs
            files[kind, workers] = (open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read())
            assert stats.tokens == len(files[kind, workers][0]) // 2  # uint16 ids
    assert len(set(files.values())) == 1  # every kind and worker count wrote the same bytes
    meta = read_meta(f"{tmp_path}/jsonl-w1_text_document")
    assert meta["tokenizer_type"] == spec.kind and meta["documents"] == len(docs) and meta["append_eod"] is True


def test_text_boundaries_keys_and_summary(setup, tmp_path, capsys):
    spec = setup["spm"]
    (tmp_path / "a.txt").write_text("the king\nthe queen\n\nmy lord\n")
    stats = preprocess([tmp_path / "a.txt"], tmp_path / "line", spec, text_boundary="line", progress=False)
    assert read_back(stats.outputs[0], spec, eod=False) == ["the king", "the queen", "my lord"]
    stats = preprocess([tmp_path / "a.txt"], tmp_path / "file", spec, text_boundary="file", progress=False)
    assert read_back(stats.outputs[0], spec, eod=False) == ["the king\nthe queen\n\nmy lord\n"]

    two_keys = tmp_path / "two.jsonl"
    two_keys.write_text('{"title": "the king", "text": "my lord"}\n{"title": "", "text": "the queen"}\n')
    argv = ["--input", str(two_keys), "--json-keys", "title", "text", "--output-prefix", str(tmp_path / "k"),
            "--tokenizer-model", setup["spm"].tokenizer_model, "--append-eod", "--workers", "2", "--no-progress"]
    assert load_tool("preprocess_data").main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/k_title_document, {tmp_path}/k_text_document: 2 documents" in out
    assert "documents/s" in out and "MB/s" in out and "skipped 1 empty documents" in out
    assert read_back(f"{tmp_path}/k_title_document", spec) == ["the king"]  # the empty title is left out
    assert read_back(f"{tmp_path}/k_text_document", spec) == ["my lord", "the queen"]
    assert load_tool("preprocess_data").main(argv) == 2  # outputs exist: refused without --overwrite
    assert "k_title_document.bin exists; pass --overwrite" in capsys.readouterr().err


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    ([b""], r"empty\.jsonl is empty: give it text, or leave it out of --input"),
    ([b'{"text": "the king"}', b'{"text": "the queen",}', b'{"text": "my lord"}'],
     r"bad\.jsonl:2: is not valid JSON \(Expecting property name enclosed in double quotes at column 22\); "
     r"fix or delete the line \(1 of 3 lines are bad, more than the 0\.01 share \(--max-bad-fraction\)"),
    ([b'{"text": "the king"}', b'{"body": "the queen"}'],
     r"bad\.jsonl:2: has no 'text' field \(fields: \['body'\]\); name the text field with --json-keys"),
    ([b'{"text": "the king"}', b'{"text": 7}'], r"bad\.jsonl:2: field 'text' is a int, not a string"),
    ([b'["the king"]'], r"bad\.jsonl:1: is a JSON list, not an object"),
    ([b'{"text": "the king"}', b'{"text": "caf\xe9"}'],
     r"bad\.jsonl:2: is not UTF-8 \(byte 0xe9 at column 14\); convert the file to UTF-8, e\.g\. iconv"),
    ([b'{"text": " "}', b'{"text": ""}'], r"every 'text' text in .*bad\.jsonl is empty"),
], ids=["empty-file", "invalid-json", "missing-key", "not-a-string", "not-an-object", "not-utf8", "all-empty"])
def test_bad_input_gets_one_message(setup, tmp_path, lines, message):
    path = tmp_path / ("empty.jsonl" if lines == [b""] else "bad.jsonl")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=message):
        preprocess([path], tmp_path / "out", setup["spm"], progress=False)
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_a_few_bad_lines_in_a_large_file_are_skipped_with_a_warning(setup, tmp_path, caplog):
    good = [f'{{"text": "the king {i}"}}'.encode() for i in range(300)]
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(good[:100] + [b'{"text": broken'] + good[100:] + [b'{"txt": "x"}']))
    with caplog.at_level(logging.WARNING):
        stats = preprocess([path], tmp_path / "out", setup["spm"], progress=False)
    assert stats.documents == 300 and stats.bad_lines == 2
    assert "skipping " + str(path) + ":101: is not valid JSON" in caplog.text
    assert f"skipped 2 bad line(s) of 302 in {path}" in caplog.text
    assert inspect_prefix(stats.outputs[0]).documents == 300


def test_other_input_errors(setup, tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "the king"}\n' * 50)[:40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz is not a readable gzip file .*re-download or re-compress"):
        preprocess([tmp_path / "cut.jsonl.gz"], tmp_path / "out", setup["spm"], progress=False)
    with pytest.raises(FileNotFoundError, match=r"input .*missing\.jsonl not found"):
        preprocess([tmp_path / "missing.jsonl"], tmp_path / "out", setup["spm"], progress=False)
    with pytest.raises(DataError, match="no tokenizer given"):
        preprocess([tmp_path / "cut.jsonl.gz"], tmp_path / "out", TokenizerSpec(), progress=False)


# --- checking a prefix ---------------------------------------------------------------------------


@pytest.fixture
def dataset(setup, tmp_path) -> str:
    path = write_jsonl(tmp_path / "d.jsonl", setup["docs"][:20])
    return preprocess([path], tmp_path / "d", setup["spm"], append_eod=True, progress=False).outputs[0]


def test_inspect_prefix_reads_counts(dataset):
    info = inspect_prefix(dataset)
    assert info.documents == info.sequences == 20 and info.dtype == np.uint16
    assert info.tokens == info.meta["tokens"] and 0 < max_token_id(info) < 150


def test_prefix_errors(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset .*/d\.bin/\.idx; did you mean .*/d_text_document"):
        inspect_prefix(str(tmp_path / "d"))
    idx, binary = dataset + ".idx", dataset + ".bin"
    data = open(binary, "rb").read()
    open(binary, "wb").write(data[:-6])
    with pytest.raises(DataError, match=rf"{binary} is truncated: {len(data) - 6} bytes, but {idx} expects "
                       rf"{len(data)} \(\d+ tokens of uint16\); make it again with: python tools/preprocess_data\.py"):
        inspect_prefix(dataset)
    open(binary, "wb").write(data + b"\0\0")
    with pytest.raises(DataError, match="from different runs"):
        inspect_prefix(dataset)
    open(binary, "wb").write(data)
    index = open(idx, "rb").read()
    open(idx, "wb").write(index[:50])
    with pytest.raises(DataError, match=rf"{idx} is truncated"):
        inspect_prefix(dataset)
    open(idx, "wb").write(b"garbage" * 10)
    with pytest.raises(DataError, match=rf"{idx} is not a Megatron index file"):
        inspect_prefix(dataset)
    (tmp_path / "d_text_document.idx").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{idx} is missing \(its {binary} is there\)"):
        inspect_prefix(dataset)
