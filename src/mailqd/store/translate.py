"""Driver errors translated into mailqd's, by the code the database gave, not its wording.

PostgreSQL names every error with a SQLSTATE (psycopg's `sqlstate`);
SQLite with a result code (`sqlite_errorcode`, extended codes on). The
few cases that mean something to mailqd are chosen by those codes: a
missing table is a schema that was never migrated, a unique or primary
key violation is a `ConstraintError`. Everything else is decided by the
class of the driver's error, as DB-API defines it: an `OperationalError`
(cannot connect, connection lost, database locked) is an outage.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from mailqd.errors import ConstraintError, DatabaseUnavailableError, SchemaError, StoreError

__all__ = ["sqlstate_of", "translate_errors"]

_UNDEFINED_TABLE = "42P01"
_UNIQUE_VIOLATION = "23505"
_SQLITE_UNIQUE = {
    sqlite3.SQLITE_CONSTRAINT_UNIQUE,
    sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY,
}
_SQLITE_NO_SUCH_TABLE = "no such table"
"""SQLite gives a missing table only the generic SQLITE_ERROR code; its text is all there is."""


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into mailqd's: a down database, a missing schema, a broken key."""
    try:
        yield
    except DBAPIError as exc:
        raise translated(exc) from exc
    except Exception as exc:
        raw = _translated_raw_psycopg(exc)
        if raw is None:
            raise
        raise raw from exc


def _translated_raw_psycopg(exc: Exception) -> StoreError | None:
    """A psycopg 3 error raised on the caller's own connection (the outbox's `connection=`),
    which SQLAlchemy never wrapped; None for anything else."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    state = getattr(exc, "sqlstate", None)
    if state == _UNDEFINED_TABLE:
        return SchemaError("the mailqd tables do not exist; run `mailqctl migrate`")
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnavailableError(f"database unavailable: {first}")
    if state == _UNIQUE_VIOLATION:
        return ConstraintError(f"database error: {first}")
    return StoreError(f"database error: {first}")


def translated(exc: DBAPIError) -> StoreError:
    """The mailqd error for one driver error (wrapped by SQLAlchemy)."""
    if _is_missing_table(exc):
        return SchemaError("the mailqd tables do not exist; run `mailqctl migrate`")
    if isinstance(exc, OperationalError):
        return DatabaseUnavailableError(f"database unavailable: {_first_line(exc)}")
    if isinstance(exc, ProgrammingError):
        return StoreError(f"database error: {_first_line(exc)}")
    if exc.connection_invalidated:
        return DatabaseUnavailableError(f"database connection lost: {_first_line(exc)}")
    if _is_unique_violation(exc):
        return ConstraintError(f"database error: {_first_line(exc)}")
    return StoreError(f"database error: {_first_line(exc)}")


def sqlstate_of(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a driver error (psycopg's), None for SQLite or none given."""
    orig = getattr(exc, "orig", exc)
    state = getattr(orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def _sqlite_code(exc: DBAPIError) -> int | None:
    orig = exc.orig
    return orig.sqlite_errorcode if isinstance(orig, sqlite3.Error) else None


def _is_missing_table(exc: DBAPIError) -> bool:
    if sqlstate_of(exc) == _UNDEFINED_TABLE:
        return True
    return _sqlite_code(exc) == sqlite3.SQLITE_ERROR and str(exc.orig).startswith(
        _SQLITE_NO_SUCH_TABLE
    )


def _is_unique_violation(exc: DBAPIError) -> bool:
    return sqlstate_of(exc) == _UNIQUE_VIOLATION or _sqlite_code(exc) in _SQLITE_UNIQUE


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
