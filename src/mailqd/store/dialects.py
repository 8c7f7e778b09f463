"""What differs between PostgreSQL and SQLite, in one object per database.

Every role of the store writes its statements once and asks the dialect
for the few pieces that differ: the INSERT with ON CONFLICT, greatest and
least, epoch time, how a single statement runs (PostgreSQL: autocommit,
one round trip; SQLite: BEGIN IMMEDIATE, for the write lock), NOTIFY, the
batch complete and the batch delete of `delete_finished`. Time arithmetic
on timestamps (`add_seconds`, `seconds_between`, `utcnow`) is compiled per
database by `mailqd.store.schema`, so that the hot statements built once
at import run on both; the dialect hands those out too, so that roles have
one place to ask.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailqd.store import completion
from mailqd.store.attachment_tables import email_attachments as ea
from mailqd.store.completion import Completion
from mailqd.store.relay_tables import email_recipients as er
from mailqd.store.schema import NOTIFY_CHANNEL, add_seconds, seconds_between
from mailqd.store.sql import a, at_time, q

__all__ = ["POSTGRESQL", "SQLITE", "Dialect", "PostgresDialect", "SqliteDialect", "dialect_for"]


class Connections(Protocol):
    """Where a dialect's operation gets its connection (`mailqd.store.database.Database`)."""

    def begin(self) -> AbstractContextManager[sa.Connection]: ...

    def one_statement(self) -> AbstractContextManager[sa.Connection]: ...


