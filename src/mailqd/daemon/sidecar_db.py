"""The sidecar's database threads: every query of `/metrics`, `/healthz` and `/stats`.

The HTTP thread never waits on the database: it reads the latest answers
(`Cached.latest`) and asks for fresh ones. One thread refreshes the queue
counts and the relays' breaker rows (`Snapshot`) when they are asked for
and older than `cache_seconds`, and every `SUMMARY_INTERVAL` for the
summary (systemd's STATUS=); another runs the `/stats` queries when asked,
so a slow `/stats` never delays the answer behind `/healthz`. Each query
runs under the supervisor's fork lock (`ForkLock`, shared), and so does the
logging of what went wrong in the HTTP thread: no lock a worker needs is
held by these threads when the supervisor forks.

A query that has run for more than `stale_after` seconds (one that hangs)
makes its endpoints say the database does not answer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from mailqd.breaker import RelayState
from mailqd.errors import DatabaseUnavailableError, MailqError
from mailqd.models import QueueStats
from mailqd.store import Store
from mailqd.store.stats import Unfinished

__all__ = [
    "CACHE_SECONDS",
    "STALE_AFTER",
    "Answer",
    "Cached",
    "ForkLock",
    "SidecarDatabase",
    "Snapshot",
    "StatsAnswer",
]

T = TypeVar("T")

CACHE_SECONDS = 1.0
"""How long a database answer (or failure) is reused by the endpoints."""
SUMMARY_INTERVAL = 2.0
"""Seconds between refreshes of the one-line summary (systemd's STATUS=)."""
STALE_AFTER = 10.0
"""Seconds after which a query still running means the database does not answer."""
STOP_WAIT = 2.0
"""Longest wait at stop; a thread stuck in a query is left to end with the process."""

log = structlog.get_logger(component="sidecar")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What `/metrics` and `/healthz` are made of: the unfinished jobs and the breakers' rows."""

    unfinished: Unfinished
    relays: tuple[RelayState, ...]
    """The rows of `mailqd_relay_state` (a relay without one is up)."""


@dataclass(frozen=True, slots=True)
class StatsAnswer:
    """What `/stats` is made of."""

    stats: QueueStats
    failed_attempts: int
    recipients_refused_1h: int
    relays: tuple[RelayState, ...]


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
        self._computing_since: float | None = None

    def get(self) -> T:
        if self.stale():
            self._computing_since = self._clock()
            try:
                value, error = self._compute(), None
            except MailqError as exc:
                value, error = None, exc
            finally:
                self._computing_since = None
            # Counted from the answer, so a query that took long is still reused.
            self._answer = Answer(value, error, self._clock())
        assert self._answer is not None
        return self._answer.result()

    def waiting(self) -> float:
        """Seconds the computation in progress has run so far; 0 when none runs."""
        since = self._computing_since
        return 0.0 if since is None else self._clock() - since

    def latest(self) -> Answer[T] | None:
        """The last answer, however old; None before the first."""
        return self._answer

    def stale(self) -> bool:
        answer = self._answer
        return answer is None or self._clock() - answer.at >= self._ttl


class ForkLock:
    """Held by the supervisor around each fork, and shared by the sidecar's queries.

    Shared holders run together, so a slow `/stats` query does not hold up
    the queue counts that `/healthz` relies on; a fork waits until no query
    runs, and no query starts while a fork waits. `acquire`/`release` are
    the fork's side, as on `threading.Lock`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._forks_waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._cond:
            self._forks_waiting += 1
            try:
                while self._exclusive or self._shared:
                    left = None if deadline is None else deadline - time.monotonic()
                    if not blocking or (left is not None and left <= 0):
                        return False
                    self._cond.wait(left)
                self._exclusive = True
                return True
            finally:
                self._forks_waiting -= 1
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._forks_waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()


class _Refresher:
    """One thread that refreshes one `Cached` when asked, and every `interval` seconds if set.

    The query runs under the fork lock (shared); `after` runs after each
    refresh, in the thread, also under the lock. With an `interval`, the
    first refresh is at once, so the answer is there for the first request.
    """

    def __init__(
        self,
        name: str,
        cached: Cached[Any],
        fork_lock: ForkLock,
        after: Callable[[], None],
        interval: float | None = None,
    ) -> None:
        self._cached = cached
        self._fork_lock = fork_lock
        self._after = after
        self._interval = interval
        self._wanted = threading.Condition()
        self._asked, self._closing = interval is not None, False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def ask(self) -> None:
        with self._wanted:
            self._asked = True
            self._wanted.notify()

    def close(self) -> None:
        with self._wanted:
            self._closing = True
            self._wanted.notify()

    def _run(self) -> None:
        while True:
            with self._wanted:
                self._wanted.wait_for(lambda: self._asked or self._closing, self._interval)
                if self._closing:
                    return
                self._asked = False
            with self._fork_lock.shared():
                try:
                    with contextlib.suppress(MailqError):
                        self._cached.get()
                    self._after()
                except Exception:
                    log.exception("sidecar query failed")


class SidecarDatabase:
    """The queries behind the endpoints, each kind in a thread of its own.

    `database_url` gives the URL in force (a reload may change it);
    `summarize` makes the STATUS= line from the latest counts; `wake` is
    called after every refresh (the HTTP server looks at what waits on it).
    """

    def __init__(
        self,
        *,
        database_url: Callable[[], str],
        open_store: Callable[[str], Store],
        fork_lock: ForkLock,
        summarize: Callable[[Answer[Snapshot] | None], str],
        cache_seconds: float = CACHE_SECONDS,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.summary: str | None = None
        self.counts = Cached(self._query_snapshot, cache_seconds)
        self.stats = Cached(self._query_stats, cache_seconds)
        self._database_url = database_url
        self._open_store = open_store
        self._summarize = summarize
        self._stale_after = stale_after
        self._store: Store | None = None
        self._store_url: str | None = None
        self._store_lock = threading.Lock()
        self._errors: deque[BaseException] = deque(maxlen=100)
        self._wake: Callable[[], None] = lambda: None
        self._counts_thread = _Refresher(
            "mailqd-sidecar-counts", self.counts, fork_lock, self._after_counts, SUMMARY_INTERVAL
        )
        self._stats_thread = _Refresher(
            "mailqd-sidecar-stats", self.stats, fork_lock, lambda: self._wake()
        )

    # -- what the HTTP thread calls (never waits on the database) ---------------

    def latest_snapshot(self) -> Snapshot:
        """The latest counts and relay rows, or `MailqError`; asks for fresh ones when stale."""
        if self.counts.stale():
            self._counts_thread.ask()
        return self.recent(self.counts)

    def recent(self, cached: Cached[T]) -> T:
        """The latest result, or `DatabaseUnavailableError` while a query hangs.

        A query running for more than `stale_after` seconds means the
        database does not answer, whatever it answered before.
        """
        waiting = cached.waiting()
        if waiting > self._stale_after:
            raise DatabaseUnavailableError(f"database unavailable: no answer for {waiting:.0f} s")
        answer = cached.latest()
        if answer is None:
            raise DatabaseUnavailableError("database unavailable: no answer yet")
        return answer.result()

    def ask_stats(self) -> None:
        """Fresh `/stats` numbers soon; `wake` is called once they are in."""
        self._stats_thread.ask()

    def report(self, error: BaseException) -> None:
        """An error of the HTTP thread, to be logged where logging is fork-safe."""
        self._errors.append(error)
        self._counts_thread.ask()

    # -- lifecycle -------------------------------------------------------------

    def start(self, wake: Callable[[], None]) -> None:
        """Start the threads (they inherit the caller's signal mask)."""
        self._wake = wake
        for refresher in (self._counts_thread, self._stats_thread):
            refresher.thread.start()

    def stop(self) -> None:
        deadline = time.monotonic() + STOP_WAIT
        refreshers = (self._counts_thread, self._stats_thread)
        for refresher in refreshers:
            refresher.close()
        for refresher in refreshers:
            if refresher.thread.ident is not None:
                refresher.thread.join(max(0.0, deadline - time.monotonic()))
        if any(refresher.thread.is_alive() for refresher in refreshers):
            return  # stuck in a query: the store is still in use
        if self._store is not None:
            self._store.close()
            self._store = None

    def forget_after_fork(self) -> None:
        """In a freshly forked worker: drop the connections without touching them."""
        if self._store is not None:
            self._store.forget_after_fork()
            self._store = None

    # -- in the threads ----------------------------------------------------------

    def _after_counts(self) -> None:
        """Every refresh of the counts: the summary, and the HTTP thread's errors logged."""
        self.summary = self._summarize(self.counts.latest())
        self._wake()
        while self._errors:
            log.error("sidecar request failed", exc_info=self._errors.popleft())

    def _current_store(self) -> Store:
        """The store of the configuration in force; a reload may have changed the URL."""
        url = self._database_url()
        with self._store_lock:
            if self._store is not None and self._store_url != url:
                self._store.close()
                self._store = None
            if self._store is None:
                self._store = self._open_store(url)
                self._store_url = url
            return self._store

    def _query_snapshot(self) -> Snapshot:
        store = self._current_store()
        return Snapshot(store.stats.unfinished(), tuple(store.relay_health.states()))

    def _query_stats(self) -> StatsAnswer:
        store = self._current_store()
        return StatsAnswer(
            stats=store.queue_stats(),
            failed_attempts=store.failed_attempts_count(),
            recipients_refused_1h=store.stats.recipients_refused(),
            relays=tuple(store.relay_health.states()),
        )
