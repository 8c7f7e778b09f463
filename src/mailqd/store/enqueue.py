"""Writing new jobs: the one hot write path, on any kind of connection.

Rows are written in as few round trips as the database allows:
- on PostgreSQL, jobs without an idempotency key go in with one binary
  `COPY` per call (no SQL to build or parse per row; the NOTIFY trigger
  still fires once);
- jobs with a key (and everything on SQLite) go in with one cached
  `INSERT … ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT
  NULL DO NOTHING`, run as an
  executemany (pipelined by psycopg), after which the ids of keys that were
  already queued are read back, so a repeated key yields the first job's id.

Attachments are written after the jobs, in the same transaction: each
distinct content once into `mailqd_blobs` (`INSERT … ON CONFLICT DO
NOTHING`), then one `email_attachments` row per attachment, for the jobs
that were written (not for a repeated idempotency key, whose first job
keeps its own). Jobs without attachments add no statement.

Building a 1,000-row multi-VALUES INSERT instead costs about 0.5 ms of
client CPU per row in SQLAlchemy's compiler (bench/bench_store.py), which is
why this module exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import sqlalchemy as sa

from mailqd.errors import StoreError
from mailqd.models import NewJob
from mailqd.store.attachment_tables import blobs, email_attachments
from mailqd.store.attachments import attachment_rows, blob_rows
from mailqd.store.dialects import POSTGRESQL, Dialect, dialect_for
from mailqd.store.schema import IDEMPOTENCY_KEY_PRESENT
from mailqd.store.schema import email_queue as q

# Columns a job writes, and their PostgreSQL types for binary COPY. A job
# without send_after leaves next_attempt_at to the database clock's default.
_COLUMNS: dict[str, str] = {
    "id": "text",
    "recipient_to": "text",
    "subject": "text",
    "body": "text",
    "html": "text",
    "template_id": "varchar",
    "variables": "jsonb",
    "cc": "text",
    "bcc": "text",
    "reply_to": "text",
    "from_address": "text",
    "headers": "jsonb",
    "priority": "int4",
    "expires_at": "timestamptz",
    "max_attempts": "int4",
    "idempotency_key": "varchar",
}
_SEND_AFTER = ("next_attempt_at", "timestamptz")
_KEY_LOOKUP_CHUNK = 1000


class Writer(Protocol):
    """What writing jobs needs from a connection, whatever its kind."""

    def insert_many(self, columns: Sequence[str], rows: list[dict[str, Any]]) -> None: ...

    def insert_rows(self, table: sa.Table, rows: list[dict[str, Any]], *, ignore: bool) -> None:
        """INSERT `rows` into `table` (all with the same keys); with `ignore`, ON CONFLICT
        DO NOTHING, without a conflict target (which would need SELECT on it)."""
        ...

    def fetch(self, stmt: sa.Select[Any]) -> list[Any]: ...

    def copy(self, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> bool:
        """Bulk-load rows; False where the connection cannot (SQLite)."""
        ...


def write_jobs(writer: Writer, jobs: Sequence[NewJob]) -> list[str]:
    """Write `jobs` through `writer`; returns their ids in input order."""
    for keyed in (False, True):
        for timed in (False, True):
            group = [
                j
                for j in jobs
                if (j.idempotency_key is not None) == keyed and (j.send_after is not None) == timed
            ]
            if group:
                _write_group(writer, group, keyed=keyed, timed=timed)
    existing = _existing_ids(writer, jobs)
    ids = [existing[j.idempotency_key] if j.idempotency_key else j.id for j in jobs]
    _write_attachments(writer, [j for j, written in zip(jobs, ids, strict=True) if j.id == written])
    return ids


def _write_attachments(writer: Writer, written: Sequence[NewJob]) -> None:
    with_files = [j for j in written if j.attachments]
    if not with_files:
        return
    writer.insert_rows(blobs, blob_rows(f for j in with_files for f in j.attachments), ignore=True)
    rows = [row for j in with_files for row in attachment_rows(j.id, j.attachments)]
    writer.insert_rows(email_attachments, rows, ignore=False)


def _write_group(writer: Writer, jobs: list[NewJob], *, keyed: bool, timed: bool) -> None:
    columns = list(_COLUMNS) + ([_SEND_AFTER[0]] if timed else [])
    values = [_row(j, timed) for j in jobs]
    if not keyed and writer.copy(columns, values):
        return
    writer.insert_many(columns, [dict(zip(columns, v, strict=True)) for v in values])


def _row(job: NewJob, timed: bool) -> tuple[Any, ...]:
    row = (
        job.id,
        job.recipient_to,
        job.subject,
        job.body,
        job.html,
        job.template_id,
        job.variables,
        job.cc,
        job.bcc,
        job.reply_to,
        job.from_address,
        job.headers,
        job.priority,
        job.expires_at,
        job.max_attempts,
        job.idempotency_key,
    )
    return (*row, job.send_after) if timed else row


def _existing_ids(writer: Writer, jobs: Sequence[NewJob]) -> dict[str, str]:
    keys = list({j.idempotency_key for j in jobs if j.idempotency_key is not None})
    found: dict[str, str] = {}
    for start in range(0, len(keys), _KEY_LOOKUP_CHUNK):
        chunk = keys[start : start + _KEY_LOOKUP_CHUNK]
        stmt = sa.select(q.c.idempotency_key, q.c.id).where(q.c.idempotency_key.in_(chunk))
        found.update((key, job_id) for key, job_id in writer.fetch(stmt))
    return found


def _insert_statement(dialect: Dialect) -> Any:
    return dialect.insert(q).on_conflict_do_nothing(
        index_elements=["idempotency_key"], index_where=IDEMPOTENCY_KEY_PRESENT
    )


def _copy_rows(raw: Any, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Binary COPY into email_queue on a psycopg connection, in its open transaction."""
    types = [{**_COLUMNS, _SEND_AFTER[0]: _SEND_AFTER[1]}[c] for c in columns]
    sql = f"COPY email_queue ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
    with raw.cursor() as cursor, cursor.copy(sql) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


