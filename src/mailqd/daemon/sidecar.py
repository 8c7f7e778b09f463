"""The supervisor's sidecar HTTP server: `/metrics`, `/healthz` and `/stats`.

It listens on `metrics_listen` (127.0.0.1:9478 by default) and runs in one
thread of the supervisor, serving one request at a time: scrapes are small
and rare, and a single thread keeps the database work of all requests
behind one cache. The queue gauges come from one cheap query
(`Store.unfinished_counts`), reused for `cache_seconds`, so Prometheus
scraping every second, a load balancer probing `/healthz` and `/stats`
together cost the database at most one such query per interval.

The supervisor forks workers while this thread runs. A fork copies locks in
whatever state they are, and a lock held by this thread at that moment
(the log stream's, the connection pool's) would stay held forever in the
child. So the request work happens under `fork_lock`, which the supervisor
takes around each fork, and the child forgets the sidecar at once
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
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import structlog

from mailqd import __version__
from mailqd.errors import ConfigError, MailqError
from mailqd.metrics import CONTENT_TYPE, PoolStatus, SupervisorCollector, counter_total, render
from mailqd.models import QueueStats, Status
from mailqd.store import Store
from mailqd.transport import redact_url

__all__ = ["CACHE_SECONDS", "Cached", "Sidecar", "parse_listen"]

T = TypeVar("T")

CACHE_SECONDS = 1.0
"""How long a database answer (or failure) is reused by the endpoints."""
SUMMARY_INTERVAL = 2.0
"""Seconds between refreshes of the one-line summary (systemd's STATUS=)."""
POLL_INTERVAL = 0.5
REQUEST_TIMEOUT = 10.0

log = structlog.get_logger(component="sidecar")


class Cached(Generic[T]):
    """The result of `compute`, or the `MailqError` it raised, reused for `ttl` seconds."""

    def __init__(
        self, compute: Callable[[], T], ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._compute = compute
        self._ttl = ttl
        self._clock = clock
        self._at: float | None = None
        self._value: T | None = None
        self._error: MailqError | None = None

    def get(self) -> T:
        if self._at is None or self._clock() - self._at >= self._ttl:
            try:
                self._value, self._error = self._compute(), None
            except MailqError as exc:
                self._value, self._error = None, exc
            # Counted from the answer, so a query that took long is still reused.
            self._at = self._clock()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


@dataclass(frozen=True, slots=True)
class _Response:
    status: HTTPStatus
    content_type: str
    body: bytes


class Sidecar:
    """The HTTP server; `start` binds (a `ConfigError` if it cannot) and starts the thread.

    `status` returns the supervisor's latest `PoolStatus`; `database_url`
    the URL of the current configuration (it may change on reload);
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
        fork_lock: threading.Lock,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self.listen = listen
        self.fork_lock = fork_lock
        self.summary: str | None = None
        """One line for systemd's STATUS=, refreshed by the sidecar thread."""
        self._status = status
        self._database_url = database_url
        self._open_store = open_store
        self._metrics_dir = metrics_dir
        self._store: Store | None = None
        self._store_url: str | None = None
        self._counts = Cached(lambda: self._current_store().unfinished_counts(), cache_seconds)
        self._stats = Cached(self._query_stats, cache_seconds)
        self._collector = SupervisorCollector(status, self._counts.get, __version__)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._summary_at = 0.0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        host, port = parse_listen(self.listen)
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            raise ConfigError(
                "metrics_listen", f"cannot listen on {self.listen}: {exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="mailqd-sidecar",
            daemon=True,
        )
        # The thread starts with every signal blocked, so signals always reach
        # the supervisor's main thread and wake its loop at once.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("sidecar listening", address=self.address, url=self.url)

    @property
    def address(self) -> str:
        """`host:port` actually bound (the port is chosen by the system for port 0)."""
        assert self._server is not None, "start() the sidecar first"
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        """Stop serving (after the request in progress) and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def forget_after_fork(self) -> None:
        """In a freshly forked worker: drop the socket and connections without touching them."""
        if self._server is not None:
            self._server.socket.close()
            self._server = None
        self._thread = None
        if self._store is not None:
            self._store.engine.dispose(close=False)
            self._store = None

    # -- the endpoints ---------------------------------------------------------

    def respond(self, path: str) -> _Response:
        handlers: dict[str, Callable[[], _Response]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/stats": self._stats_page,
            "/": self._index,
        }
        handler = handlers.get(path)
        if handler is None:
            return _text(HTTPStatus.NOT_FOUND, "not found; try /metrics, /healthz or /stats\n")
        return handler()

    def _metrics(self) -> _Response:
        return _Response(HTTPStatus.OK, CONTENT_TYPE, render(self._metrics_dir, self._collector))

    def _healthz(self) -> _Response:
        problems = self.problems()
        if problems:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy: " + "; ".join(problems) + "\n")
        status = self._status()
        return _text(HTTPStatus.OK, f"ok: {status.workers}/{status.desired} workers, database ok\n")

    def problems(self) -> list[str]:
        """Why mailqd is not healthy now; empty when it is."""
        problems = []
        status = self._status()
        if status.stopping:
            problems.append("stopping")
        elif status.workers < status.desired:
            problems.append(f"{status.workers} of {status.desired} workers running")
        try:
            self._counts.get()
        except MailqError as exc:
            problems.append(str(exc))
        return problems

    def _stats_page(self) -> _Response:
        try:
            stats, failed_attempts = self._stats.get()
        except MailqError as exc:
            body = {"success": False, "error": str(exc)}
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, body)
        data = self.stats_data(stats, failed_attempts)
        return _json(HTTPStatus.OK, {"success": True, "data": data})

    def stats_data(self, stats: QueueStats, failed_attempts: int) -> dict[str, Any]:
        """The seed's REST shape: service, queue, performance."""
        status = self._status()
        counts = stats.counts
        rate = stats.last_1h.failure_rate
        state = "stopping" if status.stopping else "running"
        if not status.stopping and status.workers < status.desired:
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
                "retry_queue": stats.retries_waiting,
                "permanent_failed": counts.by_status.get(Status.FAILED, 0),
                "total_sent": counts.by_status.get(Status.SENT, 0),
                "total_failed": failed_attempts,
                "queue_depth": counts.depth,
            },
            "rows": {"sending_without_lease": stats.unleased},
            "performance": {
                "failure_rate_1h_percent": round(rate * 100, 2) if rate is not None else 0.0,
                "recent_attempts_1h": stats.last_1h.attempts,
                "deduplicated_1h": stats.last_1h.deduplicated,
                "deferred_by_recipient_cap_1h": stats.last_1h.cap_deferred,
            },
            "as_of": stats.at.isoformat(),
        }

    def _index(self) -> _Response:
        return _text(HTTPStatus.OK, "mailqd sidecar: /metrics /healthz /stats\n")

    # -- background work of the sidecar thread ---------------------------------

    def refresh_summary(self) -> None:
        """Every few seconds: the one-line summary the supervisor sends as STATUS=."""
        if time.monotonic() - self._summary_at < SUMMARY_INTERVAL:
            return
        with self.fork_lock:
            self.summary = self._make_summary()
        self._summary_at = time.monotonic()

    def _make_summary(self) -> str:
        status = self._status()
        sent = int(counter_total(self._metrics_dir, "mailqd_email_sent"))
        failed = int(counter_total(self._metrics_dir, "mailqd_email_failed"))
        try:
            queue = f"queue depth {self._counts.get().depth}"
        except MailqError:
            queue = "database unavailable"
        plural = "" if status.workers == 1 else "s"
        return f"{status.workers} worker{plural}, {sent} sent, {failed} failed, {queue}"

    # -- the database ------------------------------------------------------------

    def _current_store(self) -> Store:
        """The store of the configuration in force; a reload may have changed the URL."""
        url = self._database_url()
        if self._store is not None and self._store_url != url:
            self._store.close()
            self._store = None
        if self._store is None:
            self._store = self._open_store(url)
            self._store_url = url
        return self._store

    def _query_stats(self) -> tuple[QueueStats, int]:
        store = self._current_store()
        return store.queue_stats(), store.failed_attempts_count()

    def log_unexpected(self) -> None:
        with self.fork_lock:
            log.exception("sidecar request failed")


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (already validated by the config) into a bind address."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _text(status: HTTPStatus, text: str) -> _Response:
    return _Response(status, "text/plain; charset=utf-8", text.encode())


def _json(status: HTTPStatus, data: dict[str, Any]) -> _Response:
    return _Response(status, "application/json", json.dumps(data).encode() + b"\n")


class _Server(HTTPServer):
    """One request at a time, in the sidecar thread."""

    def __init__(self, address: tuple[str, int], sidecar: Sidecar) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sidecar = sidecar
        super().__init__(address, _Handler)

    def service_actions(self) -> None:
        """Called by `serve_forever` between requests."""
        self.sidecar.refresh_summary()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.sidecar.log_unexpected()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = f"mailqd/{__version__}"

    def do_GET(self) -> None:
        sidecar = self.server.sidecar
        with sidecar.fork_lock:
            response = sidecar.respond(urlsplit(self.path).path)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus scrapes would drown the delivery log."""
