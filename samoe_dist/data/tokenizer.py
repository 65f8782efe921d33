"""A SentencePiece tokenizer: training it from text, and a small wrapper to use it.

Training settings favour exact round trips (`decode(encode(x)) == x`): identity normalisation,
whitespace and newlines kept, no dummy prefix, and byte fallback so unseen characters still encode.
The end-of-sequence piece is the end-of-document (EOD) token appended after every document.
Inputs are read by :mod:`samoe_dist.data.inputs` (JSON lines, plain text, gzip of either), the
same reader the preprocessor uses.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from samoe_dist.data.corpus import atomic_path, normalize_text, split_paragraphs
from samoe_dist.data.errors import DataError
from samoe_dist.data.inputs import ReadStats, iter_documents

logger = logging.getLogger(__name__)

UNK_ID, EOD_ID = 0, 1  # no BOS and no PAD: every other id is a learned or byte piece
MAX_SENTENCE_BYTES = 16384  # longer paragraphs are fed to the trainer line by line


def train_command(model_path: Path) -> str:
    """The command line that makes `model_path`, for error messages."""
    prefix = str(model_path)[: -len(".model")] if str(model_path).endswith(".model") else str(model_path)
    return (f"python tools/train_tokenizer.py --input data/shakespeare.jsonl --model-prefix {prefix} "
            f"--vocab-size 2000")


class Tokenizer:
    """A trained SentencePiece model: text <-> token ids, plus the EOD id."""

    kind = "SentencePieceTokenizer"

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.model_path} not found; make it with: "
                                    f"{train_command(self.model_path)}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer model {self.model_path} is not a SentencePiece model ({e}); "
                            f"remake it with: {train_command(self.model_path)} --overwrite") from e
        if self._sp.eos_id() < 0:
            raise DataError(f"tokenizer model {self.model_path} has no end-of-sequence piece to use as "
                            f"EOD; remake it with: {train_command(self.model_path)} --overwrite")
        self._sha256: str | None = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document in the token stream."""
        return self._sp.eos_id()

    @property
    def sha256(self) -> str:
        """Hash of the model file: identifies the tokenizer that made a token file."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.model_path.read_bytes()).hexdigest()
        return self._sha256

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like `encode` on each text, but in one call (SentencePiece encodes them in parallel)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """The trainer's "sentences": paragraphs (so newlines inside them are learned), split into
    lines when longer than the trainer accepts."""
    for text in texts:
        for paragraph in split_paragraphs(normalize_text(text)):
            if len(paragraph.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield paragraph
            else:
                yield from (line for line in paragraph.split("\n") if line.strip())


def train_tokenizer(
    inputs: Sequence[Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    overwrite: bool = False,
    json_keys: Sequence[str] = ("text",),
    input_sentence_size: int = 200_000,
    seed: int = 1234,
    special_tokens: Sequence[str] = (),
    text_boundary: str = "file",
    max_bad_fraction: float = 0.01,
    progress: bool | None = False,
) -> Path:
    """Train a SentencePiece model on `inputs`; writes PREFIX.model and PREFIX.vocab atomically
    and returns the .model path. Refuses (FileExistsError) to replace a model unless `overwrite`.

    `special_tokens` become user-defined pieces (ids 2, 3, ... after <unk> and the EOD </s>),
    always kept whole when they appear in text. `progress` shows a bar over the input bytes read
    (None: only on a terminal).
    """
    model_path, vocab_path = Path(f"{model_prefix}.model"), Path(f"{model_prefix}.vocab")
    if model_path.exists() and not overwrite:
        raise FileExistsError(f"{model_path} exists; pass --overwrite to replace it, or pick another "
                              f"--model-prefix")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    for token in special_tokens:
        if not token or token in ("<unk>", "</s>") or any(c.isspace() for c in token):
            raise DataError(f"--special-tokens {token!r}: a special token must be non-empty, without "
                            f"whitespace, and not <unk> or </s> (those exist already)")
    for path in map(Path, inputs):
        if not path.is_file():
            raise FileNotFoundError(f"input {path} not found")

    stats = ReadStats()
    total = sum(Path(p).stat().st_size for p in inputs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=None if progress is None else not progress)

    input_errors: list[Exception] = []  # SentencePiece turns an iterator's exception into its own

    def sentences() -> Iterator[str]:
        try:
            for texts in iter_documents(inputs, json_keys, text_boundary, max_bad_fraction, stats):
                yield from training_sentences(texts)
                bar.update(stats.input_bytes - bar.n)
        except (DataError, OSError) as e:
            input_errors.append(e)
            raise
        bar.set_postfix_str(f"{stats.documents} documents; training {model_type}")

    spm.set_random_generator_seed(seed)  # sentence sampling is the only randomness
    model = io.BytesIO()
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=1.0 if not byte_fallback else 0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=UNK_ID, eos_id=EOD_ID, bos_id=-1, pad_id=-1,
            user_defined_symbols=list(special_tokens),
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        if input_errors:
            raise input_errors[0] from None
        raise DataError(_explain_training_error(str(e), vocab_size, byte_fallback)) from e
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic_path(vocab_path) as tmp:
        # One "piece<TAB>score" a line, for people to read; newlines inside pieces are escaped.
        tmp.write_text("".join(f"{_escape(sp.id_to_piece(i))}\t{sp.get_score(i):g}\n"
                               for i in range(sp.get_piece_size())), encoding="utf-8")
    logger.info("trained %s tokenizer on %d documents (%.1f MB): vocab %d in %.1f s -> %s", model_type,
                stats.documents, stats.text_bytes / 1e6, vocab_size, seconds, model_path)
    return model_path


def _escape(piece: str) -> str:
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _explain_training_error(message: str, vocab_size: int, byte_fallback: bool) -> str:
    """SentencePiece's errors name internal sources; turn the common ones into advice."""
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        extra = " (256 of them are byte-fallback pieces; --no-byte-fallback drops them)" if byte_fallback else ""
        return (f"--vocab-size {vocab_size} is too small for this input: it needs at least "
                f"{too_small.group(2)} pieces{extra}")
    too_large = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        return (f"--vocab-size {vocab_size} is too large for this little input: use at most "
                f"{too_large.group(2)}, or give more text")
    return f"SentencePiece training failed: {message.strip().splitlines()[-1]}"
