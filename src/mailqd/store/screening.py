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

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailqd.models import Job, Outcome, Status
from mailqd.rules import envelope_addresses
from mailqd.store import buckets
from mailqd.store.rows import UnreadableRow
from mailqd.store.schema import add_seconds, dedup, email_attempts, email_queue, recipient_counts

__all__ = [
    "DOMAIN_BUCKET_PREFIX",
    "ScreenRules",
    "Screened",
    "ScreenedClaim",
    "content_hash",
    "recipients_of",
]

DOMAIN_BUCKET_PREFIX = "domain:"
"""`mailqd_rate_limit` rows of the per-domain limits are named `domain:<domain>`."""

q = email_queue
d = dedup
rc = recipient_counts

_HOUR = timedelta(hours=1)
_LONGEST_ADDRESS = 254
"""Longer is no address (RFC 5321); such a job fails when composed, so it is not counted."""
_PURGE_BATCH = 5000
# The holder of a hash ended without being sent, or was deleted: its hash is free.
# Text, because SQLAlchemy would not correlate the subquery to the upserted row.
_HOLDER_GONE = sa.literal_column(
    "NOT EXISTS (SELECT 1 FROM email_queue AS holder WHERE holder.id = mailqd_dedup.job_id"
    " AND holder.status IN ('pending', 'sending', 'sent'))",
    sa.Boolean,
)


@dataclass(frozen=True, slots=True)
class ScreenRules:
    """What to screen claimed jobs for; a rule at 0 is off.

    `open_variables` turns a job's stored `variables` into what they say
    (encrypted variables differ at every enqueue), for the content hash.
    """

    dedup_window: float = 0.0
    """Seconds: a job with the same content as one claimed this recently is not sent."""
    recipient_hourly_cap: int = 0
    """Sends begun per recipient per clock hour; more wait for the next hour."""
    domain_rates: Mapping[str, float] = field(default_factory=dict)
    """Messages per second per recipient domain (`Settings.domain_rates`); `*.d`: d's subdomains."""
    open_variables: Callable[[Any], Any] | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.dedup_window > 0 or self.recipient_hourly_cap > 0 or bool(self.domain_rates)

    def limited_domain(self, domain: str) -> str | None:
        """The `domain_rates` key that limits a (lower-cased) recipient domain, if any.

        The exact domain first, then the closest `*.parent` above it.
        """
        if domain in self.domain_rates:
            return domain
        labels = domain.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in self.domain_rates:
                return wildcard
        return None


@dataclass(frozen=True, slots=True)
class Screened:
    """A claimed job that was not sent, and why; already recorded in the store."""

    job: Job
    outcome: Outcome
    """`DUPLICATE` (now cancelled), `DEFERRED` or `THROTTLED` (both pending again)."""
    reason: str
    """The job's `last_error` and its attempt row's text (`THROTTLED`: for the log only)."""
    domain: str = ""
    """`THROTTLED`: the limited domain (a `domain_rates` key) that held the job back."""
    delay: float = 0.0
    """`DEFERRED`, `THROTTLED`: seconds from the claim until the job is due again."""


@dataclass(frozen=True, slots=True)
class ScreenedClaim:
    """What `Store.claim_screened` took: jobs to send, and jobs it set aside."""

    jobs: list[Job]
    screened: list[Screened] = field(default_factory=list)
    unreadable: list[UnreadableRow] = field(default_factory=list)
    """Rows that could not be read: already failed, each with its column in `last_error`."""

    @property
    def claimed(self) -> int:
        return len(self.jobs) + len(self.screened) + len(self.unreadable)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for s in self.screened if s.outcome is outcome)


# -- what is compared ---------------------------------------------------------------


