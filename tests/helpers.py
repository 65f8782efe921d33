"""Test helpers: a tiny synthetic corpus with its tokenizer, and running the training script and tools
(through the real launchers, or as forks of a preloaded server)."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp
from multiprocessing.connection import wait as wait_for_exits

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


def preloaded_context():
    """The multiprocessing fork-server context whose server has imported torch, DeepSpeed,
    megatron-core and samoe_dist once (samoe_dist/preload.py): a process started from it is a
    fresh fork of that server, not an interpreter importing them again (~10 s of CPU a process on
    a 2-core CPU). One server per test session, shared by every caller."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["samoe_dist.preload"])
    return ctx


def _run_script_here(script: str, argv: list[str], env: dict, stdout: str, stderr: str) -> None:
    """In a fork of the preloaded server: run ``script`` as `python SCRIPT ARGV` would, with
    ``env`` as its whole environment and its stdout/stderr (file descriptors 1 and 2, so C-level
    output and loggers made at import time too) going to the given files."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    import torch

    # OpenMP read OMP_NUM_THREADS when the server loaded torch: set what this process was given.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    os.chdir(REPO)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


def _read_if_any(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def run_preloaded(script: Path, argv: list[str], envs: list[dict], timeout: float = 600,
                  grace: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``script`` in ``len(envs)`` processes forked from the preloaded server, process i with
    environment ``envs[i]``, as a launcher runs its ranks: if one fails the others are sent
    SIGTERM, then SIGKILL after ``grace`` seconds. Returns a CompletedProcess whose stdout and
    stderr are the processes' own, in process order, and whose return code is the first failed
    process's (0 if none failed); past ``timeout`` all are killed and TimeoutExpired raised."""
    ctx = preloaded_context()
    cmd = ["<preloaded fork>", str(script), *argv]
    with tempfile.TemporaryDirectory(prefix="samoe-run-") as tmp:
        procs = []
        for i, env in enumerate(envs):
            p = ctx.Process(target=_run_script_here,
                            args=(str(script), list(argv), env, f"{tmp}/out{i}", f"{tmp}/err{i}"))
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        first_failed = 0  # the exit code of the process that failed first (the lowest if several did)
        stop_by = None
        while True:
            now = time.monotonic()
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed and stop_by is None:
                first_failed = failed[0]
                stop_by = now + grace
                for p in procs:
                    if p.exitcode is None:
                        p.terminate()
            elif stop_by is not None and now > stop_by:
                for p in procs:
                    if p.exitcode is None:
                        p.kill()
            running = [p.sentinel for p in procs if p.exitcode is None]
            if not running:
                break
            if now > deadline:
                for p in procs:
                    p.kill()
                for p in procs:
                    p.join()
                raise subprocess.TimeoutExpired(cmd, timeout)
            wait_for_exits(running, timeout=0.5)
        for p in procs:
            p.join()
        # a process that died before it opened its files (in the fork server's bootstrap) has none
        out = "".join(_read_if_any(Path(f"{tmp}/out{i}")) for i in range(len(envs)))
        err = "".join(_read_if_any(Path(f"{tmp}/err{i}")) for i in range(len(envs)))
    return subprocess.CompletedProcess(cmd, first_failed, out, err)


def rank_envs(world: int, **extra: str) -> list[dict]:
    """For run_preloaded: this process's environment with RANK and WORLD_SIZE of each of ``world``
    ranks, plus ``extra``."""
    return [dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), **extra) for r in range(world)]


def run_tool(name: str, argv: list[str], timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """`python tools/NAME.py ARGV`, one process forked from the preloaded server (see run_preloaded)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra_env)
    return run_preloaded(REPO / "tools" / f"{name}.py", argv, [env], timeout=timeout)


def run_launcher(nprocs: int, args: list[str], timeout: int = 600, launcher: str = "preloaded",
                 **extra_env: str) -> subprocess.CompletedProcess:
    """Run `pretrain_samoe.py ARGS` in ``nprocs`` CPU ranks (``extra_env``: more environment for every
    rank) with one of three launchers:

    - ``'deepspeed'``: `deepspeed --num_gpus N pretrain_samoe.py ARGS`, the command a user types;
    - ``'torchrun'``: `torchrun --nproc_per_node N pretrain_samoe.py ARGS`;
    - ``'preloaded'`` (default): the ranks are forks of the preloaded server (run_preloaded), each
      given the environment those launchers give a rank (RANK, LOCAL_RANK, WORLD_SIZE,
      LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and running the script as `python` would.

    The script's code path is the same under all three; what differs is the process start: the
    launchers import DeepSpeed or torch themselves (~4-7 s) and every rank imports torch, DeepSpeed
    and megatron-core (~10 s of CPU each on a 2-core CPU), which the preloaded fork does not
    (a 2-rank, 4-iteration run: ~13 s with torchrun, ~1.3 s preloaded). So the tests of the
    launchers' own behaviour (the command line, one-line errors as a user sees them; torchrun wraps
    a failed rank in its ChildFailedError traceback) name theirs, and the rest run preloaded."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra_env)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    script = REPO / "pretrain_samoe.py"
    if launcher == "preloaded":
        port = str(free_port())
        envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(nprocs)]
        return run_preloaded(script, args, envs, timeout=timeout)
    if launcher == "deepspeed":
        head = [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port())]
    elif launcher == "torchrun":
        head = [TORCHRUN, "--nproc_per_node", str(nprocs), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    else:
        raise ValueError(f"launcher must be 'preloaded', 'torchrun' or 'deepspeed', got {launcher!r}")
    return subprocess.run([*head, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def error_lines(text: str) -> list[str]:
    """The entry script's one-line errors in ``text`` (a run's stderr): what a user reads. Rank 0's
    line is `pretrain_samoe.py: error: ...`, another rank's `pretrain_samoe.py: error (rank N): ...`."""
    return [line for line in text.splitlines() if re.search(r"pretrain_samoe\.py: error( \(rank \d+\))?: ", line)]


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
