"""Engines for the two supported databases, set up the way the queue needs them."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mailqd.credentials import ESCAPE_HINT, check_userinfo
from mailqd.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 30_000
KEY = "database_url"
SUPPORTED = "use postgresql://user:password@host/database or sqlite:///path"
BAD_PORT = f"the port must be a number from 1 to 65535; {ESCAPE_HINT}"


def normalize_url(url: str) -> sa.URL:
    """Accept `postgresql://`, `postgresql+psycopg://` and `sqlite:///path`; else `ConfigError`.

    Errors never quote the URL or a piece of it: in a URL that splits in the
    wrong place, the "host" or "port" is a piece of the password.
    """
    if not isinstance(url, str):
        raise ConfigError(KEY, f"must be a string, got a {type(url).__name__}; {SUPPORTED}")
    if not url.strip():
        raise ConfigError(KEY, f"is empty; {SUPPORTED}")
    if url.partition("://")[0].lower().startswith("postgres"):
        check_userinfo(url, KEY)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(KEY, f"not a database URL; {SUPPORTED}") from None
    except ValueError:  # SQLAlchemy's int(port)
        raise ConfigError(KEY, BAD_PORT) from None
    if parsed.get_backend_name() == "postgresql":
        return _postgresql(parsed)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.host or parsed.username or parsed.password or parsed.port:
            raise ConfigError(KEY, "a SQLite URL has no user or host: write sqlite:///path")
        return parsed
    raise ConfigError(KEY, f"{parsed.drivername!r} is not supported; {SUPPORTED}")


def _postgresql(parsed: sa.URL) -> sa.URL:
    if parsed.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ConfigError(KEY, f"driver {parsed.drivername!r} is not supported; use postgresql://")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(KEY, BAD_PORT)
    return parsed.set(drivername="postgresql+psycopg")


def make_engine(url: str, *, application_name: str | None = None, **kwargs: Any) -> sa.Engine:
    """Create an engine; on SQLite, one that takes the write lock at BEGIN.

    `application_name` (PostgreSQL only) names the connections in
    `pg_stat_activity`: `mailqd-supervisor`, `mailqd-worker-N`, `mailqctl`.

    SQLite serialises writers; taking the lock up front (`BEGIN IMMEDIATE`)
    makes the read-then-update of a claim atomic across processes and avoids
    the deadlock of two readers both trying to upgrade.

    Statement parameters (recipients, bodies) are kept out of SQLAlchemy's
    error messages and logs (`hide_parameters`), so a failed write never
    puts a message into a log line or a traceback.
    """
    parsed = normalize_url(url)
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 5)
        if application_name is not None:
            kwargs["connect_args"] = {
                **kwargs.get("connect_args", {}),
                "application_name": application_name,
            }
        return sa.create_engine(parsed, **kwargs)
    engine = sa.create_engine(parsed, **kwargs)
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgresql(url: str) -> bool:
    """Whether `url` names a PostgreSQL database (`ConfigError` if it names none we support)."""
    return normalize_url(url).get_backend_name() == "postgresql"
