"""Test helpers: a tiny synthetic corpus with its tokenizer, and running the real launcher."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from samoe_dist.ports import free_port  # noqa: F401  (the tests take it from here)

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")

_SUBJECTS = ["the king", "a fool", "my lord", "the queen", "this night", "our army", "the moon", "thy heart"]
_VERBS = ["doth love", "shall see", "hath slain", "will call", "must fear", "did praise", "can hear"]
_OBJECTS = ["the crown", "a ghost", "his sword", "her ring", "the sea", "my friend", "the stars"]


def make_tiny_corpus(directory: Path, documents: int = 300, vocab_size: int = 160, seed: int = 0):
    """Write a templated jsonl corpus (learnable structure) and train a SentencePiece model on it.

    Returns (jsonl path, tokenizer model path).
    """
    from samoe_dist.data.tokenizer import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    jsonl = directory / "tiny.jsonl"
    with open(jsonl, "w") as f:
        for _ in range(documents):
            lines = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                     for _ in range(rng.randint(4, 12))]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    model = train_tokenizer([jsonl], directory / "spm", vocab_size=vocab_size, byte_fallback=False)
    return jsonl, Path(model)


# -- bf16 tolerances, derived from the rounding (not fitted to one machine's deviations) -------------
# bfloat16 keeps 8 significand bits (7 stored): round to nearest has unit roundoff u = 2^-8, and each
# rounding multiplies a value by (1 + d) with |d| <= u. A test states how many roundings separate
# the computations it compares (their order, grouping or kernels may differ: another CPU's GEMM may
# block its reductions differently), then takes one of these bounds.
BF16_U = 2.0 ** -8


def bf16_worst_case(roundings: int, computations: int = 1) -> float:
    """Relative bound on ONE value through ``roundings`` bf16 roundings in each of ``computations``
    computations compared (1: bf16 against an exact float64 oracle; 2: two bf16 computations).

    To first order each rounding adds at most u of relative error (Higham's gamma_n ~ n*u), and two
    computations differ by at most the sum of their errors. It bounds the largest of many
    elementwise errors; relative to the size of the terms summed (use the tensor's scale, not
    each element, where sums cancel).
    """
    return computations * roundings * BF16_U


def bf16_aggregate(roundings: int, elements: int, computations: int = 2, sigmas: float = 3.0) -> float:
    """Relative bound on the norm of the difference of two bf16 computations of a vector of
    ``elements`` values, each through ``roundings`` roundings.

    Round-to-nearest errors are independent and uniform in [-u, u] (variance u^2/3) and add like a
    random walk: per element the difference has rms u*sqrt(computations*roundings/3), and the norm of
    ``elements`` such differences concentrates at that rms times the vector's norm, with relative
    spread 1/sqrt(2*elements); ``sigmas`` standard deviations of that spread are added.
    """
    rms = BF16_U * math.sqrt(computations * roundings / 3.0)
    return rms * (1.0 + sigmas / math.sqrt(2.0 * elements))


def bf16_mean(roundings: int, count: int, computations: int = 2, sigmas: float = 3.0) -> float:
    """Relative bound on the difference of two bf16 computations of a MEAN of ``count`` values
    whose rounding errors are independent (a loss averaged over tokens, each token's activations
    rounded on their own): ``sigmas`` standard deviations of the per-value rms over sqrt(count)."""
    return sigmas * BF16_U * math.sqrt(computations * roundings / 3.0) / math.sqrt(count)


def run_launcher(nprocs: int, args: list[str], timeout: int = 600, launcher: str = "torchrun",
                 **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N pretrain_samoe.py ARGS` on CPU, or with ``launcher='deepspeed'``
    `deepspeed --num_gpus N pretrain_samoe.py ARGS`, as a user runs it (``extra_env``: more
    environment for every rank).

    Both set the same environment for the ranks. DeepSpeed's runner imports DeepSpeed twice before
    a rank starts (its runner, then its per-node launch.py: ~7 s a launch on a 2-core CPU), so the
    tests of the launcher's own behaviour (the command line, one-line errors; torchrun wraps a
    failed rank in its ChildFailedError traceback) use it and the rest use torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra_env)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if launcher == "deepspeed":
        head = [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port())]
    elif launcher == "torchrun":
        head = [TORCHRUN, "--nproc_per_node", str(nprocs), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    else:
        raise ValueError(f"launcher must be 'torchrun' or 'deepspeed', got {launcher!r}")
    cmd = [*head, str(REPO / "pretrain_samoe.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def read_metrics(path: Path, kind: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def tiny_model_args(tmp: Path, corpus, tokenizer, *extra: str) -> list[str]:
    """Flags of a tiny GPT run on the tiny corpus (a few seconds per process on CPU)."""
    return ["--ds_config", str(REPO / "examples/ds_config_cpu.json"),
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--data-path", str(corpus), "--tokenizer-model", str(tokenizer), "--data-cache-path", str(tmp),
            "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "2", "--lr-warmup-iters", "1",
            *extra]


def direct_env(**extra: str) -> dict:
    """Environment of a single training process started without a launcher (rank 0 of 1)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_direct(args: list[str], **extra_env: str) -> subprocess.Popen:
    """Start `python pretrain_samoe.py ARGS` as one process (so a test can signal it)."""
    return subprocess.Popen([sys.executable, str(REPO / "pretrain_samoe.py"), *args], cwd=REPO,
                            env=direct_env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)


# A tiny GPT built in-process at EP=1 (export, conversion and evaluation tests).
TINY_GPT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--vocab-size", "64", "--ffn-hidden-size", "48"]


def build_training_model(argv: list[str]):
    """(model in eval mode with perturbed weights, cfg, groups) at EP=1 (needs the `seeded` fixture)."""
    import torch

    from samoe_dist.arguments import parse_args
    from samoe_dist.config import validate_layout
    from samoe_dist.model import build_model
    from samoe_dist.parallel import init_distributed

    cfg, _ = parse_args([*TINY_GPT, *argv])
    validate_layout(cfg, 1)
    groups = init_distributed(1)
    model = build_model(cfg, groups)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():  # norm weights off 1, biases off 0: every weight must map right
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval(), cfg, groups


def write_checkpoint(save_dir: Path, model, cfg, groups, iteration: int = 3) -> Path:
    """A checkpoint as samoe_dist.checkpoint.save leaves it (without the DeepSpeed files)."""
    from safetensors.torch import save_file

    from samoe_dist.checkpoint import consolidated_state

    tag_dir = save_dir / f"iter_{iteration:07d}"
    tag_dir.mkdir(parents=True)
    save_file(consolidated_state(model, cfg, groups), str(tag_dir / "model.safetensors"), metadata={"format": "samoe"})
    (tag_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "layout": {"world_size": 1, "ep_size": 1}}))
    (tag_dir / "client_state.json").write_text(json.dumps({"iteration": iteration, "consumed_samples": 24}))
    (save_dir / "latest").write_text(tag_dir.name)
    return tag_dir


@functools.lru_cache(maxsize=None)
def convert_tool():
    """tools/convert_checkpoint.py as a module, loaded once (its main() is the command line)."""
    from samoe_dist.data.testing import load_tool

    return load_tool("convert_checkpoint")
