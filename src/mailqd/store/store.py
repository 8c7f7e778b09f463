"""The queue store: every read and write of the queue, for both databases.

Each public method is one statement or one short transaction. Time is the
database's clock unless a `now` is passed (tests pass one to be exact), so
that daemons on several hosts agree on what is due and what has expired.
Jobs are guarded by their lease: an outcome is recorded only by the worker
that still holds the job.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from mailqd.errors import DatabaseUnavailableError, JobNotFoundError, JobStateError, StoreError
from mailqd.models import (
    FINISHED_STATUSES,
    Attempt,
    Job,
    NewJob,
    Outcome,
    QueueCounts,
    QueueStats,
    Status,
    WindowStats,
)
from mailqd.store import rows, screening
from mailqd.store.engine import make_engine
from mailqd.store.enqueue import PsycopgWriter, SqlAlchemyWriter, write_jobs
from mailqd.store.schema import (
    LEASED,
    NOTIFY_CHANNEL,
    UNLEASED,
    add_seconds,
    email_attempts,
    email_queue,
    seconds_between,
    utcnow,
)
from mailqd.store.screening import ScreenedClaim, ScreenRules
from mailqd.store.templates import TemplateStore

T = TypeVar("T")
q = email_queue
a = email_attempts

_CLEANUP_BATCH = 1000
_SCREENED_OUTCOMES = (Outcome.DUPLICATE, Outcome.DEFERRED, Outcome.THROTTLED)
"""Attempt rows of jobs set aside at claim time (`claim_screened`): nothing was tried."""
LONGEST_LEASE = 86400.0
"""Seconds: a lease ending further ahead was given by no worker, and is rescued (`rescue`)."""
_FIVE_MINUTES = 300.0
_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of one delivery attempt, to be recorded for a held job.

    `outcome` decides the job's next state: SENT → sent; RETRY and AMBIGUOUS
    → pending again after `retry_in_seconds`; FAILED and EXPIRED → failed.
    `attempt` is the number of this attempt (the job's `attempts` + 1).
    """

    job_id: str
    owner: str
    attempt: int
    outcome: Outcome
    started_at: datetime
    duration_seconds: float
    smtp_code: int | None = None
    smtp_text: str | None = None
    error: str | None = None
    retry_in_seconds: float = 0.0
    message_id: str | None = None


_NEXT_STATUS = {
    Outcome.SENT: Status.SENT,
    Outcome.RETRY: Status.PENDING,
    Outcome.AMBIGUOUS: Status.PENDING,
    Outcome.FAILED: Status.FAILED,
    Outcome.EXPIRED: Status.FAILED,
}


def _now(now: datetime | None) -> sa.ColumnElement[datetime]:
    """The given time as a bound value, else the database's clock."""
    return utcnow() if now is None else sa.literal(now, type_=q.c.created_at.type)


def _status_is(status: Status) -> sa.ColumnElement[bool]:
    """`status = 'pending'` with the value inlined, not bound.

    psycopg prepares a statement after a few runs, and PostgreSQL may then
    switch to a generic plan; with `status = $1` that plan cannot use the
    partial index (`WHERE status = 'pending'`) and scans the whole table:
    about 1 s at a million sent rows instead of a few ms (bench/bench_store.py).
    """
    return q.c.status == sa.literal_column(f"'{status.value}'")


def _status_in(*statuses: Status) -> sa.ColumnElement[bool]:
    """`status IN ('sent', 'failed')`, values inlined for the same reason as `_status_is`."""
    return q.c.status.in_([sa.literal_column(f"'{s.value}'") for s in statuses])


def _held() -> sa.ColumnElement[bool]:
    """Jobs a worker holds: `sending`, with a lease (the claim sets both).

    Saying "with a lease" lets the planner read them through
    `ix_email_queue_lease` (see its comment in `mailqd.store.schema`).
    """
    return _status_is(Status.SENDING) & LEASED


def _having(status: Status) -> sa.ColumnElement[bool]:
    """The jobs in `status`, as a condition that the index holding them answers."""
    return _held() if status is Status.SENDING else _status_is(status)


