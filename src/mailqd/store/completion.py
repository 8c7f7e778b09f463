"""Recording delivery outcomes: the `Completion` a worker hands in, and its two statements.

`complete` is the hottest write of the queue. PostgreSQL runs it as one
statement (`COMPLETE_PG`, the batch as one JSON text); SQLite as one
UPDATE per job and one INSERT of the attempts, in one transaction
(`complete_statement`). Which one runs is the dialect's choice
(`mailqd.store.dialects`); both apply the rules below.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.models import Outcome, RecipientResult, Status
from mailqd.store.schema import add_seconds, utcnow
from mailqd.store.sql import q

__all__ = ["Completion"]


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of one delivery attempt, to be recorded for a held job.

    `outcome` decides the job's next state: SENT → sent; RETRY and AMBIGUOUS
    → pending again after `retry_in_seconds`; DEFERRED (the relay failed, not
    the message) → pending again without using an attempt; FAILED and
    EXPIRED → failed. `attempt` is the number of this attempt (the job's
    `attempts` + 1). `recipients` holds each recipient's result when they
    did not all fare alike (`email_recipients`).
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
    recipients: tuple[RecipientResult, ...] = ()


_NEXT_STATUS = {
    Outcome.SENT: Status.SENT,
    Outcome.RETRY: Status.PENDING,
    Outcome.AMBIGUOUS: Status.PENDING,
    Outcome.DEFERRED: Status.PENDING,
    Outcome.FAILED: Status.FAILED,
    Outcome.EXPIRED: Status.FAILED,
}


def complete_statement(at: sa.ColumnElement[datetime]) -> sa.Update:
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
            attempts=q.c.attempts + sa.bindparam("b_counted", type_=sa.Integer),
            last_error=sa.bindparam("b_error"),
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=add_seconds(at, sa.bindparam("b_delay", type_=sa.Float)),
            sent_at=sa.case((sa.bindparam("b_status") == Status.SENT, at), else_=q.c.sent_at),
            message_id=sa.func.coalesce(sa.bindparam("b_mid", type_=sa.Text), q.c.message_id),
            updated_at=at,
        )
    )


# `complete` on PostgreSQL. Both CTEs see the same snapshot and commit
# together; an outcome for a job whose lease this owner lost changes
# nothing, but its attempt is still recorded.
COMPLETE_PG = sa.text(
    """
WITH done AS (
    SELECT *
    FROM jsonb_to_recordset(CAST(:batch AS jsonb)) AS d(
        id text, owner text, status text, error text, delay float8, mid text, counted integer,
        attempt integer, started timestamptz, duration float8, outcome text,
        code integer, text text)
), clock AS (
    SELECT coalesce(CAST(:now AS timestamptz), now()) AS at
), changed AS (
    UPDATE email_queue AS q
    SET status = d.status,
        attempts = q.attempts + d.counted,
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

COMPLETE_AT_DB_TIME = complete_statement(utcnow())
"""Built once: constructing it (and its cache key) cost more CPU per call than running it."""


def storable_text(text: str | None) -> str | None:
    """Text that both databases (and PostgreSQL's jsonb) accept: no NUL, no lone surrogate.

    An SMTP reply is decoded with `surrogateescape`, so a server that sends
    invalid UTF-8 (or a NUL) would otherwise make the whole batch of
    outcomes fail, and be retried, for ever.
    """
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def job_outcome(c: Completion) -> dict[str, Any]:
    """What a completion changes on its job: the parameters of both forms of `complete`
    (`COMPLETE_PG`'s JSON fields; `complete_statement`'s, prefixed `b_`)."""
    return {
        "id": c.job_id,
        "owner": c.owner,
        "status": _NEXT_STATUS[c.outcome].value,
        "error": None if c.outcome is Outcome.SENT else storable_text(c.error),
        "delay": c.retry_in_seconds,
        "mid": c.message_id,
        "counted": 0 if c.outcome is Outcome.DEFERRED else 1,
    }


def attempt_text(c: Completion) -> str | None:
    """The attempt row's text: the server's reply, else the error."""
    return storable_text(c.smtp_text if c.smtp_text is not None else c.error)


def attempt_values(c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "attempt": c.attempt,
        "started_at": c.started_at,
        "duration_seconds": c.duration_seconds,
        "outcome": c.outcome,
        "smtp_code": c.smtp_code,
        "smtp_text": attempt_text(c),
        "worker": c.owner,
    }


def json_batch(completions: Any) -> list[dict[str, Any]]:
    """The batch as `COMPLETE_PG` reads it: one JSON object per completion."""
    return [
        {
            **job_outcome(c),
            "attempt": c.attempt,
            "started": c.started_at.isoformat(),
            "duration": c.duration_seconds,
            "outcome": c.outcome.value,
            "code": c.smtp_code,
            "text": attempt_text(c),
        }
        for c in completions
    ]


def recipient_rows(completions: Any) -> list[dict[str, Any]]:
    """The `email_recipients` rows of a batch: only completions that carry recipients."""
    return [
        {
            "job_id": c.job_id,
            "address": r.address,
            "status": r.status.value,
            "smtp_code": r.smtp_code,
            "smtp_text": storable_text(r.smtp_text),
            "relay": r.relay,
            "attempt": c.attempt,
        }
        for c in completions
        for r in c.recipients
    ]


def record_recipients(conn: sa.Connection, insert: Any, rows: list[dict[str, Any]]) -> None:
    """Upsert per-recipient results; written before the outcome, so that a job whose
    outcome is lost is retried knowing who already has it."""
    from mailqd.store.relay_tables import email_recipients as r

    stmt = insert(r)
    stmt = stmt.on_conflict_do_update(
        index_elements=[r.c.job_id, r.c.address],
        set_={
            name: stmt.excluded[name]
            for name in ("status", "smtp_code", "smtp_text", "relay", "attempt")
        }
        | {"updated_at": utcnow()},
    )
    conn.execute(stmt, rows)
