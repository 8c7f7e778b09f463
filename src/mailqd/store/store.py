"""The queue store: every read and write of the queue, for both databases.

Each public method is one statement or one short transaction. Time is the
database's clock unless a `now` is passed (tests pass one to be exact), so
that daemons on several hosts agree on what is due and what has expired.
Jobs are guarded by their lease: an outcome is recorded only by the worker
that still holds the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from mailqd.errors import DatabaseUnavailableError, JobNotFoundError, JobStateError, StoreError
from mailqd.models import FINISHED_STATUSES, Attempt, Job, NewJob, Outcome, QueueCounts, Status
from mailqd.store.engine import make_engine
from mailqd.store.schema import (
    NOTIFY_CHANNEL,
    add_seconds,
    email_attempts,
    email_queue,
    seconds_between,
    utcnow,
)

T = TypeVar("T")
q = email_queue
a = email_attempts

# Rows per INSERT statement in enqueue_many: under both databases' limits on
# bound parameters (SQLite 32,766; PostgreSQL 65,535) with ~20 columns a row.
ENQUEUE_CHUNK = 1000
_CLEANUP_BATCH = 1000


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


def _job_from_row(row: sa.Row[Any]) -> Job:
    values = row._mapping
    return Job(
        **{name: values[name] for name in Job.__slots__ if name != "status"},
        status=Status(values["status"]),
    )


def _new_job_values(job: NewJob) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": job.id,
        "recipient_to": job.recipient_to,
        "subject": job.subject,
        "body": job.body,
        "html": job.html,
        "template_id": job.template_id,
        "variables": job.variables,
        "cc": job.cc,
        "bcc": job.bcc,
        "reply_to": job.reply_to,
        "from_address": job.from_address,
        "headers": job.headers,
        "priority": job.priority,
        "expires_at": job.expires_at,
        "max_attempts": job.max_attempts,
        "idempotency_key": job.idempotency_key,
    }
    return values


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

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """A short transaction, with driver errors translated to mailqd's."""
        with translate_errors(), self.engine.begin() as conn:
            yield conn

    # -- enqueue --------------------------------------------------------------

    def enqueue(self, job: NewJob, connection: sa.Connection | None = None) -> str:
        """Queue one message; returns its id (the existing one for a known idempotency key)."""
        return self.enqueue_many([job], connection)[0]

    def enqueue_many(self, jobs: Sequence[NewJob], connection: Any = None) -> list[str]:
        """Queue messages with one INSERT per chunk of rows; ids in input order.

        With `connection` (a SQLAlchemy Connection or a raw psycopg 3
        Connection), the rows are written in the caller's open transaction
        and nothing is committed here: the transactional outbox.
        """
        if not jobs:
            return []
        if connection is None:
            with self._begin() as conn:
                return enqueue_statements(self.dialect, jobs, _sqlalchemy_executor(conn))
        with translate_errors():
            if isinstance(connection, sa.Connection):
                return enqueue_statements(self.dialect, jobs, _sqlalchemy_executor(connection))
            return enqueue_statements(self.dialect, jobs, self._psycopg_executor(connection))

    def _psycopg_executor(self, raw: Any) -> Callable[[sa.Executable], list[Any]]:
        """Run statements on a caller's raw psycopg connection (PostgreSQL only)."""
        import psycopg
        from psycopg.types.json import Jsonb

        if not isinstance(raw, psycopg.Connection) or self.dialect != "postgresql":
            raise StoreError(
                "connection= takes a SQLAlchemy Connection, or a psycopg Connection to the "
                f"same PostgreSQL database; got {type(raw).__name__}"
            )

        def execute(stmt: sa.Executable) -> list[Any]:
            compiled = stmt.compile(dialect=self.engine.dialect)  # type: ignore[attr-defined]
            params = {
                k: Jsonb(v) if isinstance(v, dict | list) else v
                for k, v in compiled.construct_params().items()
            }
            with raw.cursor() as cursor:
                cursor.execute(str(compiled), params)
                return cursor.fetchall() if cursor.description else []

        return execute

    # -- the worker's operations ---------------------------------------------

    def claim(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[Job]:
        """Take up to `limit` due jobs: highest priority first, then oldest due.

        On PostgreSQL the due rows are locked with SKIP LOCKED, so concurrent
        claimers each get different jobs without waiting on each other; on
        SQLite the transaction holds the database's write lock.
        """
        if limit <= 0:
            return []
        at = _now(now)
        due = (
            sa.select(q.c.id)
            .where(q.c.status == Status.PENDING, q.c.next_attempt_at <= at)
            .order_by(q.c.priority.desc(), q.c.next_attempt_at, q.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        stmt = (
            q.update()
            .where(q.c.id.in_(sa.select(due.c.id)))
            .values(
                status=Status.SENDING,
                lease_owner=owner,
                lease_expires_at=add_seconds(at, lease_seconds),
                updated_at=at,
            )
            .returning(*q.c)
        )
        with self._begin() as conn:
            jobs = [_job_from_row(row) for row in conn.execute(stmt)]
        jobs.sort(key=lambda j: (-j.priority, j.next_attempt_at, j.id))
        return jobs

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int:
        """Record outcomes of held jobs and their attempt rows, in one transaction.

        Returns how many jobs changed state: an outcome for a job whose lease
        this owner no longer holds changes nothing (the attempt is still
        recorded, because it happened).
        """
        if not completions:
            return 0
        at = _now(now)
        stmt = (
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
        params = [
            {
                "b_id": c.job_id,
                "b_owner": c.owner,
                "b_status": _NEXT_STATUS[c.outcome].value,
                "b_error": None if c.outcome is Outcome.SENT else c.error,
                "b_delay": c.retry_in_seconds,
                "b_mid": c.message_id,
            }
            for c in completions
        ]
        with self._begin() as conn:
            changed = conn.execute(stmt, params).rowcount
            conn.execute(a.insert(), [_attempt_values(c) for c in completions])
        return changed

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
        self, *, owner: str | None = None, now: datetime | None = None, limit: int = 1000
    ) -> list[str]:
        """Return jobs whose worker is gone to the queue; returns their ids.

        Without `owner`: jobs whose lease has expired (their daemon died, or
        hung). With `owner`: every job that worker holds, expired or not (the
        supervisor saw it die). The interrupted attempt is counted and
        recorded as `lost`, so a message that kills every worker that tries
        it runs out of attempts instead of looping forever.
        """
        at = _now(now)
        cond = q.c.status == Status.SENDING
        cond &= (q.c.lease_owner == owner) if owner is not None else (q.c.lease_expires_at < at)
        victims = (
            sa.select(q.c.id)
            .where(cond)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("victims")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        stmt = (
            q.update()
            .where(q.c.id.in_(sa.select(victims.c.id)), cond)
            .values(
                status=Status.PENDING,
                attempts=q.c.attempts + 1,
                last_error=sa.literal("lease expired: the worker ")
                + sa.func.coalesce(q.c.lease_owner, "?")
                + sa.literal(" stopped during delivery"),
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=at,
                updated_at=at,
            )
            .returning(q.c.id, q.c.attempts, q.c.last_error)
        )
        with self._begin() as conn:
            rows = list(conn.execute(stmt))
            if rows:
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
                        for r in rows
                    ],
                )
                self._notify(conn)
        return [r.id for r in rows]

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
        chosen = sa.select(q.c.id).where(q.c.status == Status.FAILED)
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
            row = conn.execute(stmt).first()
            if row is None:
                status = conn.execute(sa.select(q.c.status).where(q.c.id == job_id)).scalar()
                if status is None:
                    raise JobNotFoundError(job_id)
                raise JobStateError(job_id, status, operation)
            if row.status == Status.PENDING:
                self._notify(conn)
        return _job_from_row(row)

    def get(self, job_id: str) -> Job:
        with self._begin() as conn:
            row = conn.execute(sa.select(q).where(q.c.id == job_id)).first()
        if row is None:
            raise JobNotFoundError(job_id)
        return _job_from_row(row)

    def attempts(self, job_id: str) -> list[Attempt]:
        stmt = sa.select(a).where(a.c.job_id == job_id).order_by(a.c.attempt, a.c.id)
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
            .where(q.c.status == Status.FAILED)
            .order_by(q.c.updated_at.desc(), q.c.id)
            .limit(limit)
        )
        with self._begin() as conn:
            return [_job_from_row(r) for r in conn.execute(stmt)]

    def counts(self, now: datetime | None = None) -> QueueCounts:
        """Jobs per status, and how long the oldest due pending job has waited."""
        at = _now(now)
        by_status = sa.select(q.c.status, sa.func.count()).group_by(q.c.status)
        oldest = sa.select(seconds_between(at, sa.func.min(q.c.next_attempt_at))).where(
            q.c.status == Status.PENDING, q.c.next_attempt_at <= at
        )
        with self._begin() as conn:
            counts = {Status(s): n for s, n in conn.execute(by_status)}
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
            with self._begin() as conn:
                ids = list(
                    conn.execute(
                        sa.select(q.c.id)
                        .where(cutoff)
                        .limit(batch_size)
                        .with_for_update(skip_locked=True)
                    ).scalars()
                )
                if not ids:
                    return total
                conn.execute(a.delete().where(a.c.job_id.in_(ids)))
                conn.execute(q.delete().where(q.c.id.in_(ids)))
            total += len(ids)
            if on_batch is not None:
                on_batch(len(ids))

    def _finished_before(
        self, older_than_days: float, now: datetime | None
    ) -> sa.ColumnElement[bool]:
        cutoff = add_seconds(_now(now), -older_than_days * 86400)
        return q.c.status.in_(FINISHED_STATUSES) & (q.c.updated_at < cutoff)

    def _notify(self, conn: sa.Connection) -> None:
        """Wake listening workers (PostgreSQL); SQLite workers poll."""
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))


