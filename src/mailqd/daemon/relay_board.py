"""A worker's view of its relays' circuit breakers (`mailqd.breaker`), shared through the store.

The board is the routed transport's `RelayGate`: before a send it says
whether a relay may be tried (up, or down with its probe due and this
worker the one that took it); after a send it reports a relay failure, or
the first success after failures, to the store, which applies the rules
to the one shared row per relay, so that every worker of every daemon sees
the same breaker. Its own view is refreshed from the store by
`run_once()` (a maintenance service, about every second) and from the
state each report returns, so a worker that sees a relay fail stops
trying it at once, and the others within a refresh.

The producer asks `claim_limit` before it claims: while every relay of the
default route is down it claims nothing (jobs stay pending, untouched)
until a probe is due, then one job, the probe's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from mailqd.breaker import BreakerPolicy, RelayState, after_failure, after_success
from mailqd.daemon.events import Events
from mailqd.daemon.periodic import Schedule
from mailqd.daemon.ports import Clock, DatabaseClock
from mailqd.daemon.ratelimit import RateLimiter
from mailqd.errors import RelayUnavailableError, StoreError
from mailqd.logging import mask_addresses_in
from mailqd.routes import RelayPlan

__all__ = ["RelayBoard", "RelayHealthPort", "RelayMetrics"]

REFRESH_SECONDS = 1.0


class RelayHealthPort(Protocol):
    """What the board needs of `Store.relay_health` (the fake store has one too)."""

    def states(self) -> list[RelayState]: ...

    def failed(
        self,
        relay: str,
        *,
        reason: str,
        error: str,
        policy: BreakerPolicy,
        opens_now: bool,
        owner: str,
        now: datetime | None = None,
    ) -> RelayState: ...

    def succeeded(self, relay: str, now: datetime | None = None) -> RelayState | None: ...

    def take_probe(
        self, relay: str, owner: str, now: datetime | None = None
    ) -> RelayState | None: ...


class RelayMetrics(Protocol):
    def relay_failed(self, relay: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What one refresh found: the relays down now."""

    down: tuple[str, ...]
    asked_store: bool = True


