"""The per-recipient hourly cap: sends begun per recipient per clock hour.

Counted in `mailqd_recipient_counts` with one upsert per batch. A job any
of whose recipients is over the cap is not sent and not failed: it goes
back to pending, due at the start of the next hour, its attempt not
counted, with a `deferred` attempt row saying which recipient.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailqd.models import Job, Outcome
from mailqd.store.dialects import Dialect
from mailqd.store.schema import recipient_counts as rc
from mailqd.store.screened import Screened, admit, recipients_of

__all__ = ["cap", "counted", "give_back", "hour_of"]

_HOUR = timedelta(hours=1)
_LONGEST_ADDRESS = 254
"""Longer is no address (RFC 5321); such a job fails when composed, so it is not counted."""


def cap(
    conn: sa.Connection, dialect: Dialect, jobs: Sequence[Job], cap: int, at: datetime
) -> dict[str, Screened]:
    """Count the batch's sends per recipient this hour; defer the jobs that would exceed `cap`.

    One upsert adds what the whole batch wants and returns the new totals;
    the jobs are then admitted in claim order while every recipient of the
    job has room (`admit`), and what the deferred jobs had added is taken
    back. The rows are written in address order (no deadlock between workers).
    """
    wanted = {job.id: counted(job) for job in jobs}
    demand = Counter(address for addresses in wanted.values() for address in addresses)
    if not demand:
        return {}
    hour = hour_of(at)
    insert = dialect.insert(rc).values(
        [{"hour_start": hour, "recipient": r, "sent": n} for r, n in sorted(demand.items())]
    )
    stmt = insert.on_conflict_do_update(
        index_elements=[rc.c.hour_start, rc.c.recipient],
        set_={"sent": rc.c.sent + insert.excluded.sent},
    ).returning(rc.c.recipient, rc.c.sent)
    room = {row.recipient: cap - (row.sent - demand[row.recipient]) for row in conn.execute(stmt)}
    admitted, refused = admit(jobs, wanted, room)
    unused = Counter(demand)
    unused.subtract(address for job in admitted for address in wanted[job.id])
    next_hour = hour + _HOUR
    deferred: dict[str, Screened] = {}
    for job, full in refused:
        reason = (
            f"deferred to {next_hour:%Y-%m-%d %H:%M} UTC: recipient {full[0]} reached "
            f"recipient_hourly_cap ({cap} per hour); attempt not counted"
        )
        deferred[job.id] = Screened(
            job, Outcome.DEFERRED, reason, delay=(next_hour - at).total_seconds()
        )
    give_back(conn, hour, +unused)
    return deferred


def hour_of(at: datetime) -> datetime:
    """The start of the clock hour the cap counts `at` in."""
    return at.replace(minute=0, second=0, microsecond=0)


def counted(job: Job) -> list[str]:
    """The job's recipients that the cap counts."""
    return [r for r in recipients_of(job) if len(r) <= _LONGEST_ADDRESS]


def give_back(conn: sa.Connection, hour: datetime, unused: Counter[str]) -> None:
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
