"""Perplexity and bits-per-byte of a checkpoint on held-out text (a .jsonl/.txt file, or .gz of one).

    python tools/eval_ppl.py --load runs/main/checkpoints --input data/heldout.jsonl [--json-keys text] \\
        [--limit 200] [--stride 64] [--output runs/main/eval/ppl.json]

``--load`` takes a training checkpoint or an exported model (both run as the plain PyTorch model,
with the tokenizer the run was trained with unless ``--tokenizer-model`` is given). Each document is
scored after the end-of-document token, in windows of the model's context (``--stride`` new tokens
per window after the first; default: the whole context). Reports the mean token loss, perplexity,
bits per byte (total NLL over the text's UTF-8 bytes: independent of the tokenizer, so models with
different vocabularies compare) and word perplexity. Inputs are read as the data tools read them:
JSON lines with the text under ``--json-keys``, or plain text cut per file, blank line or line
(``--text-boundary``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.config import ConfigError  # noqa: E402
from samoe_dist.data.inputs import TEXT_BOUNDARIES, iter_documents  # noqa: E402
from samoe_dist.evaluation.loading import (  # noqa: E402
    EvaluationError, add_model_arguments, check_output, load_from_args, write_json)
from samoe_dist.evaluation.perplexity import evaluate_texts  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--input", nargs="+", required=True, help="text files: .jsonl/.json/.ndjson, plain text, .gz")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the text in JSON lines")
    parser.add_argument("--text-boundary", default="file", choices=TEXT_BOUNDARIES,
                        help="plain text: one document per file, per blank-line-separated block, or per line")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N documents only")
    parser.add_argument("--stride", type=int, default=None,
                        help="new tokens scored per window after the first (default: the model's context length)")
    parser.add_argument("--output", default=None, help="write the numbers as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.limit is not None and args.limit < 1:
            raise EvaluationError(f"--limit must be >= 1, got {args.limit}")
        for path in args.input:
            if not Path(path).is_file():
                raise EvaluationError(f"--input {path}: no such file")
        if args.output:
            check_output(args.output, args.overwrite)
        loaded = load_from_args(args)
        if args.stride is not None and not 1 <= args.stride <= loaded.max_length:
            raise EvaluationError(f"--stride {args.stride} must be in [1, {loaded.max_length}] (the model's context)")
        texts = (t for doc in iter_documents(args.input, args.json_keys, args.text_boundary) for t in doc)
        start = time.perf_counter()
        result = evaluate_texts(loaded.model, loaded.tokenizer, texts, loaded.max_length, args.stride,
                                args.batch_size, args.limit, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        if not result.documents:
            raise EvaluationError(f"--input {' '.join(args.input)}: no non-empty documents to evaluate")
        print("| documents | tokens | bytes | loss | perplexity | bits/byte | word perplexity |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {result.documents} | {result.tokens} | {result.bytes} | {result.loss:.4f} | {result.perplexity:.3f} "
              f"| {result.bits_per_byte:.4f} | {result.word_perplexity:.3f} |")
        print(f"{loaded.source} ({loaded.model.config.kind}), context {loaded.max_length}, stride "
              f"{args.stride or loaded.max_length}, {seconds:.1f} s on {loaded.device}")
        if args.output:
            record = {"model": loaded.info(), "input": args.input, "json_keys": args.json_keys,
                      "max_length": loaded.max_length, "stride": args.stride or loaded.max_length,
                      "limit": args.limit, **result.to_dict()}
            print(f"wrote {write_json(args.output, record, args.overwrite)}")
    except (EvaluationError, ConfigError, FileNotFoundError, OSError) as exc:
        print(f"eval_ppl.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
