"""The supervisor's signals: handlers that only queue the signal and wake the main loop.

As in gunicorn's arbiter, nothing runs in signal context but an append and
a write to a self-pipe; the loop sleeps in `select` on that pipe, drains the
queue and dispatches each signal to its handler in plain code.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType

__all__ = ["SUPERVISOR_SIGNALS", "SignalQueue"]

SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
)


class SignalQueue:
    """The queued signals and the self-pipe that wakes the loop when one arrives."""

    def __init__(self) -> None:
        self._signals: deque[int] = deque()
        self._pipe: tuple[int, int] | None = None

    def install(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, self._queue)

    def remove(self) -> None:
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.close()

    def close(self) -> None:
        """Close the pipe and forget queued signals (also in a freshly forked child)."""
        self._signals.clear()
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _queue(self, signum: int, _frame: FrameType | None) -> None:
        """The only code that runs in signal context: queue, and wake the loop."""
        self._signals.append(signum)
        if self._pipe is not None:
            # A full pipe means the loop is awake already.
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b".")

    def sleep(self, timeout: float) -> None:
        """Wait until a signal arrives or `timeout` passes."""
        assert self._pipe is not None
        readable, _, _ = select.select([self._pipe[0]], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):  # raised once drained
                while os.read(self._pipe[0], 512):
                    pass

    def dispatch(self, handlers: Mapping[signal.Signals, Callable[[], None]]) -> None:
        """Run the handler of each queued signal, oldest first."""
        while self._signals:
            handlers[signal.Signals(self._signals.popleft())]()
