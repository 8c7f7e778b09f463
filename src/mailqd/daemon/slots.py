"""The worker's delivery slots: how many sends may run at once, each with its own transport."""

from __future__ import annotations

import asyncio

from mailqd.daemon.waiting import wait_any, with_timeout
from mailqd.transport import Transport
from mailqd.transport.url import TransportFactory

__all__ = ["TRANSPORT_CLOSE_TIMEOUT", "Slots", "TransportFactory"]

TRANSPORT_CLOSE_TIMEOUT = 5.0


class Slots:
    """The worker's delivery slots: how many sends may run at once, each with its own transport.

    Transports are made on first use and kept between messages. One whose
    send was cancelled may be mid-dialogue, so it is retired (closed at the
    end) and the slot gets a fresh one next time.
    """

    def __init__(self, size: int, factory: TransportFactory) -> None:
        if size < 1:
            raise ValueError(f"a worker needs at least one delivery slot, not {size}")
        self._size = size
        self._factory = factory
        self._idle: list[Transport] = []
        self._busy = 0
        self._retired: list[Transport] = []
        self.freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self._size - self._busy

    def take(self) -> Transport:
        if self._busy >= self._size:
            raise RuntimeError("no free delivery slot")
        self._busy += 1
        return self._idle.pop() if self._idle else self._factory()

    async def wait_free(self, count: int, linger: float, stop: asyncio.Event) -> None:
        """Wait until `count` slots are free, or `linger` seconds after the first one is."""
        while self.free == 0 and not stop.is_set():
            self.freed.clear()
            await wait_any(stop, self.freed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while self.free < count and not stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.freed.clear()
            await wait_any(stop, self.freed, timeout=remaining)

    def put_back(self, transport: Transport, *, reusable: bool) -> None:
        self._busy -= 1
        (self._idle if reusable else self._retired).append(transport)
        self.freed.set()

    async def close_all(self) -> None:
        transports, self._idle, self._retired = [*self._idle, *self._retired], [], []
        await asyncio.gather(
            *(with_timeout(t.close(), TRANSPORT_CLOSE_TIMEOUT) for t in transports),
            return_exceptions=True,
        )
