"""Keeps the screening tables small: expired de-duplication rows and past hours' counts.

The claim ignores expired rows anyway; this only bounds the tables' size.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailqd.daemon.events import Events
from mailqd.daemon.periodic import Schedule
from mailqd.daemon.ports import Clock, DatabaseClock, JobLeases

__all__ = ["PurgeResult", "ScreeningPurger", "ScreeningPurgerConfig"]

SCREENING_PURGE_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class ScreeningPurgerConfig:
    dedup_window: float
    interval: float = SCREENING_PURGE_INTERVAL

    def __post_init__(self) -> None:
        if self.dedup_window < 0 or not self.interval > 0:
            raise ValueError(f"dedup_window must be >= 0 and interval > 0: {self}")


@dataclass(frozen=True, slots=True)
class PurgeResult:
    deleted: int = 0
    asked_store: bool = True


class ScreeningPurger:
    name = "purging old de-duplication and recipient counts"

    def __init__(
        self,
        leases: JobLeases,
        config: ScreeningPurgerConfig,
        *,
        clock: Clock | None = None,
        events: Events | None = None,
    ) -> None:
        self._leases = leases
        self.config = config
        self.schedule = Schedule(config.interval, jitter=0.25, stagger=True)
        self._clock = clock or DatabaseClock()
        self._events = events

    async def run_once(self) -> PurgeResult:
        deleted = await asyncio.to_thread(
            self._leases.purge_screening, self.config.dedup_window, self._clock.now()
        )
        if self._events is not None:
            self._events.emit("screening_purged", deleted=deleted)
        return PurgeResult(deleted)
