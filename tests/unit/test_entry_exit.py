"""pretrain_samoe.exit_without_teardown: the exit code, the atexit handlers and a live non-daemon
thread's work all survive skipping the interpreter's teardown. pretrain_samoe.report_error: a bad-input
error is one line over all ranks, rank 0's, unless only another rank has the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, error_lines, rank_envs, run_preloaded

SCRIPT = """
import atexit, sys, threading, time
sys.path.insert(0, {repo!r})
from pretrain_samoe import exit_without_teardown
out = {out!r}
atexit.register(lambda: open(out, "a").write("atexit\\n"))
print("buffered stdout, no newline flush", end="")
if {thread}:
    def late():
        time.sleep(0.5)
        open(out, "a").write("thread\\n")
    threading.Thread(target=late, daemon=False).start()
exit_without_teardown({code})
open(out, "a").write("not reached\\n")
"""


@pytest.mark.parametrize("thread", [False, True])
@pytest.mark.parametrize("code", [0, 3])
def test_exit_runs_atexit_waits_for_threads_and_keeps_the_code(tmp_path, thread, code):
    out = tmp_path / "out.txt"
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO), out=str(out), thread=thread, code=code)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == code, run.stderr[-2000:]
    assert run.stdout == "buffered stdout, no newline flush"  # flushed before the process ends
    # a non-daemon thread finishes first (the plain exit path), then the atexit handlers run
    assert out.read_text().splitlines() == (["thread", "atexit"] if thread else ["atexit"])


REPORT = """
import os, sys, time
sys.path.insert(0, {repo!r})
import pretrain_samoe
from samoe_dist.config import ConfigError
pretrain_samoe.ERROR_WAIT_S = float(os.environ["WAIT"])
if os.environ["RANK"] == "0":
    time.sleep(float(os.environ.get("RANK0_LATE", "0")))  # rank 0 reaches the check this much later
if os.environ["RANK"] in os.environ["FAILING"].split(","):
    pretrain_samoe.report_error(ConfigError("--data-path x does not exist"))
    sys.exit(2)
time.sleep(600)  # a rank that passed the check waits in a collective
"""


@pytest.fixture
def report_script(tmp_path):
    path = tmp_path / "report.py"
    path.write_text(REPORT.format(repo=str(REPO)))
    return path


def test_an_error_every_rank_hits_is_one_line_even_if_rank_1_gets_there_first(report_script):
    # rank 1 reaches the check, then rank 0 only 2 s later: rank 1 waits to be stopped, so rank 0's
    # line is the one printed (were rank 1 to exit at once, the launcher would stop rank 0 first)
    run = run_preloaded(report_script, [], rank_envs(2, FAILING="0,1", WAIT="60", RANK0_LATE="2"), timeout=120)
    assert run.returncode == 2
    assert error_lines(run.stderr) == ["pretrain_samoe.py: error: --data-path x does not exist"]


def test_an_error_only_another_rank_hits_is_printed_by_that_rank(report_script):
    run = run_preloaded(report_script, [], rank_envs(3, FAILING="2", WAIT="1"), timeout=120)
    assert run.returncode == 2  # ranks 0 and 1 were stopped
    assert error_lines(run.stderr) == ["pretrain_samoe.py: error (rank 2): --data-path x does not exist"]


def test_sigterm_stops_a_waiting_rank_even_after_training_set_its_handler(report_script):
    # training records SIGTERM to save and exit at the next step; in the error wait it must stop the rank
    # (else rank 1 would print its own line after the 30 s wait, before the SIGKILL at 60 s)
    script = report_script.read_text().replace(
        "pretrain_samoe.ERROR_WAIT_S", "from samoe_dist.training import SigtermFlag; SigtermFlag()\n"
        "pretrain_samoe.ERROR_WAIT_S")
    report_script.write_text(script)
    envs = rank_envs(2, FAILING="0,1", WAIT="30", RANK0_LATE="2")  # rank 1 is waiting when stopped
    run = run_preloaded(report_script, [], envs, timeout=120, grace=60)
    assert run.returncode == 2 and len(error_lines(run.stderr)) == 1
