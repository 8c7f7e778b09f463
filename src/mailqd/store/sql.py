"""Expressions the store's roles share: the table aliases, "now", and status conditions.

Statuses are inlined, not bound (see `status_is`); each condition is
written so that the partial index holding those rows can answer it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.models import FINISHED_STATUSES, Outcome, Status
from mailqd.store.schema import LEASED, email_attempts, email_queue, utcnow

q = email_queue
a = email_attempts

SCREENED_OUTCOMES = (Outcome.DUPLICATE, Outcome.DEFERRED, Outcome.THROTTLED)
"""Attempt rows of jobs set aside at claim time (`claim_screened`): nothing was tried."""


def at_time(now: datetime | None) -> sa.ColumnElement[datetime]:
    """The given time as a bound value, else the database's clock."""
    return utcnow() if now is None else sa.literal(now, type_=q.c.created_at.type)


def status_is(status: Status) -> sa.ColumnElement[bool]:
    """`status = 'pending'` with the value inlined, not bound.

    psycopg prepares a statement after a few runs, and PostgreSQL may then
    switch to a generic plan; with `status = $1` that plan cannot use the
    partial index (`WHERE status = 'pending'`) and scans the whole table:
    about 1 s at a million sent rows instead of a few ms (bench/bench_store.py).
    """
    return q.c.status == sa.literal_column(f"'{status.value}'")


def status_in(*statuses: Status) -> sa.ColumnElement[bool]:
    """`status IN ('sent', 'failed')`, values inlined for the same reason as `status_is`."""
    return q.c.status.in_([sa.literal_column(f"'{s.value}'") for s in statuses])


def held() -> sa.ColumnElement[bool]:
    """Jobs a worker holds: `sending`, with a lease (the claim sets both).

    Saying "with a lease" lets the planner read them through
    `ix_email_queue_lease` (see its comment in `mailqd.store.schema`).
    """
    return status_is(Status.SENDING) & LEASED


def having(status: Status) -> sa.ColumnElement[bool]:
    """The jobs in `status`, as a condition that the index holding them answers."""
    return held() if status is Status.SENDING else status_is(status)


def counts_by_status() -> sa.CompoundSelect[Any]:
    """(status, jobs) rows, each status counted through the partial index that holds it.

    One GROUP BY over the table would read every row (or, on PostgreSQL,
    find no index holding all statuses); this reads the pending, sending and
    finished entries of their own indexes. Statuses with no jobs may be
    missing or 0.
    """

    def one(status: Status) -> sa.Select[str, int]:
        label = sa.literal_column(f"'{status.value}'", sa.String).label("status")
        return sa.select(label, sa.func.count()).where(having(status))

    finished = (
        sa.select(q.c.status, sa.func.count())
        .where(status_in(*FINISHED_STATUSES))
        .group_by(q.c.status)
    )
    return sa.union_all(one(Status.PENDING), one(Status.SENDING), finished)


def read_counts(conn: sa.Connection) -> dict[Status, int]:
    return {Status(status): n for status, n in conn.execute(counts_by_status()) if n}
