"""The queue store: every read and write of the queue, for both databases, behind one facade.

`Store` is what the worker, the CLI, the sidecar and applications hold.
It keeps no logic of its own: each method hands over to the part of the
store that owns that role, reachable directly too:

- `store.jobs` (`mailqd.store.jobs`): the lease protocol workers follow;
- `store.changes` (`mailqd.store.changes`): what operators change and clean up;
- `store.stats` (`mailqd.store.stats`): counts and gauges;
- `store.relay_health` (`mailqd.store.relay_health`): the relays' circuit breakers;
- `store.relay_registry` (`mailqd.store.relay_registry`): relays kept in the database;
- `store.audit` (`mailqd.store.audit`): the audit trail;
- `store.attachments` (`mailqd.store.attachments`): jobs' attachments, and their cleanup;
- `store.templates` (`mailqd.store.templates`), and `RateLimits(store)`
  (`mailqd.store.ratelimit`) for the token buckets;
- enqueueing is `mailqd.store.enqueue`, screening `mailqd.store.screening`.

Each public method is one statement or one short transaction. Time is the
database's clock unless a `now` is passed. Nothing outside `mailqd.store`
needs the SQLAlchemy engine: `check_schema`, `forget_after_fork`,
`dialect_name` and `is_postgresql` answer what callers asked it for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from mailqd.models import Attempt, Job, NewJob, QueueCounts, QueueStats, RecipientResult
from mailqd.store import screening
from mailqd.store.attachments import AttachmentStore
from mailqd.store.audit import AuditLog
from mailqd.store.changes import CLEANUP_BATCH, OperatorChanges
from mailqd.store.completion import Completion
from mailqd.store.database import Database
from mailqd.store.engine import make_engine
from mailqd.store.enqueue import PsycopgWriter, SqlAlchemyWriter, write_jobs
from mailqd.store.jobs import LONGEST_LEASE, JobLeases
from mailqd.store.recipients import RecipientLedger
from mailqd.store.relay_health import RelayHealthStore
from mailqd.store.relay_registry import RelayRegistry
from mailqd.store.screening import ScreenedClaim, ScreenRules
from mailqd.store.sql import at_time
from mailqd.store.stats import Statistics
from mailqd.store.templates import TemplateStore
from mailqd.store.translate import translate_errors

if TYPE_CHECKING:
    from mailqd.store.migrate import MigrationResult

__all__ = ["LONGEST_LEASE", "Completion", "Store", "translate_errors"]


class Store:
    """The queue, on one database. Safe to share between threads, not across fork()."""

    def __init__(self, engine: sa.Engine) -> None:
        self.database = Database(engine)
        self.engine = engine
        """For tests' and benches' raw SQL set-up only; mailqd's own code asks the store."""
        self.dialect = engine.dialect.name
        self.jobs = JobLeases(self.database)
        self.changes = OperatorChanges(self.database)
        self.stats = Statistics(self.database)
        self.templates = TemplateStore(self.database)
        """The message templates (`mailqctl templates`), in the same database."""
        self.relay_health = RelayHealthStore(self.database)
        """The relays' circuit breakers, shared by every worker (`mailqd.breaker`)."""
        self.recipient_ledger = RecipientLedger(self.database)
        """Which recipients of a job are settled (`email_recipients`), for its next attempt."""
        self.relay_registry = RelayRegistry(self.database)
        """Relays kept in the database (`mailqctl relays`), passwords sealed."""
        self.audit = AuditLog(self.database)
        """Who changed what (`mailqctl audit`)."""
        self.attachments = AttachmentStore(self.database)
        """Jobs' attachments (`for_job`, `for_jobs`, `describe`) and `purge_orphan_blobs`."""

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Store:
        return cls(make_engine(url, **engine_kwargs))

    def close(self) -> None:
        self.engine.dispose()

    # -- the database itself ---------------------------------------------------

    @property
    def dialect_name(self) -> str:
        """`postgresql` or `sqlite`."""
        return self.database.dialect.name

    @property
    def is_postgresql(self) -> bool:
        return self.database.dialect.is_postgresql

    @property
    def url(self) -> str:
        """The database URL, password included: for a listener's or child's own connection."""
        return self.engine.url.render_as_string(hide_password=False)

    def check_schema(self) -> str:
        """The schema revision, or `SchemaError` unless it is the one this mailqd needs."""
        from mailqd.store.migrate import check_schema

        return check_schema(self.engine)

    def upgrade(self) -> MigrationResult:
        """Migrate the schema to this mailqd's revision (`mailqctl migrate`)."""
        from mailqd.store.migrate import upgrade

        return upgrade(self.engine)

    def grant_enqueue_role(
        self,
        role: str,
        *,
        create: bool = False,
        password: str | None = None,
        schema: str = "public",
    ) -> None:
        """Make `role` enqueue-only (`mailqd.store.roles`); PostgreSQL only."""
        from mailqd.store.roles import grant_enqueue_role

        grant_enqueue_role(self.engine, role, create=create, password=password, schema=schema)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pooled connections, leaving them open for it."""
        self.database.forget_after_fork()

    # -- enqueue ---------------------------------------------------------------

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
            with self.database.begin() as conn:
                return write_jobs(SqlAlchemyWriter(conn), jobs)
        with translate_errors():
            if isinstance(connection, sa.Connection):
                return write_jobs(SqlAlchemyWriter(connection), jobs)
            return write_jobs(PsycopgWriter(connection, self.engine.dialect), jobs)

    # -- the worker's operations (`mailqd.store.jobs`) -------------------------------

    def claim(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> list[Job]:
        """Take up to `limit` due jobs: highest priority first, then oldest due.

        Rows that cannot be read are failed, not returned (see `claim_batch`).
        """
        return self.jobs.claim_batch(owner, limit, lease_seconds, now).jobs

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> ScreenedClaim:
        """`claim`, also saying which claimed rows could not be read (`JobLeases.claim_batch`)."""
        return self.jobs.claim_batch(owner, limit, lease_seconds, now)

    def claim_screened(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        rules: ScreenRules,
        now: datetime | None = None,
    ) -> ScreenedClaim:
        """`claim_batch`, then set aside duplicates, capped and throttled jobs (one transaction)."""
        return self.jobs.claim_screened(owner, limit, lease_seconds, rules, now)

    def purge_screening(self, dedup_window: float, now: datetime | None = None) -> int:
        """Delete hash rows older than `dedup_window` and per-recipient counts of past hours."""
        return screening.purge(self.database.begin, dedup_window, at_time(now))

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int:
        """Record outcomes of held jobs and their attempts; returns how many jobs changed."""
        return self.jobs.complete(completions, now)

    def release(
        self,
        job_ids: Sequence[str],
        owner: str,
        now: datetime | None = None,
        *,
        reasons: Mapping[str, str] | None = None,
        counted: Collection[str] = (),
    ) -> int:
        """Give held jobs back, each with an attempt row saying why (`JobLeases.release`)."""
        return self.jobs.release(job_ids, owner, now, reasons=reasons, counted=counted)

    def extend_leases(
        self, job_ids: Sequence[str], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> int:
        """Push back the lease expiry of jobs still being worked on."""
        return self.jobs.extend_leases(job_ids, owner, lease_seconds, now)

    def rescue(
        self,
        *,
        owner: str | None = None,
        reason: str | None = None,
        now: datetime | None = None,
        limit: int = 1000,
        longest_lease: float = LONGEST_LEASE,
    ) -> list[str]:
        """Return jobs whose worker is gone to the queue; returns their ids (`JobLeases.rescue`)."""
        return self.jobs.rescue(
            owner=owner, reason=reason, now=now, limit=limit, longest_lease=longest_lease
        )

    # -- the operator's operations (`mailqd.store.changes`) ---------------------------

    def requeue_failed(
        self,
        job_ids: Sequence[str] | None = None,
        limit: int | None = None,
        now: datetime | None = None,
    ) -> int:
        """Failed jobs back to pending, due now, with a fresh attempt budget."""
        return self.changes.requeue_failed(job_ids, limit, now)

    def requeue(self, job_id: str, now: datetime | None = None) -> Job:
        """One failed or cancelled job back to pending, due now, fresh attempts."""
        return self.changes.requeue(job_id, now)

    def cancel(self, job_id: str, now: datetime | None = None) -> Job:
        """A pending job will not be sent. A job being sent cannot be cancelled."""
        return self.changes.cancel(job_id, now)

    def get(self, job_id: str) -> Job:
        return self.changes.get(job_id)

    def attempts(self, job_id: str) -> list[Attempt]:
        """A job's attempts in the order they were recorded."""
        return self.changes.attempts(job_id)

    def recipients(self, job_id: str) -> list[RecipientResult]:
        """A job's per-recipient results; empty when its recipients all fared alike."""
        return self.changes.recipients(job_id)

    def list_failed(self, limit: int) -> list[Job]:
        return self.changes.list_failed(limit)

    def list_partially_refused(self, limit: int) -> list[tuple[Job, list[RecipientResult]]]:
        """Sent jobs some recipients refused, most recent first, with those refusals."""
        return self.changes.list_partially_refused(limit)

    def count_finished(self, older_than_days: float, now: datetime | None = None) -> int:
        """How many sent, failed or cancelled jobs `delete_finished` would remove."""
        return self.changes.count_finished(older_than_days, now)

    def delete_finished(
        self,
        older_than_days: float,
        batch_size: int = CLEANUP_BATCH,
        now: datetime | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished jobs (attempts, recipient results) last updated before the cutoff."""
        return self.changes.delete_finished(older_than_days, batch_size, now, on_batch)

    # -- statistics (`mailqd.store.stats`) ---------------------------------------------

    def counts(self, now: datetime | None = None) -> QueueCounts:
        """Jobs per status, and how long the oldest due pending job has waited."""
        return self.stats.counts(now)

    def queue_stats(self, now: datetime | None = None, soon_seconds: float = 60.0) -> QueueStats:
        """Counts by status, what is due and waiting to retry, and the last 5 minutes and hour."""
        return self.stats.queue_stats(now, soon_seconds)

    def unfinished_counts(self, now: datetime | None = None) -> QueueCounts:
        """Pending, sending and failed jobs, and the oldest due job's wait, in one statement."""
        return self.stats.unfinished_counts(now)

    def failed_attempts_count(self) -> int:
        """Attempts that did not deliver (retried, failed, expired, lost) still on record."""
        return self.stats.failed_attempts_count()
