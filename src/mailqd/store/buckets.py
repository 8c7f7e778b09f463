"""Token buckets kept in the database, on a connection the caller holds.

Each bucket is one row of `mailqd_rate_limit`. Taking tokens is a single
upsert that refills the bucket for the time elapsed since its last use,
grants what is there (up to what was asked) and returns the grant, so
concurrent takers on any host are serialised by the row and can never
together exceed `burst + rate * elapsed`. Time is epoch seconds, as a
float: the database's clock unless a `now` is passed.

Two callers share these statements: `RateLimits` (the global `rate_limit`,
each take its own transaction) and the claim-time screening (the
per-domain limits, taken inside the claim's transaction; see
`mailqd.store.screening`). A bucket's `reserved_until` is for the second:
the time up to which jobs that found the bucket empty have been given
slots to come back in, so that a backlog is spread out rather than
re-claimed all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from mailqd.store.dialects import Dialect
from mailqd.store.schema import rate_limit

__all__ = ["TokenGrant", "booked_ahead", "give_back", "reserve", "take", "tokens"]

r = rate_limit

SLOT_MARGIN = 0.005
"""Seconds a slot starts after its token is due, so a job claimed on time finds the token
(SQLite keeps milliseconds, and epoch seconds as floats are not exact)."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a take got: `granted` tokens now, else how long until one is available."""

    granted: int
    tokens_left: float
    wait_seconds: float


def take(
    conn: sa.Connection,
    dialect: Dialect,
    name: str,
    want: int,
    rate: float,
    burst: float,
    now: float | None = None,
) -> TokenGrant:
    """Take up to `want` tokens from bucket `name` (refilling at `rate`/s, holding `burst`).

    A bucket that does not exist yet starts full. On PostgreSQL the row
    stays locked until `conn`'s transaction ends.
    """
    if want <= 0 or rate <= 0:
        raise ValueError("take() needs want >= 1 and rate > 0")
    at = dialect.epoch(now)
    elapsed = dialect.greatest(at - r.c.refilled_at, sa.literal(0.0))
    available = dialect.least(sa.literal(float(burst)), r.c.tokens + elapsed * rate)
    grant = dialect.least(sa.literal(want), dialect.floor_int(available))
    first = min(want, int(burst))
    stmt = (
        dialect.insert(r)
        .values(name=name, tokens=float(burst) - first, refilled_at=at, granted=first)
        .on_conflict_do_update(
            index_elements=[r.c.name],
            set_={
                "tokens": available - grant,
                "refilled_at": dialect.greatest(at, r.c.refilled_at),
                "granted": grant,
            },
        )
        .returning(r.c.granted, r.c.tokens)
    )
    granted, left = conn.execute(stmt).one()
    wait = 0.0 if granted else max(0.0, (1.0 - left) / rate)
    return TokenGrant(granted=int(granted), tokens_left=float(left), wait_seconds=wait)


def give_back(conn: sa.Connection, dialect: Dialect, name: str, count: int, burst: float) -> None:
    """Return `count` tokens that were taken and not used (never more than `burst`)."""
    if count <= 0:
        return
    stmt = (
        r.update()
        .where(r.c.name == name)
        .values(tokens=dialect.least(sa.literal(float(burst)), r.c.tokens + count))
    )
    conn.execute(stmt)


def reserve(
    conn: sa.Connection, dialect: Dialect, name: str, count: int, rate: float, now: float
) -> float:
    """Hand out `count` slots, `1/rate` apart, to jobs that found bucket `name` empty.

    The first slot is when the bucket's next token arrives (and
    `SLOT_MARGIN`), or the end of
    the slots already handed out if that is later (`reserved_until`, which
    moves on by `count / rate`). Returns the first slot (epoch seconds);
    the k-th job is to come back at `first + k / rate`. Call after `take`
    on the same bucket, in the same transaction.
    """
    wait = dialect.greatest(sa.literal(0.0), 1.0 - r.c.tokens) / rate
    next_token = r.c.refilled_at + wait + SLOT_MARGIN
    start = dialect.greatest(
        sa.func.coalesce(r.c.reserved_until, sa.literal(0.0)),
        next_token,
        sa.literal(float(now)),
    )
    stmt = (
        r.update()
        .where(r.c.name == name)
        .values(reserved_until=start + count / rate)
        .returning(r.c.reserved_until)
    )
    reserved_until = float(conn.execute(stmt).scalar_one())
    return reserved_until - count / rate


def tokens(conn: sa.Connection, name: str) -> float | None:
    """The bucket's token count as of its last use (None if never used)."""
    value = conn.execute(sa.select(r.c.tokens).where(r.c.name == name)).scalar()
    return None if value is None else float(value)


def booked_ahead(
    conn: sa.Connection, dialect: Dialect, prefix: str, now: float | None = None
) -> dict[str, float]:
    """Buckets named `prefix…` with slots handed out beyond `now`: name (prefix cut) → seconds.

    Jobs that found such a bucket empty are pending, each due at its slot
    (`reserve`); at `rate` per second, about `seconds * rate` of them wait.
    """
    ahead = r.c.reserved_until - dialect.epoch(now)
    stmt = sa.select(r.c.name, ahead).where(r.c.name.startswith(prefix, autoescape=True), ahead > 0)
    return {name.removeprefix(prefix): float(seconds) for name, seconds in conn.execute(stmt)}
