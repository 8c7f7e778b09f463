"""The worker's side of `rate_limit`: take tokens from the shared bucket before claiming.

The bucket lives in the database (`mailqd.store.ratelimit`), so the limit
holds for all workers of all daemons together. A worker asks for as many
tokens as it has free delivery slots, claims at most that many jobs, and
gives back what the claim did not use. When the bucket is empty it sleeps,
on the event loop, for as long as the store says the next token takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mailqd.daemon.ports import Clock, DatabaseClock
from mailqd.daemon.waiting import wait_any
from mailqd.store import Store
from mailqd.store.ratelimit import GLOBAL_BUCKET, RateLimits

__all__ = ["RateLimiter"]


class RateLimiter:
    """Messages per second across every worker sharing the database; 0 turns it off."""

    def __init__(
        self,
        store: Store,
        rate: float,
        *,
        bucket: str = GLOBAL_BUCKET,
        on_wait: Callable[[float], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`on_wait(seconds)` is told of every wait for an empty bucket (for the metrics)."""
        self.rate = rate
        self.bucket = bucket
        # One second's worth, and at least one message: short bursts are
        # allowed, a long run averages `rate`.
        self.burst = max(1.0, rate)
        self._limits = RateLimits(store)
        self._on_wait = on_wait
        self._clock = clock or DatabaseClock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def acquire(self, want: int, stop: asyncio.Event) -> int:
        """Wait until at least one of `want` tokens is granted; 0 only if `stop` is set first.

        Raises `StoreError` when the database cannot be asked.
        """
        if not self.enabled or want <= 0:
            return want
        while not stop.is_set():
            now = self._clock.now()
            grant = await asyncio.to_thread(
                self._limits.take,
                self.bucket,
                want,
                self.rate,
                self.burst,
                None if now is None else now.timestamp(),
            )
            if grant.granted:
                return grant.granted
            loop = asyncio.get_running_loop()
            waited_from = loop.time()
            await wait_any(stop, timeout=grant.wait_seconds)
            if self._on_wait is not None:
                self._on_wait(loop.time() - waited_from)
        return 0

    async def give_back(self, count: int) -> None:
        """Return tokens that no message used (the claim found fewer jobs)."""
        if self.enabled and count > 0:
            await asyncio.to_thread(self._limits.give_back, self.bucket, count, self.burst)
