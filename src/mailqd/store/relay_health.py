"""Relay health in `mailqd_relay_state`: the circuit breaker every worker shares.

Reached as `Store.relays_health`. The rules are `mailqd.breaker`'s; this
module only reads and writes them atomically: `failed` takes the row's
lock (an upsert first, so there is a row to lock on both databases)
and applies `after_failure`; `take_probe` is one conditional UPDATE, so
of all the workers whose probe is due exactly one gets it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.breaker import BreakerPolicy, RelayState, after_failure, after_success
from mailqd.store.database import Database
from mailqd.store.relay_tables import relay_state as rs
from mailqd.store.schema import add_seconds
from mailqd.store.sql import at_time

__all__ = ["RelayHealthStore"]

_FIELDS = tuple(f.name for f in dataclasses.fields(RelayState))


def _state(row: Any) -> RelayState:
    values = row._mapping
    return RelayState(**{name: values[name] for name in _FIELDS})


class RelayHealthStore:
    """The breakers of one database's relays."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def states(self) -> list[RelayState]:
        """Every relay with a recorded state (a relay without one is up)."""
        with self._db.begin() as conn:
            return [_state(row) for row in conn.execute(sa.select(rs).order_by(rs.c.relay))]

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
    ) -> RelayState:
        """Count one relay failure; returns the state after it (down once the policy says)."""
        with self._db.begin() as conn:
            at = conn.execute(sa.select(at_time(now))).scalar_one()
            conn.execute(
                self._db.dialect.insert(rs)
                .values(relay=relay, updated_at=at)
                .on_conflict_do_nothing(index_elements=[rs.c.relay])
            )
            row = conn.execute(sa.select(rs).where(rs.c.relay == relay).with_for_update()).one()
            new = after_failure(
                _state(row),
                reason=reason,
                error=error[:2000],
                at=at,
                policy=policy,
                opens_now=opens_now,
                owner=owner,
            )
            conn.execute(rs.update().where(rs.c.relay == relay).values(_values(new)))
        return new

    def succeeded(self, relay: str, now: datetime | None = None) -> RelayState | None:
        """Mark the relay up with no failures; returns the new state, None if it was clean."""
        with self._db.begin() as conn:
            at = conn.execute(sa.select(at_time(now))).scalar_one()
            row = conn.execute(
                sa.select(rs)
                .where(rs.c.relay == relay, (rs.c.failures > 0) | rs.c.down_since.is_not(None))
                .with_for_update()
            ).first()
            if row is None:
                return None
            new = after_success(_state(row), at)
            conn.execute(rs.update().where(rs.c.relay == relay).values(_values(new)))
        return new

    def take_probe(self, relay: str, owner: str, now: datetime | None = None) -> RelayState | None:
        """Become the one probing the down relay, if its probe is due; the new state, or None.

        The next probe moves `probe_interval` ahead at once, so a worker
        that dies while probing holds the probe up no longer than that.
        """
        at = at_time(now)
        due = rs.c.down_since.is_not(None) & (rs.c.probe_at.is_(None) | (rs.c.probe_at <= at))
        stmt = (
            rs.update()
            .where(rs.c.relay == relay, due)
            .values(
                probe_owner=owner,
                probe_at=add_seconds(at, rs.c.probe_interval),
                updated_at=at,
            )
            .returning(*rs.c)
        )
        with self._db.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _state(row)

    def forget(self, relay: str) -> None:
        """Drop a relay's state (`mailqctl relays remove`, or reset by an operator)."""
        with self._db.begin() as conn:
            conn.execute(rs.delete().where(rs.c.relay == relay))


def _values(state: RelayState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _FIELDS if name != "relay"}
