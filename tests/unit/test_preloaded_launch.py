"""tests/helpers.run_preloaded, which most integration tests start their ranks with: each process
gets its own environment and arguments, output comes back per process in process order, and when
one process fails the others are stopped (SIGTERM, then SIGKILL) as a launcher stops them."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.helpers import rank_envs, run_preloaded

SCRIPT = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
print(f"out {rank} of {os.environ['WORLD_SIZE']}: {sys.argv[1:]} {__name__}", flush=True)
print(f"err {rank}", file=sys.stderr, flush=True)
if os.environ.get("IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready = os.environ.get("READY_DIR")
if rank == int(os.environ.get("FAIL_RANK", "-1")):
    # fail only once every other process has printed and set its signal handling, so what the
    # test sees is the stopping of running processes, not a race with their start
    others = [os.path.join(ready, str(r)) for r in range(int(os.environ["WORLD_SIZE"])) if r != rank]
    while ready and not all(os.path.exists(p) for p in others):
        time.sleep(0.01)
    sys.exit(3)
if ready:
    open(os.path.join(ready, str(rank)), "w").close()
if os.environ.get("HANG") == "1":
    time.sleep(600)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def test_each_process_runs_the_script_as_main_with_its_own_environment(script):
    run = run_preloaded(script, ["--flag", "x"], rank_envs(3), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"out {r} of 3: ['--flag', 'x'] __main__" for r in range(3)]
    assert run.stderr.splitlines() == ["err 0", "err 1", "err 2"]


def test_a_failed_process_stops_the_others_and_gives_its_exit_code(script, tmp_path):
    # rank 1 exits 3 once ranks 0 and 2 are sleeping for 600 s: they are sent SIGTERM, and the run
    # ends well inside its 120 s timeout (else TimeoutExpired)
    run = run_preloaded(script, [], rank_envs(3, FAIL_RANK="1", HANG="1", READY_DIR=str(tmp_path)), timeout=120)
    assert run.returncode == 3
    assert run.stdout.splitlines() == [f"out {r} of 3: [] __main__" for r in range(3)]


def test_a_process_ignoring_sigterm_is_killed_after_the_grace(script, tmp_path):
    envs = rank_envs(2, FAIL_RANK="1", HANG="1", IGNORE_TERM="1", READY_DIR=str(tmp_path))
    run = run_preloaded(script, [], envs, timeout=120, grace=1.0)
    assert run.returncode == 3  # the first failure's code, not rank 0's SIGKILL


def test_the_timeout_kills_every_process(script):
    with pytest.raises(subprocess.TimeoutExpired):
        run_preloaded(script, [], rank_envs(2, HANG="1"), timeout=3)


def test_a_killed_process_reports_the_signal(tmp_path):
    path = tmp_path / "die.py"
    path.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    run = run_preloaded(path, [], rank_envs(1), timeout=120)
    assert run.returncode == -signal.SIGKILL
