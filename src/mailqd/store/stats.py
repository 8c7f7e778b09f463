"""Statistics of the queue: counts for `mailqctl stats`/`top`, gauges for `/metrics`.

Read-only. Each count reads the partial index that holds its rows, never
the millions of sent rows that make up most of the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.models import Outcome, QueueCounts, QueueStats, RecipientStatus, Status, WindowStats
from mailqd.store.database import Database
from mailqd.store.relay_tables import email_recipients as er
from mailqd.store.schema import UNLEASED, add_seconds, seconds_between
from mailqd.store.sql import (
    SCREENED_OUTCOMES,
    a,
    at_time,
    having,
    q,
    read_counts,
    status_in,
    status_is,
)

__all__ = ["Statistics", "Unfinished"]

_FIVE_MINUTES = 300.0
_HOUR = 3600.0
_NOT_TRIED = (*SCREENED_OUTCOMES, Outcome.RELEASED)
"""Attempt rows that are no delivery attempt: set aside at the claim, or given back unsent."""


@dataclass(frozen=True, slots=True)
class Unfinished:
    """The unfinished jobs by status, and how many pending ones are due now (`/metrics`)."""

    counts: QueueCounts
    due: int
    """Pending jobs whose time has come; the rest of `counts.pending` are scheduled
    for later or wait for their retry."""


class Statistics:
    """What the queue of one database holds, and what it did lately."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def counts(self, now: datetime | None = None) -> QueueCounts:
        """Jobs per status, and how long the oldest due pending job has waited."""
        at = at_time(now)
        oldest = sa.select(seconds_between(at, sa.func.min(q.c.next_attempt_at))).where(
            status_is(Status.PENDING), q.c.next_attempt_at <= at
        )
        with self._db.begin() as conn:
            counts = read_counts(conn)
            age = conn.execute(oldest).scalar()
        return QueueCounts(by_status=counts, oldest_due_age_seconds=age)

    def queue_stats(self, now: datetime | None = None, soon_seconds: float = 60.0) -> QueueStats:
        """Counts by status, what is due and waiting to retry, and the last 5 minutes and hour.

        "Sent"/"failed" in a window are jobs whose final state was reached in
        it (`updated_at`, read through the finished-jobs index, so the
        millions of older sent rows are not scanned); attempts come from the
        attempts table by start time.
        """
        at = at_time(now)
        with self._db.begin() as conn:
            taken_at = conn.execute(sa.select(at)).scalar_one()
            counts = read_counts(conn)
            due, oldest, retrying, soon = conn.execute(_pending(at, soon_seconds)).one()
            sent_5m, failed_5m, sent_1h, failed_1h = conn.execute(_finished(at)).one()
            attempts = conn.execute(_attempts(at)).one()
            unleased = conn.execute(sa.select(sa.func.count()).where(UNLEASED)).scalar_one()
        return QueueStats(
            at=taken_at,
            counts=QueueCounts(by_status=counts, oldest_due_age_seconds=oldest),
            due=due,
            retries_waiting=retrying,
            retries_due_soon=soon,
            soon_seconds=soon_seconds,
            last_5m=WindowStats(_FIVE_MINUTES, sent_5m, failed_5m, *attempts[:4]),
            last_1h=WindowStats(_HOUR, sent_1h, failed_1h, *attempts[4:]),
            unleased=unleased,
        )

    def unfinished_counts(self, now: datetime | None = None) -> QueueCounts:
        """Pending, sending and failed jobs, and the oldest due job's wait (see `unfinished`)."""
        return self.unfinished(now).counts

    def unfinished(self, now: datetime | None = None) -> Unfinished:
        """Pending, sending and failed jobs, the due ones and the oldest due job's wait.

        One statement, for `/metrics`, which may be scraped every second:
        each count reads only its own status's entries in the index that
        holds them, never the sent rows that make up most of the table, so
        `by_status` holds only those three statuses. The due jobs are counted
        by the same range scan that finds the oldest of them (the claim
        index's pending entries up to now).
        """
        at = at_time(now)

        def count(status: Status) -> sa.ScalarSelect[Any]:
            return sa.select(sa.func.count()).where(having(status)).scalar_subquery()

        due = (
            sa.select(
                sa.func.count().label("jobs"), sa.func.min(q.c.next_attempt_at).label("first")
            )
            .where(status_is(Status.PENDING), q.c.next_attempt_at <= at)
            .subquery("due")
        )
        stmt = sa.select(
            count(Status.PENDING),
            count(Status.SENDING),
            count(Status.FAILED),
            due.c.jobs,
            seconds_between(at, due.c.first),
        ).select_from(due)
        with self._db.begin() as conn:
            pending, sending, failed, due_jobs, oldest = conn.execute(stmt).one()
        counts = QueueCounts(
            by_status={Status.PENDING: pending, Status.SENDING: sending, Status.FAILED: failed},
            oldest_due_age_seconds=oldest,
        )
        return Unfinished(counts=counts, due=int(due_jobs))

    def recipients_refused(self, seconds: float = _HOUR, now: datetime | None = None) -> int:
        """Recipients refused for good (5xx) in the last `seconds`, by their result's time.

        Only jobs whose recipients did not all fare alike have rows in
        `email_recipients`; a job refused as a whole is a failed job, not
        counted here.
        """
        at = at_time(now)
        stmt = sa.select(sa.func.count()).where(
            er.c.status == sa.literal_column(f"'{RecipientStatus.REFUSED.value}'"),
            er.c.updated_at > add_seconds(at, -seconds),
            er.c.updated_at <= at,
        )
        with self._db.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def failed_attempts_count(self) -> int:
        """Attempts that did not deliver (retried, failed, expired, lost) still on record."""
        stmt = sa.select(sa.func.count()).where(a.c.outcome.not_in((Outcome.SENT, *_NOT_TRIED)))
        with self._db.begin() as conn:
            return int(conn.execute(stmt).scalar_one())


