"""Reading claimed rows that plain SQL may have filled with anything.

A claim takes a batch of rows in one statement. Any writer of `email_queue`
(the enqueue-only role, an operator, another application) can put a value
there that mailqd cannot read: `'infinity'` or a year past 9999 in a
PostgreSQL timestamp, which psycopg refuses to load; on SQLite, which keeps
any value in any column, text in an integer column, a BLOB in a text
column, text that is no timestamp or no valid UTF-8. One such row must not
fail the batch (the other rows would be claimed with it, never read, and
rescued and re-claimed together for ever): it is failed alone, at once, in
the claim's transaction (or, on PostgreSQL's autocommit claim, right after
it), with a `last_error` naming the column and an attempt row, and the rows
claimed with it are handed on to be sent.

The common case pays nothing for this on PostgreSQL but one integer
comparison per row (the server guarantees every type; only the driver's
loading can fail, and that is caught for the whole batch at once): when
loading fails, the ids are taken from the result the server already sent
(`PGresult`), and the rows are read again one at a time, and a row that
still fails, one column at a time. On SQLite each row's values are checked
against their columns' types (one set lookup of the row's value types for
the few shapes real rows come in, a type test per value otherwise); the
one failure SQLite's driver has (text that is not UTF-8) makes the claim
roll back and run again returning only `rowid`s, which cannot fail, and
the rows are then read one at a time in the same way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from mailqd.models import JOB_COLUMNS, Job, Outcome, Status
from mailqd.store.schema import (
    JSONValue,
    Unreadable,
    UTCDateTime,
    email_attempts,
    email_queue,
    kind_of,
    utcnow,
)

__all__ = [
    "ROWID",
    "Claimed",
    "RereadNeeded",
    "UnreadableRow",
    "claim_by_rowid",
    "counted_attempt",
    "job_from_row",
    "read_claimed",
    "read_jobs",
    "replacing_bad_utf8",
]

q = email_queue
ROWID: sa.ColumnElement[int] = sa.literal_column("rowid", sa.Integer)
"""SQLite's own key of a row: an integer, readable whatever the row holds."""

_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1


def counted_attempt() -> sa.ColumnElement[int]:
    """`attempts + 1`, for any value plain SQL may have left in `attempts`.

    The largest PostgreSQL integer cannot be incremented (the statement, and
    every row in it, would fail), and on SQLite the column may hold text;
    such a count starts again at 1.
    """
    in_range = (q.c.attempts >= _INT4_MIN) & (q.c.attempts < _INT4_MAX)
    return sa.case((in_range, q.c.attempts + 1), else_=1)


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    """A claimed row that could not be read: failed at its claim, never sent."""

    job_id: str
    """The row's id, or `rowid N` when the id itself cannot be read (SQLite)."""
    column: str
    reason: str
    key: Any = field(repr=False)
    """What finds the row again: its id as read, or SQLite's rowid (`by_rowid`)."""
    by_rowid: bool = False

    @property
    def error(self) -> str:
        """The row's `last_error`, and its attempt row's text."""
        return f"{self.column}: cannot be read: {self.reason}"


@dataclass(slots=True)
class Claimed:
    """What a claim took: the jobs to hand on, in claim order, and the rows failed at once."""

    jobs: list[Job] = field(default_factory=list)
    unreadable: list[UnreadableRow] = field(default_factory=list)

    def in_claim_order(self) -> list[Job]:
        """Highest priority first, then oldest due: the types are checked, so this cannot raise."""
        return sorted(self.jobs, key=lambda j: (-j.priority, j.next_attempt_at, j.id))


class RereadNeeded(Exception):
    """SQLite's driver could not read the claim's rows: roll back, and `claim_by_rowid`."""


def _expected(column: sa.Column[Any]) -> frozenset[type] | None:
    """The Python types a column's values come back as; None: anything (JSON)."""
    if isinstance(column.type, JSONValue):
        return None
    if isinstance(column.type, UTCDateTime):
        kinds: set[type] = {datetime}
    elif isinstance(column.type, sa.Integer):
        kinds = {int}
    else:
        kinds = {str}
    return frozenset(kinds | ({type(None)} if column.nullable else set()))


_EXPECTED = tuple((i, c.name, _expected(c)) for i, c in enumerate(q.c))
_ID = list(q.c.keys()).index("id")
_ATTEMPTS = list(q.c.keys()).index("attempts")
_WHAT = {datetime: "a timestamp", int: "an integer", str: "text"}
_GOOD_SHAPES: set[tuple[type, ...]] = set()
"""The value types of rows found good: the check depends on the types alone, and real rows
come in a few shapes (which nullable columns are NULL), so most rows cost one set lookup."""
_MAX_SHAPES = 4096


