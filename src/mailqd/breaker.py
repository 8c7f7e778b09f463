"""The circuit breaker of a relay: its shared state and the pure rules that change it.

The state lives in the database (`mailqd_relay_state`, `mailqd.store.relay_health`),
so every worker of every daemon sees one breaker per relay; the store
applies `after_failure` and `after_success` to it in a transaction, and
the fake store of the tests applies the same functions.

- `relay_failure_threshold` consecutive relay failures, counted over all
  workers, mark the relay down; a TLS or AUTH failure marks it down at once.
- While down, one worker at a time may probe it (`take_probe`): the first
  probe comes `relay_probe_interval` seconds after the relay went down, and
  each failed probe doubles the wait, up to `relay_probe_max`.
- The first success (a probe, or a send that was already under way) marks
  it up again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

__all__ = ["BreakerPolicy", "RelayState", "after_failure", "after_success"]


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    threshold: int = 3
    first_probe: float = 5.0
    max_probe: float = 300.0

    def __post_init__(self) -> None:
        if self.threshold < 1 or not 0 < self.first_probe <= self.max_probe:
            raise ValueError(f"not a breaker policy: {self}")

    @classmethod
    def from_settings(cls, settings: Any) -> BreakerPolicy:
        return cls(
            threshold=settings.relay_failure_threshold,
            first_probe=settings.relay_probe_interval,
            max_probe=settings.relay_probe_max,
        )


@dataclass(frozen=True, slots=True)
class RelayState:
    """One relay's breaker. A relay with no recorded state is up with no failures."""

    relay: str
    failures: int = 0
    down_since: datetime | None = None
    probe_at: datetime | None = None
    probe_interval: float = 0.0
    probe_owner: str | None = None
    last_reason: str | None = None
    last_error: str | None = None
    last_failure_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    @property
    def clean(self) -> bool:
        """Up with no failure counted: a success has nothing to reset."""
        return self.down_since is None and self.failures == 0

    def probe_due(self, now: datetime) -> bool:
        return self.down_since is not None and (self.probe_at is None or self.probe_at <= now)


def after_failure(
    state: RelayState,
    *,
    reason: str,
    error: str,
    at: datetime,
    policy: BreakerPolicy,
    opens_now: bool,
    owner: str,
) -> RelayState:
    """The state after one relay failure reported by `owner` at `at`.

    A failure while the relay is down moves the next probe only when it was
    the probe that failed (`owner` took it): sends that began before the
    breaker opened and fail now do not push the probe further away.
    """
    counted = dataclasses.replace(
        state,
        failures=state.failures + 1,
        last_reason=reason,
        last_error=error,
        last_failure_at=at,
        updated_at=at,
    )
    if state.down_since is None:
        if counted.failures < policy.threshold and not opens_now:
            return counted
        return _probe_in(dataclasses.replace(counted, down_since=at), policy.first_probe, at)
    if state.probe_owner == owner:  # the probe failed: wait twice as long for the next
        interval = min(policy.max_probe, max(state.probe_interval, policy.first_probe) * 2)
        return _probe_in(counted, interval, at)
    return counted


def _probe_in(state: RelayState, interval: float, at: datetime) -> RelayState:
    return dataclasses.replace(
        state,
        probe_at=at + timedelta(seconds=interval),
        probe_interval=interval,
        probe_owner=None,
    )


def after_success(state: RelayState, at: datetime) -> RelayState:
    """Up, no failures counted; the last error is kept for the operator's view."""
    return RelayState(
        relay=state.relay,
        last_reason=state.last_reason,
        last_error=state.last_error,
        last_failure_at=state.last_failure_at,
        updated_at=at,
    )
