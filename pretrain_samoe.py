#!/usr/bin/env python
"""Pretrain a dense, standard-MoE or SaMoE GPT with megatron-core and DeepSpeed.

    deepspeed --num_gpus 2 pretrain_samoe.py --ds_config examples/ds_config_cpu.json \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
        --num-experts 8 --samoe-pool-size 8 --data-path data/shakespeare.jsonl \
        --tokenizer-model data/spm.model --train-iters 100

Flags follow Megatron's names; `--help` lists them. The training loop lives in samoe_dist.training.
"""

import atexit
import os
import signal
import sys
import threading
import time

from samoe_dist import cpu_compat
from samoe_dist.arguments import parse_args
from samoe_dist.config import ConfigError


def main(argv=None) -> int:
    cpu_compat.apply()
    cfg, ds_config = parse_args(argv)
    from samoe_dist.parallel import destroy
    from samoe_dist.training import pretrain

    try:
        pretrain(cfg, ds_config)
        # Tear the process groups down while the interpreter is whole: left to exit-time cleanup,
        # gloo's threads can abort the process ("terminate called without an active exception").
        destroy()
    except (ConfigError, FileNotFoundError, FloatingPointError) as exc:
        report_error(exc)
        return 2
    return 0


# How long a rank other than 0 waits, after a bad-input error, to be stopped by the launcher.
ERROR_WAIT_S = 20.0


def report_error(exc: BaseException) -> None:
    """Print one line for a problem with the input: rank 0's, once.

    Every rank usually hits the same check. Rank 0 prints the line and exits; the launcher
    (deepspeed, torchrun, mpirun) then stops the other ranks. Were they to exit at once too, the
    launcher could stop rank 0 before its line is out, and the user would see no reason at all, so
    they wait ERROR_WAIT_S instead, with SIGTERM's default action back (training's handler only
    records it). A rank still running after the wait hit a problem of its own (a file missing on
    its node, say), or runs under a launcher that does not stop the others: it prints its own line,
    naming its rank.
    """
    # RANK is set by deepspeed, torchrun and our SLURM script, and under mpirun once DeepSpeed has
    # initialised; before that, MPI's own variables (Open MPI, then MPICH and Intel MPI) say it
    rank = int(next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), 0))
    if rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(ERROR_WAIT_S)
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"pretrain_samoe.py: error{where}: {exc}", file=sys.stderr, flush=True)


def exit_without_teardown(code: int) -> None:
    """End the process once the run is over, without the interpreter's teardown.

    Finalising the module graphs of torch (its compiler stack included, which megatron-core
    imports), DeepSpeed and megatron-core costs ~2 s of CPU a process (`import torch._dynamo` and
    exit alone: 1.8 s on a 2-core CPU) and does nothing a finished run needs: its metrics file and
    TensorBoard writer are closed, checkpoints are complete on disk, the process groups are
    destroyed. What exit does that matters still happens, in the same order: non-daemon threads
    are waited for (if one is alive, this is a plain ``sys.exit``), then the atexit handlers run
    (logging's flush, whatever a library registered), then stdout and stderr are flushed. Under
    MPI (mpi4py loaded) it is a plain ``sys.exit`` too: mpi4py calls MPI_Finalize from the
    interpreter's C-level teardown, and mpirun counts a rank that leaves without it as failed.
    """
    main_thread = threading.main_thread()
    if "mpi4py.MPI" in sys.modules or any(
            t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_FinalizeEx runs first; a stable CPython API since 2.x
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
