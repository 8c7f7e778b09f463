"""The job lease protocol, as workers use it: claim, complete, release, extend, rescue.

A job is guarded by its lease: an outcome is recorded only by the worker
that still holds the job. Time is the database's clock unless a `now` is
passed (tests pass one to be exact), so that daemons on several hosts
agree on what is due and what has expired.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.models import Outcome, Status
from mailqd.store import rows, screening
from mailqd.store.attachment_tables import email_attachments
from mailqd.store.completion import Completion
from mailqd.store.database import Database
from mailqd.store.schema import UNLEASED, add_seconds, utcnow
from mailqd.store.screening import ScreenedClaim, ScreenRules
from mailqd.store.sql import a, at_time, held, q, status_is

__all__ = ["LONGEST_LEASE", "RELEASED_UNSENT", "JobLeases"]

LONGEST_LEASE = 86400.0
"""Seconds: a lease ending further ahead was given by no worker, and is rescued (`rescue`)."""
RELEASED_UNSENT = "released: given back unsent by its worker"
"""The attempt row's text of a job `release` gives back without a reason."""


def _claim_statement(at: sa.ColumnElement[datetime], *, rowids: bool = False) -> sa.Update:
    """The claim, with `b_limit`, `b_owner` and `b_lease` (seconds) bound at execution.

    With `rowids` it returns SQLite's rowid of each row, not the row: what
    `rows.claim_by_rowid` reads a batch with that SQLite's driver refused.
    """
    due = (
        sa.select(q.c.id)
        .where(status_is(Status.PENDING), q.c.next_attempt_at <= at)
        .order_by(q.c.priority.desc(), q.c.next_attempt_at, q.c.id)
        .limit(sa.bindparam("b_limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    return (
        q.update()
        .where(q.c.id.in_(sa.select(due.c.id)))
        .values(
            status=Status.SENDING,
            lease_owner=sa.bindparam("b_owner", type_=sa.String),
            lease_expires_at=add_seconds(at, sa.bindparam("b_lease", type_=sa.Float)),
            updated_at=at,
        )
        .returning(*((rows.ROWID,) if rowids else (*q.c, HAS_ATTACHMENTS)))
    )


HAS_ATTACHMENTS = sa.exists().where(email_attachments.c.job_id == q.c.id).label("has_attachments")
"""In the claim's RETURNING: which claimed jobs have attachments, so the worker looks up
only those (an index probe per row, no round trip)."""


# The worker's hot statement, built once: constructing it (and its cache
# key) cost more CPU per call than executing it. Tests that pass `now` get
# a fresh statement with that time.
_CLAIM_AT_DB_TIME = _claim_statement(utcnow())


def _claim_for(now: datetime | None, *, rowids: bool = False) -> sa.Update:
    if now is None and not rowids:
        return _CLAIM_AT_DB_TIME
    return _claim_statement(at_time(now), rowids=rowids)


class JobLeases:
    """Claiming jobs and recording what became of them, on one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> ScreenedClaim:
        """Take up to `limit` due jobs, saying which claimed rows could not be read.

        Highest priority first, then oldest due. On PostgreSQL the due rows
        are locked with SKIP LOCKED, so concurrent claimers each get
        different jobs without waiting on each other; on SQLite the
        transaction holds the database's write lock. Rows that cannot be
        read are failed in the claim, alone, each with a `last_error`
        naming the column (`mailqd.store.rows`); the others are handed on.
        """
        if limit <= 0:
            return ScreenedClaim([])
        return self._claim(
            owner,
            {"b_limit": limit, "b_owner": owner, "b_lease": lease_seconds},
            now,
            self._db.one_statement,
            lambda _conn, claimed: ScreenedClaim(
                claimed.in_claim_order(), unreadable=claimed.unreadable
            ),
        )

    def claim_screened(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        rules: ScreenRules,
        now: datetime | None = None,
    ) -> ScreenedClaim:
        """`claim_batch`, then set aside duplicates, capped and throttled jobs, in one transaction.

        What `rules` turns away is recorded before this returns (see
        `mailqd.store.screening`); only the jobs to send are held. One
        transaction, so a failure leaves nothing claimed and nothing counted.
        """
        if limit <= 0:
            return ScreenedClaim([])
        return self._claim(
            owner,
            {"b_limit": limit, "b_owner": owner, "b_lease": lease_seconds},
            now,
            self._db.begin,
            lambda conn, claimed: self._screen(conn, claimed, rules, owner),
        )

    def _claim(
        self,
        owner: str,
        params: dict[str, object],
        now: datetime | None,
        connect: Callable[[], AbstractContextManager[sa.Connection]],
        finish: Callable[[sa.Connection, rows.Claimed], ScreenedClaim],
    ) -> ScreenedClaim:
        """Run the claim in `connect()`'s connection and `finish` there with the rows read.

        When a row cannot even be fetched (`rows.RereadNeeded`, SQLite's
        undecodable text), the claim runs again in a transaction of its own
        returning rowids, and its rows are read one by one.
        """
        db = self._db
        try:
            with connect() as conn:
                result = conn.execute(_claim_for(now), params)
                claimed = rows.read_claimed(conn, db.dialect.checks_row_types, result, owner)
                return finish(conn, claimed)
        except rows.RereadNeeded:
            with db.begin() as conn:
                claimed = rows.claim_by_rowid(conn, _claim_for(now, rowids=True), params, owner)
                return finish(conn, claimed)

    def _screen(
        self, conn: sa.Connection, claimed: rows.Claimed, rules: ScreenRules, owner: str
    ) -> ScreenedClaim:
        jobs = claimed.in_claim_order()
        screened = screening.screen(conn, self._db.dialect, jobs, rules, owner)
        return dataclasses.replace(screened, unreadable=claimed.unreadable)

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int:
        """Record outcomes of held jobs and their attempt rows, in one transaction.

        Returns how many jobs changed state: an outcome for a job whose lease
        this owner no longer holds changes nothing (the attempt is still
        recorded, because it happened).
        """
        if not completions:
            return 0
        return self._db.dialect.complete(self._db, completions, now)

    def release(
        self,
        job_ids: Sequence[str],
        owner: str,
        now: datetime | None = None,
        *,
        reasons: Mapping[str, str] | None = None,
        counted: Collection[str] = (),
    ) -> int:
        """Give held jobs back: pending, due now, each with an attempt row saying why.

        `reasons` maps a job to what happened (default `RELEASED_UNSENT`).
        A job in `counted` had reached DATA (its content may be with the
        server): its attempt is counted, recorded `ambiguous`, and the
        reason becomes its `last_error`. The others use no attempt and are
        recorded `released`, their `last_error` untouched. Returns how many
        jobs this owner still held and gave back.
        """
        if not job_ids:
            return 0
        at = at_time(now)
        why = dict(reasons or {})
        counted_ids = [job_id for job_id in job_ids if job_id in counted]
        unsent_ids = [job_id for job_id in job_ids if job_id not in counted]
        with self._db.begin() as conn:
            given: list[tuple[str, int, Outcome]] = []
            if unsent_ids:
                result = conn.execute(_release_statement(at, unsent_ids, owner, counted=False))
                given += [(row.id, row.number, Outcome.RELEASED) for row in result]
            for job_id in counted_ids:
                reason = why.get(job_id, RELEASED_UNSENT)
                stmt = _release_statement(at, [job_id], owner, counted=True, error=reason)
                given += [(row.id, row.number, Outcome.AMBIGUOUS) for row in conn.execute(stmt)]
            if given:
                started = conn.execute(sa.select(at)).scalar_one()
                rows_ = [
                    _given_back(job_id, number, started, outcome, why.get(job_id), owner)
                    for job_id, number, outcome in given
                ]
                conn.execute(a.insert(), rows_)
        return len(given)

    def extend_leases(
        self, job_ids: Sequence[str], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> int:
        """Push back the lease expiry of jobs still being worked on."""
        if not job_ids:
            return 0
        at = at_time(now)
        stmt = (
            q.update()
            .where(q.c.id.in_(job_ids), q.c.status == Status.SENDING, q.c.lease_owner == owner)
            .values(lease_expires_at=add_seconds(at, lease_seconds))
        )
        with self._db.begin() as conn:
            return conn.execute(stmt).rowcount

    def rescue(
        self,
        *,
        owner: str | None = None,
        reason: str | None = None,
        now: datetime | None = None,
        limit: int = 1000,
        longest_lease: float = LONGEST_LEASE,
    ) -> list[str]:
        """Return jobs whose worker is gone to the queue; returns their ids.

        Without `owner`: jobs whose lease has expired (their daemon died, or
        hung), and `sending` rows no worker can hold: with no lease at all,
        or one ending more than `longest_lease` seconds from now, which no
        worker gives (plain SQL wrote them). With `owner`: every job that
        worker holds, expired or not (the supervisor saw it die), with
        `reason` (what the supervisor saw: "worker killed: ...") as each
        job's `last_error`. Each is recorded as `lost`, stamped with the
        time of the rescue. Nobody who is left knows whether the attempt
        had reached DATA: a job's first loss uses no attempt, every later
        one does, so that a message that kills every worker that tries it
        runs out of attempts instead of looping forever
        (docs/reliability.md).
        """
        at = at_time(now)
        stmt = _rescue_statement(at, owner, reason, limit, longest_lease)
        with self._db.begin() as conn, rows.replacing_bad_utf8(conn):  # an id plain SQL wrote
            rescued = list(conn.execute(stmt))
            if rescued:
                counted = _were_lost(conn, [r.id for r in rescued])
                started = conn.execute(sa.select(at)).scalar_one()
                conn.execute(
                    a.insert(), [_lost(r, r.id in counted, started, owner) for r in rescued]
                )
                self._db.dialect.notify(conn)
        return [r.id for r in rescued]


def _release_statement(
    at: sa.ColumnElement[datetime],
    job_ids: Sequence[str],
    owner: str,
    *,
    counted: bool,
    error: str | None = None,
) -> sa.Update:
    """Jobs `release` gives back, returning each one's id and the number of its attempt row.

    The number is that of the attempt the job was on (RETURNING reads the
    updated row): when it is counted, the new `attempts`; when not, the
    attempt it will make next, as a `deferred` row has. `counted_attempt`
    gives a number whatever plain SQL left in `attempts`.
    """
    values: dict[str, Any] = {
        "status": Status.PENDING,
        "lease_owner": None,
        "lease_expires_at": None,
        "next_attempt_at": at,
        "updated_at": at,
    }
    if counted:
        values |= {"attempts": rows.counted_attempt(), "last_error": error}
    number = q.c.attempts if counted else rows.counted_attempt()
    return (
        q.update()
        .where(q.c.id.in_(job_ids), q.c.status == Status.SENDING, q.c.lease_owner == owner)
        .values(**values)
        .returning(q.c.id, number.label("number"))
    )


def _rescue_statement(
    at: sa.ColumnElement[datetime],
    owner: str | None,
    reason: str | None,
    limit: int,
    longest_lease: float,
) -> sa.Update:
    """Jobs `rescue` returns, pending again with the reason in `last_error`.

    The attempt is counted only for a job lost before (`_lost_before`).
    RETURNING gives the new `attempts` and the attempt after it (`next`,
    a number whatever plain SQL left in `attempts`): the number of the
    `lost` row is the first when counted, else the second (`_lost`).
    """
    too_long = q.c.lease_expires_at > add_seconds(at, longest_lease)
    if owner is not None:
        cond = held() & (q.c.lease_owner == owner)
    else:
        cond = (held() & ((q.c.lease_expires_at < at) | too_long)) | UNLEASED
    victims = (
        sa.select(q.c.id)
        .where(cond)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("victims")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    worker = sa.func.coalesce(q.c.lease_owner, "?")
    why: sa.ColumnElement[str] = sa.case(
        (UNLEASED, sa.literal("sending with no lease: no worker held it")),
        (
            too_long,
            sa.literal("lease longer than any worker gives: the worker ")
            + worker
            + sa.literal(" cannot hold it"),
        ),
        else_=sa.literal("lease expired: the worker ")
        + worker
        + sa.literal(" stopped renewing it during delivery"),
    )
    if owner is not None:
        said = reason or f"worker died: the worker {owner} held it when it ended"
        why = sa.literal(said, sa.Text)
    again = _lost_before()
    return (
        q.update()
        .where(q.c.id.in_(sa.select(victims.c.id)), cond)
        .values(
            status=Status.PENDING,
            attempts=sa.case((again, rows.counted_attempt()), else_=q.c.attempts),
            last_error=why,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=at,
            updated_at=at,
        )
        .returning(q.c.id, q.c.attempts, rows.counted_attempt().label("next"), q.c.last_error)
    )


def _lost_before() -> sa.Exists:
    """Whether the job already has a `lost` attempt row: it was lost before this rescue.

    The one statement of the rule, used by the rescue's UPDATE and then
    by `_were_lost`, through the attempts' index on `job_id`. Not in
    RETURNING: SQLite writes its columns there without their table, and
    `id` would be the attempt's.
    """
    return (
        sa.exists()
        .where(a.c.job_id == q.c.id, a.c.outcome == sa.literal_column(f"'{Outcome.LOST.value}'"))
        .correlate(q)
    )


def _were_lost(conn: sa.Connection, job_ids: list[str]) -> set[str]:
    """Which of these jobs the rescue counted: `_lost_before`, read before their rows go in."""
    stmt = sa.select(q.c.id).where(q.c.id.in_(job_ids), _lost_before())
    return set(conn.execute(stmt).scalars())


def _lost(row: Any, counted: bool, started: datetime, owner: str | None) -> dict[str, Any]:
    """The `lost` attempt row of one rescued job."""
    number = row.attempts if counted else row.next
    return _given_back(row.id, number, started, Outcome.LOST, row.last_error, owner)


def _given_back(
    job_id: str, number: int, at: datetime, outcome: Outcome, text: str | None, owner: str | None
) -> dict[str, Any]:
    """The attempt row of one job given back (released or rescued), stamped `at`."""
    return {
        "job_id": job_id,
        "attempt": number,
        "started_at": at,
        "duration_seconds": 0.0,
        "outcome": outcome,
        "smtp_text": text or RELEASED_UNSENT,
        "worker": owner,
    }