class RelayBoard:
    """One worker's breakers; also the maintenance service that refreshes them."""

    name = "refreshing relay health"

    def __init__(
        self,
        health: RelayHealthPort,
        plan: RelayPlan,
        policy: BreakerPolicy,
        owner: str,
        *,
        clock: Clock | None = None,
        events: Events | None = None,
        metrics: RelayMetrics | None = None,
        on_up: Callable[[], None] | None = None,
        refresh_every: float = REFRESH_SECONDS,
        rate_limiters: Mapping[str, RateLimiter] | None = None,
    ) -> None:
        self._health = health
        self._plan = plan
        self._policy = policy
        self._owner = owner
        self._clock = clock or DatabaseClock()
        self._events = events
        self._metrics = metrics
        self._on_up = on_up
        self._log = structlog.get_logger().bind(worker=owner)
        self._states = {name: RelayState(name) for name in plan.relays}
        self._reserved: set[str] = set()
        self._limiters = dict(rate_limiters or {})
        self._tokens: dict[str, int] = {}
        self._never = asyncio.Event()
        self.schedule = Schedule(refresh_every, jitter=0.2, stagger=True)

    @property
    def plan(self) -> RelayPlan:
        return self._plan

    def state(self, relay: str) -> RelayState:
        return self._states[relay]

    # -- the routed transport's gate ----------------------------------------------------

    def is_clean(self, relay: str) -> bool:
        return self._states[relay].clean and relay not in self._limiters

    async def admit(self, relay: str) -> bool:
        state = self._states[relay]
        if state.up:
            if relay in self._limiters:
                await self._token(relay)
            return True
        if relay in self._reserved:  # the producer took this probe for the job it claimed
            self._reserved.discard(relay)
            return True
        return await self._take_probe(relay)

    async def _token(self, relay: str) -> None:
        """Wait for one of the relay's `rate_limit` tokens (shared by all daemons).

        Taken from the store a few at a time (a tenth of a second's worth),
        so that a limited relay costs one round trip per few messages.
        """
        if self._tokens.get(relay, 0) > 0:
            self._tokens[relay] -= 1
            return
        limiter = self._limiters[relay]
        want = max(1, int(limiter.rate / 10))
        try:
            granted = await limiter.acquire(want, self._never)
        except StoreError:  # the bucket cannot be read: send, rather than fail the message
            self._log.debug("relay rate-limit bucket unavailable", relay=relay)
            return
        self._tokens[relay] = granted - 1

    async def _take_probe(self, relay: str) -> bool:
        state = self._states[relay]
        now = self._now()
        if not state.probe_due(now):
            return False
        try:
            taken = await asyncio.to_thread(
                self._health.take_probe, relay, self._owner, self._clock.now()
            )
        except StoreError:
            return False
        if taken is None:  # another worker probes; look again after its interval
            self._states[relay] = _later(state, now, self._policy)
            return False
        self._states[relay] = taken
        self._emit("relay_probe", relay=relay)
        self._log.info("probing relay", relay=relay, down_since=_iso(state.down_since))
        return True

    async def failed(self, relay: str, error: RelayUnavailableError) -> None:
        if self._metrics is not None:
            self._metrics.relay_failed(relay, error.reason)
        before = self._states[relay]
        text = str(error)
        try:
            after = await asyncio.to_thread(
                self._health.failed,
                relay,
                reason=error.reason,
                error=text,
                policy=self._policy,
                opens_now=error.opens_breaker_now,
                owner=self._owner,
                now=self._clock.now(),
            )
        except StoreError:  # keep a breaker of our own until the database answers again
            after = after_failure(
                before,
                reason=error.reason,
                error=text,
                at=self._now(),
                policy=self._policy,
                opens_now=error.opens_breaker_now,
                owner=self._owner,
            )
        self._states[relay] = after
        self._emit("relay_failed", relay=relay, reason=error.reason)
        if before.up and not after.up:
            self._went_down(after)

    async def succeeded(self, relay: str) -> None:
        before = self._states[relay]
        if before.clean:
            return
        with contextlib.suppress(StoreError):  # the next success or refresh tells the store
            await asyncio.to_thread(self._health.succeeded, relay, self._clock.now())
        self._states[relay] = after_success(before, self._now())
        if not before.up:
            self._went_up(relay)

    def retry_after(self, relays: Sequence[str]) -> float:
        now = self._now()
        waits = []
        for relay in relays:
            state = self._states[relay]
            if state.up or state.probe_at is None:
                return self._policy.first_probe
            waits.append((state.probe_at - now).total_seconds())
        return max(1.0, min(waits))

    # -- the producer's question ----------------------------------------------------------

    async def claim_limit(self, free: int) -> tuple[int, float]:
        """How many jobs to claim now, and if none, how long to wait before asking again.

        All the default route's relays down: none until one's probe is due
        and this worker takes it, then one (the probe's job). Routes other
        than the default are not judged here: their jobs are claimed and
        deferred at send time.
        """
        states = [self._states[relay] for relay in self._plan.default_route.relays]
        if any(state.up for state in states):
            return free, 0.0
        for state in states:
            if await self._take_probe(state.relay):
                self._reserved.add(state.relay)
                return min(free, 1), 0.0
        now = self._now()
        states = [self._states[relay] for relay in self._plan.default_route.relays]
        due = [s.probe_at for s in states if s.probe_at is not None]
        wait = min((d - now).total_seconds() for d in due) if due else self._policy.first_probe
        return 0, max(0.05, wait)

    @property
    def down(self) -> list[str]:
        return [name for name, state in self._states.items() if not state.up]

    # -- the maintenance service -------------------------------------------------------

    async def run_once(self) -> Refreshed:
        """Read every relay's shared state; note relays that went down or came back."""
        rows = {state.relay: state for state in await asyncio.to_thread(self._health.states)}
        for name, before in list(self._states.items()):
            after = rows.get(name, RelayState(name))
            self._states[name] = after
            if before.up and not after.up:
                self._went_down(after)
            elif not before.up and after.up:
                self._went_up(name)
        return Refreshed(down=tuple(self.down))

    # -- helpers -------------------------------------------------------------------------

    def _went_down(self, state: RelayState) -> None:
        self._log.warning(
            "relay down; deferring its mail",
            relay=state.relay,
            reason=state.last_reason,
            error=mask_addresses_in(state.last_error or ""),
            probe_in=round(state.probe_interval, 2),
        )
        self._emit("relay_down", relay=state.relay, reason=state.last_reason)

    def _went_up(self, relay: str) -> None:
        self._log.info("relay up", relay=relay)
        self._emit("relay_up", relay=relay)
        if self._on_up is not None:
            self._on_up()

    def _now(self) -> datetime:
        return self._clock.now() or datetime.now(UTC)

    def _emit(self, name: str, **fields: object) -> None:
        if self._events is not None:
            self._events.emit(name, **fields)


def _later(state: RelayState, now: datetime, policy: BreakerPolicy) -> RelayState:
    wait = max(state.probe_interval, policy.first_probe)
    return replace(state, probe_at=now + timedelta(seconds=wait))


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None
