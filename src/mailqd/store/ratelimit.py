"""A token bucket kept in the database, so one rate limit holds for every daemon sharing it.

Each bucket is one row of `mailqd_rate_limit`. Taking tokens is a single
upsert that refills the bucket for the time elapsed since its last use,
grants what is there (up to what was asked) and returns the grant, so
concurrent takers on any host are serialised by the row and can never
together exceed `burst + rate * elapsed`. Time is the database's clock
(epoch seconds, as a float) unless a `now` is passed, as tests do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailqd.store.schema import rate_limit
from mailqd.store.store import Store, translate_errors

__all__ = ["GLOBAL_BUCKET", "RateLimits", "TokenGrant"]

GLOBAL_BUCKET = "global"
"""The bucket behind `settings.rate_limit` (messages per second, all daemons together)."""

r = rate_limit


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a take got: `granted` tokens now, else how long until one is available."""

    granted: int
    tokens_left: float
    wait_seconds: float


class RateLimits:
    """The token buckets of one database."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._dialect = store.dialect

    def take(
        self, name: str, want: int, rate: float, burst: float, now: float | None = None
    ) -> TokenGrant:
        """Take up to `want` tokens from bucket `name` (refilling at `rate`/s, holding `burst`).

        A bucket that does not exist yet starts full.
        """
        if want <= 0 or rate <= 0:
            raise ValueError("take() needs want >= 1 and rate > 0")
        at = self._epoch(now)
        elapsed = self._greatest(at - r.c.refilled_at, sa.literal(0.0))
        available = self._least(sa.literal(float(burst)), r.c.tokens + elapsed * rate)
        grant = self._least(sa.literal(want), self._floor(available))
        first = min(want, int(burst))
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        stmt = (
            insert(r)
            .values(name=name, tokens=float(burst) - first, refilled_at=at, granted=first)
            .on_conflict_do_update(
                index_elements=[r.c.name],
                set_={
                    "tokens": available - grant,
                    "refilled_at": self._greatest(at, r.c.refilled_at),
                    "granted": grant,
                },
            )
            .returning(r.c.granted, r.c.tokens)
        )
        with translate_errors(), self._store.engine.begin() as conn:
            granted, left = conn.execute(stmt).one()
        wait = 0.0 if granted else max(0.0, (1.0 - left) / rate)
        return TokenGrant(granted=int(granted), tokens_left=float(left), wait_seconds=wait)

    def give_back(self, name: str, count: int, burst: float) -> None:
        """Return tokens taken for messages that turned out not to exist (an empty claim)."""
        if count <= 0:
            return
        stmt = (
            r.update()
            .where(r.c.name == name)
            .values(tokens=self._least(sa.literal(float(burst)), r.c.tokens + count))
        )
        with translate_errors(), self._store.engine.begin() as conn:
            conn.execute(stmt)

    def tokens(self, name: str) -> float | None:
        """The bucket's token count as of its last use (None if never used); for tests and stats."""
        with translate_errors(), self._store.engine.begin() as conn:
            value = conn.execute(sa.select(r.c.tokens).where(r.c.name == name)).scalar()
        return None if value is None else float(value)

    # -- the few expressions that differ between the databases ---------------

    def _epoch(self, now: float | None) -> sa.ColumnElement[float]:
        if now is not None:
            return sa.literal(float(now), type_=sa.Float)
        if self._dialect == "postgresql":
            return sa.cast(sa.extract("epoch", sa.func.statement_timestamp()), sa.Float)
        return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400.0, sa.Float)

    def _greatest(self, *args: sa.ColumnElement[float]) -> sa.ColumnElement[float]:
        name = "greatest" if self._dialect == "postgresql" else "max"
        return getattr(sa.func, name)(*args)  # type: ignore[no-any-return]

    def _least(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
        name = "least" if self._dialect == "postgresql" else "min"
        return getattr(sa.func, name)(*args)  # type: ignore[no-any-return]

    def _floor(self, value: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
        """Whole tokens. SQLite's CAST truncates: floor, for the non-negative counts here."""
        if self._dialect == "postgresql":
            return sa.cast(sa.func.floor(value), sa.Integer)
        return sa.cast(value, sa.Integer)
