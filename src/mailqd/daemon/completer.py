"""Records delivery outcomes in batches (River's batch completer).

One `store.complete` per message would make the database round trip, not
SMTP, the limit on throughput. Delivery slots hand their `Completion`s to
the completer, which writes them together: as soon as `max_batch` are
waiting, or `max_delay` after the first one arrived. An outcome is dropped
from memory only once it is committed; while the database is down they are
kept and retried, so a sent message is never forgotten (at worst, its lease
expires first and it is sent again, which at-least-once allows).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from mailqd.daemon.outage import DatabaseOutage
from mailqd.daemon.ports import Clock, DatabaseClock, JobLeases
from mailqd.daemon.waiting import wait_any
from mailqd.errors import StoreError
from mailqd.store import Completion

__all__ = ["Completer"]

OnRecorded = Callable[[Sequence[Completion]], None]


class Completer:
    """Buffers `Completion`s and writes them with `store.complete` in batches."""

    def __init__(
        self,
        store: JobLeases,
        *,
        on_recorded: OnRecorded,
        outage: DatabaseOutage | None = None,
        max_batch: int = 200,
        max_delay: float = 0.005,
        clock: Clock | None = None,
    ) -> None:
        if max_batch < 1 or max_delay < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay >= 0: {max_batch}, {max_delay}")
        self._store = store
        self._clock = clock or DatabaseClock()
        self._on_recorded = on_recorded
        self._outage = outage or DatabaseOutage()
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._pending: list[Completion] = []
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Outcomes received and not yet committed."""
        return len(self._pending)

    def pending_job_ids(self) -> set[str]:
        return {c.job_id for c in self._pending}

    def add(self, completion: Completion, *, last_for_now: bool = False) -> None:
        """Queue an outcome; `last_for_now` (no other send in flight) writes without waiting.

        Waiting only pays when more outcomes are about to arrive; an idle
        worker's single message is recorded at once.
        """
        self._pending.append(completion)
        self._arrived.set()
        if last_for_now or len(self._pending) >= self._max_batch:
            self._full.set()

    async def run(self) -> None:
        """Flush batches until cancelled; a failed write is retried after a backoff."""
        while True:
            await self._arrived.wait()
            if len(self._pending) < self._max_batch:
                await wait_any(self._full, timeout=self._max_delay)
            try:
                await self.flush()
            except StoreError as exc:
                await asyncio.sleep(self._outage.failed(exc, "recording outcomes"))

    async def flush(self) -> None:
        """Commit everything waiting now; raises `StoreError` (keeping it all) on failure."""
        async with self._lock:
            while self._pending:
                await self._write(self._pending[: self._max_batch])
            self._arrived.clear()
            self._full.clear()

    async def _write(self, batch: list[Completion]) -> None:
        """Commit one batch and forget it; a cancellation waits for the write to land.

        The write runs in a thread that cancellation cannot stop, so the
        books are settled before the cancellation is passed on; otherwise
        the batch would stay pending and be recorded twice.
        """
        now = self._clock.now()
        write = asyncio.ensure_future(asyncio.to_thread(self._store.complete, batch, now))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                self._recorded(batch)
            raise
        self._recorded(batch)

    def _recorded(self, batch: list[Completion]) -> None:
        self._outage.succeeded()
        del self._pending[: len(batch)]
        self._on_recorded(batch)

    async def flush_until(self, deadline: float) -> bool:
        """Keep trying to flush until the loop-clock `deadline`; False if outcomes remain."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.flush()
                return True
            except StoreError as exc:
                delay = self._outage.failed(exc, "recording outcomes at shutdown")
                if loop.time() + delay >= deadline:
                    return False
                await asyncio.sleep(delay)
