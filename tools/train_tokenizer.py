"""Train a SentencePiece tokenizer on JSON-lines (`text` field) or plain text files.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --model-prefix data/spm \\
        --vocab-size 2000 [--model-type bpe|unigram] [--no-byte-fallback] [--overwrite]

Writes PREFIX.model and PREFIX.vocab. The end-of-sequence piece (id 1) is the end-of-document token.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help=".jsonl/.json/.ndjson files (one JSON object a line) or plain text files")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="encode unseen characters as UTF-8 bytes (adds 256 pieces)")
    parser.add_argument("--json-key", default="text", help="field of each JSON line holding the text")
    parser.add_argument("--input-sentence-size", type=int, default=200_000,
                        help="at most this many paragraphs (sampled) are used for training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    try:
        model_path = train_tokenizer(
            args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
            byte_fallback=args.byte_fallback, overwrite=args.overwrite, json_key=args.json_key,
            input_sentence_size=args.input_sentence_size,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer(model_path)
    print(f"wrote {model_path}: {args.model_type}, vocab {tokenizer.vocab_size}, eod id {tokenizer.eod}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
