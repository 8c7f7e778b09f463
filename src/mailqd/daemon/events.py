"""What the worker's parts announce, for tests (and later a console) to wait on.

Tests used to wait for log lines; rewording a log line then broke a test
that meant to wait for a state. The parts emit named events with a few
fields instead, and `Events.wait_for` waits for one with a deadline. The
hub keeps a short history, so an event that came before the wait began is
found too. Emitting costs an append; nothing is formatted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "Events"]

HISTORY = 256
"""Events kept for waits that start late; older ones are dropped. Their fields
are counts and job ids, never jobs, so what is kept stays small."""


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: `kind` (e.g. "rescued") and its fields."""

    kind: str
    data: Mapping[str, Any]


Predicate = Callable[[Event], bool]


class Events:
    """An in-process event hub: parts `emit`, tests `wait_for`.

    Kinds the worker emits: listener_started, claimed, set_aside,
    failed_unreadable, recorded, released, rescued, lease_extended,
    screening_purged, database_unavailable, database_reachable,
    waiting_for_sends, stopped.
    """

    def __init__(self, history: int = HISTORY) -> None:
        self._history: deque[Event] = deque(maxlen=history)
        self._waiters: list[tuple[str, Predicate | None, asyncio.Future[Event]]] = []

    def emit(self, kind: str, **data: Any) -> None:
        event = Event(kind, data)
        self._history.append(event)
        if not self._waiters:
            return
        waiting = []
        for waiter in self._waiters:
            wanted, predicate, future = waiter
            if future.done():
                continue
            if wanted == kind and (predicate is None or predicate(event)):
                future.set_result(event)
            else:
                waiting.append(waiter)
        self._waiters = waiting

    def seen(self, kind: str, predicate: Predicate | None = None) -> list[Event]:
        """The kept events of `kind` (matching `predicate`), oldest first."""
        return [e for e in self._history if e.kind == kind and (predicate is None or predicate(e))]

    async def wait_for(
        self, kind: str, predicate: Predicate | None = None, timeout: float = 15.0
    ) -> Event:
        """The first event of `kind` matching `predicate`, past or to come.

        Raises `TimeoutError` after `timeout` seconds.
        """
        found = self.seen(kind, predicate)
        if found:
            return found[0]
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, predicate, future))
        async with asyncio.timeout(timeout):
            return await future