def _pending(
    at: sa.ColumnElement[datetime], soon_seconds: float
) -> sa.Select[int, float, int, int]:
    """Due jobs, the oldest due one's wait, retries waiting and retries due soon."""
    is_due = q.c.next_attempt_at <= at
    waiting_retry = (q.c.attempts > 0) & (q.c.next_attempt_at > at)
    return sa.select(
        sa.func.count().filter(is_due),
        seconds_between(at, sa.func.min(q.c.next_attempt_at).filter(is_due)),
        sa.func.count().filter(waiting_retry),
        sa.func.count().filter(
            waiting_retry & (q.c.next_attempt_at <= add_seconds(at, soon_seconds))
        ),
    ).where(status_is(Status.PENDING))


def _finished(at: sa.ColumnElement[datetime]) -> sa.Select[int, int, int, int]:
    """Jobs sent and failed in the last 5 minutes and the last hour."""
    hour_ago, five_min_ago = add_seconds(at, -_HOUR), add_seconds(at, -_FIVE_MINUTES)
    ended_recently = (q.c.updated_at > hour_ago) & (q.c.updated_at <= at)
    in_5m = q.c.updated_at > five_min_ago
    sent, failed = q.c.status == Status.SENT, q.c.status == Status.FAILED
    return sa.select(
        sa.func.count().filter(sent & in_5m),
        sa.func.count().filter(failed & in_5m),
        sa.func.count().filter(sent),
        sa.func.count().filter(failed),
    ).where(status_in(Status.SENT, Status.FAILED), ended_recently)


def _attempts(at: sa.ColumnElement[datetime]) -> sa.Select[*tuple[int, ...]]:
    """Attempts tried, duplicates, cap deferrals and relay deferrals, in the last 5 minutes
    then the last hour.

    Both deferrals are `deferred` rows (pending again, no attempt used): the
    claim's screening writes the recipient cap's with a duration of 0, a
    delivery whose relay failed writes its own with the time it took.
    """
    hour_ago, five_min_ago = add_seconds(at, -_HOUR), add_seconds(at, -_FIVE_MINUTES)
    in_5m = a.c.started_at > five_min_ago
    tried = a.c.outcome.not_in(_NOT_TRIED)
    duplicate, deferred = a.c.outcome == Outcome.DUPLICATE, a.c.outcome == Outcome.DEFERRED
    capped, by_relay = deferred & (a.c.duration_seconds == 0), deferred & (a.c.duration_seconds > 0)
    kinds = (tried, duplicate, capped, by_relay)
    return sa.select(
        *(sa.func.count().filter(kind & in_5m) for kind in kinds),
        *(sa.func.count().filter(kind) for kind in kinds),
    ).where(a.c.started_at > hour_ago, a.c.started_at <= at)