def _counts_by_status() -> sa.CompoundSelect[Any]:
    """(status, jobs) rows, each status counted through the partial index that holds it.

    One GROUP BY over the table would read every row (or, on PostgreSQL,
    find no index holding all statuses); this reads the pending, sending and
    finished entries of their own indexes. Statuses with no jobs may be
    missing or 0.
    """

    def one(status: Status) -> sa.Select[str, int]:
        label = sa.literal_column(f"'{status.value}'", sa.String).label("status")
        return sa.select(label, sa.func.count()).where(_having(status))

    finished = (
        sa.select(q.c.status, sa.func.count())
        .where(_status_in(*FINISHED_STATUSES))
        .group_by(q.c.status)
    )
    return sa.union_all(one(Status.PENDING), one(Status.SENDING), finished)


def _read_counts(conn: sa.Connection) -> dict[Status, int]:
    return {Status(status): n for status, n in conn.execute(_counts_by_status()) if n}


def _claim_statement(at: sa.ColumnElement[datetime], *, rowids: bool = False) -> sa.Update:
    """The claim, with `b_limit`, `b_owner` and `b_lease` (seconds) bound at execution.

    With `rowids` it returns SQLite's rowid of each row, not the row: what
    `rows.claim_by_rowid` reads a batch with that SQLite's driver refused.
    """
    due = (
        sa.select(q.c.id)
        .where(_status_is(Status.PENDING), q.c.next_attempt_at <= at)
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
        .returning(*((rows.ROWID,) if rowids else q.c))
    )


def _complete_statement(at: sa.ColumnElement[datetime]) -> sa.Update:
    """One job's outcome, executed once per completion with the `b_*` parameters."""
    return (
        q.update()
        .where(
            q.c.id == sa.bindparam("b_id"),
            q.c.status == Status.SENDING,
            q.c.lease_owner == sa.bindparam("b_owner"),
        )
        .values(
            status=sa.bindparam("b_status"),
            attempts=q.c.attempts + 1,
            last_error=sa.bindparam("b_error"),
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=add_seconds(at, sa.bindparam("b_delay", type_=sa.Float)),
            sent_at=sa.case((sa.bindparam("b_status") == Status.SENT, at), else_=q.c.sent_at),
            message_id=sa.func.coalesce(sa.bindparam("b_mid", type_=sa.Text), q.c.message_id),
            updated_at=at,
        )
    )


# `complete` on PostgreSQL (see `Store._complete_in_one_statement`). Both
# CTEs see the same snapshot and commit together; an outcome for a job whose
# lease this owner lost changes nothing, but its attempt is still recorded.
_COMPLETE_PG = sa.text(
    """
WITH done AS (
    SELECT *
    FROM jsonb_to_recordset(CAST(:batch AS jsonb)) AS d(
        id text, owner text, status text, error text, delay float8, mid text,
        attempt integer, started timestamptz, duration float8, outcome text,
        code integer, text text)
), clock AS (
    SELECT coalesce(CAST(:now AS timestamptz), now()) AS at
), changed AS (
    UPDATE email_queue AS q
    SET status = d.status,
        attempts = q.attempts + 1,
        last_error = d.error,
        lease_owner = NULL,
        lease_expires_at = NULL,
        next_attempt_at = clock.at + make_interval(secs => d.delay),
        sent_at = CASE WHEN d.status = 'sent' THEN clock.at ELSE q.sent_at END,
        message_id = coalesce(d.mid, q.message_id),
        updated_at = clock.at
    FROM done AS d, clock
    WHERE q.id = d.id AND q.status = 'sending' AND q.lease_owner = d.owner
    RETURNING q.id
), recorded AS (
    INSERT INTO email_attempts
        (job_id, attempt, started_at, duration_seconds, outcome, smtp_code, smtp_text, worker)
    SELECT id, attempt, started, duration, outcome, code, text, owner FROM done
)
SELECT count(*) FROM changed
"""
)

# The worker's two hot statements, built once: constructing them (and their
# cache keys) cost more CPU per call than executing them (measured ~0.6 ms
# per claim). Tests that pass `now` get a fresh statement with that time.
_CLAIM_AT_DB_TIME = _claim_statement(utcnow())
_COMPLETE_AT_DB_TIME = _complete_statement(utcnow())


