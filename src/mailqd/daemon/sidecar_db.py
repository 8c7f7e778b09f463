"""The sidecar's database thread: every query of `/metrics`, `/healthz` and `/stats`.

The HTTP thread never waits on the database: it reads the latest answers
(`Cached.latest`) and asks this thread for fresh ones (`ask`). This thread
refreshes the queue counts (`Store.unfinished_counts`) when asked and they
are older than `cache_seconds`, and for the summary (systemd's STATUS=)
every `SUMMARY_INTERVAL`; it runs the `/stats` query when asked. Each query
runs under the supervisor's fork lock, and so does the logging of what went
wrong in the HTTP thread: no lock a worker needs is held by this thread
when the supervisor forks.

An answer older than `stale_after` (a query that hangs) counts as no answer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from mailqd.errors import DatabaseUnavailableError, MailqError
from mailqd.models import QueueCounts, QueueStats
from mailqd.store import Store

__all__ = ["CACHE_SECONDS", "STALE_AFTER", "Answer", "Cached", "DatabaseThread"]

T = TypeVar("T")

CACHE_SECONDS = 1.0
"""How long a database answer (or failure) is reused by the endpoints."""
SUMMARY_INTERVAL = 2.0
"""Seconds between refreshes of the one-line summary (systemd's STATUS=)."""
STALE_AFTER = 10.0
"""A database answer older than this means the database does not answer (a hung query)."""
STOP_WAIT = 2.0
"""Longest wait at stop; a thread stuck in a query is left to end with the process."""

log = structlog.get_logger(component="sidecar")


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """One database answer: a value or the `MailqError` raised, and when (monotonic)."""

    value: T | None
    error: MailqError | None
    at: float

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class Cached(Generic[T]):
    """The result of `compute`, or the `MailqError` it raised, reused for `ttl` seconds.

    `get` computes when stale, so only the database thread calls it;
    `latest` never computes, so the HTTP thread reads it without waiting.
    """

    def __init__(
        self, compute: Callable[[], T], ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._compute = compute
        self._ttl = ttl
        self._clock = clock
        self._answer: Answer[T] | None = None

    def get(self) -> T:
        if self.stale():
            try:
                value, error = self._compute(), None
            except MailqError as exc:
                value, error = None, exc
            # Counted from the answer, so a query that took long is still reused.
            self._answer = Answer(value, error, self._clock())
        assert self._answer is not None
        return self._answer.result()

    def latest(self) -> Answer[T] | None:
        """The last answer, however old; None before the first."""
        return self._answer

    def stale(self) -> bool:
        answer = self._answer
        return answer is None or self._clock() - answer.at >= self._ttl


class DatabaseThread:
    """The queries behind the endpoints, run in a thread of their own.

    `database_url` gives the URL in force (a reload may change it);
    `summarize` makes the STATUS= line from the latest counts.
    """

    def __init__(
        self,
        *,
        database_url: Callable[[], str],
        open_store: Callable[[str], Store],
        fork_lock: threading.Lock,
        summarize: Callable[[Answer[QueueCounts] | None], str],
        cache_seconds: float = CACHE_SECONDS,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.fork_lock = fork_lock
        self.summary: str | None = None
        self.counts = Cached(lambda: self._current_store().unfinished_counts(), cache_seconds)
        self.stats = Cached(self._query_stats, cache_seconds)
        self._database_url = database_url
        self._open_store = open_store
        self._summarize = summarize
        self._stale_after = stale_after
        self._store: Store | None = None
        self._store_url: str | None = None
        self._thread: threading.Thread | None = None
        self._wanted = threading.Condition()
        """Guards the requests below; never held across a query."""
        self._want_counts = self._want_stats = self._closing = False
        self._errors: deque[BaseException] = deque(maxlen=100)

    # -- what the HTTP thread calls (never waits on the database) ---------------

    def latest_counts(self) -> QueueCounts:
        """The latest queue counts, or `MailqError`; asks for fresh ones when they are stale."""
        if self.counts.stale():
            self.ask(stats=False)
        return self.recent(self.counts.latest())

    def recent(self, answer: Answer[T] | None) -> T:
        """The answer's result, or `DatabaseUnavailableError` if there is none this recent."""
        if answer is None:
            raise DatabaseUnavailableError("database unavailable: no answer yet")
        age = time.monotonic() - answer.at
        if age > self._stale_after:
            raise DatabaseUnavailableError(f"database unavailable: no answer for {age:.0f} s")
        return answer.result()

    def ask(self, *, stats: bool) -> None:
        """Fresh counts (and the `/stats` numbers) soon; `wake` is called once they are in."""
        with self._wanted:
            self._want_counts = True
            self._want_stats = self._want_stats or stats
            self._wanted.notify()

    def report(self, error: BaseException) -> None:
        """An error of the HTTP thread, logged here where logging is fork-safe."""
        self._errors.append(error)
        with self._wanted:
            self._wanted.notify()

    # -- lifecycle -------------------------------------------------------------

    def start(self, wake: Callable[[], None]) -> None:
        """Start the thread (with the caller's signal mask); `wake` after each refresh."""
        self._thread = threading.Thread(
            target=self._run, args=(wake,), name="mailqd-sidecar-db", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._wanted:
            self._closing = True
            self._wanted.notify()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():
                return  # stuck in a query: its store is still in use
            self._thread = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def forget_after_fork(self) -> None:
        """In a freshly forked worker: drop the connections without touching them."""
        self._thread = None
        if self._store is not None:
            self._store.engine.dispose(close=False)
            self._store = None

    # -- the thread ------------------------------------------------------------

    def _run(self, wake: Callable[[], None]) -> None:
        summary_due = time.monotonic()
        while True:
            with self._wanted:
                self._wanted.wait_for(
                    lambda: self._closing or self._want_counts or self._want_stats or self._errors,
                    timeout=max(0.0, summary_due - time.monotonic()),
                )
                if self._closing:
                    return
                counts, stats = self._want_counts, self._want_stats
                self._want_counts = self._want_stats = False
            try:
                if time.monotonic() >= summary_due:
                    summary_due = time.monotonic() + SUMMARY_INTERVAL
                    self._refresh(self.counts)
                    with self.fork_lock:
                        self.summary = self._summarize(self.counts.latest())
                if counts or stats:
                    self._refresh(self.counts)
                if stats:
                    self._refresh(self.stats)
            except Exception as exc:
                self._errors.append(exc)
            wake()
            self._log_errors()

    def _refresh(self, cached: Cached[Any]) -> None:
        """A fresh answer if the cached one is stale; the query runs under the fork lock."""
        with self.fork_lock, contextlib.suppress(MailqError):
            cached.get()

    def _log_errors(self) -> None:
        while self._errors:
            error = self._errors.popleft()
            with self.fork_lock:
                log.error("sidecar request failed", exc_info=error)

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
