"""The pre-fork supervisor: starts the worker processes, keeps them alive, stops them.

Modelled on gunicorn's arbiter. The supervisor holds no delivery logic and
writes no SQL: it forks `settings.workers` OS processes, watches them, and
calls the store for two things only, the schema check before it forks and
`rescue(owner=...)` after a worker died, so the jobs that worker held are
sent again at once instead of after their lease expires.

Signals (the handlers only queue the signal and wake the main loop, which
dispatches to the `handle_*` methods):

- SIGTERM, SIGINT: graceful stop. No new workers; every worker gets SIGTERM
  and has `shutdown_timeout` + `kill_grace` seconds to finish its in-flight
  sends and release what it had not started; stragglers are SIGKILLed and
  their jobs rescued. Exit code 0.
- A second SIGTERM/SIGINT during a graceful stop, or SIGQUIT: immediate
  stop. Every worker is SIGKILLed and its jobs rescued (the interrupted
  attempts are counted, as after a crash). Exit code 1 (`EXIT_FORCED`), so
  that systemd and the operator see that sends were cut off.
- SIGHUP: reload. The settings are read again from the same sources; if
  they are invalid or the database check fails, the error is logged and the
  current workers keep running. Otherwise a new generation of workers starts
  with the new settings and the old generation is stopped gracefully.
- SIGCHLD: reap exited workers.

Beside the workers, the supervisor runs the sidecar HTTP server
(`mailqd.daemon.sidecar`: `/metrics`, `/healthz`, `/stats`) in two threads,
and gives the workers a fresh directory for their metric files
(`mailqd.metrics`), removed when it exits. Under systemd (`Type=notify`) it
sends READY=1, RELOADING=1 and STOPPING=1, a STATUS= line with a summary,
and WATCHDOG=1 at half the watchdog interval when `WatchdogSec=` is set.

A worker that dies unexpectedly is replaced after a delay that doubles with
each consecutive quick death (`RestartBackoff`), so a crash loop does not
spin the CPU or hammer the database. A worker that exits with
`WORKER_BOOT_ERROR` (its configuration or the schema cannot work) stops the
supervisor with that exit code instead: restarting it cannot help. A worker
whose heartbeat is older than `heartbeat_timeout` is hung: it gets SIGTERM,
then SIGKILL `kill_grace` seconds later, and is replaced like a crashed one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

import structlog

from mailqd import metrics
from mailqd.config import Settings
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.sidecar import ForkLock, Sidecar
from mailqd.errors import ConfigError, MailqError, SchemaError
from mailqd.store import Store, check_schema, is_postgresql
from mailqd.transport import redact_url, tls_verification_off

__all__ = [
    "EXIT_FORCED",
    "EXIT_OK",
    "KILL_GRACE",
    "WORKER_BOOT_ERROR",
    "RestartBackoff",
    "SettingsLoader",
    "Supervisor",
    "WorkerEntry",
    "WorkerProcess",
    "open_store",
]

WorkerEntry = Callable[[Settings, WorkerIdentity, Heartbeat], int]
"""A worker's main function: runs until SIGTERM, returns the process exit code."""

SettingsLoader = Callable[[], Settings]
"""Reads the settings again from their sources (file, environment, flags), for SIGHUP."""

EXIT_OK = 0
EXIT_FORCED = 1
WORKER_BOOT_ERROR = 3
"""Exit code of a worker that cannot work at all (config, schema); the supervisor stops with it."""

KILL_GRACE = 5.0
"""Seconds a worker gets after SIGTERM (beyond `shutdown_timeout` when stopping) before SIGKILL."""

TICK = 1.0
"""Longest sleep of the main loop: how often heartbeats are checked when nothing happens."""

SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
)
# Ctrl-C and a terminal hangup reach every process of the foreground group;
# stopping and reloading workers is the supervisor's decision, not theirs.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP)
DB_CONNECT_TIMEOUT = 5
RESCUE_BATCH = 1000
FORK_LOCK_WAIT = 0.2
"""Longest wait for the sidecar's database thread to finish a query before a fork; else retried."""

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
    settings: Settings
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


