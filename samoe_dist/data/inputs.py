"""Documents from the user's text files: JSON lines, plain text, and gzip of either.

One reader serves the tokenizer trainer and the preprocessor, so both accept the same inputs and
fail the same way. The format follows the name: ``.jsonl``/``.json``/``.ndjson`` (optionally
``.gz``) is one JSON object a line with the text under ``--json-keys``; anything else is plain text,
cut into documents per file, per blank-line-separated block, or per line.

Bad lines (invalid JSON, a missing or non-string key, bytes that are not UTF-8) are skipped and
counted, with a warning naming the first few, as long as they are at most ``max_bad_fraction`` of a
file's lines; beyond that the file is rejected with one message naming the file, the first bad
line, what is wrong with it and what to do. Nothing bad is ever tokenized silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from samoe_dist.data.errors import DataError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_BOUNDARIES = ("file", "blank-line", "line")
WARN_FIRST = 5  # bad lines named one by one per file; the rest are only counted
EARLY_ABORT_LINES = 1000  # a file whose first 1000 lines are all bad is rejected at once


@dataclasses.dataclass
class ReadStats:
    """Counts over everything read so far (the tools' progress bars and summaries)."""

    files: int = 0
    lines: int = 0
    """Non-blank lines (JSON lines) or lines (text) read."""
    documents: int = 0
    text_bytes: int = 0
    """UTF-8 bytes of the documents' text, all keys."""
    input_bytes: int = 0
    """Bytes read from disk (compressed bytes for .gz)."""
    bad_lines: int = 0


def input_kind(path: str | Path) -> str:
    """'jsonl' or 'text', from the file name (a .gz suffix is looked through)."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


class _CountingFile(io.RawIOBase):
    """A raw file that adds the bytes it reads to ``stats.input_bytes``."""

    def __init__(self, raw, stats: ReadStats) -> None:
        self._raw, self._stats = raw, stats

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        self._stats.input_bytes += n or 0
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _BadLines:
    """Bad lines of one file: warn about the first few, reject the file beyond the allowed share."""

    def __init__(self, path: Path, max_bad_fraction: float, stats: ReadStats) -> None:
        self.path, self.max_bad_fraction, self.stats = path, max_bad_fraction, stats
        self.count = 0
        self.first: tuple[int, str, str] | None = None  # (line, what is wrong, what to do)

    def add(self, line_no: int, reason: str, fix: str, lines_so_far: int) -> None:
        self.count += 1
        self.stats.bad_lines += 1
        if self.first is None:
            self.first = (line_no, reason, fix)
        if self.count <= WARN_FIRST:
            logger.warning("skipping %s:%d: %s", self.path, line_no, reason)
        if self.count == lines_so_far == EARLY_ABORT_LINES:
            self.check(lines_so_far)

    def check(self, lines: int) -> None:
        """At the end of the file (or early): raise unless the bad lines are few enough to skip."""
        if self.count == 0:
            return
        if self.count > self.max_bad_fraction * lines:
            line_no, reason, fix = self.first
            raise DataError(f"{self.path}:{line_no}: {reason}; {fix} ({self.count} of {lines} lines are "
                            f"bad, more than the {self.max_bad_fraction:g} share (--max-bad-fraction) "
                            f"that is skipped with a warning)")
        logger.warning("skipped %d bad line(s) of %d in %s (first at line %d: %s)",
                       self.count, lines, self.path, self.first[0], self.first[1])


def _open_lines(path: Path, stats: ReadStats) -> io.BufferedIOBase:
    if not path.is_file():
        raise FileNotFoundError(f"input {path} not found" + (" (it is a directory: give the files in it)"
                                                            if path.is_dir() else ""))
    raw = io.BufferedReader(_CountingFile(open(path, "rb", buffering=0), stats), buffer_size=1 << 20)
    if str(path).lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _decode(raw: bytes, line_no: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                       "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None
    return text[1:] if line_no == 1 and text.startswith("\ufeff") else text  # a byte-order mark


class _BadLine(Exception):
    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _json_record(line: str, json_keys: Sequence[str]) -> tuple[str, ...]:
    try:
        record = json.loads(line)
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        col = getattr(e, "colno", None)
        raise _BadLine(f"is not valid JSON ({msg}{f' at column {col}' if col else ''})",
                       "fix or delete the line") from None
    if not isinstance(record, dict):
        raise _BadLine(f"is a JSON {type(record).__name__}, not an object",
                       "each line must be one JSON object like {\"text\": \"...\"}")
    texts = []
    for key in json_keys:
        if key not in record:
            raise _BadLine(f"has no {key!r} field (fields: {sorted(record)})",
                           "name the text field with --json-keys")
        if not isinstance(record[key], str):
            raise _BadLine(f"field {key!r} is a {type(record[key]).__name__}, not a string",
                           "name the text field with --json-keys")
        texts.append(record[key])
    return tuple(texts)


def _jsonl_documents(path: Path, json_keys: Sequence[str], bad: _BadLines,
                     stats: ReadStats) -> Iterator[tuple[str, ...]]:
    lines = 0
    with _open_lines(path, stats) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            lines += 1
            stats.lines += 1
            try:
                texts = _json_record(_decode(raw, line_no), json_keys)
            except _BadLine as e:
                bad.add(line_no, e.reason, e.fix, lines)
                continue
            yield texts
    bad.check(lines)


def _text_documents(path: Path, boundary: str, bad: _BadLines, stats: ReadStats) -> Iterator[tuple[str, ...]]:
    lines = 0
    block: list[str] = []
    with _open_lines(path, stats) as f:
        for line_no, raw in enumerate(f, 1):
            lines += 1
            stats.lines += 1
            try:
                line = _decode(raw, line_no)
            except _BadLine as e:
                bad.add(line_no, e.reason, e.fix, lines)
                continue
            if boundary == "line":
                if line.strip():
                    yield (line.rstrip("\r\n"),)
            elif boundary == "blank-line" and not line.strip():
                if block:
                    yield ("".join(block).rstrip("\r\n"),)
                    block = []
            else:
                block.append(line)
    if block:
        yield ("".join(block) if boundary == "file" else "".join(block).rstrip("\r\n"),)
    bad.check(lines)


def iter_documents(paths: Sequence[str | Path], json_keys: Sequence[str] = ("text",),
                   text_boundary: str = "file", max_bad_fraction: float = 0.01,
                   stats: ReadStats | None = None) -> Iterator[tuple[str, ...]]:
    """Every document of `paths`, in order: one string per JSON key (one string for text files).

    Raises DataError for an empty file, a gzip file that cannot be read, or more bad lines than
    `max_bad_fraction` of a file; FileNotFoundError for a missing input.
    """
    if text_boundary not in TEXT_BOUNDARIES:
        raise DataError(f"--text-boundary must be one of {', '.join(TEXT_BOUNDARIES)}, got {text_boundary!r}")
    if not json_keys:
        raise DataError("--json-keys needs at least one key")
    stats = stats if stats is not None else ReadStats()
    for path in map(Path, paths):
        bad = _BadLines(path, max_bad_fraction, stats)
        before = stats.documents
        if input_kind(path) == "jsonl":
            documents = _jsonl_documents(path, json_keys, bad, stats)
        else:
            documents = _text_documents(path, text_boundary, bad, stats)
        try:
            for texts in documents:
                stats.documents += 1
                stats.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
                yield texts
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path} is not a readable gzip file ({e}): re-download or re-compress it") from None
        stats.files += 1
        if stats.documents == before:
            what = "is empty" if path.stat().st_size == 0 else "has no documents"
            raise DataError(f"{path} {what}: give it text, or leave it out of --input")