class Store:
    """The queue, on one database. Safe to share between threads, not across fork()."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Store:
        return cls(make_engine(url, **engine_kwargs))

    def close(self) -> None:
        self.engine.dispose()

    @property
    def templates(self) -> TemplateStore:
        """The message templates (`mailqctl templates`), in the same database."""
        return TemplateStore(self._begin, self.dialect)

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """A short transaction, with driver errors translated to mailqd's."""
        with translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _one_statement(self) -> Iterator[sa.Connection]:
        """A connection for a single statement that is atomic on its own.

        On PostgreSQL it runs in autocommit: one round trip instead of three
        (BEGIN, the statement, COMMIT), which is most of an idle claim's
        latency. On SQLite it is `_begin`, whose BEGIN IMMEDIATE makes a
        read-then-write statement atomic across processes.
        """
        if self.dialect != "postgresql":
            with self._begin() as conn:
                yield conn
            return
        with translate_errors(), self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    # -- enqueue --------------------------------------------------------------

    def enqueue(self, job: NewJob, connection: sa.Connection | None = None) -> str:
        """Queue one message; returns its id (the existing one for a known idempotency key)."""
        return self.enqueue_many([job], connection)[0]

    def enqueue_many(self, jobs: Sequence[NewJob], connection: Any = None) -> list[str]:
        """Queue messages in one transaction; returns their ids in input order.

        With `connection` (a SQLAlchemy Connection or a raw psycopg 3
        Connection), the rows are written in the caller's open transaction
        and nothing is committed here: the transactional outbox.
        See `mailqd.store.enqueue` for how rows are written.
        """
        if not jobs:
            return []
        if connection is None:
            with self._begin() as conn:
                return write_jobs(SqlAlchemyWriter(conn), jobs)
        with translate_errors():
            if isinstance(connection, sa.Connection):
                return write_jobs(SqlAlchemyWriter(connection), jobs)
            return write_jobs(PsycopgWriter(connection, self.engine.dialect), jobs)

    # -- the worker's operations ---------------------------------------------

    def claim(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[Job]:
        """Take up to `limit` due jobs: highest priority first, then oldest due.

        On PostgreSQL the due rows are locked with SKIP LOCKED, so concurrent
        claimers each get different jobs without waiting on each other; on
        SQLite the transaction holds the database's write lock. Rows that
        cannot be read are failed, not returned (see `claim_batch`).
        """
        return self.claim_batch(owner, limit, lease_seconds, now).jobs

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> ScreenedClaim:
        """`claim`, also saying which claimed rows could not be read.

        Those are failed in the claim, alone, each with a `last_error` naming
        the column (`mailqd.store.rows`); the others are handed on.
        """
        if limit <= 0:
            return ScreenedClaim([])
        params = {"b_limit": limit, "b_owner": owner, "b_lease": lease_seconds}
        try:
            with self._one_statement() as conn:
                result = conn.execute(self._claim_for(now), params)
                claimed = rows.read_claimed(conn, self.dialect, result, owner)
        except rows.RereadNeeded:
            with self._begin() as conn:
                claimed = rows.claim_by_rowid(
                    conn, self._claim_for(now, rowids=True), params, owner
                )
        return ScreenedClaim(claimed.in_claim_order(), unreadable=claimed.unreadable)

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
        params = {"b_limit": limit, "b_owner": owner, "b_lease": lease_seconds}
        try:
            with self._begin() as conn:
                result = conn.execute(self._claim_for(now), params)
                claimed = rows.read_claimed(conn, self.dialect, result, owner)
                return self._screen(conn, claimed, rules, owner)
        except rows.RereadNeeded:
            with self._begin() as conn:
                claimed = rows.claim_by_rowid(
                    conn, self._claim_for(now, rowids=True), params, owner
                )
                return self._screen(conn, claimed, rules, owner)

    def _claim_for(self, now: datetime | None, *, rowids: bool = False) -> sa.Update:
        if now is None and not rowids:
            return _CLAIM_AT_DB_TIME
        return _claim_statement(_now(now), rowids=rowids)

    def _screen(
        self, conn: sa.Connection, claimed: rows.Claimed, rules: ScreenRules, owner: str
    ) -> ScreenedClaim:
        screened = screening.screen(conn, self.dialect, claimed.in_claim_order(), rules, owner)
        return dataclasses.replace(screened, unreadable=claimed.unreadable)

    def purge_screening(self, dedup_window: float, now: datetime | None = None) -> int:
        """Delete hash rows older than `dedup_window` and per-recipient counts of past hours."""
        return screening.purge(self._begin, dedup_window, _now(now))

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int:
        """Record outcomes of held jobs and their attempt rows, in one transaction.

        Returns how many jobs changed state: an outcome for a job whose lease
        this owner no longer holds changes nothing (the attempt is still
        recorded, because it happened).
        """
        if not completions:
            return 0
        if self.dialect == "postgresql":
            return self._complete_in_one_statement(completions, now)
        stmt = _COMPLETE_AT_DB_TIME if now is None else _complete_statement(_now(now))
        params = [{f"b_{k}": v for k, v in _job_outcome(c).items()} for c in completions]
        with self._begin() as conn:
            changed = conn.execute(stmt, params).rowcount
            conn.execute(a.insert(), [_attempt_values(c) for c in completions])
        return changed

    def _complete_in_one_statement(
        self, completions: Sequence[Completion], now: datetime | None
    ) -> int:
        """`complete` on PostgreSQL: the batch as arrays, one statement, one round trip.

        The same rules as the per-row UPDATE that SQLite runs, but the
        executemany of one UPDATE per job plus an INSERT, between BEGIN and
        COMMIT, cost ~0.1 ms of worker CPU per message (measured), most of
        the recording cost. The batch goes as one JSON text: psycopg's
        adaptation of Python lists to arrays cost more CPU than the rest.
        """
        batch = [
            {
                **_job_outcome(c),
                "attempt": c.attempt,
                "started": c.started_at.isoformat(),
                "duration": c.duration_seconds,
                "outcome": c.outcome.value,
                "code": c.smtp_code,
                "text": _attempt_text(c),
            }
            for c in completions
        ]
        params = {"now": now, "batch": json.dumps(batch)}
        with self._one_statement() as conn:
            return int(conn.execute(_COMPLETE_PG, params).scalar_one())

    def release(self, job_ids: Sequence[str], owner: str, now: datetime | None = None) -> int:
        """Give held jobs back unsent: pending, due now, the attempt not counted."""
        if not job_ids:
            return 0
        at = _now(now)
        stmt = (
            q.update()
            .where(q.c.id.in_(job_ids), q.c.status == Status.SENDING, q.c.lease_owner == owner)
            .values(
                status=Status.PENDING,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=at,
                updated_at=at,
            )
        )
        with self._begin() as conn:
            return conn.execute(stmt).rowcount

    def extend_leases(
        self, job_ids: Sequence[str], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> int:
        """Push back the lease expiry of jobs still being worked on."""
        if not job_ids:
            return 0
        at = _now(now)
        stmt = (
            q.update()
            .where(q.c.id.in_(job_ids), q.c.status == Status.SENDING, q.c.lease_owner == owner)
            .values(lease_expires_at=add_seconds(at, lease_seconds))
        )
        with self._begin() as conn:
            return conn.execute(stmt).rowcount

    def rescue(
        self,
        *,
        owner: str | None = None,
        now: datetime | None = None,
        limit: int = 1000,
        longest_lease: float = LONGEST_LEASE,
    ) -> list[str]:
        """Return jobs whose worker is gone to the queue; returns their ids.

        Without `owner`: jobs whose lease has expired (their daemon died, or
        hung), and `sending` rows no worker can hold: with no lease at all,
        or one ending more than `longest_lease` seconds from now, which no
        worker gives (plain SQL wrote them). With `owner`: every job that
        worker holds, expired or not (the supervisor saw it die). The
        interrupted attempt is counted and recorded as `lost`, so a message
        that kills every worker that tries it runs out of attempts instead
        of looping forever.
        """
        at = _now(now)
        too_long = q.c.lease_expires_at > add_seconds(at, longest_lease)
        if owner is not None:
            cond = _held() & (q.c.lease_owner == owner)
        else:
            cond = (_held() & ((q.c.lease_expires_at < at) | too_long)) | UNLEASED
        victims = (
            sa.select(q.c.id)
            .where(cond)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("victims")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        worker = sa.func.coalesce(q.c.lease_owner, "?")
        why = sa.case(
            (UNLEASED, sa.literal("sending with no lease: no worker held it")),
            (
                too_long,
                sa.literal("lease longer than any worker gives: the worker ")
                + worker
                + sa.literal(" cannot hold it"),
            ),
            else_=sa.literal("lease expired: the worker ")
            + worker
            + sa.literal(" stopped during delivery"),
        )
        stmt = (
            q.update()
            .where(q.c.id.in_(sa.select(victims.c.id)), cond)
            .values(
                status=Status.PENDING,
                attempts=rows.counted_attempt(),
                last_error=why,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=at,
                updated_at=at,
            )
            .returning(q.c.id, q.c.attempts, q.c.last_error)
        )
        with self._begin() as conn, rows.replacing_bad_utf8(conn):  # an id plain SQL wrote
            rescued = list(conn.execute(stmt))
            if rescued:
                started = conn.execute(sa.select(at)).scalar_one()
                conn.execute(
                    a.insert(),
                    [
                        {
                            "job_id": r.id,
                            "attempt": r.attempts,
                            "started_at": started,
                            "duration_seconds": 0.0,
                            "outcome": Outcome.LOST,
                            "smtp_text": r.last_error,
                            "worker": owner,
                        }
                        for r in rescued
                    ],
                )
                self._notify(conn)
        return [r.id for r in rescued]

    # -- the operator's operations -------------------------------------------

    def requeue_failed(
        self,
        job_ids: Sequence[str] | None = None,
        limit: int | None = None,
        now: datetime | None = None,
    ) -> int:
        """Failed jobs back to pending, due now, with a fresh attempt budget.

        Without ids, the most recently failed first, up to `limit`.
        """
        at = _now(now)
        chosen = sa.select(q.c.id).where(_status_is(Status.FAILED))
        if job_ids is not None:
            chosen = chosen.where(q.c.id.in_(job_ids))
        if limit is not None:
            chosen = chosen.order_by(q.c.updated_at.desc()).limit(limit)
        stmt = (
            q.update()
            .where(q.c.id.in_(chosen.scalar_subquery()), q.c.status == Status.FAILED)
            .values(status=Status.PENDING, attempts=0, next_attempt_at=at, updated_at=at)
        )
        with self._begin() as conn:
            count = conn.execute(stmt).rowcount
            if count:
                self._notify(conn)
        return count

    def requeue(self, job_id: str, now: datetime | None = None) -> Job:
        """One failed or cancelled job back to pending, due now, fresh attempts."""
        return self._transition(
            job_id,
            allowed=(Status.FAILED, Status.CANCELLED),
            operation="requeue",
            values={"status": Status.PENDING, "attempts": 0, "next_attempt_at": _now(now)},
            now=now,
        )

    def cancel(self, job_id: str, now: datetime | None = None) -> Job:
        """A pending job will not be sent. A job being sent cannot be cancelled."""
        return self._transition(
            job_id,
            allowed=(Status.PENDING,),
            operation="cancel",
            values={"status": Status.CANCELLED},
            now=now,
        )

    def _transition(
        self,
        job_id: str,
        allowed: tuple[Status, ...],
        operation: str,
        values: dict[str, Any],
        now: datetime | None,
    ) -> Job:
        stmt = (
            q.update()
            .where(q.c.id == job_id, q.c.status.in_(allowed))
            .values(**values, updated_at=_now(now))
            .returning(*q.c)
        )
        with self._begin() as conn:
            again = sa.select(q).where(q.c.id == job_id)
            found = rows.read_jobs(conn, conn.execute(stmt), again)
            if not found:
                status = conn.execute(sa.select(q.c.status).where(q.c.id == job_id)).scalar()
                if status is None:
                    raise JobNotFoundError(job_id)
                raise JobStateError(job_id, status, operation)
            if found[0].status == Status.PENDING:
                self._notify(conn)
        return found[0]

    def get(self, job_id: str) -> Job:
        with self._begin() as conn:
            stmt = sa.select(q).where(q.c.id == job_id)
            found = rows.read_jobs(conn, conn.execute(stmt), stmt)
        if not found:
            raise JobNotFoundError(job_id)
        return found[0]

    def attempts(self, job_id: str) -> list[Attempt]:
        """A job's attempts in the order they were recorded.

        Not by attempt number: `requeue` and `requeue_failed` restart the
        numbering, and the history should still read from oldest to newest.
        """
        stmt = sa.select(a).where(a.c.job_id == job_id).order_by(a.c.id)
        with self._begin() as conn:
            return [
                Attempt(
                    job_id=r.job_id,
                    attempt=r.attempt,
                    started_at=r.started_at,
                    duration_seconds=r.duration_seconds,
                    outcome=Outcome(r.outcome),
                    smtp_code=r.smtp_code,
                    smtp_text=r.smtp_text,
                    worker=r.worker,
                )
                for r in conn.execute(stmt)
            ]

    def list_failed(self, limit: int) -> list[Job]:
        stmt = (
            sa.select(q)
            .where(_status_is(Status.FAILED))
            .order_by(q.c.updated_at.desc(), q.c.id)
            .limit(limit)
        )
        with self._begin() as conn:
            return rows.read_jobs(conn, conn.execute(stmt), stmt)

    def counts(self, now: datetime | None = None) -> QueueCounts:
        """Jobs per status, and how long the oldest due pending job has waited."""
        at = _now(now)
        oldest = sa.select(seconds_between(at, sa.func.min(q.c.next_attempt_at))).where(
            _status_is(Status.PENDING), q.c.next_attempt_at <= at
        )
        with self._begin() as conn:
            counts = _read_counts(conn)
            age = conn.execute(oldest).scalar()
        return QueueCounts(by_status=counts, oldest_due_age_seconds=age)

    def count_finished(self, older_than_days: float, now: datetime | None = None) -> int:
        """How many sent, failed or cancelled jobs `delete_finished` would remove."""
        stmt = sa.select(sa.func.count()).where(self._finished_before(older_than_days, now))
        with self._begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def delete_finished(
        self,
        older_than_days: float,
        batch_size: int = _CLEANUP_BATCH,
        now: datetime | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished jobs (and their attempts) last updated before the cutoff.

        Each batch is its own short transaction, so claims never wait on a
        long delete. Returns the number of jobs deleted.
        """
        cutoff = self._finished_before(older_than_days, now)
        total = 0
        while True:
            started = time.monotonic()
            with self._begin() as conn:
                deleted = self._delete_batch(conn, cutoff, batch_size)
            if not deleted:
                return total
            total += deleted
            if on_batch is not None:
                on_batch(deleted)
            if self.dialect == "sqlite":
                time.sleep(_sqlite_pause(time.monotonic() - started))

    def _delete_batch(
        self, conn: sa.Connection, cutoff: sa.ColumnElement[bool], batch_size: int
    ) -> int:
        """One batch of `delete_finished`; returns how many jobs it deleted.

        On PostgreSQL it is one statement whose CTEs pick the jobs, delete
        them and delete their attempts by index; given the ids as a list
        instead, the planner scans the whole attempts table for every batch
        (measured 4x slower on 200,000 rows). SQLite has no DML in CTEs.
        """
        doomed = sa.select(q.c.id).where(cutoff).limit(batch_size).with_for_update(skip_locked=True)
        if self.dialect != "postgresql":
            ids = list(conn.execute(doomed).scalars())
            if ids:
                conn.execute(a.delete().where(a.c.job_id.in_(ids)))
                conn.execute(q.delete().where(q.c.id.in_(ids)))
            return len(ids)
        picked = doomed.cte("doomed").prefix_with("MATERIALIZED", dialect="postgresql")
        gone = q.delete().where(q.c.id.in_(sa.select(picked.c.id))).returning(q.c.id).cte("gone")
        gone_attempts = a.delete().where(a.c.job_id.in_(sa.select(gone.c.id))).cte("gone_attempts")
        count = sa.select(sa.func.count()).select_from(gone).add_cte(gone_attempts)
        return int(conn.execute(count).scalar_one())

    def _finished_before(
        self, older_than_days: float, now: datetime | None
    ) -> sa.ColumnElement[bool]:
        cutoff = add_seconds(_now(now), -older_than_days * 86400)
        return _status_in(*FINISHED_STATUSES) & (q.c.updated_at < cutoff)

    def _notify(self, conn: sa.Connection) -> None:
        """Wake listening workers (PostgreSQL); SQLite workers poll."""
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))

    # -- statistics, for mailqctl stats/top --------------------------------------

    def queue_stats(self, now: datetime | None = None, soon_seconds: float = 60.0) -> QueueStats:
        """Counts by status, what is due and waiting to retry, and the last 5 minutes and hour.

        "Sent"/"failed" in a window are jobs whose final state was reached in
        it (`updated_at`, read through the finished-jobs index, so the
        millions of older sent rows are not scanned); attempts come from the
        attempts table by start time.
        """
        at = _now(now)
        is_due = q.c.next_attempt_at <= at
        waiting_retry = (q.c.attempts > 0) & (q.c.next_attempt_at > at)
        pending_stmt = sa.select(
            sa.func.count().filter(is_due),
            seconds_between(at, sa.func.min(q.c.next_attempt_at).filter(is_due)),
            sa.func.count().filter(waiting_retry),
            sa.func.count().filter(
                waiting_retry & (q.c.next_attempt_at <= add_seconds(at, soon_seconds))
            ),
        ).where(_status_is(Status.PENDING))
        hour_ago, five_min_ago = add_seconds(at, -_HOUR), add_seconds(at, -_FIVE_MINUTES)
        ended_recently = (q.c.updated_at > hour_ago) & (q.c.updated_at <= at)
        in_5m = q.c.updated_at > five_min_ago
        sent, failed = q.c.status == Status.SENT, q.c.status == Status.FAILED
        finished_stmt = sa.select(
            sa.func.count().filter(sent & in_5m),
            sa.func.count().filter(failed & in_5m),
            sa.func.count().filter(sent),
            sa.func.count().filter(failed),
        ).where(_status_in(Status.SENT, Status.FAILED), ended_recently)
        in_5m_attempts = a.c.started_at > five_min_ago
        tried = a.c.outcome.not_in(_SCREENED_OUTCOMES)
        duplicate, deferred = a.c.outcome == Outcome.DUPLICATE, a.c.outcome == Outcome.DEFERRED
        attempts_stmt = sa.select(
            sa.func.count().filter(tried & in_5m_attempts),
            sa.func.count().filter(duplicate & in_5m_attempts),
            sa.func.count().filter(deferred & in_5m_attempts),
            sa.func.count().filter(tried),
            sa.func.count().filter(duplicate),
            sa.func.count().filter(deferred),
        ).where(a.c.started_at > hour_ago, a.c.started_at <= at)
        with self._begin() as conn:
            taken_at = conn.execute(sa.select(at)).scalar_one()
            counts = _read_counts(conn)
            due, oldest, retrying, soon = conn.execute(pending_stmt).one()
            sent_5m, failed_5m, sent_1h, failed_1h = conn.execute(finished_stmt).one()
            attempts = conn.execute(attempts_stmt).one()
            unleased = conn.execute(sa.select(sa.func.count()).where(UNLEASED)).scalar_one()
        return QueueStats(
            at=taken_at,
            counts=QueueCounts(by_status=counts, oldest_due_age_seconds=oldest),
            due=due,
            retries_waiting=retrying,
            retries_due_soon=soon,
            soon_seconds=soon_seconds,
            last_5m=WindowStats(_FIVE_MINUTES, sent_5m, failed_5m, *attempts[:3]),
            last_1h=WindowStats(_HOUR, sent_1h, failed_1h, *attempts[3:]),
            unleased=unleased,
        )

    # -- gauges and totals, for the metrics sidecar ------------------------------------

    def unfinished_counts(self, now: datetime | None = None) -> QueueCounts:
        """Pending, sending and failed jobs, and the oldest due job's wait, in one statement.

        For `/metrics`, which may be scraped every second: each count reads
        only its own status's entries in the index that holds them, never
        the sent rows that make up most of the table, so `by_status` holds
        only those three statuses.
        """
        at = _now(now)

        def count(status: Status) -> sa.ScalarSelect[Any]:
            return sa.select(sa.func.count()).where(_having(status)).scalar_subquery()

        oldest_due = (
            sa.select(seconds_between(at, sa.func.min(q.c.next_attempt_at)))
            .where(_status_is(Status.PENDING), q.c.next_attempt_at <= at)
            .scalar_subquery()
        )
        stmt = sa.select(
            count(Status.PENDING), count(Status.SENDING), count(Status.FAILED), oldest_due
        )
        with self._begin() as conn:
            pending_count, sending_count, failed_count, oldest = conn.execute(stmt).one()
        return QueueCounts(
            by_status={
                Status.PENDING: pending_count,
                Status.SENDING: sending_count,
                Status.FAILED: failed_count,
            },
            oldest_due_age_seconds=oldest,
        )

    def failed_attempts_count(self) -> int:
        """Attempts that did not deliver (retried, failed, expired, lost) still on record."""
        stmt = sa.select(sa.func.count()).where(
            a.c.outcome.not_in((Outcome.SENT, *_SCREENED_OUTCOMES))
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).scalar_one())


def _storable_text(text: str | None) -> str | None:
    """Text that both databases (and PostgreSQL's jsonb) accept: no NUL, no lone surrogate.

    An SMTP reply is decoded with `surrogateescape`, so a server that sends
    invalid UTF-8 (or a NUL) would otherwise make the whole batch of
    outcomes fail, and be retried, for ever.
    """
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _job_outcome(c: Completion) -> dict[str, Any]:
    """What a completion changes on its job: the parameters of both forms of `complete`
    (`_COMPLETE_PG`'s JSON fields; `_complete_statement`'s, prefixed `b_`)."""
    return {
        "id": c.job_id,
        "owner": c.owner,
        "status": _NEXT_STATUS[c.outcome].value,
        "error": None if c.outcome is Outcome.SENT else _storable_text(c.error),
        "delay": c.retry_in_seconds,
        "mid": c.message_id,
    }


def _attempt_text(c: Completion) -> str | None:
    """The attempt row's text: the server's reply, else the error."""
    return _storable_text(c.smtp_text if c.smtp_text is not None else c.error)


def _attempt_values(c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "attempt": c.attempt,
        "started_at": c.started_at,
        "duration_seconds": c.duration_seconds,
        "outcome": c.outcome,
        "smtp_code": c.smtp_code,
        "smtp_text": _attempt_text(c),
        "worker": c.owner,
    }


def _sqlite_pause(batch_seconds: float) -> float:
    """How long cleanup leaves SQLite's write lock free after a batch.

    A writer waiting on SQLite's lock sleeps in steps of up to 25 ms for
    its first ~130 ms of waiting, then 50 and 100 ms; if the next batch
    took the lock back at once, a claim could wait through many batches
    (measured: 2 s during a 200-batch cleanup). A pause as long as the
    batch (25 to 100 ms) lets every waiter in after at most one batch.
    """
    return min(max(batch_seconds, 0.025), 0.1)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into mailqd's: a down database, a missing schema."""
    try:
        yield
    except OperationalError as exc:
        if _is_missing_table(exc):
            raise _schema_missing() from exc
        raise DatabaseUnavailableError(f"database unavailable: {_first_line(exc)}") from exc
    except ProgrammingError as exc:
        if _is_missing_table(exc):
            raise _schema_missing() from exc
        raise StoreError(f"database error: {_first_line(exc)}") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailableError(f"database connection lost: {_first_line(exc)}") from exc
        raise StoreError(f"database error: {_first_line(exc)}") from exc


def _is_missing_table(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def _schema_missing() -> StoreError:
    from mailqd.errors import SchemaError

    return SchemaError("the mailqd tables do not exist; run `mailqctl migrate`")


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
