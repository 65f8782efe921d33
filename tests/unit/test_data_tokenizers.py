"""Tokenizers: SentencePiece training (BPE/unigram, special tokens, inputs of every kind), GPT-2
byte-level BPE from vocab.json/merges.txt, choosing one by Megatron's names, and their errors."""

from __future__ import annotations

import gzip

import pytest

from samoe_dist.data.errors import DataError
from samoe_dist.data.gpt2_bpe import GPT2BPETokenizer, pretokenizer
from samoe_dist.data.testing import load_tool, synthetic_documents, write_gpt2_files, write_jsonl
from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer
from samoe_dist.data.tokenizers import TokenizerSpec, megatron_tokenizer, tokenizer_identity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny corpus and a tokenizer trained on it (vocab 150, no byte fallback)."""
    root = tmp_path_factory.mktemp("tok")
    docs = synthetic_documents(300)
    jsonl = write_jsonl(root / "tiny.jsonl", docs)
    model = train_tokenizer([jsonl], root / "spm", vocab_size=150, byte_fallback=False)
    return {"root": root, "docs": docs, "jsonl": jsonl, "model": model, "tokenizer": Tokenizer(model)}


def test_sentencepiece_round_trip(tiny):
    tokenizer = tiny["tokenizer"]
    text = "Good night, sweet queen!\nWhat now?  Come hence,\n\nthe crown."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size == 150 and tokenizer.eod == 1 and tokenizer.eod not in ids
    assert len(ids) < len(text) / 2  # it learned merges, not only characters


def test_unigram_special_tokens_and_mixed_inputs(tiny, tmp_path):
    text_file = tmp_path / "plain.txt.gz"
    text_file.write_bytes(gzip.compress("\n\n".join(synthetic_documents(50, seed=1)).encode()))
    model = train_tokenizer([tiny["jsonl"], text_file], tmp_path / "uni", vocab_size=340, model_type="unigram",
                            special_tokens=["<|user|>", "<sep>"])
    tok = Tokenizer(model)
    assert tok.vocab_size == 340 and tok.eod == 1
    assert tok._sp.id_to_piece(2) == "<|user|>" and tok._sp.id_to_piece(3) == "<sep>"
    text = "<|user|>Good night<sep> thé ☃"  # unseen characters: byte fallback keeps them
    ids = tok.encode(text)
    assert 2 in ids and 3 in ids and tok.decode(ids) == text


def test_train_refuses_existing_model(tiny, capsys):
    before = tiny["model"].read_bytes()
    with pytest.raises(FileExistsError, match="spm.model exists; pass --overwrite"):
        train_tokenizer([tiny["jsonl"]], tiny["root"] / "spm", vocab_size=120, byte_fallback=False)
    argv = ["--input", str(tiny["jsonl"]), "--model-prefix", str(tiny["root"] / "spm"), "--vocab-size", "120"]
    assert load_tool("train_tokenizer").main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tiny["model"].read_bytes() == before


def test_train_tokenizer_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*nothing\.model not found; make it "
                       r"with: python tools/train_tokenizer.py .*--model-prefix .*nothing"):
        Tokenizer(tmp_path / "nothing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model is not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match=r"--vocab-size 200 is too small .* at least \d+ pieces .*byte-fallback"):
        train_tokenizer([tiny["jsonl"]], tmp_path / "small", vocab_size=200, byte_fallback=True)
    assert not (tmp_path / "small.model").exists()
    with pytest.raises(DataError, match=r"--special-tokens '</s>'"):
        train_tokenizer([tiny["jsonl"]], tmp_path / "s", vocab_size=150, special_tokens=["</s>"])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["one"], key="content")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: has no 'text' field \(fields: \['content'\]\); name the "
                       r"text field with --json-keys"):
        train_tokenizer([bad], tmp_path / "b", vocab_size=150)


# --- GPT-2 BPE -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> GPT2BPETokenizer:
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "k"), ("i", "n"), ("Ġk", "in"), ("Ġkin", "g")]
    vocab, merge_file = write_gpt2_files(tmp_path_factory.mktemp("gpt2"), merges)
    return GPT2BPETokenizer(vocab, merge_file)


def test_gpt2_bpe_merges_by_rank_and_round_trips(gpt2):
    ids = gpt2.encode(" the king")
    assert [gpt2.decoder[i] for i in ids] == ["Ġthe", "Ġking"]
    assert gpt2.eod == gpt2.vocab_size - 1 and gpt2.kind == "GPT2BPETokenizer"
    text = "It's the king's 12 crowns!\n\n  Café ☃ 日本  \t"
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_pretokenizer_matches_the_reference_pattern():
    # GPT-2's pattern: contractions, letters and numbers with one leading space, other symbols,
    # and runs of whitespace that leave their last character to the next piece.
    pieces = pretokenizer().findall("I'll see 42 kings²,  now!\n\nCafé")
    assert pieces == ["I", "'ll", " see", " 42", " kings", "²", ",", " ", " now", "!", "\n", "\n", "Café"]


def test_gpt2_file_errors(tmp_path):
    vocab, merges = write_gpt2_files(tmp_path, [("a", "b")])
    with pytest.raises(FileNotFoundError, match=r"--merge-file .*nope\.txt not found"):
        GPT2BPETokenizer(vocab, tmp_path / "nope.txt")
    (tmp_path / "bad_merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(DataError, match=r"bad_merges\.txt:2: 'a b c' is not a merge"):
        GPT2BPETokenizer(vocab, tmp_path / "bad_merges.txt")
    (tmp_path / "v.json").write_text('{"a": 0}')
    with pytest.raises(DataError, match=r"has no <\|endoftext\|> entry"):
        GPT2BPETokenizer(tmp_path / "v.json", merges)


# --- choosing one, and the megatron-core adapter -------------------------------------------------


def test_spec_picks_and_checks(tiny, gpt2):
    assert TokenizerSpec(tokenizer_model=str(tiny["model"])).kind == "SentencePieceTokenizer"
    assert TokenizerSpec("GPTSentencePieceTokenizer", str(tiny["model"])).kind == "SentencePieceTokenizer"
    assert TokenizerSpec(vocab_file="v", merge_file="m").kind == "GPT2BPETokenizer"
    assert TokenizerSpec().load() is None
    for spec, message in [
        (TokenizerSpec("HuggingFaceTokenizer"), "--tokenizer-type 'HuggingFaceTokenizer' is not supported"),
        (TokenizerSpec("GPT2BPETokenizer", vocab_file="v"), "needs --vocab-file .* and --merge-file"),
        (TokenizerSpec("SentencePieceTokenizer"), "needs --tokenizer-model"),
        (TokenizerSpec(tokenizer_model="m", vocab_file="v"), "belong to GPT2BPETokenizer"),
    ]:
        with pytest.raises(DataError, match=message):
            spec.check()


def test_megatron_adapter(tiny):
    tok = tiny["tokenizer"]
    adapter = megatron_tokenizer(tokenizer_identity(tok), tok)
    assert adapter.vocab_size == 150 and adapter.eod == 1
    assert adapter.detokenize(adapter.tokenize("the king")) == "the king"
    assert adapter.unique_identifiers["sha256"] == tok.sha256  # the index caches follow the tokenizer
    bare = megatron_tokenizer({"vocab_size": 99})
    assert bare.vocab_size == 99 and bare.eod == -1
    with pytest.raises(DataError, match="no tokenizer given"):
        bare.tokenize("x")
