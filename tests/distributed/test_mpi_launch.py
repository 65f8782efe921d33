"""`mpirun -np 2 python pretrain_samoe.py ...`: DeepSpeed's MPI discovery (mpi4py, Open MPI's runtime
wheel from PyPI) sets rank, world and master, and the run equals the single-process one: same
global batch, same losses (EP=2 SaMoE, ZeRO-1; the tolerance of the data-parallel equivalence test,
2e-5 relative: the same fp32 sums grouped differently over 3 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, free_port, read_metrics, run_launcher, tiny_model_args


def _mpirun(nprocs: int, args: list[str]) -> subprocess.CompletedProcess:
    mpirun = Path(sys.executable).parent / "mpirun"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_COMM"))}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(mpirun), "-np", str(nprocs), "--oversubscribe", "--bind-to", "none",
           "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", "-x", "PATH",
           sys.executable, str(REPO / "pretrain_samoe.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_mpirun_two_ranks_match_one_process(tmp_path, tiny_corpus):
    corpus, tok = tiny_corpus
    common = ["--num-experts", "4", "--samoe-pool-size", "2", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", "3", "--lr", "3e-3"]
    one = tmp_path / "one.jsonl"
    out = run_launcher(1, tiny_model_args(tmp_path, corpus, tok, *common, "--metrics-file", str(one)))
    assert out.returncode == 0, out.stderr[-3000:]
    two = tmp_path / "two.jsonl"
    out = _mpirun(2, tiny_model_args(tmp_path, corpus, tok, *common, "--expert-model-parallel-size", "2",
                                     "--metrics-file", str(two)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # EP=2 needs a world of 2: each rank running alone (world 1) would stop at the layout check
    assert "does not divide the world size" not in out.stderr
    want = [r["lm_loss"] for r in read_metrics(one, "train")]
    got = [r["lm_loss"] for r in read_metrics(two, "train")]
    assert len(got) == len(want) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= 2e-5 * abs(a), (want, got)
    assert read_metrics(two, "train")[0]["consumed_samples"] == 8  # the global batch, not a per-rank one
