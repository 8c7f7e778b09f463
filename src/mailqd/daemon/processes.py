"""The supervisor's worker processes: what it knows of each, and how it forks, signals and kills.

A worker is forked with the supervisor's signals blocked, so the child can
never run the parent's handlers; the child sheds the supervisor's state,
runs the worker entry, and ends in `os._exit` whatever happens, so it never
unwinds into the supervisor's stack (its loop, its `finally` blocks, click).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import structlog

from mailqd.config import Settings
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.wakeup import SUPERVISOR_SIGNALS
from mailqd.errors import ConfigError, SchemaError
from mailqd.runtime import Runtime

__all__ = [
    "EXIT_FORCED",
    "WORKER_BOOT_ERROR",
    "RestartBackoff",
    "WorkerEntry",
    "WorkerProcess",
    "describe_exit",
    "fork_worker",
    "kill",
    "kill_overdue",
    "murder_hung",
    "terminate",
]

WorkerEntry = Callable[[Runtime, WorkerIdentity, Heartbeat], int]
"""A worker's main function: runs until SIGTERM, returns the process exit code.

It is given the supervisor's `Runtime` (`runtime.settings` are the settings)."""

EXIT_FORCED = 1
WORKER_BOOT_ERROR = 3
"""Exit code of a worker that cannot work at all (config, schema); the supervisor stops with it."""

# Ctrl-C and a terminal hangup reach every process of the foreground group;
# stopping and reloading workers is the supervisor's decision, not theirs.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP)

log = structlog.get_logger(component="supervisor")


class RestartBackoff:
    """How long to wait before replacing a worker that died.

    The first quick death waits `initial` seconds, each consecutive quick death
    doubles the wait up to `cap`. A worker that lived longer than
    `stable_after` seconds counts as healthy, and its death starts the
    sequence over. One sequence for the whole pool: when workers keep dying,
    the cause is nearly always shared (the database, the mail server, a
    poison message), and a per-slot delay would just multiply the restarts.
    """

    def __init__(self, initial: float = 0.1, cap: float = 30.0, stable_after: float = 60.0) -> None:
        self.initial = initial
        self.cap = cap
        self.stable_after = stable_after
        self.quick_deaths = 0

    def delay_after(self, lifetime: float) -> float:
        """Record a death after `lifetime` seconds of life; return the restart delay."""
        if lifetime > self.stable_after:
            self.quick_deaths = 0
        delay = min(self.cap, self.initial * 2.0**self.quick_deaths)
        if delay < self.cap:
            self.quick_deaths += 1
        return delay


@dataclass(slots=True)
class WorkerProcess:
    """What the supervisor knows about one forked worker."""

    pid: int
    identity: WorkerIdentity
    heartbeat: Heartbeat
    runtime: Runtime
    generation: int
    started_at: float
    retiring: bool = False
    """Asked to stop (shutdown or reload): its exit is expected and it is not replaced."""
    kill_at: float | None = None
    """Monotonic time at which it is SIGKILLed if still alive; set when SIGTERM is sent."""
    killed: bool = False

    @property
    def slot(self) -> int:
        return self.identity.index

    @property
    def settings(self) -> Settings:
        """The settings of the generation it was started in."""
        return self.runtime.settings


def terminate(worker: WorkerProcess, grace: float) -> None:
    """SIGTERM now, and a deadline after which `kill` follows."""
    worker.kill_at = time.monotonic() + grace
    _send(worker, signal.SIGTERM)


def kill(worker: WorkerProcess) -> None:
    if not worker.killed:
        worker.killed = True
        _send(worker, signal.SIGKILL)


def _send(worker: WorkerProcess, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already dead; the reaper sees it
        os.kill(worker.pid, signum)


def murder_hung(workers: Iterable[WorkerProcess], grace: float) -> None:
    """SIGTERM each worker whose heartbeat is older than its `heartbeat_timeout`."""
    for worker in workers:
        if worker.kill_at is not None:
            continue
        silent = worker.heartbeat.seconds_since_beat()
        if silent > worker.settings.heartbeat_timeout:
            log.warning(
                "worker hung; terminating it",
                pid=worker.pid,
                slot=worker.slot,
                silent_seconds=round(silent, 1),
                heartbeat_timeout=worker.settings.heartbeat_timeout,
            )
            terminate(worker, grace=grace)


def kill_overdue(workers: Iterable[WorkerProcess]) -> None:
    """SIGKILL workers that did not exit by their deadline after SIGTERM."""
    now = time.monotonic()
    for worker in workers:
        if worker.kill_at is not None and not worker.killed and now >= worker.kill_at:
            log.warning("worker did not stop in time; killing it", pid=worker.pid)
            kill(worker)


def fork_worker(
    identity_for: Callable[[int], WorkerIdentity],
    heartbeat: Heartbeat,
    runtime: Runtime,
    entry: WorkerEntry,
    shed_state: Callable[[], None],
) -> int:
    """Fork one worker and return its pid (`OSError` if the fork failed); never returns in it.

    `identity_for(pid)` names the worker (parent and child agree on it);
    `shed_state` drops, in the child, what belongs to the supervisor.
    """
    flush_stdio()
    # Signals stay blocked across fork so the child cannot run the parent's handlers.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _become_worker(identity_for, heartbeat, runtime, entry, shed_state, old_mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid


def _become_worker(
    identity_for: Callable[[int], WorkerIdentity],
    heartbeat: Heartbeat,
    runtime: Runtime,
    entry: WorkerEntry,
    shed_state: Callable[[], None],
    old_mask: Iterable[int],
) -> NoReturn:
    """The child side of the fork: shed the supervisor's state, run the worker, exit."""
    code = EXIT_FORCED
    try:
        for signum in SUPERVISOR_SIGNALS:
            ignored = signum in WORKER_IGNORED_SIGNALS
            signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
        shed_state()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        identity = identity_for(os.getpid())
        heartbeat.beat()
        code = entry(runtime, identity, heartbeat)
    except (ConfigError, SchemaError) as exc:
        log.error("worker cannot start", pid=os.getpid(), error=str(exc))
        code = WORKER_BOOT_ERROR
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_FORCED
    except BaseException:
        log.exception("worker crashed", pid=os.getpid())
        code = EXIT_FORCED
    finally:
        flush_stdio()
        os._exit(code)


def describe_exit(code: int) -> dict[str, int | str]:
    """`waitstatus_to_exitcode` gives -N for death by signal N; name the signal."""
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": str(-code)}
    return {"exit_code": code}


def flush_stdio() -> None:
    """Flush before fork (or the child repeats buffered output) and before `os._exit`."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to lose
            stream.flush()
