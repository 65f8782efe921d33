"""Small synthetic inputs for the data tests: documents, files, a GPT-2-style BPE vocabulary."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

from samoe_dist.data.gpt2_bpe import EOD_TOKEN, bytes_to_unicode

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the king queen lord good night sweet love death crown sword heart fair speak shall "
         "thou thee my what now come go hence here there").split()


def load_tool(name: str):
    """A module of tools/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_documents(n: int, seed: int = 0, words: tuple[str, ...] = tuple(WORDS)) -> list[str]:
    """ASCII documents of a few short lines each, from a small word list."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words, rng.randint(3, 9))).capitalize() + rng.choice([".", ",", "!", "?"])
                 for _ in range(rng.randint(2, 6))]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text", gz: bool = False) -> Path:
    data = "".join(json.dumps({key: d}) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_gpt2_files(directory: Path, merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    """A GPT-2-format vocab.json / merges.txt: the 256 byte pieces, the given merges, <|endoftext|>."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOD_TOKEN] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory / "vocab.json", directory / "merges.txt"