class Dialect(ABC):
    """The operations whose SQL differs between the databases the queue runs on."""

    name: str
    is_postgresql: bool
    checks_row_types: bool
    """Whether a row's values must be checked against their columns (SQLite keeps anything)."""

    @abstractmethod
    def insert(self, table: sa.Table) -> Any:
        """`INSERT INTO table`, with this database's `on_conflict_do_*` and `excluded`."""

    @abstractmethod
    def greatest(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]: ...

    @abstractmethod
    def least(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]: ...

    @abstractmethod
    def floor_int(self, value: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
        """The whole part of a non-negative number, as an integer."""

    @abstractmethod
    def epoch(self, now: float | None = None) -> sa.ColumnElement[float]:
        """`now` (epoch seconds), else the database's clock as epoch seconds."""

    @abstractmethod
    def one_statement(self, engine: sa.Engine) -> AbstractContextManager[sa.Connection]:
        """A connection for one statement that is atomic on its own."""

    @abstractmethod
    def notify(self, conn: sa.Connection) -> None:
        """Wake workers listening for new jobs, when `conn` commits (nothing where none listen)."""

    @abstractmethod
    def complete(
        self, db: Connections, completions: Sequence[Completion], now: datetime | None
    ) -> int:
        """Record `completions` (see `Store.complete`) on `db`'s connections."""

    @abstractmethod
    def delete_batch(self, conn: sa.Connection, cutoff: sa.ColumnElement[bool], size: int) -> int:
        """Delete up to `size` jobs matching `cutoff`, their attempts, recipient results and
        attachment rows (not the blobs: `AttachmentStore.purge_orphan_blobs`); returns how
        many jobs."""

    def pause_after_batch(self, batch_seconds: float) -> float:
        """Seconds a batched cleanup leaves the database alone between batches."""
        return 0.0

    def add_seconds(
        self, when: sa.ColumnElement[datetime], seconds: Any
    ) -> sa.ColumnElement[datetime]:
        return add_seconds(when, seconds)

    def seconds_between(self, later: Any, earlier: Any) -> sa.ColumnElement[float]:
        return seconds_between(later, earlier)


class PostgresDialect(Dialect):
    name = "postgresql"
    is_postgresql = True
    checks_row_types = False

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def greatest(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
        return sa.func.greatest(*args)

    def least(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
        return sa.func.least(*args)

    def floor_int(self, value: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
        return sa.cast(sa.func.floor(value), sa.Integer)

    def epoch(self, now: float | None = None) -> sa.ColumnElement[float]:
        if now is not None:
            return sa.literal(float(now), type_=sa.Float)
        return sa.cast(sa.extract("epoch", sa.func.statement_timestamp()), sa.Float)

    @contextmanager
    def one_statement(self, engine: sa.Engine) -> Iterator[sa.Connection]:
        """Autocommit: one round trip instead of three (BEGIN, the statement, COMMIT)."""
        with engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def notify(self, conn: sa.Connection) -> None:
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))

    def complete(
        self, db: Connections, completions: Sequence[Completion], now: datetime | None
    ) -> int:
        """The batch as one JSON text, one statement, one round trip.

        The executemany of one UPDATE per job plus an INSERT, between BEGIN
        and COMMIT, cost most of the recording CPU per message; psycopg's
        adaptation of Python lists to arrays cost more than the rest.
        """
        params = {"now": now, "batch": json.dumps(completion.json_batch(completions))}
        recipients = completion.recipient_rows(completions)
        if recipients:  # rare: a split or partly refused message
            with db.begin() as conn:
                completion.record_recipients(conn, self.insert, recipients)
        with db.one_statement() as conn:
            return int(conn.execute(completion.COMPLETE_PG, params).scalar_one())

    def delete_batch(self, conn: sa.Connection, cutoff: sa.ColumnElement[bool], size: int) -> int:
        """One statement whose CTEs pick the jobs, delete them and delete their attempts by index.

        Given the ids as a list instead, the planner scans the whole
        attempts table for every batch.
        """
        picked = (
            _doomed(cutoff, size).cte("doomed").prefix_with("MATERIALIZED", dialect="postgresql")
        )
        gone = q.delete().where(q.c.id.in_(sa.select(picked.c.id))).returning(q.c.id).cte("gone")
        gone_attempts = a.delete().where(a.c.job_id.in_(sa.select(gone.c.id))).cte("gone_attempts")
        gone_results = er.delete().where(er.c.job_id.in_(sa.select(gone.c.id))).cte("gone_results")
        gone_files = ea.delete().where(ea.c.job_id.in_(sa.select(gone.c.id))).cte("gone_files")
        count = (
            sa.select(sa.func.count())
            .select_from(gone)
            .add_cte(gone_attempts, gone_results, gone_files)
        )
        return int(conn.execute(count).scalar_one())


class SqliteDialect(Dialect):
    name = "sqlite"
    is_postgresql = False
    checks_row_types = True

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def greatest(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
        return sa.func.max(*args)

    def least(self, *args: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
        return sa.func.min(*args)

    def floor_int(self, value: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
        """SQLite's CAST truncates: the floor, for the non-negative counts it is used for."""
        return sa.cast(value, sa.Integer)

    def epoch(self, now: float | None = None) -> sa.ColumnElement[float]:
        if now is not None:
            return sa.literal(float(now), type_=sa.Float)
        return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400.0, sa.Float)

    def one_statement(self, engine: sa.Engine) -> AbstractContextManager[sa.Connection]:
        """A transaction: its BEGIN IMMEDIATE makes a read-then-write atomic across processes."""
        return engine.begin()

    def notify(self, conn: sa.Connection) -> None:
        """SQLite workers poll."""

    def complete(
        self, db: Connections, completions: Sequence[Completion], now: datetime | None
    ) -> int:
        """One UPDATE per job (executemany) and one INSERT of the attempts, one transaction."""
        if now is None:
            stmt = completion.COMPLETE_AT_DB_TIME
        else:
            stmt = completion.complete_statement(at_time(now))
        params = [{f"b_{k}": v for k, v in completion.job_outcome(c).items()} for c in completions]
        recipients = completion.recipient_rows(completions)
        with db.begin() as conn:
            if recipients:
                completion.record_recipients(conn, self.insert, recipients)
            changed = conn.execute(stmt, params).rowcount
            conn.execute(a.insert(), [completion.attempt_values(c) for c in completions])
        return changed

    def delete_batch(self, conn: sa.Connection, cutoff: sa.ColumnElement[bool], size: int) -> int:
        """The ids first, then a DELETE per table: SQLite has no DML in CTEs."""
        ids = list(conn.execute(_doomed(cutoff, size)).scalars())
        if ids:
            conn.execute(a.delete().where(a.c.job_id.in_(ids)))
            conn.execute(er.delete().where(er.c.job_id.in_(ids)))
            conn.execute(ea.delete().where(ea.c.job_id.in_(ids)))
            conn.execute(q.delete().where(q.c.id.in_(ids)))
        return len(ids)

    def pause_after_batch(self, batch_seconds: float) -> float:
        """How long cleanup leaves SQLite's write lock free after a batch.

        A writer waiting on SQLite's lock sleeps in steps of up to 25 ms for
        its first ~130 ms of waiting, then 50 and 100 ms; if the next batch
        took the lock back at once, a claim could wait through many batches.
        A pause as long as the batch (25 to 100 ms) lets every waiter in
        after at most one batch.
        """
        return min(max(batch_seconds, 0.025), 0.1)


def _doomed(cutoff: sa.ColumnElement[bool], size: int) -> sa.Select[Any]:
    return sa.select(q.c.id).where(cutoff).limit(size).with_for_update(skip_locked=True)


POSTGRESQL = PostgresDialect()
SQLITE = SqliteDialect()
_DIALECTS: dict[str, Dialect] = {POSTGRESQL.name: POSTGRESQL, SQLITE.name: SQLITE}


def dialect_for(name: str) -> Dialect:
    """The dialect of a SQLAlchemy dialect name (`engine.dialect.name`)."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"mailqd does not run on {name!r}") from None
