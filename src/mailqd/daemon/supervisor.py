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
  stop. Every worker is SIGKILLed and its jobs rescued (recorded `lost`,
  as after a crash: docs/reliability.md). Exit code 1 (`EXIT_FORCED`), so
  that systemd and the operator see that sends were cut off.
- SIGHUP: reload. The settings are read again from the same sources; if
  they are invalid or the database check fails, the error is logged and the
  current workers keep running. Otherwise a new generation of workers starts
  with the new settings and the old generation is stopped gracefully.
- SIGCHLD: reap exited workers.

Relays kept in the database (`mailqctl relays`) are merged into the
settings at start and at every reload (`mailqd.daemon.relay_sync`); the
main loop looks at their version every 2 s, and a change reloads as
SIGHUP does.

The settings are turned into a `Runtime` (`mailqd.runtime`: the parsed SMTP
URL and password, the secrets box, the DKIM signer, limits, backoff and
screening) once at start and once per successful reload, before forking:
workers inherit it and read no key file or environment themselves.

Its parts: `wakeup` (the signal queue), `processes` (forking, signalling
and killing workers), `systemd` (notify and watchdog) and `sidecar_host`.
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
import signal
import socket
import time
from collections.abc import Callable

import structlog

from mailqd.config import Settings, relay_plan
from mailqd.daemon.giveback import SupervisorStores, open_store
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.processes import (
    EXIT_FORCED,
    WORKER_BOOT_ERROR,
    RestartBackoff,
    WorkerEntry,
    WorkerProcess,
    describe_exit,
    fork_worker,
    kill,
    kill_overdue,
    murder_hung,
    terminate,
)
from mailqd.daemon.relay_sync import RelaySync
from mailqd.daemon.sidecar_host import FORK_LOCK_WAIT, SidecarHost
from mailqd.daemon.systemd import SystemdNotifier
from mailqd.daemon.wakeup import SignalQueue
from mailqd.errors import MailqError
from mailqd.metrics import PoolStatus
from mailqd.runtime import Runtime
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

SettingsLoader = Callable[[], Settings]
"""Reads the settings again from their sources (file, environment, flags), for SIGHUP."""

EXIT_OK = 0

KILL_GRACE = 5.0
"""Seconds a worker gets after SIGTERM (beyond `shutdown_timeout` when stopping) before SIGKILL."""

TICK = 1.0
"""Longest sleep of the main loop: how often heartbeats are checked when nothing happens."""

log = structlog.get_logger(component="supervisor")


