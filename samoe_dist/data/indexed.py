"""Megatron indexed datasets: writing them from text (the preprocessor) and checking them.

A dataset is a prefix P with ``P.bin`` (the token ids of every document, back to back) and
``P.idx`` (dtype, document lengths and offsets), written by megatron-core's
``IndexedDatasetBuilder``, exactly what Megatron-LM's ``tools/preprocess_data.py`` writes: one
sequence per document, named ``{output_prefix}_{json_key}_document``. Next to them ``P.meta.json``
records the tokenizer (type, file hash, vocabulary, EOD), the sources and the counts, so training
can tell a dataset made by another tokenizer; Megatron ignores the file.

Workers tokenize chunks of documents in parallel; the main process writes the chunks in input
order, so the files are byte-identical for any number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from samoe_dist.data.errors import DataError
from samoe_dist.data.inputs import ReadStats, iter_documents
from samoe_dist.data.tokenizers import TokenizerSpec, tokenizer_identity

logger = logging.getLogger(__name__)

CHUNK_DOCUMENTS = 64  # documents per task sent to a worker
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}


def dataset_prefix(output_prefix: str | Path, json_key: str) -> str:
    """Megatron's name of the dataset written for one JSON key: PREFIX_KEY_document."""
    return f"{output_prefix}_{json_key}_document"


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.meta.json")


def read_meta(prefix: str | Path) -> dict | None:
    try:
        return json.loads(meta_path(prefix).read_text())
    except (OSError, ValueError):
        return None


def preprocess_command(prefix: str | Path) -> str:
    """The command that makes `prefix` (for messages)."""
    out = str(prefix)[: -len("_text_document")] if str(prefix).endswith("_text_document") else str(prefix)
    return (f"python tools/preprocess_data.py --input TEXT.jsonl --output-prefix {out} "
            f"--tokenizer-model data/spm.model --append-eod")


@dataclasses.dataclass
class PreprocessStats:
    """What the preprocessor wrote, for its summary line and the benchmark."""

    outputs: list[str]
    documents: int
    """Documents read (each may feed several keys)."""
    tokens: int
    """Tokens written, all keys, EODs included."""
    text_bytes: int
    input_bytes: int
    seconds: float
    bad_lines: int
    empty_documents: int
    """Empty or whitespace-only texts left out (per key)."""

    @property
    def documents_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


# --- workers -------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _worker_tokenizer
    _worker_tokenizer = spec.load()


