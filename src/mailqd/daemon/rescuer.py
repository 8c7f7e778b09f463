"""Returns jobs whose lease expired (their daemon died or hung) to the queue.

Every worker runs it, at jittered intervals: it is one cheap indexed
statement, so no single process is needed for it to happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from mailqd.daemon.events import Events
from mailqd.daemon.periodic import Schedule
from mailqd.daemon.ports import Clock, DatabaseClock, JobLeases

__all__ = ["RescueResult", "Rescuer", "RescuerConfig"]


@dataclass(frozen=True, slots=True)
class RescuerConfig:
    """`interval` between runs; `longest_lease` beyond which a lease is one no worker gives."""

    interval: float
    longest_lease: float
    limit: int = 1000

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.longest_lease > 0 and self.limit > 0):
            raise ValueError(f"rescuer interval, longest lease and limit must be > 0: {self}")

    @classmethod
    def for_lease(cls, lease_seconds: float, longest_lease: float) -> RescuerConfig:
        """Four runs per lease; others' leases may be longer than ours, up to twice."""
        return cls(lease_seconds / 4, max(longest_lease, 2 * lease_seconds))


@dataclass(frozen=True, slots=True)
class RescueResult:
    rescued: list[str] = field(default_factory=list)
    asked_store: bool = True


class Rescuer:
    """The maintenance service; `on_rescued(ids)` is told of every job it returned."""

    name = "rescuing expired leases"

    def __init__(
        self,
        leases: JobLeases,
        config: RescuerConfig,
        *,
        clock: Clock | None = None,
        events: Events | None = None,
        on_rescued: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._leases = leases
        self.config = config
        self.schedule = Schedule(config.interval, jitter=0.25, stagger=True)
        self._clock = clock or DatabaseClock()
        self._events = events
        self._on_rescued = on_rescued
        self._log = structlog.get_logger()

    async def run_once(self) -> RescueResult:
        rescued = await asyncio.to_thread(
            self._leases.rescue,
            now=self._clock.now(),
            limit=self.config.limit,
            longest_lease=self.config.longest_lease,
        )
        if rescued:
            self._log.warning("rescued jobs whose lease expired", count=len(rescued))
            if self._events is not None:
                self._events.emit("rescued", job_ids=rescued)
            if self._on_rescued is not None:
                self._on_rescued(rescued)
        return RescueResult(rescued)
