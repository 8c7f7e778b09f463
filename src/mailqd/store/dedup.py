"""De-duplication at claim time: a job with the same content as one claimed lately is not sent.

A job's content hash (its recipients, sender, subject, bodies, template
and variables) is claimed in `mailqd_dedup` with one upsert per batch.
The row's primary key decides, atomically across workers and daemons,
which job holds the hash: the first to claim it, or a later one once the
holder's claim is older than the window or the holder ended without
being sent (failed or cancelled, or deleted). Every other job with that
hash is a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mailqd.models import Job, Outcome
from mailqd.store.dialects import Dialect
from mailqd.store.schema import dedup as d
from mailqd.store.screened import Screened, ScreenRules, recipients_of

__all__ = ["content_hash", "deduplicate"]

# The holder of a hash ended without being sent, or was deleted: its hash is free.
# Text, because SQLAlchemy would not correlate the subquery to the upserted row.
_HOLDER_GONE = sa.literal_column(
    "NOT EXISTS (SELECT 1 FROM email_queue AS holder WHERE holder.id = mailqd_dedup.job_id"
    " AND holder.status IN ('pending', 'sending', 'sent'))",
    sa.Boolean,
)


def content_hash(job: Job, open_variables: Callable[[Any], Any] | None = None) -> str:
    """SHA-256 over what makes two messages the same message to the same people.

    Not the headers, reply-to, priority or schedule: a retried enqueue of
    the same message differs in none of what is hashed.
    """
    variables = job.variables
    if open_variables is not None and variables is not None:
        try:
            variables = open_variables(variables)
        except Exception:  # a job whose variables cannot be opened fails when rendered
            variables = job.variables
    content = {
        "recipients": recipients_of(job),
        "from": (job.from_address or "").strip().lower(),
        "subject": job.subject,
        "body": job.body,
        "html": job.html,
        "template_id": job.template_id,
        "variables": variables,
    }
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    except (RecursionError, ValueError):  # variables nested too deeply: like no other job
        text = json.dumps({**content, "variables": {"unhashable job": job.id}}, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def deduplicate(
    conn: sa.Connection, dialect: Dialect, jobs: Sequence[Job], rules: ScreenRules, at: datetime
) -> dict[str, Screened]:
    """Claim each distinct hash for its first job; every job whose hash another job holds is out.

    Within the batch the oldest job (by `created_at`) is the candidate.
    The rows are written in hash order, so two workers upserting the same
    hashes lock them in the same order and cannot deadlock.
    """
    hashes = {job.id: content_hash(job, rules.open_variables) for job in jobs}
    candidates: dict[str, Job] = {}
    for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
        candidates.setdefault(hashes[job.id], job)
    insert = dialect.insert(d).values(
        [
            {"content_hash": h, "job_id": candidates[h].id, "first_seen_at": at}
            for h in sorted(candidates)
        ]
    )
    proposed = insert.excluded
    cutoff = sa.literal(at - timedelta(seconds=rules.dedup_window), type_=d.c.first_seen_at.type)
    take_over = (d.c.first_seen_at <= cutoff) | (d.c.job_id == proposed.job_id) | _HOLDER_GONE
    stmt = insert.on_conflict_do_update(
        index_elements=[d.c.content_hash],
        set_={
            "job_id": sa.case((take_over, proposed.job_id), else_=d.c.job_id),
            "first_seen_at": sa.case((take_over, proposed.first_seen_at), else_=d.c.first_seen_at),
        },
    ).returning(d.c.content_hash, d.c.job_id)
    holders = {row.content_hash: row.job_id for row in conn.execute(stmt)}
    span = _span(rules.dedup_window)
    return {
        job.id: Screened(
            job,
            Outcome.DUPLICATE,
            f"duplicate of job {holders[hashes[job.id]]}: the same recipients and content "
            f"were claimed for sending within {span} (dedup_window); not sent",
        )
        for job in jobs
        if holders[hashes[job.id]] != job.id
    }


def _span(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