def _sqlalchemy_executor(conn: sa.Connection) -> Callable[[sa.Executable], list[Any]]:
    def execute(stmt: sa.Executable) -> list[Any]:
        result = conn.execute(stmt)
        return list(result) if result.returns_rows else []

    return execute


def enqueue_statements(
    dialect: str, jobs: Sequence[NewJob], execute: Callable[[sa.Executable], list[Any]]
) -> list[str]:
    """Write jobs through `execute` (any connection kind); returns ids in input order.

    Rows go in with ON CONFLICT DO NOTHING on the idempotency key; the ids of
    keys that were already queued are then read back, so a repeated key
    yields the first job's id and no second row.
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for start in range(0, len(jobs), ENQUEUE_CHUNK):
        rows = [_new_job_values(j) for j in jobs[start : start + ENQUEUE_CHUNK]]
        for row, job in zip(rows, jobs[start : start + ENQUEUE_CHUNK], strict=True):
            if job.send_after is not None:
                row["next_attempt_at"] = job.send_after
        _insert_rows(insert, rows, execute)
    keys = list({j.idempotency_key for j in jobs if j.idempotency_key is not None})
    existing: dict[str, str] = {}
    for start in range(0, len(keys), ENQUEUE_CHUNK):
        chunk = keys[start : start + ENQUEUE_CHUNK]
        for key, job_id in execute(
            sa.select(q.c.idempotency_key, q.c.id).where(q.c.idempotency_key.in_(chunk))
        ):
            existing[key] = job_id
    return [existing[j.idempotency_key] if j.idempotency_key else j.id for j in jobs]


def _insert_rows(insert: Any, rows: list[dict[str, Any]], execute: Callable[..., Any]) -> None:
    # Rows with and without a send_after differ in columns; a multi-row
    # VALUES needs one shape, so the column defaults are made explicit.
    with_time = [r for r in rows if "next_attempt_at" in r]
    without = [r for r in rows if "next_attempt_at" not in r]
    for group in (with_time, without):
        if group:
            stmt = (
                insert(q).values(group).on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            execute(stmt)


def _attempt_values(c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "attempt": c.attempt,
        "started_at": c.started_at,
        "duration_seconds": c.duration_seconds,
        "outcome": c.outcome,
        "smtp_code": c.smtp_code,
        "smtp_text": c.smtp_text if c.smtp_text is not None else c.error,
        "worker": c.owner,
    }


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
