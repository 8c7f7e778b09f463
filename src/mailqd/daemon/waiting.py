"""Waiting on events with a timeout, in a way that never swallows a cancellation.

`asyncio.wait_for` on Python 3.11 can lose a cancellation that arrives just
as the awaited thing finishes, leaving a task that was told to stop running
forever; a worker's graceful stop depends on cancellations landing. These
helpers use `asyncio.timeout` and `asyncio.wait`, which do not have that race.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["wait_any", "with_timeout"]

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Return when any event is set (True), or after `timeout` seconds (False)."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


async def with_timeout(awaitable: Awaitable[T], timeout: float) -> T:
    """Await with a deadline; raises `TimeoutError` after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        return await awaitable
