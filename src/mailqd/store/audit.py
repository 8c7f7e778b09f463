"""The audit trail in `mailqd_audit`: who changed what, and when.

Reached as `Store.audit`. "Who" is both the database role (PostgreSQL's
`current_user`, the role the statement ran as; SQLite has none) and the
operating-system user of the process that wrote the row (the effective
uid's name), so an entry names a person even when everyone shares one
database role. "When" is the database's clock.

A change and its audit row are written in one transaction: `write` takes
the change's connection (`mailqd.store.relay_registry` uses it), `record`
opens its own. Nothing secret is ever written here: a relay's password
appears as whether it is set, never as its value.
"""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailqd.store.database import Database
from mailqd.store.relay_tables import audit_log as al
from mailqd.store.sql import at_time

__all__ = ["AuditEntry", "AuditLog", "os_user", "write"]

DEFAULT_LIMIT = 100


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit trail."""

    id: int
    at: datetime
    db_role: str | None
    os_user: str | None
    command: str
    target: str | None
    filter: str | None
    affected: int | None
    detail: str | None


def os_user() -> str:
    """The name of this process's effective user (its uid when it has no name)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _detail_text(detail: Any) -> str | None:
    if detail is None or isinstance(detail, str):
        return detail
    return json.dumps(detail, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def db_role(conn: sa.Connection) -> str | None:
    """The role this connection's statements run as (PostgreSQL); None on SQLite."""
    if conn.dialect.name != "postgresql":
        return None
    return str(conn.execute(sa.select(sa.literal_column("current_user"))).scalar_one())


def write(
    conn: sa.Connection,
    command: str,
    *,
    target: str | None = None,
    filter: str | None = None,
    affected: int | None = None,
    detail: Any = None,
    now: datetime | None = None,
) -> None:
    """One audit row in the caller's transaction. `detail` is text, or JSON-ready data."""
    conn.execute(
        al.insert().values(
            at=at_time(now),
            db_role=db_role(conn),
            os_user=os_user(),
            command=command,
            target=target,
            filter=filter,
            affected=affected,
            detail=_detail_text(detail),
        )
    )


class AuditLog:
    """The audit trail of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        command: str,
        *,
        target: str | None = None,
        filter: str | None = None,
        affected: int | None = None,
        detail: Any = None,
        now: datetime | None = None,
    ) -> None:
        """Write one entry in a transaction of its own (for a change made elsewhere)."""
        with self._db.begin() as conn:
            write(
                conn,
                command,
                target=target,
                filter=filter,
                affected=affected,
                detail=detail,
                now=now,
            )

    def entries(
        self, since: datetime | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[AuditEntry]:
        """The newest `limit` entries (at or after `since`, if given), newest first."""
        query = sa.select(al).order_by(al.c.at.desc(), al.c.id.desc()).limit(max(limit, 0))
        if since is not None:
            query = query.where(al.c.at >= at_time(since))
        with self._db.begin() as conn:
            return [AuditEntry(**row._mapping) for row in conn.execute(query)]
