"""The operator's changes to jobs: requeue, cancel, retry failed jobs, look one up, clean up.

Looking up includes a job's per-recipient results (`email_recipients`,
written when its recipients did not all fare alike) and the jobs sent with
some recipients refused.

What `mailqctl` runs. A job that does not exist is a `JobNotFoundError`,
one in the wrong state a `JobStateError`: neither is a database problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.errors import JobNotFoundError, JobStateError
from mailqd.models import (
    FINISHED_STATUSES,
    Attempt,
    Job,
    Outcome,
    RecipientResult,
    RecipientStatus,
    Status,
)
from mailqd.store import rows
from mailqd.store.attachments import AttachmentStore
from mailqd.store.database import Database
from mailqd.store.relay_tables import email_recipients as er
from mailqd.store.schema import add_seconds
from mailqd.store.sql import a, at_time, q, status_in, status_is

__all__ = ["CLEANUP_BATCH", "OperatorChanges"]

CLEANUP_BATCH = 1000


class OperatorChanges:
    """What an operator changes in the queue of one database, and what they look at."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def requeue_failed(
        self,
        job_ids: Sequence[str] | None = None,
        limit: int | None = None,
        now: datetime | None = None,
    ) -> int:
        """Failed jobs back to pending, due now, with a fresh attempt budget.

        Without ids, the most recently failed first, up to `limit`.
        """
        at = at_time(now)
        chosen = sa.select(q.c.id).where(status_is(Status.FAILED))
        if job_ids is not None:
            chosen = chosen.where(q.c.id.in_(job_ids))
        if limit is not None:
            chosen = chosen.order_by(q.c.updated_at.desc()).limit(limit)
        stmt = (
            q.update()
            .where(q.c.id.in_(chosen.scalar_subquery()), q.c.status == Status.FAILED)
            .values(status=Status.PENDING, attempts=0, next_attempt_at=at, updated_at=at)
        )
        with self._db.begin() as conn:
            count = conn.execute(stmt).rowcount
            if count:
                self._db.dialect.notify(conn)
        return count

    def requeue(self, job_id: str, now: datetime | None = None) -> Job:
        """One failed or cancelled job back to pending, due now, fresh attempts."""
        return self._transition(
            job_id,
            allowed=(Status.FAILED, Status.CANCELLED),
            operation="requeue",
            values={"status": Status.PENDING, "attempts": 0, "next_attempt_at": at_time(now)},
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
            .values(**values, updated_at=at_time(now))
            .returning(*q.c)
        )
        with self._db.begin() as conn:
            again = sa.select(q).where(q.c.id == job_id)
            found = rows.read_jobs(conn, conn.execute(stmt), again)
            if not found:
                status = conn.execute(sa.select(q.c.status).where(q.c.id == job_id)).scalar()
                if status is None:
                    raise JobNotFoundError(job_id)
                raise JobStateError(job_id, status, operation)
            if found[0].status == Status.PENDING:
                self._db.dialect.notify(conn)
        return found[0]

    def get(self, job_id: str) -> Job:
        with self._db.begin() as conn:
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
        with self._db.begin() as conn:
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

    def recipients(self, job_id: str) -> list[RecipientResult]:
        """A job's per-recipient results, by address; empty when all fared alike (or no job)."""
        stmt = sa.select(er).where(er.c.job_id == job_id).order_by(er.c.address)
        with self._db.begin() as conn:
            return [_recipient_result(r) for r in conn.execute(stmt)]

    def list_partially_refused(self, limit: int) -> list[tuple[Job, list[RecipientResult]]]:
        """Sent jobs that some recipients refused (5xx), most recently sent first, with
        those refusals (by address).

        Read from the refusals (`email_recipients` holds only jobs whose
        recipients fared differently), each job then found by its key.
        """
        refused = er.c.status == sa.literal_column(f"'{RecipientStatus.REFUSED.value}'")
        stmt = (
            sa.select(q)
            .where(status_is(Status.SENT), q.c.id.in_(sa.select(er.c.job_id).where(refused)))
            .order_by(q.c.updated_at.desc(), q.c.id)
            .limit(limit)
        )
        with self._db.begin() as conn:
            jobs = rows.read_jobs(conn, conn.execute(stmt), stmt)
            found: dict[str, list[RecipientResult]] = {job.id: [] for job in jobs}
            if jobs:
                results = (
                    sa.select(er)
                    .where(er.c.job_id.in_(list(found)), refused)
                    .order_by(er.c.job_id, er.c.address)
                )
                for r in conn.execute(results):
                    found[r.job_id].append(_recipient_result(r))
        return [(job, found[job.id]) for job in jobs]

    def list_failed(self, limit: int) -> list[Job]:
        stmt = (
            sa.select(q)
            .where(status_is(Status.FAILED))
            .order_by(q.c.updated_at.desc(), q.c.id)
            .limit(limit)
        )
        with self._db.begin() as conn:
            return rows.read_jobs(conn, conn.execute(stmt), stmt)

    def count_finished(self, older_than_days: float, now: datetime | None = None) -> int:
        """How many sent, failed or cancelled jobs `delete_finished` would remove."""
        stmt = sa.select(sa.func.count()).where(_finished_before(older_than_days, now))
        with self._db.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def delete_finished(
        self,
        older_than_days: float,
        batch_size: int = CLEANUP_BATCH,
        now: datetime | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished jobs (their attempts, recipient results and attachments too) last
        updated before the cutoff, then the attachment content no job refers to any more.

        Each batch is its own short transaction, so claims never wait on a
        long delete (`Dialect.delete_batch`, `Dialect.pause_after_batch`);
        the content goes in batches too (`AttachmentStore.purge_orphan_blobs`).
        Returns the number of jobs deleted.
        """
        cutoff = _finished_before(older_than_days, now)
        dialect = self._db.dialect
        total = 0
        while True:
            started = time.monotonic()
            with self._db.begin() as conn:
                deleted = dialect.delete_batch(conn, cutoff, batch_size)
            if not deleted:
                AttachmentStore(self._db).purge_orphan_blobs(batch_size)
                return total
            total += deleted
            if on_batch is not None:
                on_batch(deleted)
            pause = dialect.pause_after_batch(time.monotonic() - started)
            if pause:
                time.sleep(pause)


def _recipient_result(row: sa.Row[Any]) -> RecipientResult:
    return RecipientResult(
        address=row.address,
        status=RecipientStatus(row.status),
        smtp_code=row.smtp_code,
        smtp_text=row.smtp_text,
        relay=row.relay,
        attempt=row.attempt,
        updated_at=row.updated_at,
    )


def _finished_before(older_than_days: float, now: datetime | None) -> sa.ColumnElement[bool]:
    cutoff = add_seconds(at_time(now), -older_than_days * 86400)
    return status_in(*FINISHED_STATUSES) & (q.c.updated_at < cutoff)
