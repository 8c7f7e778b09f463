"""The "enqueue-only" PostgreSQL role: may queue mail, may not read it.

An application that only sends mail should not be able to read other
jobs' recipients and bodies, nor change or delete them. The role this
module sets up can:

- INSERT into `email_queue`, only the columns a client writes (the client
  library's single INSERT, its binary COPY, and plain SQL alike); not
  `status`, leases or attempts, so a row it inserts is always a new
  pending job;
- SELECT `id` and `idempotency_key` only: `ON CONFLICT (idempotency_key)`
  and reading back the id of an already queued key need them, and so does
  `INSERT ... RETURNING id`;

- INSERT into `mailqd_blobs` and `email_attachments`, every column, and
  read neither: the blob insert is `ON CONFLICT DO NOTHING` without a
  conflict target, which needs no SELECT (naming `(sha256)` would), and the
  foreign key from an attachment to its blob is checked with the tables'
  owner's rights. Not even the hashes are readable: they would tell
  whether a guessed file is stored. On PostgreSQL a CHECK keeps each
  blob's key the SHA-256 of its content, so the role cannot file other
  bytes under the hash of a file someone else will attach;

and nothing else: no other column of `email_queue`, no UPDATE or DELETE,
nothing on `email_attempts`, `email_templates` or any other mailqd table.
The NOTIFY trigger works for it (trigger functions and `pg_notify` need no
grant). The client library runs no other statement, so it works as this
role unchanged.

`enqueue_role_sql` is the single source of these statements: `mailqctl
grant-enqueue` runs them, `--print-sql` prints them, and docs/security.md
shows that output (a test checks they agree).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from mailqd.errors import StoreError
from mailqd.store.attachment_tables import blobs, email_attachments
from mailqd.store.dialects import dialect_for
from mailqd.store.enqueue import _COLUMNS, _SEND_AFTER

__all__ = [
    "ATTACHMENT_TABLES",
    "ENQUEUE_COLUMNS",
    "READABLE_COLUMNS",
    "enqueue_role_sql",
    "grant_enqueue_role",
]

ENQUEUE_COLUMNS: tuple[str, ...] = (*_COLUMNS, _SEND_AFTER[0])
"""The columns of `email_queue` the role may write: exactly those the client writes."""

READABLE_COLUMNS = ("id", "idempotency_key")
"""The columns the role may read: what ON CONFLICT and reading back a known key's id need."""

ATTACHMENT_TABLES: tuple[sa.Table, ...] = (blobs, email_attachments)
"""Tables the role may INSERT every column of (blobs first: attachments refer to them)."""

_PREPARER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


def enqueue_role_sql(role: str, *, create: bool = False, schema: str = "public") -> list[str]:
    """The statements that make `role` enqueue-only on mailqd's tables in `schema`.

    With `create`, the first statement creates the role (LOGIN, no
    password: set one with `grant_enqueue_role`, or psql's `\\password`).
    """
    if not role:
        raise StoreError("the role name is empty")
    who = _PREPARER.quote(role)
    where = _PREPARER.quote_schema(schema)
    table = f"{where}.email_queue"
    statements = [f"CREATE ROLE {who} LOGIN"] if create else []
    statements += [
        f"GRANT USAGE ON SCHEMA {where} TO {who}",
        f"GRANT INSERT ({', '.join(ENQUEUE_COLUMNS)}) ON {table} TO {who}",
        f"GRANT SELECT ({', '.join(READABLE_COLUMNS)}) ON {table} TO {who}",
    ]
    statements += [
        f"GRANT INSERT ({', '.join(c.name for c in t.columns)}) ON {where}.{t.name} TO {who}"
        for t in ATTACHMENT_TABLES
    ]
    return statements


def grant_enqueue_role(
    engine: sa.Engine,
    role: str,
    *,
    create: bool = False,
    password: str | None = None,
    schema: str = "public",
) -> None:
    """Run `enqueue_role_sql` in one transaction, and set the role's password if given.

    The password is hashed here (SCRAM-SHA-256, as psql's `\\password`
    does), so the server, and its statement log, never see it in clear.
    Raises `StoreError` on SQLite, or when the database refuses (the
    connecting role may not create roles or grant on these tables).
    """
    from mailqd.store.translate import translate_errors

    if not dialect_for(engine.dialect.name).is_postgresql:
        raise StoreError("database roles exist only on PostgreSQL; SQLite has no permissions")
    with translate_errors(), engine.begin() as conn:
        for statement in enqueue_role_sql(role, create=create, schema=schema):
            conn.exec_driver_sql(statement)
        if password is not None:
            conn.exec_driver_sql(_set_password_sql(conn, role, password))


def _set_password_sql(conn: sa.Connection, role: str, password: str) -> str:
    raw: Any = conn.connection.driver_connection
    verifier = raw.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    literal = "'" + verifier.decode("ascii").replace("'", "''") + "'"
    return f"ALTER ROLE {_PREPARER.quote(role)} PASSWORD {literal}"
