"""Claim-time screening: de-duplication, the per-recipient hourly cap, per-domain rate limits.

Both are judged when a worker claims jobs (`Store.claim_screened`), in the
claim's own transaction, so they cover every way a job got into the queue
(the client, `mailqctl enqueue`, a plain SQL INSERT) and enqueueing pays
nothing for them: `email_queue` has no column or index for either.

De-duplication: a job's content hash (its recipients, sender, subject,
bodies, template and variables) is claimed in `mailqd_dedup` with one
upsert per batch. The row's primary key decides, atomically across
workers and daemons, which job holds the hash: the first to claim it, or
a later one once the holder's claim is older than the window or the
holder ended without being sent (failed or cancelled, or deleted). Every
other job with that hash is a duplicate: it is cancelled, not sent, with
the holder's id in its `last_error` and a `duplicate` attempt row.

The cap: sends begun per recipient (the lower-cased address) per clock
hour are counted in `mailqd_recipient_counts` with one upsert per batch.
A job any of whose recipients is over the cap is not sent and not failed:
it goes back to pending, due at the start of the next hour, its attempt
not counted, with a `deferred` attempt row saying which recipient.

Per-domain rate limits: each limited recipient domain has a token bucket
(`mailqd.store.buckets`, named `domain:<domain>`) taken from in the
claim's transaction, once per job however many of its recipients are in
that domain. Jobs are admitted in claim order while every limited domain
of the job has a token; tokens taken for jobs that were not admitted are
given back. A job turned away goes back to pending, its attempt not
counted and no attempt row written (nothing was tried, and `last_error`
is kept), due in the slot its domain's bucket hands it: the k-th waiting
job of a domain comes back about `wait for the next token + k / rate`
seconds later, after the jobs already waiting. So a backlog is spread
over the time the limit needs to send it, deferred about once per job,
and no worker re-claims it in a loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mailqd.models import Job, Outcome, Status
from mailqd.store import recipient_cap
from mailqd.store.dedup import content_hash, deduplicate
from mailqd.store.dialects import Dialect
from mailqd.store.schema import add_seconds, dedup, email_attempts, email_queue, recipient_counts
from mailqd.store.screened import Screened, ScreenedClaim, ScreenRules, recipients_of
from mailqd.store.throttle import DOMAIN_BUCKET_PREFIX, throttle

__all__ = [
    "DOMAIN_BUCKET_PREFIX",
    "ScreenRules",
    "Screened",
    "ScreenedClaim",
    "content_hash",
    "recipients_of",
]

q = email_queue
d = dedup
rc = recipient_counts

_HOUR = timedelta(hours=1)
_PURGE_BATCH = 5000


def screen(
    conn: sa.Connection, dialect: Dialect, jobs: Sequence[Job], rules: ScreenRules, owner: str
) -> ScreenedClaim:
    """Judge freshly claimed `jobs` (all stamped with the claim's time) and record the verdicts."""
    if not jobs or not rules.active:
        return ScreenedClaim(list(jobs))
    at = jobs[0].updated_at  # the claim's database time, the same on every claimed row
    screened: dict[str, Screened] = {}
    if rules.dedup_window > 0:
        screened |= deduplicate(conn, dialect, jobs, rules, at)
    if rules.recipient_hourly_cap > 0:
        remaining = [job for job in jobs if job.id not in screened]
        screened |= recipient_cap.cap(conn, dialect, remaining, rules.recipient_hourly_cap, at)
    if rules.domain_rates:
        remaining = [job for job in jobs if job.id not in screened]
        throttled = throttle(conn, dialect, remaining, rules, at)
        if rules.recipient_hourly_cap > 0:  # their sends were counted, and did not begin
            given = Counter(a for s in throttled.values() for a in recipient_cap.counted(s.job))
            recipient_cap.give_back(conn, recipient_cap.hour_of(at), given)
        screened |= throttled
    if screened:
        _record(conn, list(screened.values()), owner, at)
    return ScreenedClaim(
        jobs=[job for job in jobs if job.id not in screened], screened=list(screened.values())
    )


# How `_record` leaves a job of each kind: its new values, with `b_error`
# (the reason) and `b_due` (when it is due again) bound per job.
_SET_ASIDE_VALUES: dict[Outcome, dict[str, Any]] = {
    Outcome.DUPLICATE: {
        "status": Status.CANCELLED,
        "attempts": q.c.attempts + 1,
        "last_error": sa.bindparam("b_error"),
    },
    Outcome.DEFERRED: {
        "status": Status.PENDING,
        "next_attempt_at": sa.bindparam("b_due", type_=q.c.next_attempt_at.type),
        "last_error": sa.bindparam("b_error"),
    },
    Outcome.THROTTLED: {
        "status": Status.PENDING,
        "next_attempt_at": sa.bindparam("b_due", type_=q.c.next_attempt_at.type),
    },
}


def _record(conn: sa.Connection, screened: list[Screened], owner: str, at: datetime) -> None:
    """Duplicates end cancelled (attempt counted); deferrals are pending again (not counted).

    Deferred jobs are due at the next hour. Throttled jobs are pending too,
    each due after its own delay, with neither an attempt row nor a new
    `last_error`: nothing was tried.
    """
    held = (
        (q.c.id == sa.bindparam("b_id"))
        & (q.c.status == Status.SENDING)
        & (q.c.lease_owner == owner)
    )
    released: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": at}
    for outcome, values in _SET_ASIDE_VALUES.items():
        params = [
            {"b_id": s.job.id, "b_error": s.reason, "b_due": at + timedelta(seconds=s.delay)}
            for s in screened
            if s.outcome is outcome
        ]
        if params:
            conn.execute(q.update().where(held).values(**values, **released), params)
    attempted = [s for s in screened if s.outcome is not Outcome.THROTTLED]
    if not attempted:
        return
    conn.execute(
        email_attempts.insert(),
        [
            {
                "job_id": s.job.id,
                "attempt": s.job.attempts + 1,
                "started_at": at,
                "duration_seconds": 0.0,
                "outcome": s.outcome,
                "smtp_text": s.reason,
                "worker": owner,
            }
            for s in attempted
        ],
    )


# -- housekeeping ------------------------------------------------------------------


def purge(
    begin: Callable[[], AbstractContextManager[sa.Connection]],
    window: float,
    at: sa.ColumnElement[datetime],
) -> int:
    """Delete hash rows older than the window and counts of hours that are over, in batches.

    Expired rows are already ignored by the screening; this only keeps the
    tables small. `begin` opens one short transaction per batch.
    """
    targets = [
        (rc, rc.c.hour_start <= add_seconds(at, -_HOUR.total_seconds())),
        (d, d.c.first_seen_at < add_seconds(at, -window)),  # window 0: the feature is off
    ]
    total = 0
    for table, old in targets:
        key = list(table.primary_key.columns)
        while True:
            # Rows a claim holds are skipped, not waited for (no deadlock with a claim
            # upserting them in another order); `old` is checked again on the row
            # deleted, so a hash a claim just took over is kept.
            doomed = (
                sa.select(*key).where(old).limit(_PURGE_BATCH).with_for_update(skip_locked=True)
            )
            picked = (
                key[0].in_(doomed.scalar_subquery())
                if len(key) == 1
                else sa.tuple_(*key).in_(doomed)
            )
            with begin() as conn:
                deleted = conn.execute(table.delete().where(picked, old)).rowcount
            total += deleted
            if deleted < _PURGE_BATCH:
                break
    return total
