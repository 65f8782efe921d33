"""Preprocessing throughput (documents/s, MB/s of text) on a real corpus, against its peers.

Rows, each on the same input in this run (best of ``--repeats`` rounds; every round measures
every row, so a busy machine slows them alike):

- ``tokenizer_only``: a freshly loaded tokenizer alone on documents already in memory (``encode_batch`` over
  64-document chunks, as the workers call it): the ceiling of the pipeline.
- ``preprocess_w{N}``: ``samoe_dist.data.indexed.preprocess`` (what ``tools/preprocess_data.py``
  runs): read + JSON-parse + tokenize + write .bin/.idx, with N worker processes.

Prints one JSON line per row, then a line of ratios (each row's MB/s over the tokenizer-only MB/s,
and N workers over 1 worker), and writes all of it to ``bench/results/preprocess_throughput.json``.

    .venv/bin/python bench/preprocess_throughput.py [--input data/shakespeare.jsonl ...] \\
        [--tokenizer-model data/spm.model | --vocab-file vocab.json --merge-file merges.txt] \\
        [--workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from samoe_dist.data.indexed import CHUNK_DOCUMENTS, preprocess  # noqa: E402
from samoe_dist.data.inputs import iter_documents  # noqa: E402
from samoe_dist.data.tokenizers import TokenizerSpec  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", default=[os.path.join(REPO, "data/shakespeare.jsonl")])
    p.add_argument("--tokenizer-model", default=None, help="default data/spm.model unless --vocab-file is given")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=os.path.join(REPO, "bench/results/preprocess_throughput.json"))
    args = p.parse_args(argv)
    if args.tokenizer_model is None and args.vocab_file is None:
        args.tokenizer_model = os.path.join(REPO, "data/spm.model")
    return args


def tokenizer_only(tokenizer, documents: list[str]) -> dict:
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(documents), CHUNK_DOCUMENTS):
        tokens += sum(map(len, tokenizer.encode_batch(documents[i:i + CHUNK_DOCUMENTS])))
    seconds = time.perf_counter() - start
    return {"row": "tokenizer_only", "documents": len(documents), "tokens": tokens, "text_bytes": text_bytes,
            "seconds": seconds, "documents_per_s": len(documents) / seconds, "mb_per_s": text_bytes / 1e6 / seconds}


def pipeline(spec: TokenizerSpec, inputs: list[str], workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats = preprocess(inputs, os.path.join(tmp, "bench"), spec, append_eod=True, workers=workers,
                           progress=False)
    return {"row": f"preprocess_w{workers}", "workers": workers, "documents": stats.documents, "tokens": stats.tokens,
            "text_bytes": stats.text_bytes, "seconds": stats.seconds, "documents_per_s": stats.documents_per_s,
            "mb_per_s": stats.mb_per_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        print(f"error: {missing[0]} not found: make the default corpus with bash scripts/setup.sh "
              f"(or python tools/fetch_corpus.py shakespeare --output data/shakespeare.jsonl)", file=sys.stderr)
        return 2
    spec = TokenizerSpec(None, args.tokenizer_model, args.vocab_file, args.merge_file)
    documents = [texts[0] for texts in iter_documents(args.input)]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for row in [tokenizer_only(spec.load(), documents)] + [pipeline(spec, args.input, w) for w in args.workers]:
            if row["row"] not in best or row["seconds"] < best[row["row"]]["seconds"]:
                best[row["row"]] = row
    rows = list(best.values())
    base, one = rows[0], next((r for r in rows if r.get("workers") == 1), None)
    ratios = {"row": "ratios", **{f"{r['row']}_over_tokenizer_only": r["mb_per_s"] / base["mb_per_s"] for r in rows[1:]}}
    if one:
        ratios.update({f"{r['row']}_over_preprocess_w1": r["mb_per_s"] / one["mb_per_s"]
                       for r in rows[1:] if r is not one})
    context = {"row": "context", "inputs": [os.path.relpath(p, REPO) for p in args.input],
               "input_bytes": sum(os.path.getsize(p) for p in args.input), "tokenizer": spec.kind,
               "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    for row in [context, *rows, ratios]:
        print(json.dumps(row))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump([context, *rows, ratios], f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
