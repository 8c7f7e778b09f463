"""The sidecar's lifecycle in the supervisor: its metric directory, its start and its stop.

The sidecar (`mailqd.daemon.sidecar`) stays a pair of threads in the
supervisor rather than a child process: it reads the pool's status on every
request and gives systemd's STATUS= line back, it must fail the start when
it cannot bind `metrics_listen`, and `/metrics` aggregates the files of
every worker in a directory this host owns. What the threads cost is the
fork lock: the supervisor takes it around each fork (`ForkLock`), so no
thread holds a lock the child would inherit held.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from mailqd import metrics
from mailqd.daemon.sidecar import ForkLock, Sidecar
from mailqd.routes import RelayPlan
from mailqd.store import Store

__all__ = ["FORK_LOCK_WAIT", "SidecarHost"]

FORK_LOCK_WAIT = 0.2
"""Longest wait for the sidecar's database thread to finish a query before a fork; else retried."""


class SidecarHost:
    """Owns the sidecar and the workers' metric directory for one run of the supervisor."""

    def __init__(self) -> None:
        self.fork_lock = ForkLock()
        self._sidecar: Sidecar | None = None
        self.metrics_dir: str | None = None

    def start(
        self,
        listen: str,
        status: Callable[[], metrics.PoolStatus],
        database_url: Callable[[], str],
        open_store: Callable[[str], Store],
        relay_plan: Callable[[], RelayPlan | None] = lambda: None,
    ) -> None:
        """Fresh metric files for this run, and the HTTP server; `ConfigError` if it cannot bind.

        `relay_plan` gives the relays of the configuration in force, whose
        health `/metrics`, `/healthz` and `/stats` show.
        """
        self.metrics_dir = metrics.make_multiprocess_dir()
        metrics.use_multiprocess_dir(self.metrics_dir)
        sidecar = Sidecar(
            listen,
            status=status,
            database_url=database_url,
            open_store=open_store,
            metrics_dir=self.metrics_dir,
            fork_lock=self.fork_lock,
            relay_plan=relay_plan,
        )
        try:
            sidecar.start()
        except BaseException:
            self._remove_metrics_dir()
            raise
        self._sidecar = sidecar

    @property
    def summary(self) -> str | None:
        """The sidecar's one-line queue summary, for systemd's STATUS=."""
        return self._sidecar.summary if self._sidecar is not None else None

    @property
    def address(self) -> str | None:
        return self._sidecar.address if self._sidecar is not None else None

    def process_dead(self, pid: int) -> None:
        """Fold a dead worker's metric files into the totals."""
        if self.metrics_dir is not None:
            metrics.process_dead(pid, self.metrics_dir)

    def stop(self) -> None:
        if self._sidecar is not None:
            self._sidecar.stop()
            self._sidecar = None
        self._remove_metrics_dir()

    def forget_after_fork(self) -> None:
        """In a freshly forked worker: drop the sidecar's sockets and connections untouched."""
        if self._sidecar is not None:
            self._sidecar.forget_after_fork()
            self._sidecar = None

    def _remove_metrics_dir(self) -> None:
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
