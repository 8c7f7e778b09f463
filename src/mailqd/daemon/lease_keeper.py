"""Extends the leases of jobs in flight, so a slow send is not taken for a dead worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from mailqd.daemon.events import Events
from mailqd.daemon.periodic import Schedule
from mailqd.daemon.ports import Clock, DatabaseClock, JobLeases

__all__ = ["LeaseExtension", "LeaseKeeper", "LeaseKeeperConfig"]


@dataclass(frozen=True, slots=True)
class LeaseKeeperConfig:
    """Leases of `lease_seconds`, renewed three times per lease."""

    owner: str
    lease_seconds: float

    def __post_init__(self) -> None:
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, not {self.lease_seconds}")
        if not self.owner:
            raise ValueError("a lease keeper needs its worker's owner name")

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3


@dataclass(frozen=True, slots=True)
class LeaseExtension:
    """The jobs whose leases were asked to be extended, and how many still were ours."""

    job_ids: list[str] = field(default_factory=list)
    extended: int = 0

    @property
    def asked_store(self) -> bool:
        return bool(self.job_ids)


class LeaseKeeper:
    """The maintenance service; `held()` says which jobs the worker holds now."""

    name = "extending leases"

    def __init__(
        self,
        leases: JobLeases,
        config: LeaseKeeperConfig,
        held: Callable[[], Collection[str]],
        *,
        clock: Clock | None = None,
        events: Events | None = None,
    ) -> None:
        self._leases = leases
        self.config = config
        self.schedule = Schedule(config.interval)
        self._held = held
        self._clock = clock or DatabaseClock()
        self._events = events

    async def run_once(self) -> LeaseExtension:
        held = list(self._held())
        if not held:
            return LeaseExtension()
        extended = await asyncio.to_thread(
            self._leases.extend_leases,
            held,
            self.config.owner,
            self.config.lease_seconds,
            self._clock.now(),
        )
        if self._events is not None:
            self._events.emit("lease_extended", job_ids=held, extended=extended)
        return LeaseExtension(held, extended)
