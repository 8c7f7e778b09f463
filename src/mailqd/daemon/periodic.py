"""One loop for the worker's maintenance services, each run at its own interval.

The services (rescuer, lease keeper, screening purger) each do one thing in
`run_once()` and know nothing of timing or outages; this loop runs each
when it is due, jittered so that the workers of a pool do not run theirs
in step, and notes failed store calls in the worker's `DatabaseOutage`. A
`StoreError` skips that round (the next is on schedule); anything else is
a bug and ends the loop, which stops the worker.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailqd.daemon.outage import DatabaseOutage
from mailqd.errors import StoreError

__all__ = ["Periodic", "Schedule", "Service", "ServiceResult"]


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a service runs: every `every` seconds, ±`jitter` of that.

    With `stagger`, the first run comes at a random point of the first
    interval (workers started together spread out); else after one interval.
    """

    every: float
    jitter: float = 0.0
    stagger: bool = False

    def __post_init__(self) -> None:
        if not self.every > 0:
            raise ValueError(f"a service's interval must be > 0 seconds, not {self.every}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter is a fraction of the interval in [0, 1), not {self.jitter}")


class ServiceResult(Protocol):
    @property
    def asked_store(self) -> bool:
        """Whether the run called the store (so its success ends an outage)."""
        ...


class Service(Protocol):
    name: str
    """Says what failed in the outage log ("rescuing expired leases")."""
    schedule: Schedule

    async def run_once(self) -> ServiceResult: ...


class Periodic:
    """Runs each service when due; `run_due(now)` is one turn, `run()` the loop around it.

    `time` and `sleep` are the loop's clock (monotonic seconds), injectable
    so a test steps through the schedule without waiting.
    """

    def __init__(
        self,
        services: Sequence[Service],
        outage: DatabaseOutage,
        *,
        time: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.services = list(services)
        self._outage = outage
        self._time = time
        self._rng = rng or random.Random()
        self._due: dict[str, float] = {}
        self.runs: dict[str, int] = {service.name: 0 for service in self.services}
        """How many times each service has run, by name."""

    def start(self, now: float) -> None:
        """Schedule every service's first run from `now`."""
        for service in self.services:
            schedule = service.schedule
            first = self._rng.uniform(0, schedule.every) if schedule.stagger else schedule.every
            self._due[service.name] = now + first

    async def run_due(self, now: float) -> float:
        """Run the services due at `now`, in order; returns when the next one is due."""
        if not self._due:
            self.start(now)
        due = [service for service in self.services if self._due[service.name] <= now]
        for service in due:
            self._due[service.name] = now + self._next_interval(service.schedule)
        # Together, so a slow call of one (an outage's connect timeout) does
        # not hold up the others: the lease keeper must not miss its turn.
        await asyncio.gather(*(self._run(service) for service in due))
        return min(self._due.values())

    async def run(self) -> None:
        """Run the services forever (until cancelled)."""
        if not self.services:
            await asyncio.Event().wait()
        clock = self._time or asyncio.get_running_loop().time
        while True:
            now = clock()
            next_due = await self.run_due(now)
            await asyncio.sleep(max(0.0, next_due - clock()))

    async def _run(self, service: Service) -> None:
        self.runs[service.name] += 1
        try:
            result = await service.run_once()
        except StoreError as exc:
            self._outage.failed(exc, service.name)
            return
        if result.asked_store:
            self._outage.succeeded()

    def _next_interval(self, schedule: Schedule) -> float:
        if not schedule.jitter:
            return schedule.every
        return schedule.every * self._rng.uniform(1 - schedule.jitter, 1 + schedule.jitter)
