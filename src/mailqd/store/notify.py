"""LISTEN for new jobs on PostgreSQL, so an idle worker claims a new job within milliseconds.

The `email_queue` insert trigger, `requeue` and `rescue` NOTIFY the
`NOTIFY_CHANNEL`; the worker's listener turns each notification into a
wake-up call. The listener is only a shortcut: polling still runs, finds
jobs that become due by time (retries, scheduled sends), and is all there is
on SQLite or while the LISTEN connection is down. A notification can be
missed while the connection is down, so every (re)connect wakes the worker
once as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import psycopg
import structlog
from psycopg import sql

from mailqd.store.engine import is_postgresql, normalize_url
from mailqd.store.schema import NOTIFY_CHANNEL

__all__ = ["JobListener", "supports_listen"]

log = structlog.get_logger()

_CONNECT_TIMEOUT_SECONDS = 5
_FIRST_RETRY_SECONDS = 0.1
_MAX_RETRY_SECONDS = 5.0
_OUTAGE_LOG_INTERVAL = 30.0


def supports_listen(database_url: str) -> bool:
    """Whether the database can wake workers (PostgreSQL) or they must poll (SQLite)."""
    return is_postgresql(database_url)


def _libpq_url(database_url: str) -> str:
    return (
        normalize_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


class JobListener:
    """Keeps one autocommit connection LISTENing; calls `on_notify` for each notification.

    `run()` reconnects with capped exponential backoff until cancelled, and
    probes an idle connection every `probe_interval` seconds so a connection
    that died silently (a network cut, no RST) is noticed.
    """

    def __init__(
        self,
        database_url: str,
        on_notify: Callable[[], None],
        *,
        channel: str = NOTIFY_CHANNEL,
        probe_interval: float = 30.0,
    ) -> None:
        self._conninfo = _libpq_url(database_url)
        self._on_notify = on_notify
        self._channel = channel
        self._probe_interval = probe_interval
        self._connected = False
        self._listened = False
        self._connected_event = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while notifications can arrive; the worker polls in any case."""
        return self._connected

    async def wait_connected(self) -> None:
        """Return once LISTEN is in place (for tests and start-up ordering)."""
        await self._connected_event.wait()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after any connection failure."""
        delay = _FIRST_RETRY_SECONDS
        last_logged = float("-inf")
        while True:
            self._listened = False
            try:
                await self._listen_once()
            except (psycopg.Error, OSError) as exc:
                if self._listened:
                    delay = _FIRST_RETRY_SECONDS  # it worked for a while: retry quickly
                now = time.monotonic()
                if now - last_logged >= _OUTAGE_LOG_INTERVAL:
                    log.warning(
                        "listen connection down; polling until it is back",
                        error=str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__,
                        retry_in=round(delay, 2),
                    )
                    last_logged = now
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_SECONDS)

    async def _listen_once(self) -> None:
        """One connection's life: connect, LISTEN, relay notifications until it fails."""
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS
        )
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listened = True
            self._set_connected(True)
            self._on_notify()  # whatever was notified while we were away
            while True:
                async for _ in conn.notifies(timeout=self._probe_interval):
                    self._on_notify()
                await conn.execute("SELECT 1")
        finally:
            self._set_connected(False)
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    def _set_connected(self, value: bool) -> None:
        if value and not self._connected:
            log.debug("listening for new jobs", channel=self._channel)
        self._connected = value
        if value:
            self._connected_event.set()
        else:
            self._connected_event.clear()
