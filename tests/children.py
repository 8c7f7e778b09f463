"""Forked children in tests: waiting for one to exit, with a deadline."""

from __future__ import annotations

import os
import signal
import time


def exit_code(pid: int, timeout: float) -> int:
    """The child's exit code, polling with a deadline (waitpid itself cannot time out).

    A child still running at the deadline is killed (so no test leaves one
    behind) and the test fails.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not exit within {timeout} s")
