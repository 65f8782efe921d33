"""pretrain_samoe.exit_without_teardown: the exit code, the atexit handlers and a live non-daemon
thread's work all survive skipping the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

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