def _mismatch(value: Any, allowed: frozenset[type] | None) -> str | None:
    """Why `value` is not of its column's type, or None when it is."""
    if allowed is None:
        return value.reason if type(value) is Unreadable else None
    if type(value) in allowed:
        return None
    if type(value) is Unreadable:
        return value.reason
    wanted = next(_WHAT[t] for t in allowed if t in _WHAT)
    return f"{kind_of(value)}, not {wanted}"


def _problem(values: Sequence[Any], strict: bool) -> tuple[str, str] | None:
    """The first column of a row that cannot be used, and why; None for a good row.

    `strict` (SQLite) checks every value's type; PostgreSQL's server has.
    """
    if strict:
        shape = tuple(map(type, values))
        if shape not in _GOOD_SHAPES:
            for index, name, allowed in _EXPECTED:
                reason = _mismatch(values[index], allowed)
                if reason is not None:
                    return name, reason
            if len(_GOOD_SHAPES) < _MAX_SHAPES:
                _GOOD_SHAPES.add(shape)
    if not _INT4_MIN <= values[_ATTEMPTS] < _INT4_MAX:
        return "attempts", "out of range"
    return None


def job_from_row(row: sa.Row[Any]) -> Job:
    values = row._mapping
    flag = values.get("has_attachments")
    return Job(
        **{name: values[name] for name in JOB_COLUMNS if name != "status"},
        status=Status(values["status"]),
        has_attachments=None if flag is None else bool(flag),
    )


def read_claimed(
    conn: sa.Connection, strict: bool, result: sa.CursorResult[Any], owner: str
) -> Claimed:
    """The claim's rows as jobs; the rows that cannot be read are failed, in `conn`.

    `strict` checks each value against its column's type (SQLite keeps
    anything in any column: `Dialect.checks_row_types`).

    Raises `RereadNeeded` when SQLite's driver refused the rows: the caller
    rolls the claim back and makes it again with `claim_by_rowid`.
    """
    pgresult = getattr(result.cursor, "pgresult", None)  # kept: a failed fetch drops it
    try:
        fetched = result.all()
    except Exception as exc:
        if pgresult is None:
            raise RereadNeeded(str(exc)) from exc
        return _reread(conn, strict, owner, q.c.id, _ids(pgresult))
    claimed = Claimed()
    for row in fetched:
        problem = _problem(row, strict)
        if problem is None:
            claimed.jobs.append(job_from_row(row))
        else:
            claimed.unreadable.append(UnreadableRow(_shown(row[_ID]), *problem, key=row[_ID]))
    if claimed.unreadable:
        _fail(conn, owner, claimed.unreadable)
    return claimed


def read_jobs(
    conn: sa.Connection, result: sa.CursorResult[Any], again: sa.Select[Any]
) -> list[Job]:
    """Rows for the operator's commands (`show`, `failed`, `requeue`, `cancel`), never refused.

    A row the claim failed as unreadable keeps its values, so these must
    read what the driver refuses: on PostgreSQL that value is shown as
    absent (None), or where the column always holds one as the earliest
    time; on SQLite text that is not UTF-8 is read (`again`, the rows'
    SELECT) with the bad bytes replaced. Its `last_error` says what it held.
    """
    pgresult = getattr(result.cursor, "pgresult", None)
    try:
        return [job_from_row(row) for row in result.all()]
    except Exception:
        if pgresult is not None:
            return [_leniently(conn, job_id) for job_id in _ids(pgresult)]
        if not isinstance(conn.connection.driver_connection, sqlite3.Connection):
            raise
        with replacing_bad_utf8(conn):
            return [job_from_row(row) for row in conn.execute(again)]


@contextmanager
def replacing_bad_utf8(conn: sa.Connection) -> Iterator[None]:
    """On SQLite, read text that is not UTF-8 with the bad bytes replaced, not refused.

    For statements off the hot path only: SQLite's driver then calls Python
    for every text value.
    """
    raw = conn.connection.driver_connection
    if not isinstance(raw, sqlite3.Connection):
        yield
        return
    raw.text_factory = _replacing
    try:
        yield
    finally:
        raw.text_factory = str