def recipients_of(job: Job) -> list[str]:
    """The job's To, Cc and Bcc envelope addresses, lower-cased, each once, sorted.

    Parsed by the composer's own parser (`mailqd.rules`), so these are the
    addresses the message would go to, domains in A-labels as sent. A
    field that is no address list is refused later by the composer; here
    it counts as its text, so one odd row never stops a claim.
    """
    found: set[str] = set()
    for value in (job.recipient_to, job.cc, job.bcc):
        if not value:
            continue
        addresses = envelope_addresses(value)
        if addresses is None:
            found.add(str(value).strip().lower())
        else:
            found.update(addr.lower() for addr in addresses)
    return sorted(found)


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


# -- the screening, in the claim's transaction ---------------------------------------


def screen(
    conn: sa.Connection, dialect: str, jobs: Sequence[Job], rules: ScreenRules, owner: str
) -> ScreenedClaim:
    """Judge freshly claimed `jobs` (all stamped with the claim's time) and record the verdicts."""
    if not jobs or not rules.active:
        return ScreenedClaim(list(jobs))
    at = jobs[0].updated_at  # the claim's database time, the same on every claimed row
    screened: dict[str, Screened] = {}
    if rules.dedup_window > 0:
        screened |= _deduplicate(conn, dialect, jobs, rules, at)
    if rules.recipient_hourly_cap > 0:
        remaining = [job for job in jobs if job.id not in screened]
        screened |= _cap(conn, dialect, remaining, rules.recipient_hourly_cap, at)
    if rules.domain_rates:
        remaining = [job for job in jobs if job.id not in screened]
        throttled = _throttle(conn, dialect, remaining, rules, at)
        if rules.recipient_hourly_cap > 0:  # their sends were counted, and did not begin
            hour = at.replace(minute=0, second=0, microsecond=0)
            _give_back(conn, hour, Counter(a for s in throttled.values() for a in _counted(s.job)))
        screened |= throttled
    if screened:
        _record(conn, list(screened.values()), owner, at)
    return ScreenedClaim(
        jobs=[job for job in jobs if job.id not in screened], screened=list(screened.values())
    )


