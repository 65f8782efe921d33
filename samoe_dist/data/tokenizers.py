"""The tokenizers the data path knows, chosen by Megatron's ``--tokenizer-type`` names, and the
adapter that hands one to megatron-core's datasets.

- ``SentencePieceTokenizer`` (alias ``GPTSentencePieceTokenizer``): a ``--tokenizer-model`` made by
  ``tools/train_tokenizer.py`` (:class:`samoe_dist.data.tokenizer.Tokenizer`); EOD is its ``</s>``.
- ``GPT2BPETokenizer``: GPT-2's ``--vocab-file`` and ``--merge-file``
  (:class:`samoe_dist.data.gpt2_bpe.GPT2BPETokenizer`); EOD is ``<|endoftext|>``.

Both expose ``kind``, ``vocab_size``, ``eod``, ``sha256``, ``encode``, ``encode_batch``, ``decode``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Optional

from samoe_dist.data.errors import DataError

SENTENCEPIECE = "SentencePieceTokenizer"
GPT2BPE = "GPT2BPETokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, "GPTSentencePieceTokenizer", GPT2BPE)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer, by name and files: small and picklable, so worker processes load their own."""

    tokenizer_type: Optional[str] = None
    """A Megatron name (TOKENIZER_TYPES); None: SentencePiece if a model is given, else GPT-2 BPE
    if a vocab file is given."""
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None

    @property
    def kind(self) -> Optional[str]:
        """SENTENCEPIECE, GPT2BPE or None (no tokenizer given)."""
        kind = self.tokenizer_type
        if kind is None:
            kind = SENTENCEPIECE if self.tokenizer_model else GPT2BPE if self.vocab_file else None
        return SENTENCEPIECE if kind == "GPTSentencePieceTokenizer" else kind

    def check(self) -> None:
        """DataError unless the names and files given make one tokenizer."""
        kind = self.kind
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise DataError(f"--tokenizer-type {self.tokenizer_type!r} is not supported; use one of "
                            f"{', '.join(TOKENIZER_TYPES)}")
        if kind == SENTENCEPIECE and not self.tokenizer_model:
            raise DataError(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model "
                            f"(a .model file from tools/train_tokenizer.py)")
        if kind == GPT2BPE and not (self.vocab_file and self.merge_file):
            raise DataError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and "
                            "--merge-file (merges.txt)")
        if kind == SENTENCEPIECE and (self.vocab_file or self.merge_file):
            raise DataError("--vocab-file/--merge-file belong to GPT2BPETokenizer; a SentencePiece "
                            "tokenizer is only its --tokenizer-model")
        if kind == GPT2BPE and self.tokenizer_model:
            raise DataError("--tokenizer-model is a SentencePiece model; GPT2BPETokenizer reads "
                            "--vocab-file and --merge-file")

    def load(self):
        """The tokenizer object, or None when no tokenizer is given."""
        self.check()
        if self.kind == SENTENCEPIECE:
            from samoe_dist.data.tokenizer import Tokenizer

            return Tokenizer(self.tokenizer_model)
        if self.kind == GPT2BPE:
            from samoe_dist.data.gpt2_bpe import GPT2BPETokenizer

            return GPT2BPETokenizer(self.vocab_file, self.merge_file)
        return None


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer in a dataset's metadata and in index-cache names."""
    return {"tokenizer_type": tokenizer.kind, "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def megatron_tokenizer(identity: dict, tokenizer=None):
    """A megatron-core tokenizer (``MegatronTokenizerBase``) for ``GPTDatasetConfig``.

    The datasets need only ``vocab_size``, ``eod`` and ``unique_identifiers`` (hashed into the
    index-cache names: the tokenizer's type, file hash and vocabulary, not its path).
    `tokenizer` (optional) adds tokenize/detokenize; without it, `identity` (from a dataset's
    metadata, or just a vocab size) is enough to train on prepared data.
    """
    from megatron.core.tokenizers import MegatronTokenizerBase

    class _Adapter(MegatronTokenizerBase):
        def __init__(self) -> None:
            super().__init__(path=str(getattr(tokenizer, "model_path", "") or ""), config={})
            self.unique_identifiers = OrderedDict(
                [("class", identity.get("tokenizer_type") or "unknown"),
                 ("sha256", identity.get("tokenizer_sha256")),
                 ("vocab_size", identity["vocab_size"]), ("eod", identity.get("eod"))])

        def tokenize(self, text: str) -> list[int]:
            return self._need().encode(text)

        def detokenize(self, ids: Any) -> str:
            return self._need().decode(ids)

        @property
        def vocab(self) -> dict:
            raise NotImplementedError("the SaMoE data adapter does not expose the vocabulary")

        @property
        def vocab_size(self) -> int:
            return int(identity["vocab_size"])

        @property
        def eod(self) -> int:
            eod = identity.get("eod")
            return -1 if eod is None else int(eod)  # -1 never occurs in data: nothing is masked

        def apply_chat_template(self, *args, **kwargs):
            raise NotImplementedError("no chat template: this is a pretraining tokenizer")

        def _need(self):
            if tokenizer is None:
                raise DataError("no tokenizer given: pass --tokenizer-model (or --vocab-file and --merge-file)")
            return tokenizer

    return _Adapter()
