"""What the worker's parts need from outside: the job lease protocol and a clock.

The parts are typed against these protocols, not against `Store`, so a test
can run them on an in-memory store (tests/fake_store.py) that keeps the same
rules, and the contract suite (tests/test_store_contract.py) holds every
implementation to them. "Now" is a port too: every time-based call the
parts make passes `now=clock.now()`, which is None in production (the
database's clock decides, one clock for every daemon) and a fixed or
stepped time in a test, so cap, expiry and rescue tests need not wait.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from mailqd.store import Completion
from mailqd.store.screening import ScreenedClaim, ScreenRules

__all__ = ["Clock", "DatabaseClock", "FixedClock", "JobLeases"]


class Clock(Protocol):
    """Where the worker's "now" comes from; None means "the database's clock"."""

    def now(self) -> datetime | None: ...


class DatabaseClock:
    """The production clock: defers to the database, so all daemons agree on the time."""

    def now(self) -> None:
        return None


class FixedClock:
    """A clock a test sets and moves by hand."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


class JobLeases(Protocol):
    """The job lease protocol: the `Store` methods a worker calls while it runs.

    Claims hand jobs over under a lease (`owner`, `lease_seconds`); every
    later call changes only jobs whose lease `owner` still holds, except
    `rescue`, which takes back jobs whose lease ran out.
    """

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> ScreenedClaim: ...

    def claim_screened(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        rules: ScreenRules,
        now: datetime | None = None,
    ) -> ScreenedClaim: ...

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int: ...

    def release(
        self,
        job_ids: Sequence[str],
        owner: str,
        now: datetime | None = None,
        *,
        reasons: Mapping[str, str] | None = None,
        counted: Collection[str] = (),
    ) -> int: ...

    def extend_leases(
        self, job_ids: Sequence[str], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> int: ...

    def rescue(
        self,
        *,
        owner: str | None = None,
        reason: str | None = None,
        now: datetime | None = None,
        limit: int = 1000,
        longest_lease: float = ...,
    ) -> list[str]: ...

    def purge_screening(self, dedup_window: float, now: datetime | None = None) -> int: ...