def _encode_chunk(chunk: list[tuple[str, ...]], append_eod: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per JSON key: (token ids of the chunk's non-empty documents back to back [T], their lengths [D])."""
    tok = _worker_tokenizer
    out = []
    for k in range(len(chunk[0])):
        texts = [doc[k] for doc in chunk if doc[k].strip()]
        ids = tok.encode_batch(texts) if texts else []
        if append_eod:
            ids = [x + [tok.eod] for x in ids]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        out.append((tokens, lengths))
    return out


def _chunks(iterable, size: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encode_chunk_star(args):
    return _encode_chunk(*args)


@contextlib.contextmanager
def _encoded(chunks, tokenizer, spec: TokenizerSpec, append_eod: bool, workers: int):
    """The chunks' token ids, in input order: in this process, or by a pool of `workers`."""
    global _worker_tokenizer
    if workers == 1:
        _worker_tokenizer = tokenizer
        yield (_encode_chunk(c, append_eod) for c in chunks)
        return
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    pool = multiprocessing.get_context(start_method).Pool(workers, initializer=_init_worker, initargs=(spec,))
    try:
        yield pool.imap(_encode_chunk_star, ((c, append_eod) for c in chunks), chunksize=1)
    finally:
        pool.terminate()
        pool.join()


# --- the preprocessor ----------------------------------------------------------------------------


def _check_request(inputs, prefixes, spec: TokenizerSpec, keys, workers: int, max_bad_fraction: float,
                   overwrite: bool) -> None:
    spec.check()
    if spec.kind is None:
        raise DataError("no tokenizer given: pass --tokenizer-model (SentencePiece) or --tokenizer-type "
                        "GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not 0 <= max_bad_fraction < 1:
        raise DataError(f"--max-bad-fraction must be in [0, 1), got {max_bad_fraction}")
    if len(set(keys)) != len(keys):
        raise DataError(f"--json-keys {keys} names a key twice")
    for prefix in prefixes:
        for path in (Path(prefix + ".bin"), Path(prefix + ".idx")):
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or pick another "
                                      f"--output-prefix")
    for path in map(Path, inputs):
        if not path.is_file():
            raise FileNotFoundError(f"input {path} not found")


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, spec: TokenizerSpec,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               text_boundary: str = "file", max_bad_fraction: float = 0.01, overwrite: bool = False,
               progress: bool | None = None) -> PreprocessStats:
    """Tokenize `inputs` into one indexed dataset per JSON key (PREFIX_KEY_document.bin/.idx and
    .meta.json). Files appear only once complete; existing ones are replaced only with `overwrite`.
    `progress`: a bar over the input bytes with documents/s and MB/s (None: only on a terminal)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    keys = list(json_keys)
    prefixes = [dataset_prefix(output_prefix, key) for key in keys]
    _check_request(inputs, prefixes, spec, keys, workers, max_bad_fraction, overwrite)
    tokenizer = spec.load()
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    stats = ReadStats()
    tmp = {p: (f"{p}.bin.tmp{os.getpid()}", f"{p}.idx.tmp{os.getpid()}") for p in prefixes}
    builders = [IndexedDatasetBuilder(tmp[p][0], dtype=DType.optimal_dtype(tokenizer.vocab_size)) for p in prefixes]
    tokens_per_key, max_id = [0] * len(keys), -1
    start = time.perf_counter()
    bar = tqdm(total=sum(Path(p).stat().st_size for p in inputs), unit="B", unit_scale=True,
               desc="preprocessing", smoothing=0.1, disable=None if progress is None else not progress)
    try:
        chunks = _chunks(iter_documents(inputs, keys, text_boundary, max_bad_fraction, stats), CHUNK_DOCUMENTS)
        with _encoded(chunks, tokenizer, spec, append_eod, workers) as encoded:
            for per_key in encoded:  # in input order, whatever the number of workers
                for k, (builder, (ids, lengths)) in enumerate(zip(builders, per_key)):
                    max_id = max(max_id, int(ids.max()) if ids.size else -1)
                    for end, length in zip(np.cumsum(lengths).tolist(), lengths.tolist()):
                        builder.add_document(ids[end - length:end], [length])
                    tokens_per_key[k] += int(ids.size)
                bar.update(stats.input_bytes - bar.n)
                seconds = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{stats.documents / seconds:.0f} docs/s, "
                                    f"{stats.text_bytes / 1e6 / seconds:.2f} MB/s")
        written = [len(b.sequence_lengths) for b in builders]
        for key, prefix, n in zip(keys, prefixes, written):
            if n == 0:
                raise DataError(f"every {key!r} text in {', '.join(map(str, inputs))} is empty: nothing to "
                                f"write to {prefix}; check --json-keys and the input")
        for prefix, builder in zip(prefixes, builders):
            builder.finalize(tmp[prefix][1])
        seconds = time.perf_counter() - start
        sources = [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size,
                    "mtime_ns": Path(p).stat().st_mtime_ns} for p in inputs]
        for key, prefix, n, n_tokens in zip(keys, prefixes, written, tokens_per_key):
            meta_path(prefix).unlink(missing_ok=True)  # a stale sidecar must never vouch for new data
            os.replace(tmp[prefix][0], prefix + ".bin")
            os.replace(tmp[prefix][1], prefix + ".idx")
            meta = {**tokenizer_identity(tokenizer), "json_key": key, "append_eod": append_eod, "documents": n,
                    "tokens": n_tokens, "max_token_id": max_id, "text_boundary": text_boundary,
                    "sources": sources}
            meta_path(prefix).write_text(json.dumps(meta, indent=1) + "\n")
    finally:
        bar.close()
        for builder, (bin_tmp, idx_tmp) in zip(builders, tmp.values()):
            builder.data_file.close()
            Path(bin_tmp).unlink(missing_ok=True)
            Path(idx_tmp).unlink(missing_ok=True)
    return PreprocessStats(outputs=prefixes, documents=stats.documents, tokens=sum(tokens_per_key),
                           text_bytes=stats.text_bytes, input_bytes=stats.input_bytes, seconds=seconds,
                           bad_lines=stats.bad_lines, empty_documents=stats.documents * len(keys) - sum(written))


# --- checking a prefix ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """What a prefix's .idx says, checked against its .bin."""

    prefix: str
    dtype: type
    sequences: int
    documents: int
    tokens: int
    meta: dict | None


def _missing_message(prefix: str) -> str:
    bin_ok, idx_ok = Path(prefix + ".bin").is_file(), Path(prefix + ".idx").is_file()
    if bin_ok and not idx_ok:
        return (f"{prefix}.idx is missing (its {prefix}.bin is there): the two are written together; "
                f"make both again with: {preprocess_command(prefix)} --overwrite")
    if idx_ok and not bin_ok:
        return (f"{prefix}.bin is missing (its {prefix}.idx is there): make both again with: "
                f"{preprocess_command(prefix)} --overwrite")
    near = sorted(str(p)[:-4] for p in Path(prefix).parent.glob(Path(prefix).name + "_*_document.idx"))
    hint = f"; did you mean {near[0]} (a prefix names the dataset, PREFIX_KEY_document)?" if near else ""
    return f"no dataset {prefix}.bin/.idx{hint or f'; make it with: {preprocess_command(prefix)}'}"


def inspect_prefix(prefix: str) -> IndexInfo:
    """Check that `prefix` is a complete indexed dataset; raise one clear error if not.

    FileNotFoundError for a missing .bin or .idx; DataError for a file that is not an index, a
    truncated .idx or .bin, or a .bin that belongs to another index.
    """
    idx, binary = prefix + ".idx", prefix + ".bin"
    if not (Path(idx).is_file() and Path(binary).is_file()):
        raise FileNotFoundError(_missing_message(prefix))
    remake = f"make it again with: {preprocess_command(prefix)} --overwrite"
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{idx} is not a Megatron index file (bad header): {remake}")
    code = head[17]
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if code not in _DTYPES:
        raise DataError(f"{idx} names an unknown token dtype (code {code}): {remake}")
    need = 34 + 4 * sequences + 8 * sequences + 8 * documents
    if idx_size < need:
        raise DataError(f"{idx} is truncated ({idx_size} bytes, its header promises {need}): {remake}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(sequences,)) if sequences else np.zeros(0, np.int32)
    doc_index = np.memmap(idx, dtype=np.int64, mode="r", offset=34 + 12 * sequences, shape=(documents,)) \
        if documents else np.zeros(0, np.int64)
    if documents < 2 or doc_index[-1] != sequences:
        raise DataError(f"{idx} holds no documents: {remake}")
    dtype = _DTYPES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    expected, actual = tokens * np.dtype(dtype).itemsize, os.path.getsize(binary)
    if actual < expected:
        raise DataError(f"{binary} is truncated: {actual} bytes, but {idx} expects {expected} "
                        f"({tokens} tokens of {np.dtype(dtype).name}); {remake}")
    if actual > expected:
        raise DataError(f"{binary} has {actual} bytes but {idx} expects {expected}: the two files are "
                        f"from different runs; {remake}")
    return IndexInfo(prefix=prefix, dtype=dtype, sequences=int(sequences), documents=int(documents) - 1,
                     tokens=tokens, meta=read_meta(prefix))


def max_token_id(info: IndexInfo) -> int:
    """Largest id in the .bin: from the metadata when there is one, else by reading the file."""
    if info.meta and isinstance(info.meta.get("max_token_id"), int) and info.meta.get("tokens") == info.tokens:
        return info.meta["max_token_id"]
    data = np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r")
    step = 1 << 26
    return max((int(data[i:i + step].max()) for i in range(0, data.size, step)), default=-1)