class Supervisor:
    """Forks and watches the worker processes; see the module docstring for the behaviour.

    `worker_entry` defaults to `mailqd.daemon.worker.run_worker`; tests pass
    stand-ins. `load_settings` re-reads the configuration on SIGHUP (without
    it, SIGHUP restarts the workers with the same settings). `notify_socket`
    is systemd's `NOTIFY_SOCKET`, for `Type=notify` units, and
    `watchdog_seconds` its watchdog interval (`WATCHDOG_USEC`), if any.
    """

    def __init__(
        self,
        settings: Settings,
        load_settings: SettingsLoader | None = None,
        worker_entry: WorkerEntry | None = None,
        *,
        kill_grace: float = KILL_GRACE,
        backoff: RestartBackoff | None = None,
        notify_socket: str | None = None,
        watchdog_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.kill_grace = kill_grace
        self.backoff = backoff or RestartBackoff()
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 0
        self.stopping = False
        self.exit_code = EXIT_OK
        self.nonce = secrets.token_hex(4)
        self.hostname = socket.gethostname()
        self._load_settings = load_settings
        self._worker_entry = worker_entry
        self._notify_socket = notify_socket
        self._watchdog_seconds = watchdog_seconds
        self._watchdog_due = 0.0
        self._status_sent: str | None = None
        self.worker_deaths = 0
        self.jobs_given_back = 0
        self.started_at = time.time()
        self.status = self._pool_status()
        self._fork_lock = ForkLock()
        self._sidecar: Sidecar | None = None
        self._metrics_dir: str | None = None
        self._spawn_at: dict[int, float] = {}
        self._signals: deque[int] = deque()
        self._pipe: tuple[int, int] | None = None
        self._stores: dict[str, Store] = {}

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Check the database, start the workers and supervise them until stopped.

        Returns the exit code. Raises `StoreError` (schema outdated, database
        unavailable) before any worker is started.
        """
        revision = self.check_database(self.settings)
        self._resolve_worker_entry()
        self._start_sidecar()
        self._install_signal_handlers()
        try:
            log.info(
                "mailqd starting",
                pid=os.getpid(),
                workers=self.settings.workers,
                database=redact_url(self.settings.database_url),
                schema=revision,
            )
            warn_if_tls_unverified(self.settings)
            self._start_generation(self.settings)
            self._notify("READY=1")
            self._main_loop()
        except BaseException:
            self._kill_all_now()
            raise
        finally:
            self._remove_signal_handlers()
            self._stop_sidecar()
            self._close_stores()
        log.info("mailqd stopped", exit_code=self.exit_code)
        return self.exit_code

    def check_database(self, settings: Settings) -> str:
        """The schema revision, or `StoreError` if the database cannot be used by these workers."""
        return check_schema(self._store(settings.database_url).engine)

    def _main_loop(self) -> None:
        while self.workers or not self.stopping:
            self.status = self._pool_status()
            self._tell_systemd()
            self._sleep(self._next_timeout())
            self._dispatch_signals()
            self.reap_workers()
            if not self.stopping:
                self.murder_hung_workers()
                self.spawn_due_workers()
            self.kill_overdue_workers()

    def _resolve_worker_entry(self) -> None:
        """The real worker is imported here, in the parent, once: not by every child."""
        if self._worker_entry is None:
            from mailqd.daemon.worker import run_worker

            self._worker_entry = run_worker

    @property
    def worker_entry(self) -> WorkerEntry:
        assert self._worker_entry is not None, "run() resolves the worker entry first"
        return self._worker_entry

    # -- signals ---------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, self._queue_signal)

    def _remove_signal_handlers(self) -> None:
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _queue_signal(self, signum: int, _frame: FrameType | None) -> None:
        """The only code that runs in signal context: queue, and wake the loop."""
        self._signals.append(signum)
        if self._pipe is not None:
            # A full pipe means the loop is awake already.
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b".")

    def _sleep(self, timeout: float) -> None:
        """Wait until a signal arrives or `timeout` passes."""
        assert self._pipe is not None
        readable, _, _ = select.select([self._pipe[0]], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):  # raised once drained
                while os.read(self._pipe[0], 512):
                    pass

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = list(self._spawn_at.values())
        if self._watchdog_seconds:
            deadlines.append(self._watchdog_due)
        deadlines += [
            w.kill_at for w in self.workers.values() if w.kill_at is not None and not w.killed
        ]
        return max(0.0, min([TICK, *(d - now for d in deadlines)]))

    def _dispatch_signals(self) -> None:
        handlers = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGCHLD: self.handle_chld,
        }
        while self._signals:
            handlers[signal.Signals(self._signals.popleft())]()

    def handle_term(self) -> None:
        self.begin_stop("SIGTERM")

    def handle_int(self) -> None:
        self.begin_stop("SIGINT")

    def handle_quit(self) -> None:
        self.stop_now("SIGQUIT")

    def handle_hup(self) -> None:
        if self.stopping:
            log.info("reload ignored: stopping")
            return
        self.reload()

    def handle_chld(self) -> None:
        self.reap_workers()

    # -- stopping and reloading ----------------------------------------------

    def begin_stop(self, reason: str) -> None:
        """Graceful stop; asked a second time, the stop becomes immediate."""
        if self.stopping:
            self.stop_now(f"{reason} during graceful stop")
            return
        self.stopping = True
        self._spawn_at.clear()
        self._notify("STOPPING=1")
        log.info("stopping gracefully", reason=reason, workers=len(self.workers))
        for worker in self.workers.values():
            self._retire(worker)

    def stop_now(self, reason: str) -> None:
        """Immediate stop: SIGKILL every worker; the reaper gives their jobs back."""
        self.stopping = True
        self._spawn_at.clear()
        if self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FORCED
        log.warning("stopping immediately", reason=reason, workers=len(self.workers))
        for worker in self.workers.values():
            worker.retiring = True
            self._kill(worker)

    def reload(self) -> None:
        """Re-read the settings; on success replace the workers, else keep the current ones."""
        self._notify("RELOADING=1")
        log.info("reloading configuration")
        try:
            settings = self._load_settings() if self._load_settings else self.settings
            self.check_database(settings)
        except MailqError as exc:
            log.error("reload failed; keeping the current configuration", error=str(exc))
        else:
            old = list(self.workers.values())
            self._reconfigure_logging(settings)
            warn_if_tls_unverified(settings)
            if settings.metrics_listen != self.settings.metrics_listen:
                log.warning(
                    "metrics_listen changed; the sidecar keeps its address until mailqd restarts",
                    listening=self._sidecar.address if self._sidecar else None,
                )
            self._start_generation(settings)
            for worker in old:
                self._retire(worker)
            log.info("configuration reloaded", generation=self.generation, workers=settings.workers)
        self._notify("READY=1")

    @staticmethod
    def _reconfigure_logging(settings: Settings) -> None:
        from mailqd.logging import configure_logging

        configure_logging(settings)

    def _retire(self, worker: WorkerProcess) -> None:
        """Ask a worker to finish: it gets its shutdown timeout to end in-flight sends."""
        worker.retiring = True
        if worker.kill_at is None:
            self._terminate(worker, grace=worker.settings.shutdown_timeout + self.kill_grace)

    def _terminate(self, worker: WorkerProcess, grace: float) -> None:
        worker.kill_at = time.monotonic() + grace
        self._send(worker, signal.SIGTERM)

    def _kill(self, worker: WorkerProcess) -> None:
        if not worker.killed:
            worker.killed = True
            self._send(worker, signal.SIGKILL)

    @staticmethod
    def _send(worker: WorkerProcess, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # already dead; the reaper sees it
            os.kill(worker.pid, signum)

    def _kill_all_now(self) -> None:
        """Last resort when the supervisor itself fails: leave no orphaned worker behind."""
        for worker in list(self.workers.values()):
            self._kill(worker)
            with contextlib.suppress(ChildProcessError):  # reaped already
                os.waitpid(worker.pid, 0)
            self._give_back_jobs(worker)
        self.workers.clear()

    # -- watching the workers --------------------------------------------------

    def reap_workers(self) -> None:
        """Collect every exited child; react to each worker's exit."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, os.waitstatus_to_exitcode(status))

    def _worker_exited(self, worker: WorkerProcess, code: int) -> None:
        worker.heartbeat.close()
        if self._metrics_dir is not None:
            metrics.process_dead(worker.pid, self._metrics_dir)
        lifetime = time.monotonic() - worker.started_at
        expected = worker.retiring or self.stopping
        (log.info if expected and code == 0 else log.warning)(
            "worker exited",
            pid=worker.pid,
            slot=worker.slot,
            generation=worker.generation,
            lifetime=round(lifetime, 3),
            **_describe_exit(code),
        )
        self._give_back_jobs(worker)
        if expected:
            return
        self.worker_deaths += 1
        if code == WORKER_BOOT_ERROR:
            log.error("a worker failed to boot; stopping mailqd", pid=worker.pid)
            self.exit_code = WORKER_BOOT_ERROR
            self.begin_stop("worker boot error")
        elif worker.generation == self.generation:
            self._schedule_replacement(worker, lifetime)

    def _schedule_replacement(self, worker: WorkerProcess, lifetime: float) -> None:
        delay = self.backoff.delay_after(lifetime)
        self._spawn_at[worker.slot] = time.monotonic() + delay
        log.warning(
            "worker restart scheduled",
            slot=worker.slot,
            delay=round(delay, 3),
            quick_deaths=self.backoff.quick_deaths,
        )

    def _give_back_jobs(self, worker: WorkerProcess) -> None:
        """Return the jobs a dead worker held to the queue now, not when their lease expires."""
        owner = worker.identity.owner
        try:
            store = self._store(worker.settings.database_url)
            rescued = store.rescue(owner=owner, limit=RESCUE_BATCH)
            total = len(rescued)
            while len(rescued) == RESCUE_BATCH:
                rescued = store.rescue(owner=owner, limit=RESCUE_BATCH)
                total += len(rescued)
        except MailqError as exc:
            log.error(
                "could not give back a dead worker's jobs; they return when their lease expires",
                owner=owner,
                error=str(exc),
            )
            return
        if total:
            self.jobs_given_back += total
            log.warning("jobs given back", pid=worker.pid, owner=owner, count=total)

    def murder_hung_workers(self) -> None:
        """SIGTERM each worker whose heartbeat is too old; `kill_overdue_workers` follows up."""
        for worker in self.workers.values():
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
                self._terminate(worker, grace=self.kill_grace)

    def kill_overdue_workers(self) -> None:
        """SIGKILL workers that did not exit by their deadline after SIGTERM."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_at is not None and not worker.killed and now >= worker.kill_at:
                log.warning("worker did not stop in time; killing it", pid=worker.pid)
                self._kill(worker)

    # -- starting workers ------------------------------------------------------

    def _start_generation(self, settings: Settings) -> None:
        self.generation += 1
        self.settings = settings
        self._spawn_at = dict.fromkeys(range(settings.workers), 0.0)
        self.spawn_due_workers()

    def spawn_due_workers(self) -> None:
        now = time.monotonic()
        for slot, due in sorted(self._spawn_at.items()):
            if due <= now:
                del self._spawn_at[slot]
                self.spawn_worker(slot)

    def owner_for(self, pid: int) -> str:
        """The lease owner name of the worker with this pid (parent and child agree on it)."""
        return f"{self.hostname}:{self.nonce}:{pid}"

    def spawn_worker(self, slot: int) -> None:
        """Fork one worker for `slot`. Never returns in the child."""
        if not self._fork_lock.acquire(timeout=FORK_LOCK_WAIT):
            # The sidecar is in a slow query (a database that does not answer):
            # try again on the next turn rather than block the loop.
            self._spawn_at[slot] = time.monotonic() + FORK_LOCK_WAIT
            return
        heartbeat = Heartbeat()
        settings = self.settings
        _flush_stdio()
        # Signals stay blocked across fork so the child cannot run the parent's handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_worker(slot, heartbeat, settings, old_mask)
        except OSError as exc:
            heartbeat.close()
            delay = self.backoff.delay_after(0.0)
            self._spawn_at[slot] = time.monotonic() + delay
            log.error("could not fork a worker", slot=slot, error=str(exc), retry_in=delay)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self._fork_lock.release()
        identity = WorkerIdentity(index=slot, owner=self.owner_for(pid))
        self.workers[pid] = WorkerProcess(
            pid, identity, heartbeat, settings, self.generation, time.monotonic()
        )
        log.info(
            "worker started", pid=pid, slot=slot, generation=self.generation, owner=identity.owner
        )

    def _become_worker(
        self,
        slot: int,
        heartbeat: Heartbeat,
        settings: Settings,
        old_mask: Iterable[int],
    ) -> NoReturn:
        """The child side of the fork: shed the supervisor's state, run the worker, exit.

        Ends in `os._exit` whatever happens, so the child never unwinds into
        the supervisor's stack (its loop, its `finally` blocks, click).
        """
        code = EXIT_FORCED
        try:
            self._shed_supervisor_state(heartbeat)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            identity = WorkerIdentity(index=slot, owner=self.owner_for(os.getpid()))
            heartbeat.beat()
            code = self.worker_entry(settings, identity, heartbeat)
        except (ConfigError, SchemaError) as exc:
            log.error("worker cannot start", pid=os.getpid(), error=str(exc))
            code = WORKER_BOOT_ERROR
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_FORCED
        except BaseException:
            log.exception("worker crashed", pid=os.getpid())
            code = EXIT_FORCED
        finally:
            _flush_stdio()
            os._exit(code)

    def _shed_supervisor_state(self, own_heartbeat: Heartbeat) -> None:
        for signum in SUPERVISOR_SIGNALS:
            ignored = signum in WORKER_IGNORED_SIGNALS
            signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
        self._signals.clear()
        self._close_pipe()
        if self._sidecar is not None:
            self._sidecar.forget_after_fork()
            self._sidecar = None
        for worker in self.workers.values():
            if worker.heartbeat is not own_heartbeat:
                worker.heartbeat.close()
        self.workers.clear()
        # The parent's pooled connections must not be used or closed from here.
        for store in self._stores.values():
            store.engine.dispose(close=False)
        self._stores.clear()

    # -- the sidecar and its metrics ---------------------------------------------

    def _start_sidecar(self) -> None:
        """Fresh metric files for this run, and the HTTP server; `ConfigError` if it cannot bind."""
        self._metrics_dir = metrics.make_multiprocess_dir()
        metrics.use_multiprocess_dir(self._metrics_dir)
        sidecar = Sidecar(
            self.settings.metrics_listen,
            status=lambda: self.status,
            database_url=lambda: self.settings.database_url,
            open_store=open_store,
            metrics_dir=self._metrics_dir,
            fork_lock=self._fork_lock,
        )
        try:
            sidecar.start()
        except BaseException:
            self._remove_metrics_dir()
            raise
        self._sidecar = sidecar

    def _stop_sidecar(self) -> None:
        if self._sidecar is not None:
            self._sidecar.stop()
            self._sidecar = None
        self._remove_metrics_dir()

    def _remove_metrics_dir(self) -> None:
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None

    def _pool_status(self) -> metrics.PoolStatus:
        """What the sidecar reports: a new copy each loop turn, never a dict changing under it."""
        running = sum(
            1
            for w in self.workers.values()
            if not w.retiring and w.kill_at is None and w.generation == self.generation
        )
        return metrics.PoolStatus(
            workers=running,
            desired=self.settings.workers,
            stopping=self.stopping,
            worker_deaths=self.worker_deaths,
            jobs_given_back=self.jobs_given_back,
            started_at=self.started_at,
        )

    # -- the supervisor's own store and systemd -------------------------------

    def _store(self, url: str) -> Store:
        """The supervisor's store for `url`: created lazily, in the parent, never used by a child.

        One per URL, because after a reload that changes `database_url` the
        old generation's jobs still live in the old database.
        """
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = open_store(url)
        return store

    def _close_stores(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    def _tell_systemd(self) -> None:
        """The watchdog ping, and STATUS= whenever the sidecar's summary changed."""
        if not self._notify_socket:
            return
        if self._watchdog_seconds and time.monotonic() >= self._watchdog_due:
            self._notify("WATCHDOG=1")
            self._watchdog_due = time.monotonic() + self._watchdog_seconds / 2
        summary = self._sidecar.summary if self._sidecar is not None else None
        if summary and summary != self._status_sent and not self.stopping:
            self._notify(f"STATUS={summary}")
            self._status_sent = summary

    def _notify(self, state: str) -> None:
        """Tell systemd (`Type=notify`) about readiness, reloads and stopping."""
        if not self._notify_socket:
            return
        address = self._notify_socket
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("could not notify systemd", state=state, error=str(exc))


def open_store(url: str) -> Store:
    """A store whose connection attempts give up after a few seconds.

    The supervisor (and `--check-config`) must not freeze on a database host
    that drops packets: the main loop has workers to watch.
    """
    options: dict[str, Any] = {}
    if is_postgresql(url):
        options["connect_args"] = {"connect_timeout": DB_CONNECT_TIMEOUT}
    return Store.from_url(url, application_name="mailqd-supervisor", **options)


def warn_if_tls_unverified(settings: Settings) -> None:
    """One warning when the SMTP server's certificate is not checked (`tls_verify=false`).

    Logged by the supervisor when it starts or reloads, not by each worker
    or connection, so it stands out instead of scrolling by.
    """
    if tls_verification_off(settings.smtp_url):
        log.warning(
            "TLS certificate verification is off (tls_verify=false in smtp_url): anyone on "
            "the network path can pose as the mail server and read the mail and the SMTP "
            "password; remove tls_verify=false or trust the server's CA instead",
            smtp=redact_url(settings.smtp_url),
        )


def _describe_exit(code: int) -> dict[str, int | str]:
    """`waitstatus_to_exitcode` gives -N for death by signal N; name the signal."""
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": str(-code)}
    return {"exit_code": code}


def _flush_stdio() -> None:
    """Flush before fork (or the child repeats buffered output) and before `os._exit`."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to lose
            stream.flush()
