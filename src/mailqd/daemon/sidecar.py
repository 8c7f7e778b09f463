"""The supervisor's sidecar: `/metrics`, `/healthz` and `/stats` over HTTP.

It listens on `metrics_listen` (127.0.0.1:9478 by default) in threads of
the supervisor, so that neither a client nor the database can hold the
health check shut:

- the HTTP thread (`sidecar_http.HttpServer`) serves every connection from
  one selector, with deadlines and a connection cap, and never waits on the
  database: `/healthz` and `/metrics` are made from the latest answer of the
  queue and relay-state queries; `/stats` from an answer of the last
  `STATS_REUSE` seconds, or it waits up to `STATS_WAIT` seconds for a fresh
  one without holding up any other connection;
- two database threads (`sidecar_db.SidecarDatabase`), one for the queue
  counts and one for `/stats`, run every query, each answer reused for
  `cache_seconds`: so Prometheus scraping every second, a load balancer
  probing `/healthz` and `/stats` together cost the database at most one
  such query per interval.

The supervisor forks workers while these threads run. A fork copies locks in
whatever state they are, and a lock held by another thread at that moment
(the log stream's, libpq's, the connection pool's) would stay held forever
in the child. So the database threads query and log under `fork_lock`
(shared between them), which the supervisor takes around each fork; the
HTTP thread takes no lock that a worker uses (it does not even log: a
database thread logs its errors); and the child forgets the sidecar at once
(`forget_after_fork`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import structlog

from mailqd import __version__
from mailqd.breaker import RelayState
from mailqd.daemon.sidecar_db import (
    CACHE_SECONDS,
    STALE_AFTER,
    Answer,
    ForkLock,
    SidecarDatabase,
    Snapshot,
    StatsAnswer,
)
from mailqd.daemon.sidecar_http import HttpServer
from mailqd.daemon.sidecar_protocol import Deferred, Response
from mailqd.daemon.sidecar_relays import RelayHealth, relay_health
from mailqd.errors import ConfigError, MailqError
from mailqd.metrics import (
    CONTENT_TYPE,
    DatabaseGauges,
    PoolStatus,
    SupervisorCollector,
    counter_total,
    render,
)
from mailqd.models import Status
from mailqd.routes import RelayPlan
from mailqd.store import Store
from mailqd.transport import redact_url

__all__ = ["STATS_WAIT", "ForkLock", "Sidecar", "parse_listen"]

STATS_REUSE = 5.0
"""`/stats` answers at once from a database answer up to this old (and has it refreshed)."""
STATS_WAIT = 5.0
"""Longest wait of `/stats` for a fresh answer when the latest is older; then it gets that."""
STOP_WAIT = 2.0
"""Longest wait at stop for the HTTP thread."""

log = structlog.get_logger(component="sidecar")


class Sidecar:
    """The HTTP server; `start` binds (a `ConfigError` if it cannot) and starts the threads.

    `status` returns the supervisor's latest `PoolStatus`; `database_url`
    the URL of the current configuration (it may change on reload);
    `relay_plan` its relays and routes (None: no relays shown);
    `open_store` makes a store for a URL. Metrics files are read from
    `metrics_dir`.
    """

    def __init__(
        self,
        listen: str,
        *,
        status: Callable[[], PoolStatus],
        database_url: Callable[[], str],
        open_store: Callable[[str], Store],
        metrics_dir: str,
        fork_lock: ForkLock,
        relay_plan: Callable[[], RelayPlan | None] = lambda: None,
        cache_seconds: float = CACHE_SECONDS,
        stale_after: float = STALE_AFTER,
        stats_wait: float = STATS_WAIT,
    ) -> None:
        self.listen = listen
        self._stats_wait = stats_wait
        self._status = status
        self._database_url = database_url
        self._relay_plan = relay_plan
        self._metrics_dir = metrics_dir
        self._database = SidecarDatabase(
            database_url=database_url,
            open_store=open_store,
            fork_lock=fork_lock,
            summarize=self._make_summary,
            cache_seconds=cache_seconds,
            stale_after=stale_after,
        )
        self._collector = SupervisorCollector(status, self._gauges, __version__)
        self._server: HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def summary(self) -> str | None:
        """One line for systemd's STATUS=, refreshed by the counts thread."""
        return self._database.summary

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        host, port = parse_listen(self.listen)
        try:
            server = HttpServer(
                (host, port),
                self.respond,
                server_version=f"mailqd/{__version__}",
                on_error=self._database.report,
            )
        except OSError as exc:
            raise ConfigError(
                "metrics_listen", f"cannot listen on {self.listen}: {exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="mailqd-sidecar", daemon=True
        )
        # The threads start with every signal blocked, so signals always reach
        # the supervisor's main thread and wake its loop at once.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._database.start(wake=server.wake)
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("sidecar listening", address=self.address, url=self.url)

    @property
    def address(self) -> str:
        """`host:port` actually bound (the port is chosen by the system for port 0)."""
        assert self._server is not None, "start() the sidecar first"
        host, port = self._server.server_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        """Stop serving, close every connection and the listening socket."""
        if self._server is not None:
            self._server.stop()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
        if self._server is not None and not (self._thread and self._thread.is_alive()):
            self._server.close()
        self._server, self._thread = None, None
        self._database.stop()

    def forget_after_fork(self) -> None:
        """In a freshly forked worker: drop the sockets and connections without touching them."""
        if self._server is not None:
            self._server.forget_after_fork()
            self._server = None
        self._thread = None
        self._database.forget_after_fork()

    # -- the endpoints ---------------------------------------------------------

    def respond(self, path: str) -> Response | Deferred:
        """The answer to a GET (or HEAD) of `path`; called in the HTTP thread, never waits."""
        handlers: dict[str, Callable[[], Response | Deferred]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/stats": self._stats_page,
            "/": self._index,
        }
        handler = handlers.get(path)
        if handler is None:
            return _text(HTTPStatus.NOT_FOUND, "not found; try /metrics, /healthz or /stats\n")
        return handler()

    def _metrics(self) -> Response:
        plan = self._relay_plan()
        relays = tuple(plan.relays) if plan is not None else ()
        page = render(self._metrics_dir, self._collector, relays)
        return Response(HTTPStatus.OK, CONTENT_TYPE, page)

    def _gauges(self) -> DatabaseGauges:
        """The database gauges of `/metrics`, from the latest answer; `MailqError` if none."""
        snapshot = self._database.latest_snapshot()
        health = self._relay_health(snapshot.relays)
        return DatabaseGauges(
            counts=snapshot.unfinished.counts,
            due=snapshot.unfinished.due,
            relays_up=health.up_by_name() if health is not None else (),
        )

    def _healthz(self) -> Response:
        """503 with every problem; 200 `degraded` while a relay is down; else 200 `ok`."""
        status = self._status()
        problems, relays = self._problems_and_relays(status)
        if problems:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy: " + "; ".join(problems) + "\n")
        fine = f"{status.workers}/{status.desired} workers, database ok"
        degradation = relays.degradation() if relays is not None else None
        if degradation:
            return _text(HTTPStatus.OK, f"degraded: {degradation}; {fine}\n")
        return _text(HTTPStatus.OK, f"ok: {fine}\n")

    def problems(self) -> list[str]:
        """Why mailqd is not healthy now; empty when it is (a relay down is no problem yet)."""
        return self._problems_and_relays(self._status())[0]

    def _problems_and_relays(self, status: PoolStatus) -> tuple[list[str], RelayHealth | None]:
        problems = []
        if status.stopping:
            problems.append("stopping")
        elif status.workers < status.desired:
            problems.append(f"{status.workers} of {status.desired} workers running")
        relays = None
        try:
            snapshot = self._database.latest_snapshot()
        except MailqError as exc:
            problems.append(str(exc))
        else:
            relays = self._relay_health(snapshot.relays)
            problem = relays.problem() if relays is not None else None
            if problem:
                problems.append(problem)
        return problems, relays

    def _relay_health(self, states: tuple[RelayState, ...]) -> RelayHealth | None:
        plan = self._relay_plan()
        return relay_health(plan, states) if plan is not None else None

    def _stats_page(self) -> Response | Deferred:
        """At once from an answer less than `STATS_REUSE` seconds old, else once there is one.

        A stale answer is refreshed behind the request that reused it, so a
        script polling `/stats` never waits on the query.
        """
        stats = self._database.stats
        asked_at = time.monotonic()
        if stats.stale():
            self._database.ask_stats()
        answer = stats.latest()
        if answer is not None and asked_at - answer.at < STATS_REUSE:
            return self._stats_answer()

        def ready() -> Response | None:
            answer = stats.latest()
            return self._stats_answer() if answer is not None and answer.at >= asked_at else None

        return Deferred(ready, self._stats_answer, self._stats_wait)

    def _stats_answer(self) -> Response:
        try:
            answer = self._database.recent(self._database.stats)
        except MailqError as exc:
            body = {"success": False, "error": str(exc)}
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, body)
        data = self.stats_data(answer)
        return _json(HTTPStatus.OK, {"success": True, "data": data})

    def stats_data(self, answer: StatsAnswer) -> dict[str, Any]:
        """The seed's REST shape: service, queue, performance; and the relays."""
        status = self._status()
        stats = answer.stats
        counts = stats.counts
        rate = stats.last_1h.failure_rate
        relays = self._relay_health(answer.relays)
        state = "stopping" if status.stopping else "running"
        if not status.stopping and (
            status.workers < status.desired or (relays is not None and relays.down)
        ):
            state = "degraded"
        return {
            "service": {
                "name": "mailqd",
                "version": __version__,
                "status": state,
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "uptime_seconds": round(time.time() - status.started_at, 1),
                "workers": {"running": status.workers, "configured": status.desired},
                "worker_deaths": status.worker_deaths,
                "database": redact_url(self._database_url()),
            },
            "queue": {
                "pending": counts.pending,
                "due": stats.due,
                "retry_queue": stats.retries_waiting,
                "permanent_failed": counts.by_status.get(Status.FAILED, 0),
                "total_sent": counts.by_status.get(Status.SENT, 0),
                "total_failed": answer.failed_attempts,
                "queue_depth": counts.depth,
            },
            "rows": {"sending_without_lease": stats.unleased},
            "performance": {
                "failure_rate_1h_percent": round(rate * 100, 2) if rate is not None else 0.0,
                "recent_attempts_1h": stats.last_1h.attempts,
                "deduplicated_1h": stats.last_1h.deduplicated,
                "deferred_by_recipient_cap_1h": stats.last_1h.cap_deferred,
                "deferred_by_relay_1h": stats.last_1h.relay_deferred,
                "recipients_refused_1h": answer.recipients_refused_1h,
            },
            "relays": [relay.as_json() for relay in relays.relays] if relays is not None else [],
            "as_of": stats.at.isoformat(),
        }

    def _index(self) -> Response:
        return _text(HTTPStatus.OK, "mailqd sidecar: /metrics /healthz /stats\n")

    def _make_summary(self, snapshot: Answer[Snapshot] | None) -> str:
        """The STATUS= line; made by the counts thread after each refresh."""
        status = self._status()
        sent = int(counter_total(self._metrics_dir, "mailqd_email_sent"))
        failed = int(counter_total(self._metrics_dir, "mailqd_email_failed"))
        if snapshot is not None and snapshot.value is not None:
            queue = f"queue depth {snapshot.value.unfinished.counts.depth}"
            relays = self._relay_health(snapshot.value.relays)
            if relays is not None and relays.down:
                queue += ", relays down: " + ", ".join(relay.name for relay in relays.down)
        else:
            queue = "database unavailable"
        plural = "" if status.workers == 1 else "s"
        return f"{status.workers} worker{plural}, {sent} sent, {failed} failed, {queue}"


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (already validated by the config) into a bind address."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", text.encode())


def _json(status: HTTPStatus, data: dict[str, Any]) -> Response:
    return Response(status, "application/json", json.dumps(data).encode() + b"\n")
