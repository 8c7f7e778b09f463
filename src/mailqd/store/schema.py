"""The tables, and the few SQL constructs that differ between PostgreSQL and SQLite.

The Table objects describe the schema at the newest migration; the migrations
under `migrations/versions/` create it (a test checks the two agree).
Timestamps are UTC everywhere. On PostgreSQL they are `timestamptz`; SQLite
has no date type, so they are stored as `YYYY-MM-DD HH:MM:SS.SSS` text in UTC,
the format SQLite's own `strftime('%Y-%m-%d %H:%M:%f')` gives, so that the
column defaults written by SQLite and the values written by mailqd compare
correctly as text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

NOTIFY_CHANNEL = "mailqd_jobs"
"""PostgreSQL channel that is NOTIFYed (payload: the job id) when a pending job is inserted."""

STATUSES = ("pending", "sending", "sent", "failed", "cancelled")
_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


class Unreadable:
    """A value the result processors below could not turn into what its column holds.

    Returned instead of raising, so that one row written by plain SQL with
    garbage in it (SQLite keeps any value in any column) fails alone at the
    claim (`mailqd.store.rows`) instead of breaking the whole batch read.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unreadable({self.reason!r})"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both databases."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(32))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware (UTC) datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.strftime(_SQLITE_TIME_FORMAT)[:-3]  # milliseconds, like strftime('%f')
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """The UTC datetime; `Unreadable` for what plain SQL put there that is none."""
        if value is None:
            return None
        try:
            if isinstance(value, str):
                value = datetime.fromisoformat(value)
            elif not isinstance(value, datetime):
                return Unreadable(f"{kind_of(value)}, not a timestamp")
            if value.tzinfo is None:
                return value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        except ValueError:
            return Unreadable("not a timestamp")
        except OverflowError:  # in range only in its own time zone
            return Unreadable("timestamp out of range")


def kind_of(value: Any) -> str:
    """What SQLite holds, in its own words, for messages about a value of the wrong type."""
    if isinstance(value, bytes):
        return "a BLOB"
    if isinstance(value, float):
        return "a REAL"
    if isinstance(value, int):
        return "an INTEGER"
    return "TEXT" if isinstance(value, str) else type(value).__name__


class JSONValue(sa.TypeDecorator[Any]):
    """JSON: `jsonb` on PostgreSQL, text on SQLite.

    On SQLite a row written by plain SQL may hold text that is not JSON; it is
    returned as the raw string rather than raising, so that one bad row fails
    alone (the daemon checks the type) instead of breaking a whole claim.
    JSON nested deeper than Python's parser recurses is `Unreadable`.
    """

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB())
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        import json

        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or not isinstance(value, str) or dialect.name == "postgresql":
            return value
        import json

        try:
            return json.loads(value)
        except ValueError:
            return value
        except RecursionError:
            return Unreadable("JSON nested too deeply")


class utcnow(FunctionElement[datetime]):
    """The database's current UTC time, in the column format of `UTCDateTime`."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_pg(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now'))"


class add_seconds(FunctionElement[datetime]):
    """`timestamp + seconds`, where seconds may be a bound number or a column."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(add_seconds, "postgresql")