class Supervisor:
    """Forks and watches the worker processes; see the module docstring for the behaviour.

    `worker_entry` defaults to `mailqd.daemon.worker_process.run_worker`; tests pass
    stand-ins. `load_settings` re-reads the configuration on SIGHUP (without
    it, SIGHUP restarts the workers with the same settings). `runtime` is the
    one already built from `settings` (else `run` builds it). `notify_socket`
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
        runtime: Runtime | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
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
        self._systemd = SystemdNotifier(notify_socket, watchdog_seconds)
        self.worker_deaths = 0
        self.jobs_given_back = 0
        self.started_at = time.time()
        self.status = self._pool_status()
        self._sidecar = SidecarHost()
        self._spawn_at: dict[int, float] = {}
        self._signals = SignalQueue()
        self._stores = SupervisorStores()
        self._relays = RelaySync()

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Check the database, start the workers and supervise them until stopped.

        Returns the exit code. Raises `StoreError` (schema outdated, database
        unavailable) or `ConfigError` (a runtime part cannot be built) before
        any worker is started.
        """
        revision = self.check_database(self.settings)
        runtime = self._relays.runtime(self.settings, built=self.runtime)
        self._resolve_worker_entry()
        self._sidecar.start(
            self.settings.metrics_listen,
            status=lambda: self.status,
            database_url=lambda: self.settings.database_url,
            open_store=open_store,
            relay_plan=lambda: relay_plan(self.settings),
        )
        self._signals.install()
        try:
            log.info(
                "mailqd starting",
                pid=os.getpid(),
                workers=self.settings.workers,
                database=redact_url(self.settings.database_url),
                schema=revision,
            )
            warn_if_tls_unverified(self.settings)
            self._start_generation(runtime)
            self._systemd.notify("READY=1")
            self._main_loop()
        except BaseException:
            self._kill_all_now()
            raise
        finally:
            self._signals.remove()
            self._sidecar.stop()
            self._stores.close()
            self._relays.close()
        log.info("mailqd stopped", exit_code=self.exit_code)
        return self.exit_code

    def check_database(self, settings: Settings) -> str:
        """The schema revision, or `StoreError` if the database cannot be used by these workers."""
        return self._stores.check_database(settings.database_url)

    def _main_loop(self) -> None:
        while self.workers or not self.stopping:
            self.status = self._pool_status()
            self._systemd.tell(self._sidecar.summary, stopping=self.stopping)
            self._signals.sleep(self._next_timeout())
            self._signals.dispatch(self._handlers())
            self.reap_workers()
            if not self.stopping and self._relays.changed(self.settings.database_url):
                self.reload("relays changed in the database")
            if not self.stopping:
                self.murder_hung_workers()
                self.spawn_due_workers()
            self.kill_overdue_workers()

    def _resolve_worker_entry(self) -> None:
        """The real worker is imported here, in the parent, once: not by every child."""
        if self._worker_entry is None:
            from mailqd.daemon.worker_process import run_worker

            self._worker_entry = run_worker

    @property
    def worker_entry(self) -> WorkerEntry:
        assert self._worker_entry is not None, "run() resolves the worker entry first"
        return self._worker_entry

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = list(self._spawn_at.values())
        if self._systemd.watchdog_seconds:
            deadlines.append(self._systemd.watchdog_due)
        deadlines += [
            w.kill_at for w in self.workers.values() if w.kill_at is not None and not w.killed
        ]
        return max(0.0, min([TICK, *(d - now for d in deadlines)]))

    # -- signals (queued by `SignalQueue`, dispatched by the loop) ------------

    def _handlers(self) -> dict[signal.Signals, Callable[[], None]]:
        return {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGCHLD: self.handle_chld,
        }

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
        self._systemd.notify("STOPPING=1")
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
            kill(worker)

    def reload(self, reason: str = "SIGHUP") -> None:
        """Re-read the settings and rebuild the runtime; on success replace the workers.

        If the settings are invalid, a runtime part cannot be built (a key
        file that cannot be read) or the database check fails, the current
        workers keep running with the current runtime.
        """
        self._systemd.notify("RELOADING=1")
        log.info("reloading configuration", reason=reason)
        try:
            settings = self._load_settings() if self._load_settings else self.settings
            self.check_database(settings)
            runtime = self._relays.runtime(settings)
        except MailqError as exc:
            log.error("reload failed; keeping the current configuration", error=str(exc))
        else:
            old = list(self.workers.values())
            self._reconfigure_logging(runtime)
            warn_if_tls_unverified(settings)
            if settings.metrics_listen != self.settings.metrics_listen:
                log.warning(
                    "metrics_listen changed; the sidecar keeps its address until mailqd restarts",
                    listening=self._sidecar.address,
                )
            self._start_generation(runtime)
            for worker in old:
                self._retire(worker)
            log.info("configuration reloaded", generation=self.generation, workers=settings.workers)
        self._systemd.notify("READY=1")

    @staticmethod
    def _reconfigure_logging(runtime: Runtime) -> None:
        from mailqd.logging import configure_logging

        configure_logging(runtime.settings, secrets=runtime.log_secrets)

    def _retire(self, worker: WorkerProcess) -> None:
        """Ask a worker to finish: it gets its shutdown timeout to end in-flight sends."""
        worker.retiring = True
        if worker.kill_at is None:
            terminate(worker, grace=worker.settings.shutdown_timeout + self.kill_grace)

    def _kill_all_now(self) -> None:
        """Last resort when the supervisor itself fails: leave no orphaned worker behind."""
        for worker in list(self.workers.values()):
            kill(worker)
            code = None
            with contextlib.suppress(ChildProcessError):  # reaped already
                code = os.waitstatus_to_exitcode(os.waitpid(worker.pid, 0)[1])
            self._give_back_jobs(worker, code)
        self.workers.clear()

    # -- watching the workers --------------------------------------------------

    def reap_workers(self) -> None:
        """Collect every exited child (`waitpid(-1, WNOHANG)`); react to each worker's exit."""
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
        self._sidecar.process_dead(worker.pid)
        lifetime = time.monotonic() - worker.started_at
        expected = worker.retiring or self.stopping
        (log.info if expected and code == 0 else log.warning)(
            "worker exited",
            pid=worker.pid,
            slot=worker.slot,
            generation=worker.generation,
            lifetime=round(lifetime, 3),
            **describe_exit(code),
        )
        self._give_back_jobs(worker, code)
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

    def _give_back_jobs(self, worker: WorkerProcess, code: int | None) -> None:
        """Return the jobs a dead worker held to the queue now, not when their lease expires."""
        owner = worker.identity.owner
        total = self._stores.give_back(
            worker.settings.database_url, owner, code, killed=worker.killed
        )
        if total:
            self.jobs_given_back += total
            log.warning("jobs given back", pid=worker.pid, owner=owner, count=total)

    def murder_hung_workers(self) -> None:
        """SIGTERM each worker whose heartbeat is too old; `kill_overdue_workers` follows up."""
        murder_hung(self.workers.values(), self.kill_grace)

    def kill_overdue_workers(self) -> None:
        """SIGKILL workers that did not exit by their deadline after SIGTERM."""
        kill_overdue(self.workers.values())

    # -- starting workers ------------------------------------------------------

    def _start_generation(self, runtime: Runtime) -> None:
        self.generation += 1
        self.runtime = runtime
        self.settings = runtime.settings
        self._spawn_at = dict.fromkeys(range(self.settings.workers), 0.0)
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
        """Fork one worker for `slot`, with the current runtime. Never returns in the child."""
        if not self._sidecar.fork_lock.acquire(timeout=FORK_LOCK_WAIT):
            # The sidecar is in a slow query (a database that does not answer):
            # try again on the next turn rather than block the loop.
            self._spawn_at[slot] = time.monotonic() + FORK_LOCK_WAIT
            return
        heartbeat = Heartbeat()
        runtime = self.runtime
        assert runtime is not None, "a generation starts with a runtime"

        def identity_for(pid: int) -> WorkerIdentity:
            return WorkerIdentity(index=slot, owner=self.owner_for(pid))

        try:
            pid = fork_worker(
                identity_for,
                heartbeat,
                runtime,
                self.worker_entry,
                lambda: self._shed_supervisor_state(heartbeat),
            )
        except OSError as exc:
            heartbeat.close()
            delay = self.backoff.delay_after(0.0)
            self._spawn_at[slot] = time.monotonic() + delay
            log.error("could not fork a worker", slot=slot, error=str(exc), retry_in=delay)
            return
        finally:
            self._sidecar.fork_lock.release()
        identity = identity_for(pid)
        self.workers[pid] = WorkerProcess(
            pid, identity, heartbeat, runtime, self.generation, time.monotonic()
        )
        log.info(
            "worker started", pid=pid, slot=slot, generation=self.generation, owner=identity.owner
        )

    def _shed_supervisor_state(self, own_heartbeat: Heartbeat) -> None:
        """In the child: drop the signal queue, the sidecar, the other heartbeats and stores."""
        self._signals.close()
        self._sidecar.forget_after_fork()
        for worker in self.workers.values():
            if worker.heartbeat is not own_heartbeat:
                worker.heartbeat.close()
        self.workers.clear()
        self._stores.forget_after_fork()
        self._relays.forget_after_fork()

    # -- the pool's status -----------------------------------------------------

    def _pool_status(self) -> PoolStatus:
        """What the sidecar reports: a new copy each loop turn, never a dict changing under it."""
        running = sum(
            1
            for w in self.workers.values()
            if not w.retiring and w.kill_at is None and w.generation == self.generation
        )
        return PoolStatus(
            workers=running,
            desired=self.settings.workers,
            stopping=self.stopping,
            worker_deaths=self.worker_deaths,
            jobs_given_back=self.jobs_given_back,
            started_at=self.started_at,
        )


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
