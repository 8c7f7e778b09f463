"""How the worker lives through a database outage: back off, say so rarely, carry on.

A worker must survive a PostgreSQL restart or a network cut: every loop that
touches the store catches `StoreError`, asks this object how long to wait,
and tries again. The first failure is logged at once, later ones at most
every `log_interval` seconds, and recovery once, so a long outage is a
handful of log lines rather than thousands.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from mailqd.errors import DatabaseUnavailableError, StoreError

if TYPE_CHECKING:
    from mailqd.daemon.events import Events

__all__ = ["DatabaseOutage"]


class DatabaseOutage:
    """Shared by a worker's loops: one outage, one backoff, one log stream."""

    def __init__(
        self,
        *,
        first_delay: float = 0.05,
        max_delay: float = 5.0,
        log_interval: float = 30.0,
        events: Events | None = None,
    ) -> None:
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._log_interval = log_interval
        self._failures = 0
        self._last_logged = float("-inf")
        self._log = structlog.get_logger()
        self._events = events

    @property
    def ongoing(self) -> bool:
        return self._failures > 0

    def failed(self, exc: StoreError, during: str) -> float:
        """Note a failed store call; returns how many seconds to wait before the next try."""
        self._failures += 1
        if self._failures == 1 and self._events is not None:
            self._events.emit("database_unavailable", during=during, error=str(exc))
        now = time.monotonic()
        delay = min(self._max_delay, self._first_delay * 2.0 ** min(self._failures - 1, 16))
        if now - self._last_logged >= self._log_interval:
            level = "warning" if isinstance(exc, DatabaseUnavailableError) else "error"
            getattr(self._log, level)(
                "database call failed; retrying",
                during=during,
                error=str(exc),
                failures=self._failures,
                retry_in=round(delay, 3),
            )
            self._last_logged = now
        return delay

    def succeeded(self) -> None:
        """Note a store call that worked; logs the end of an outage once."""
        if self._failures:
            self._log.info("database reachable again", failed_calls=self._failures)
            if self._events is not None:
                self._events.emit("database_reachable", failed_calls=self._failures)
            self._failures = 0
            self._last_logged = float("-inf")