class SqlAlchemyWriter:
    """Writes on a SQLAlchemy Connection (the store's own, or a caller's)."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn
        self._dialect = dialect_for(conn.dialect.name)

    def insert_many(self, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        self._conn.execute(_insert_statement(self._dialect), rows)

    def insert_rows(self, table: sa.Table, rows: list[dict[str, Any]], *, ignore: bool) -> None:
        stmt = self._dialect.insert(table)
        self._conn.execute(stmt.on_conflict_do_nothing() if ignore else stmt, rows)

    def fetch(self, stmt: sa.Select[Any]) -> list[Any]:
        return list(self._conn.execute(stmt))

    def copy(self, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> bool:
        import psycopg

        raw = self._conn.connection.driver_connection
        if not isinstance(raw, psycopg.Connection):  # SQLite, or an asyncio connection
            return False
        _copy_rows(raw, columns, rows)
        return True


class PsycopgWriter:
    """Writes on a caller's raw psycopg 3 connection, in its open transaction."""

    def __init__(self, raw: Any, dialect: sa.Dialect) -> None:
        import psycopg

        if not isinstance(raw, psycopg.Connection) or not dialect_for(dialect.name).is_postgresql:
            raise StoreError(
                "connection= takes a SQLAlchemy Connection, or a psycopg Connection to the "
                f"same PostgreSQL database; got {type(raw).__name__}"
            )
        self._raw = raw
        self._dialect = dialect

    def insert_many(self, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        from psycopg.types.json import Jsonb

        compiled = _insert_statement(POSTGRESQL).compile(
            dialect=self._dialect, column_keys=list(columns)
        )
        params = [
            {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            for row in rows
        ]
        with self._raw.cursor() as cursor:
            cursor.executemany(str(compiled), params)

    def insert_rows(self, table: sa.Table, rows: list[dict[str, Any]], *, ignore: bool) -> None:
        stmt = POSTGRESQL.insert(table)
        if ignore:
            stmt = stmt.on_conflict_do_nothing()
        compiled = stmt.compile(dialect=self._dialect, column_keys=list(rows[0]))
        with self._raw.cursor() as cursor:
            cursor.executemany(str(compiled), rows)

    def fetch(self, stmt: sa.Select[Any]) -> list[Any]:
        # "expanding" IN parameters (the idempotency keys' lookup) rendered into the text,
        # as SQLAlchemy does at execution time; psycopg would see `__[POSTCOMPILE_...]`.
        compiled = stmt.compile(dialect=self._dialect, compile_kwargs={"render_postcompile": True})
        with self._raw.cursor() as cursor:
            cursor.execute(str(compiled), compiled.construct_params())
            return list(cursor.fetchall())

    def copy(self, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> bool:
        _copy_rows(self._raw, columns, rows)
        return True
