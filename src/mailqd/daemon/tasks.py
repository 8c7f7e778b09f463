"""Running a worker's tasks side by side, and cancelling them so that nothing is left running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

__all__ = ["CANCEL_TIMEOUT", "cancel_and_wait", "run_beside"]

CANCEL_TIMEOUT = 5.0
"""Seconds to wait for a cancelled task to finish before giving up on it."""


async def run_beside(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    services: Sequence[asyncio.Task[None]],
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> BaseException | None:
    """Run `main(stop)` until `stop`; if a service dies, stop it too and return its error.

    Services loop forever and handle database errors themselves, so one
    that ends has hit a bug; the worker must not run on without, say,
    its completer (outcomes would never be recorded). `main` is given its
    own stop event and always waited for, so it never outlives this call.
    """
    stop_main = asyncio.Event()
    running = asyncio.create_task(main(stop_main), name="producer")
    stopped = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait(
            [running, stopped, *services], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stop_main.set()
        stopped.cancel()
        await asyncio.wait([running])
    if running.done() and not running.cancelled() and running.exception() is not None:
        return running.exception()
    for service in services:
        if service in done and not service.cancelled():
            error = service.exception() or RuntimeError(f"{service.get_name()} ended")
            (log or structlog.get_logger()).error(
                "worker service died; stopping", service=service.get_name()
            )
            return error
    return None


async def cancel_and_wait(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel and wait, so nothing is left running when this returns.

    A task that ignores its cancellation (a library that swallows it) is
    given up on after a few seconds rather than hanging the shutdown.
    """
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=CANCEL_TIMEOUT)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            structlog.get_logger().error("task failed", task=_name(task), exc_info=task.exception())
    if stuck:
        structlog.get_logger().error(
            "tasks did not stop when cancelled", tasks=[_name(t) for t in stuck]
        )


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
