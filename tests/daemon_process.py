"""Run `mailqd` as a subprocess the way systemd runs it, and watch it from the outside.

The daemon is started in the foreground in a session (and process group) of
its own, configured through `MAILQD_*` environment variables, with stdout and
stderr going to a log file. Tests then wait for conditions with a deadline
(a log event, a number of worker processes, an exit), send signals, and read
worker pids from `/proc`. `close()` always SIGKILLs the whole process group,
so no worker outlives a failed test.

`start_mailqd` runs the real console script; `start_supervisor` runs the same
start-up path (`mailqd.cli.daemon.run_daemon`) in `python -c` with a stand-in
worker function from `standin_workers`, for behaviour the real worker should
never show (crash loops, hangs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
MAILQD = Path(sys.executable).with_name("mailqd")
DEFAULT_TIMEOUT = 15.0
POLL_INTERVAL = 0.02

_SUPERVISOR_SCRIPT = """\
import importlib, sys
from mailqd.cli.daemon import run_daemon
module, _, name = sys.argv[1].partition(":")
entry = getattr(importlib.import_module(module), name)
sys.exit(run_daemon(worker_entry=entry, kill_grace=float(sys.argv[2])))
"""


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any MAILQD_* or systemd variable, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MAILQD_") and key not in ("NOTIFY_SOCKET", "LISTEN_FDS")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["MAILQD_LOG_FORMAT"] = "json"
    # Daemons of parallel tests (and test runs) must not fight over one sidecar
    # port: each gets a free one; `DaemonProcess.sidecar_url` reads it from the log.
    env["MAILQD_METRICS_LISTEN"] = "127.0.0.1:0"
    env.update(extra or {})
    return env


class DaemonProcess:
    """One daemon process under test. Use as a context manager, or call `close()`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    # -- starting and stopping -------------------------------------------------

    def start(self) -> Self:
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "start() the daemon first"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send(self, signum: int) -> None:
        """Signal the supervisor only (as `systemctl kill --kill-who=main` would)."""
        os.kill(self.pid, signum)

    def signal_group(self, signum: int) -> None:
        """Signal the supervisor and every worker, as a terminal's Ctrl-C does."""
        os.killpg(self.pid, signum)

    def signal_worker(self, pid: int, signum: int) -> None:
        """Signal one worker, after checking that it is one of this daemon's children."""
        assert pid in self.worker_pids(), f"{pid} is not a live worker of mailqd {self.pid}"
        os.kill(pid, signum)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The exit code, once the supervisor has exited; fails at the deadline."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"mailqd (pid {self.pid}) still running after {timeout}s\n{self.log_tail()}"
            ) from None

    def close(self) -> None:
        """SIGKILL the whole process group (supervisor and workers) and reap the supervisor."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what it says ----------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- {self.log_path} (last {lines} lines) ---\n{tail}"

    def events(self, event: str | None = None, /, **fields: Any) -> list[dict[str, Any]]:
        """The JSON log records, optionally only those with this event and field values."""
        records = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            if event is not None and record.get("event") != event:
                continue
            if all(record.get(key) == value for key, value in fields.items()):
                records.append(record)
        return records

    def sidecar_url(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """`http://host:port` of the sidecar, once it listens (from its log event)."""
        [event] = self.wait_for_event("sidecar listening", timeout=timeout)[:1]
        return str(event["url"])

    # -- its workers -----------------------------------------------------------

    def worker_pids(self) -> set[int]:
        """Pids of the supervisor's live children (zombies not yet reaped do not count)."""
        return {pid for pid in children_of(self.pid) if process_state(pid) not in (None, "Z")}

    # -- waiting ---------------------------------------------------------------

    def wait_for(
        self,
        condition: Callable[[], T | None],
        what: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        may_exit: bool = False,
    ) -> T:
        """Poll `condition` until it returns something truthy, and return that.

        Fails at the deadline, or as soon as the supervisor has exited
        (unless `may_exit`), with the end of its log in the message.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if not may_exit and self.returncode is not None:
                raise AssertionError(
                    f"mailqd exited with {self.returncode} while waiting for {what}\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def wait_for_event(
        self,
        event: str,
        /,
        *,
        at_least: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """Wait until the log holds `at_least` records of `event` with these field values."""

        def enough() -> list[dict[str, Any]] | None:
            found = self.events(event, **fields)
            return found if len(found) >= at_least else None

        return self.wait_for(enough, f"{at_least} x {event!r} {fields or ''}", timeout)

    def wait_for_workers(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> set[int]:
        """Wait until exactly `count` worker processes are alive; return their pids."""

        def exactly() -> set[int] | None:
            pids = self.worker_pids()
            return pids if len(pids) == count else None

        return self.wait_for(exactly, f"{count} worker processes", timeout)


def start_mailqd(log_path: Path, env: Mapping[str, str], args: Sequence[str] = ()) -> DaemonProcess:
    """Start the real `mailqd` console script with `env` (on top of `daemon_env()`)."""
    return DaemonProcess([str(MAILQD), *args], daemon_env(env), log_path).start()


def start_supervisor(
    log_path: Path, env: Mapping[str, str], worker: str, kill_grace: float = 0.5
) -> DaemonProcess:
    """Start the real start-up path with a stand-in worker, e.g. `"standin_workers:hung"`."""
    argv = [sys.executable, "-c", _SUPERVISOR_SCRIPT, worker, str(kill_grace)]
    return DaemonProcess(argv, daemon_env(env), log_path).start()


class DaemonPool:
    """Starts daemons for one test, each logging to its own file, and kills them all at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[DaemonProcess] = []

    def mailqd(self, env: Mapping[str, str], args: Sequence[str] = ()) -> DaemonProcess:
        """The real `mailqd` command (see `start_mailqd`)."""
        return self._track(start_mailqd(self._next_log(), self._with_tmpdir(env), args))

    def supervisor(
        self, env: Mapping[str, str], worker: str, kill_grace: float = 0.5
    ) -> DaemonProcess:
        """The real start-up path with a stand-in worker (see `start_supervisor`)."""
        return self._track(
            start_supervisor(self._next_log(), self._with_tmpdir(env), worker, kill_grace)
        )

    def close(self) -> None:
        for daemon in self.started:
            daemon.close()

    def _track(self, daemon: DaemonProcess) -> DaemonProcess:
        self.started.append(daemon)
        return daemon

    def _with_tmpdir(self, env: Mapping[str, str]) -> dict[str, str]:
        """Temporary files (metric files, heartbeats) in the test's directory: a daemon
        SIGKILLed at teardown cannot remove them itself."""
        return {"TMPDIR": str(self.directory), **env}

    def _next_log(self) -> Path:
        return self.directory / f"mailqd-{len(self.started) + 1}.log"


# -- /proc --------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (no psutil)."""
    task_dir = Path(f"/proc/{pid}/task")
    try:
        children_files = list(task_dir.glob("*/children"))
    except OSError:
        return set()
    if children_files:
        found: set[int] = set()
        for path in children_files:
            found |= {int(word) for word in _read(path).split()}
        return found
    return {child for child in _all_pids() if parent_of(child) == pid}


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def process_state(pid: int) -> str | None:
    """The one-letter state (R, S, Z, …) of `pid`, or None when it does not exist."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    text = _read(Path(f"/proc/{pid}/stat"))
    if not text:
        return None
    return text[text.rindex(")") + 2 :].split()


def _all_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
