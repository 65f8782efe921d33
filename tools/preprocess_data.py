"""Tokenize text into Megatron indexed datasets (.bin/.idx), like Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input data/shakespeare.jsonl --output-prefix data/shakespeare \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/spm.model --append-eod --workers 2

writes data/shakespeare_text_document.bin/.idx (one dataset per --json-keys key, named
PREFIX_KEY_document, for `pretrain_samoe.py --data-path data/shakespeare_text_document`) and a
.meta.json naming the tokenizer. Inputs: JSON lines (.jsonl/.json/.ndjson; the text under
--json-keys), plain text (documents per --text-boundary), and .gz of either. GPT-2 BPE:
--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.data.errors import DataError  # noqa: E402
from samoe_dist.data.inputs import TEXT_BOUNDARIES  # noqa: E402
from samoe_dist.data.tokenizers import TOKENIZER_TYPES, TokenizerSpec  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="input files (.jsonl, text, or .gz of either)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize, one dataset each")
    group.add_argument("--text-boundary", choices=TEXT_BOUNDARIES, default="file",
                       help="plain text: one document per file, per blank-line-separated block, or per line")
    group.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="bad lines (invalid JSON, missing key, not UTF-8) up to this share of a file are "
                            "skipped with a warning; more stop with an error")
    group = p.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                       help="default: SentencePieceTokenizer with --tokenizer-model, GPT2BPETokenizer with --vocab-file")
    group.add_argument("--tokenizer-model", help="SentencePiece .model (tools/train_tokenizer.py)")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (encoder.json)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (vocab.bpe)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = p.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx/.meta.json")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--overwrite", action="store_true", help="replace existing .bin/.idx files")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from samoe_dist.data.indexed import preprocess

    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
    try:
        stats = preprocess(args.input, args.output_prefix, spec, args.json_keys, append_eod=args.append_eod,
                           workers=args.workers, text_boundary=args.text_boundary,
                           max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite,
                           progress=False if args.no_progress else None)
    except (DataError, FileNotFoundError, FileExistsError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    skipped = []
    if stats.bad_lines:
        skipped.append(f"{stats.bad_lines} bad lines")
    if stats.empty_documents:
        skipped.append(f"{stats.empty_documents} empty documents")
    print(f"wrote {', '.join(stats.outputs)}: {stats.documents} documents, {stats.tokens} tokens, "
          f"{stats.text_bytes} bytes of text in {stats.seconds:.1f} s ({stats.documents_per_s:.0f} documents/s, "
          f"{stats.mb_per_s:.2f} MB/s, {args.workers} worker(s))"
          + (f"; skipped {' and '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