def _add_seconds_pg(element: add_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    when, seconds = list(element.clauses)
    return (
        f"({compiler.process(when, **kw)} + "
        f"make_interval(secs => CAST({compiler.process(seconds, **kw)} AS double precision)))"
    )


@compiles(add_seconds, "sqlite")
def _add_seconds_sqlite(element: add_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    when, seconds = list(element.clauses)
    return (
        f"strftime('%Y-%m-%d %H:%M:%f', {compiler.process(when, **kw)}, "
        f"CAST({compiler.process(seconds, **kw)} AS REAL) || ' seconds')"
    )


class seconds_between(FunctionElement[float]):
    """`later - earlier` in seconds, as a float."""

    type = sa.Float()
    inherit_cache = True


@compiles(seconds_between, "postgresql")
def _seconds_between_pg(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = list(element.clauses)
    return (
        f"EXTRACT(EPOCH FROM ({compiler.process(later, **kw)} - "
        f"{compiler.process(earlier, **kw)}))::float8"
    )


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = list(element.clauses)
    return (
        f"((julianday({compiler.process(later, **kw)}) - "
        f"julianday({compiler.process(earlier, **kw)})) * 86400.0)"
    )


class new_uuid(FunctionElement[str]):
    """A random UUID as text, so that a plain SQL INSERT gets an id."""

    type = sa.String()
    inherit_cache = True


@compiles(new_uuid, "postgresql")
def _new_uuid_pg(element: new_uuid, compiler: SQLCompiler, **kw: Any) -> str:
    return "(gen_random_uuid()::text)"


@compiles(new_uuid, "sqlite")
def _new_uuid_sqlite(element: new_uuid, compiler: SQLCompiler, **kw: Any) -> str:
    # A version-4 UUID from randomblob, laid out 8-4-4-4-12.
    return (
        "(lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || "
        "substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || "
        "substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))))"
    )


metadata = sa.MetaData()

email_queue = sa.Table(
    "email_queue",
    metadata,
    # The seed's columns, names kept.
    sa.Column("id", sa.String(64), primary_key=True, server_default=new_uuid()),
    sa.Column("recipient_to", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False, server_default=""),
    sa.Column("body", sa.Text),
    sa.Column("html", sa.Text),
    sa.Column("template_id", sa.String(200)),
    sa.Column("variables", JSONValue),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow()),
    sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
    # What delivery needs; every one has a default so plain SQL can enqueue.
    sa.Column("cc", sa.Text),
    sa.Column("bcc", sa.Text),
    sa.Column("reply_to", sa.Text),
    sa.Column("from_address", sa.Text),
    sa.Column("headers", JSONValue),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False, server_default=utcnow()),
    sa.Column("expires_at", UTCDateTime),
    sa.Column("max_attempts", sa.Integer),
    sa.Column("idempotency_key", sa.String(255)),
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("message_id", sa.Text),
    sa.Column("sent_at", UTCDateTime),
    sa.CheckConstraint(
        "status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')",
        name="ck_email_queue_status",
    ),
)

# One job per idempotency key. Partial: rows without a key (most of them) are
# not in the index, so bulk enqueue maintains one index fewer; an upsert
# names the predicate (`ON CONFLICT (idempotency_key) WHERE idempotency_key
# IS NOT NULL`) to use it, see `IDEMPOTENCY_KEY_PRESENT`.
IDEMPOTENCY_KEY_PRESENT = email_queue.c.idempotency_key.isnot(None)
sa.Index(
    "uq_email_queue_idempotency_key",
    email_queue.c.idempotency_key,
    unique=True,
    postgresql_where=IDEMPOTENCY_KEY_PRESENT,
    sqlite_where=IDEMPOTENCY_KEY_PRESENT,
)

# The claim reads only pending rows, in claim order; a partial index keeps it
# independent of how many finished rows the table holds.
sa.Index(
    "ix_email_queue_claim",
    email_queue.c.priority.desc(),
    email_queue.c.next_attempt_at,
    email_queue.c.id,
    postgresql_where=email_queue.c.status == "pending",
    sqlite_where=email_queue.c.status == "pending",
)
# The rescuer looks for expired leases among the few rows being sent, and
# stats count those rows. Every job a worker holds has a lease (the claim
# sets both), so the index holds the rows with one. It is deliberately not
# partial on `status = 'sending'`: the statements that find a held job by
# id (complete, release, extend) say that, and with it the planner could
# answer them by reading this whole index, and until VACUUM runs it holds an
# entry for every lease ever taken (bitmap scans never mark entries dead).
# On a PostgreSQL without autovacuum that cost grew with every delivery:
# bench/bench_daemon.py delivered 80,000 messages at 1,880 instead of
# 3,540 msg/s, the completion statement alone keeping 1.5 cores busy.
LEASED = email_queue.c.lease_expires_at.isnot(None)
sa.Index(
    "ix_email_queue_lease",
    email_queue.c.lease_expires_at,
    postgresql_where=LEASED,
    sqlite_where=LEASED,
)
# A `sending` row without a lease (an operator's or another application's
# INSERT or UPDATE; mailqd's claim sets both) is held by no worker, and in
# none of the indexes above on PostgreSQL. The rescuer returns these rows to
# the queue and stats count them, through this index, which is empty in
# normal operation (nothing to maintain on the hot path).
UNLEASED = (email_queue.c.status == sa.literal_column("'sending'")) & (
    email_queue.c.lease_owner.is_(None) | email_queue.c.lease_expires_at.is_(None)
)
sa.Index(
    "ix_email_queue_unleased",
    email_queue.c.id,
    postgresql_where=UNLEASED,
    sqlite_where=UNLEASED,
)
# Stats, `failed` listings and cleanup go by status, then age, over finished
# jobs. Partial on PostgreSQL: pending and sending rows are counted and
# claimed through their own partial indexes above, and a status index that
# also held pending rows lured the planner, whenever the statistics said
# "few pending" (a burst after a quiet spell), into reading every pending row
# and sorting them for each claim (12 ms instead of 3 ms per claim of 16 with
# 20,000 queued; bench/bench_daemon.py's backlog drained at half speed).
# Keeping pending rows out of it also spares each enqueue and claim an index
# entry. SQLite's planner cannot match `status = 'failed'` to an IN
# predicate, so there it stays whole.
FINISHED = sa.text("status IN ('sent', 'failed', 'cancelled')")
sa.Index(
    "ix_email_queue_finished",
    email_queue.c.status,
    email_queue.c.updated_at,
    postgresql_where=FINISHED,
)

email_attempts = sa.Table(
    "email_attempts",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("duration_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("smtp_code", sa.Integer),
    sa.Column("smtp_text", sa.Text),
    sa.Column("worker", sa.String(255)),
)
sa.Index("ix_email_attempts_job", email_attempts.c.job_id, email_attempts.c.attempt)
sa.Index("ix_email_attempts_started", email_attempts.c.started_at)

# One token bucket per row, shared by every worker of every daemon on this
# database. Time is kept as epoch seconds (float), not as a UTCDateTime,
# because refills need sub-millisecond arithmetic in both databases.
rate_limit = sa.Table(
    "mailqd_rate_limit",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("refilled_at", sa.Float, nullable=False),
    # Size of the grant made by the last take: what the take's RETURNING reports.
    sa.Column("granted", sa.Integer, nullable=False, server_default="0"),
    # Epoch seconds up to which jobs that found the bucket empty were given slots
    # to come back in (per-domain limits, `mailqd.store.buckets.reserve`).
    sa.Column("reserved_until", sa.Float, nullable=True),
)

# Message templates, rendered with a job's `variables` at send time (Jinja2, sandboxed).
email_templates = sa.Table(
    "email_templates",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("subject", sa.Text, nullable=False, server_default=""),
    sa.Column("text_body", sa.Text),
    sa.Column("html_body", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow()),
    sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
)

# Content de-duplication (`dedup_window`): which job holds each content hash.
# Only jobs being claimed write here, so enqueueing pays nothing for it.
dedup = sa.Table(
    "mailqd_dedup",
    metadata,
    sa.Column("content_hash", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("first_seen_at", UTCDateTime, nullable=False),
)
sa.Index("ix_mailqd_dedup_first_seen", dedup.c.first_seen_at)

# Sends begun per recipient (lower-cased address) per clock hour (`recipient_hourly_cap`).
# The hour leads the key, so purging past hours reads the key, not the table.
recipient_counts = sa.Table(
    "mailqd_recipient_counts",
    metadata,
    sa.Column("hour_start", UTCDateTime, primary_key=True),
    sa.Column("recipient", sa.String(320), primary_key=True),
    sa.Column("sent", sa.Integer, nullable=False),
)

# The relay layer's tables (relay health, relays, per-recipient results, audit)
# and the attachment tables (blobs, email_attachments) are defined in their
# own modules, on this metadata.
from mailqd.store import attachment_tables as _attachment_tables  # noqa: E402, F401
from mailqd.store import relay_tables as _relay_tables  # noqa: E402, F401
