"""GPT-2's byte-level BPE from its ``vocab.json`` (alias ``encoder.json``) and ``merges.txt``
(alias ``vocab.bpe``), in plain Python: no extra package.

The algorithm is OpenAI's: text is split by GPT-2's pre-tokenisation pattern, each piece's UTF-8
bytes are mapped to printable characters, and the BPE merges are applied by rank. The pattern needs
the Unicode classes ``\\p{L}`` and ``\\p{N}``, which Python's ``re`` lacks; they are built once from
``unicodedata`` (about half a second), so the ids are the reference implementation's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from samoe_dist.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# Unicode White_Space (what the `regex` package's \s matches; Python's \s also takes \x1c-\x1f).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _class_ranges(prefix: str) -> str:
    """A regex character class body holding every code point whose category starts with `prefix`."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


@functools.lru_cache(maxsize=None)
def pretokenizer() -> re.Pattern:
    """GPT-2's pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    letters, numbers, space = _class_ranges("L"), _class_ranges("N"), _WHITESPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"
                      rf"| ?[^{space}{letters}{numbers}]+|[{space}]+(?![^{space}])|[{space}]+")


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE: text <-> ids, with ``<|endoftext|>`` as the end-of-document id."""

    kind = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        self.vocab_file, self.merge_file = Path(vocab_file), Path(merge_file)
        for what, path in (("--vocab-file", self.vocab_file), ("--merge-file", self.merge_file)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} {path} not found: give GPT-2's vocab.json (encoder.json) "
                                        f"and merges.txt (vocab.bpe)")
        try:
            self.encoder: dict[str, int] = json.loads(self.vocab_file.read_text(encoding="utf-8"))
            if not isinstance(self.encoder, dict) or not all(isinstance(v, int) for v in self.encoder.values()):
                raise ValueError("not a JSON object of piece -> id")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"--vocab-file {self.vocab_file} is not a GPT-2 vocab.json ({e}); "
                            f"give GPT-2's vocab.json / encoder.json") from None
        self.bpe_ranks = self._read_merges()
        if EOD_TOKEN not in self.encoder:
            raise DataError(f"--vocab-file {self.vocab_file} has no {EOD_TOKEN} entry to use as the "
                            f"end-of-document id; give GPT-2's vocab.json")
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}
        self._sha256: str | None = None
        pretokenizer()  # build the pattern now (before worker processes fork)

    def _read_merges(self) -> dict[tuple[str, str], int]:
        try:
            lines = self.merge_file.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"--merge-file {self.merge_file} is not UTF-8 ({e}); give GPT-2's merges.txt") from None
        ranks: dict[tuple[str, str], int] = {}
        for line_no, line in enumerate(lines, 1):
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise DataError(f"{self.merge_file}:{line_no}: {line[:40]!r} is not a merge 'a b'; "
                                f"give GPT-2's merges.txt (vocab.bpe)")
            ranks[(parts[0], parts[1])] = len(ranks)
        return ranks

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self.encoder[EOD_TOKEN]

    @property
    def sha256(self) -> str:
        """Hash of both files: identifies the tokenizer that made a dataset."""
        if self._sha256 is None:
            h = hashlib.sha256(self.vocab_file.read_bytes())
            h.update(self.merge_file.read_bytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenised piece (its bytes already mapped to characters)."""
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        try:
            ids = [self.encoder[w] for w in word]
        except KeyError as e:
            raise DataError(f"--vocab-file {self.vocab_file} lacks the piece {e.args[0]!r} that "
                            f"{self.merge_file} produces: the two files do not belong together") from None
        if len(self._cache) < 200_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in pretokenizer().findall(text):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
