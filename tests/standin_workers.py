"""Stand-in worker entry functions, for supervisor tests that need a worker to misbehave.

Each has the signature of `mailqd.daemon.worker_process.run_worker`. They are run in
a real supervisor process started by `daemon_process.start_supervisor`
(`python -c` around `mailqd.cli.daemon.run_daemon`), so the whole start-up
path is the real one and only the worker's body is replaced.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import structlog

from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.errors import ConfigError
from mailqd.runtime import Runtime

BEAT_INTERVAL = 0.1


def beating(runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """A healthy worker with nothing to do: beats until SIGTERM, then exits 0."""
    stop = _stop_on_sigterm()
    structlog.get_logger().info("stand-in worker running", owner=identity.owner)
    while not stop:
        heartbeat.beat()
        time.sleep(BEAT_INTERVAL)
    return 0


def crash_at_boot(runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """Dies at once with a plain failure: the supervisor should restart it, ever more slowly."""
    return 1


def boot_error(runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """Cannot work with this configuration: the supervisor should stop with exit code 3."""
    raise ConfigError("smtp_url", "stand-in: this worker cannot start")


def hung(runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """Stops beating and ignores SIGTERM, like a stuck event loop: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    structlog.get_logger().info("stand-in worker running", owner=identity.owner)
    while True:
        time.sleep(3600)


def stubborn(runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """Beats, but ignores SIGTERM: a worker stuck in a long send at shutdown."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    structlog.get_logger().info("stand-in worker running", owner=identity.owner)
    while True:
        heartbeat.beat()
        time.sleep(BEAT_INTERVAL)


class _StopFlag:
    def __init__(self) -> None:
        self.set = False

    def __bool__(self) -> bool:
        return self.set

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.set = True


def _stop_on_sigterm() -> _StopFlag:
    flag = _StopFlag()
    signal.signal(signal.SIGTERM, flag)
    return flag