def _replacing(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _ids(pgresult: Any) -> list[str]:
    """The `id` column of a result psycopg could not load: from the bytes the server sent."""
    column = [pgresult.fname(i) for i in range(pgresult.nfields)].index(b"id")
    return [pgresult.get_value(i, column).decode() for i in range(pgresult.ntuples)]


def _leniently(conn: sa.Connection, job_id: str) -> Job:
    values: dict[str, Any] = {}
    for column in q.c:
        try:
            values[column.name] = conn.execute(
                sa.select(column).where(q.c.id == job_id)
            ).scalar_one()
        except Exception:
            values[column.name] = None if column.nullable else _PLACEHOLDER.get(column.name)
    return Job(
        **{name: values[name] for name in JOB_COLUMNS if name != "status"},
        status=Status(values["status"]),
    )


_PLACEHOLDER: dict[str, Any] = {
    c.name: datetime.min.replace(tzinfo=UTC) for c in q.c if isinstance(c.type, UTCDateTime)
}


def claim_by_rowid(
    conn: sa.Connection, stmt: sa.Update, params: dict[str, Any], owner: str
) -> Claimed:
    """The claim `stmt` (returning SQLite's rowid only), each claimed row then read alone."""
    keys = list(conn.execute(stmt, params).scalars())
    return _reread(conn, True, owner, ROWID, keys)


def _reread(
    conn: sa.Connection, strict: bool, owner: str, key: sa.ColumnElement[Any], keys: list[Any]
) -> Claimed:
    """Read claimed rows one at a time, and a row that fails one column at a time."""
    claimed = Claimed()
    by_rowid = key is ROWID
    for value in keys:
        problem: tuple[str, str] | None
        try:
            row = conn.execute(sa.select(q).where(key == value)).one()
        except Exception:
            problem = _column_problem(conn, key, value, strict)
        else:
            problem = _problem(row, strict)
            if problem is None:
                claimed.jobs.append(job_from_row(row))
                continue
        shown = _id_of(conn, key, value) if by_rowid else value
        claimed.unreadable.append(UnreadableRow(shown, *problem, key=value, by_rowid=by_rowid))
    if claimed.unreadable:
        _fail(conn, owner, claimed.unreadable)
    return claimed


def _column_problem(
    conn: sa.Connection, key: sa.ColumnElement[Any], value: Any, strict: bool
) -> tuple[str, str]:
    """The first column of one row that cannot be read, and why."""
    for index, name, allowed in _EXPECTED:
        try:
            got = conn.execute(sa.select(q.c[name]).where(key == value)).scalar_one()
        except Exception as exc:
            return name, _reason(exc)
        reason = _mismatch(got, allowed) if strict or allowed is None else None
        if reason is not None:
            return name, reason
        if index == _ATTEMPTS and not _INT4_MIN <= got < _INT4_MAX:
            return name, "out of range"
    return "row", "cannot be read"


def _reason(exc: BaseException) -> str:
    """A driver's refusal in a few words, without the value it refused."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if text.startswith("Could not decode to UTF-8"):
        return "not valid UTF-8 text"
    return text.split(": ", 1)[0][:120]


def _id_of(conn: sa.Connection, key: sa.ColumnElement[Any], value: Any) -> str:
    try:
        found = conn.execute(sa.select(q.c.id).where(key == value)).scalar_one()
    except Exception:
        return f"rowid {value}"
    return _shown(found)


def _shown(job_id: Any) -> str:
    return job_id if isinstance(job_id, str) else repr(job_id)


def _fail(conn: sa.Connection, owner: str, rows: list[UnreadableRow]) -> None:
    """Fail unreadable rows this owner holds, each with an attempt row saying why.

    The attempt row is copied from the job's row by the database, so that
    nothing of the row has to be read here (its id may be what is unreadable).
    """
    for by_rowid in (False, True):
        group = [r for r in rows if r.by_rowid is by_rowid]
        if not group:
            continue
        key = ROWID if by_rowid else q.c.id
        held = (
            (key == sa.bindparam("b_key"))
            & (q.c.status == Status.SENDING)
            & (q.c.lease_owner == sa.bindparam("b_owner", type_=sa.String))
        )
        error = sa.bindparam("b_error", type_=sa.Text)
        attempt = sa.select(
            q.c.id,
            counted_attempt(),
            utcnow(),
            sa.literal(0.0),
            sa.literal(Outcome.FAILED.value),
            error,
            sa.bindparam("b_owner", type_=sa.String),
        ).where(held)
        columns = ["job_id", "attempt", "started_at", "duration_seconds", "outcome"]
        record = email_attempts.insert().from_select([*columns, "smtp_text", "worker"], attempt)
        failed = (
            q.update()
            .where(held)
            .values(
                status=Status.FAILED,
                attempts=counted_attempt(),
                last_error=error,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=utcnow(),
            )
        )
        params = [{"b_key": r.key, "b_owner": owner, "b_error": r.error} for r in group]
        conn.execute(record, params)
        conn.execute(failed, params)
