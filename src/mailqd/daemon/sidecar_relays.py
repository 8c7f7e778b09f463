"""The relays' health as the sidecar shows it: `mailqd_relay_up`, `/stats` and `/healthz`.

Pure: the configured relays (`RelayPlan`) and the breakers' rows
(`Store.relay_health.states()`) in, what to show out. A relay with no row,
or a row with no `down_since`, is up; a row of a relay that is no longer
configured is not shown. The daemon is degraded while any relay is down,
and unhealthy only while every relay of the default route is down: mail
then goes nowhere but for the routes that name other relays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailqd.breaker import RelayState
from mailqd.logging import mask_addresses_in
from mailqd.routes import RelayPlan

__all__ = ["RelayHealth", "RelayView", "relay_health"]


@dataclass(frozen=True, slots=True)
class RelayView:
    """One configured relay's state, fit to be shown (its last error's addresses masked)."""

    name: str
    up: bool
    since: datetime | None
    """When it was marked down; None while up."""
    failures: int
    """Relay failures counted since it was last healthy (over every worker)."""
    last_reason: str | None
    last_error: str | None
    last_failure_at: datetime | None
    next_probe_at: datetime | None
    """While down: when a worker may try it again."""

    @classmethod
    def of(cls, name: str, state: RelayState | None) -> RelayView:
        state = state or RelayState(relay=name)
        return cls(
            name=name,
            up=state.up,
            since=state.down_since,
            failures=state.failures,
            last_reason=state.last_reason,
            last_error=mask_addresses_in(state.last_error) if state.last_error else None,
            last_failure_at=state.last_failure_at,
            next_probe_at=None if state.up else state.probe_at,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "up": self.up,
            "since": _iso(self.since),
            "failures": self.failures,
            "last_reason": self.last_reason,
            "last_error": self.last_error,
            "last_failure_at": _iso(self.last_failure_at),
            "next_probe_at": _iso(self.next_probe_at),
        }


@dataclass(frozen=True, slots=True)
class RelayHealth:
    """Every configured relay, in the configuration's order, and what that means for the daemon."""

    relays: tuple[RelayView, ...]
    default_route: tuple[str, ...]

    @property
    def down(self) -> list[RelayView]:
        return [relay for relay in self.relays if not relay.up]

    @property
    def default_route_down(self) -> bool:
        """Every relay of the default route is down: most mail can go nowhere."""
        up = {relay.name for relay in self.relays if relay.up}
        return bool(self.default_route) and not up.intersection(self.default_route)

    def up_by_name(self) -> tuple[tuple[str, bool], ...]:
        return tuple((relay.name, relay.up) for relay in self.relays)

    def problem(self) -> str | None:
        """Why `/healthz` is 503 because of relays; None while the default route has one up."""
        if not self.default_route_down:
            return None
        return "every relay of the default route is down: " + ", ".join(self.default_route)

    def degradation(self) -> str | None:
        """Which relays are down, for a `/healthz` that stays 200; None while all are up."""
        down = self.down
        if not down:
            return None
        described = [
            f"{relay.name} ({relay.last_reason})" if relay.last_reason else relay.name
            for relay in down
        ]
        return "relay down: " + ", ".join(described)


def relay_health(plan: RelayPlan, states: Iterable[RelayState]) -> RelayHealth:
    """The configured relays' views from the breakers' rows (no row: up)."""
    by_name = {state.relay: state for state in states}
    return RelayHealth(
        relays=tuple(RelayView.of(name, by_name.get(name)) for name in plan.relays),
        default_route=plan.default_route.relays,
    )


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()