def _deduplicate(
    conn: sa.Connection, dialect: str, jobs: Sequence[Job], rules: ScreenRules, at: datetime
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
    insert = _insert_for(dialect)(d).values(
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


def _cap(
    conn: sa.Connection, dialect: str, jobs: Sequence[Job], cap: int, at: datetime
) -> dict[str, Screened]:
    """Count the batch's sends per recipient this hour; defer the jobs that would exceed `cap`.

    One upsert adds what the whole batch wants and returns the new totals;
    the jobs are then admitted in claim order while every recipient of the
    job has room, and what the deferred jobs had added is taken back. The
    rows are written in address order (no deadlock between workers).
    """
    wanted = {job.id: _counted(job) for job in jobs}
    demand = Counter(address for addresses in wanted.values() for address in addresses)
    if not demand:
        return {}
    hour = at.replace(minute=0, second=0, microsecond=0)
    insert = _insert_for(dialect)(rc).values(
        [{"hour_start": hour, "recipient": r, "sent": n} for r, n in sorted(demand.items())]
    )
    stmt = insert.on_conflict_do_update(
        index_elements=[rc.c.hour_start, rc.c.recipient],
        set_={"sent": rc.c.sent + insert.excluded.sent},
    ).returning(rc.c.recipient, rc.c.sent)
    room = {row.recipient: cap - (row.sent - demand[row.recipient]) for row in conn.execute(stmt)}
    unused = Counter(demand)
    deferred: dict[str, Screened] = {}
    next_hour = hour + _HOUR
    for job in jobs:
        full = next((r for r in wanted[job.id] if room[r] <= 0), None)
        if full is None:
            for address in wanted[job.id]:
                room[address] -= 1
                unused[address] -= 1
            continue
        reason = (
            f"deferred to {next_hour:%Y-%m-%d %H:%M} UTC: recipient {full} reached "
            f"recipient_hourly_cap ({cap} per hour); attempt not counted"
        )
        deferred[job.id] = Screened(
            job, Outcome.DEFERRED, reason, delay=(next_hour - at).total_seconds()
        )
    _give_back(conn, hour, +unused)
    return deferred


def _counted(job: Job) -> list[str]:
    """The job's recipients that the cap counts."""
    return [r for r in recipients_of(job) if len(r) <= _LONGEST_ADDRESS]


def _throttle(
    conn: sa.Connection, dialect: str, jobs: Sequence[Job], rules: ScreenRules, at: datetime
) -> dict[str, Screened]:
    """Take a token per job from each limited domain it sends to; put off the jobs that get none.

    One take per limited domain in the batch, in domain order (no deadlock
    between workers: the rows stay locked until the claim commits). The
    jobs are then admitted in claim order while each of their domains has
    a token left; what is left over is given back. The jobs turned away
    are handed slots by their domains' buckets (`buckets.reserve`) and are
    due at the latest of their slots.
    """
    limited = {job.id: _limited_domains(job, rules) for job in jobs}
    demand = Counter(domain for domains in limited.values() for domain in domains)
    if not demand:
        return {}
    now = at.timestamp()  # the claim's database time: all buckets of this claim agree
    left: dict[str, int] = {}
    for domain, n in sorted(demand.items()):
        rate = rules.domain_rates[domain]
        grant = buckets.take(conn, dialect, _bucket(domain), n, rate, _burst(rate), now)
        left[domain] = grant.granted
    refused: list[tuple[Job, list[str]]] = []
    for job in jobs:
        empty = [domain for domain in limited[job.id] if left[domain] <= 0]
        if empty:
            refused.append((job, empty))
            continue
        for domain in limited[job.id]:
            left[domain] -= 1
    for domain, unused in sorted(left.items()):
        rate = rules.domain_rates[domain]
        buckets.give_back(conn, dialect, _bucket(domain), unused, _burst(rate))
    waiting = Counter(domain for _, empty in refused for domain in empty)
    first_slot = {
        domain: buckets.reserve(conn, dialect, _bucket(domain), n, rules.domain_rates[domain], now)
        for domain, n in sorted(waiting.items())
    }
    places: Counter[str] = Counter()
    throttled: dict[str, Screened] = {}
    for job, empty in refused:
        slots: dict[str, float] = {}
        for domain in empty:
            slots[domain] = first_slot[domain] + places[domain] / rules.domain_rates[domain]
            places[domain] += 1
        domain = max(slots, key=lambda d: slots[d])
        delay = max(0.0, slots[domain] - now)
        reason = (
            f"recipient domain {domain} is at its domain_rate_limits "
            f"({rules.domain_rates[domain]:g}/s); due again in {delay:.2f} s, attempt not counted"
        )
        throttled[job.id] = Screened(job, Outcome.THROTTLED, reason, domain=domain, delay=delay)
    return throttled


def _limited_domains(job: Job, rules: ScreenRules) -> list[str]:
    """The `domain_rates` keys the job's recipients fall under, each once, sorted."""
    found = {rules.limited_domain(address.rpartition("@")[2]) for address in recipients_of(job)}
    return sorted(domain for domain in found if domain is not None)


def _bucket(domain: str) -> str:
    return DOMAIN_BUCKET_PREFIX + domain


def _burst(rate: float) -> float:
    """One second's worth, and at least one message, as for `rate_limit`."""
    return max(1.0, rate)


def _give_back(conn: sa.Connection, hour: datetime, unused: Counter[str]) -> None:
    """Take back the counts added for jobs that were deferred after all."""
    if not unused:
        return
    stmt = (
        rc.update()
        .where(rc.c.hour_start == sa.bindparam("b_hour"), rc.c.recipient == sa.bindparam("b_rcpt"))
        .values(sent=rc.c.sent - sa.bindparam("b_n", type_=sa.Integer))
    )
    conn.execute(
        stmt,
        [{"b_hour": hour, "b_rcpt": r, "b_n": n} for r, n in sorted(unused.items())],
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


def _insert_for(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _span(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
