"""Train a SentencePiece tokenizer on JSON lines, plain text, or gzip of either.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --model-prefix data/spm \\
        --vocab-size 2000 [--model-type bpe|unigram] [--no-byte-fallback] \\
        [--special-tokens "<|user|>" "<|assistant|>"] [--overwrite]

Writes PREFIX.model and PREFIX.vocab; refuses to replace an existing PREFIX.model without
--overwrite. The end-of-sequence piece </s> (id 1) is the end-of-document token; special tokens
get the ids after it and are never split.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.data.errors import DataError  # noqa: E402
from samoe_dist.data.inputs import TEXT_BOUNDARIES  # noqa: E402
from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help=".jsonl/.json/.ndjson files (one JSON object a line), plain text files, or .gz of either")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="encode unseen characters as UTF-8 bytes (adds 256 pieces)")
    parser.add_argument("--special-tokens", nargs="+", default=[], help="extra pieces kept whole, e.g. <|user|>")
    parser.add_argument("--json-keys", "--json-key", nargs="+", default=["text"],
                        help="fields of each JSON line holding the text")
    parser.add_argument("--text-boundary", choices=TEXT_BOUNDARIES, default="file",
                        help="plain text: one document per file, per blank-line-separated block, or per line")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="bad lines up to this share of a file are skipped with a warning")
    parser.add_argument("--input-sentence-size", type=int, default=200_000,
                        help="at most this many paragraphs (sampled) are used for training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    try:
        model_path = train_tokenizer(
            args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
            byte_fallback=args.byte_fallback, overwrite=args.overwrite, json_keys=args.json_keys,
            input_sentence_size=args.input_sentence_size, special_tokens=args.special_tokens,
            text_boundary=args.text_boundary, max_bad_fraction=args.max_bad_fraction,
            progress=False if args.no_progress else None,
        )
    except (FileExistsError, FileNotFoundError, DataError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer(model_path)
    print(f"wrote {model_path}: {args.model_type}, vocab {tokenizer.vocab_size}, eod id {tokenizer.eod}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
