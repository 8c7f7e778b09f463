"""Shared fixtures: a real PostgreSQL (never a mock), per-run databases, SQLite files.

Point the suite at a server with ``MAILQD_TEST_PG_URL``; otherwise it uses the
one on 127.0.0.1:5432, or starts a throwaway cluster (see ``tests/pg.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog

from daemon_process import DaemonPool
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from pg import (
    MakeDatabase,
    PostgresServer,
    create_database,
    drop_database,
    find_or_start_postgres,
    unique_database_name,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="run long soak variants")
    parser.addoption(
        "--reliability",
        action="store_true",
        default=False,
        help="no effect, kept for old command lines: tests/reliability always runs",
    )


@pytest.hookimpl(trylast=True)  # after tests/reliability/conftest.py has marked its tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the longest tests first, so that parallel workers (`-n`) finish together.

    A test marked `runs_for(seconds)` says about how long it takes; those run
    longest first, then the rest of the reliability suite, then tests marked
    `slow`, then everything else, each in collection order. Every worker
    collects the same order, as pytest-xdist requires.
    """
    items.sort(key=run_order)


def run_order(item: pytest.Item) -> tuple[float, int]:
    hint = item.get_closest_marker("runs_for")
    if hint is not None:
        return (-float(hint.args[0]), 0)
    if item.get_closest_marker("reliability") is not None:
        return (0.0, 1)
    return (0.0, 2 if item.get_closest_marker("slow") is not None else 3)


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Undo whatever logging set-up a test did (a CLI command run in-process, say).

    `configure_logging` sets structlog's level filter process-wide; left at
    "warning" by one test, it would silence the info events that a later
    test in the same worker captures with `structlog.testing.capture_logs`.
    """
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = saved


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this run; a throwaway one is removed at session end."""
    with find_or_start_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def pg_admin_url(pg_server: PostgresServer) -> str:
    """``postgresql://`` URL of the server's maintenance database, for CREATE/DROP DATABASE."""
    return pg_server.admin_url


@pytest.fixture(scope="session")
def make_pg_database(pg_admin_url: str) -> Iterator[MakeDatabase]:
    """Factory: ``make_pg_database(prefix="mailqd_test", template=None) -> URL``.

    Each call creates a fresh, uniquely named database (``mailqd_test_<hex>``) and
    returns its ``postgresql+psycopg://`` URL; all of them are dropped at session end.
    """
    created: list[str] = []

    def make(prefix: str = "mailqd_test", template: str | None = None) -> str:
        name = unique_database_name(prefix)
        url = create_database(pg_admin_url, name, template=template)
        created.append(name)
        return url

    yield make
    # Each DROP DATABASE waits for a checkpoint; the checkpointer serves
    # concurrent requests together, so dropping a few at a time ends the run sooner.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda name: drop_database(pg_admin_url, name), reversed(created)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """``sqlite:///`` URL of a database file of this test's own."""
    return f"sqlite:///{tmp_path / 'mailqd.db'}"


# --- store fixtures (lead) ---


@pytest.fixture(scope="session")
def pg_template(make_pg_database: MakeDatabase) -> str:
    """Name of a database migrated once, cloned for every test that needs PostgreSQL."""
    url = make_pg_database(prefix="mailqd_template")
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url.rsplit("/", 1)[1]


@pytest.fixture
def pg_url(make_pg_database: MakeDatabase, pg_template: str) -> str:
    """URL of a fresh, migrated PostgreSQL database of this test's own."""
    return make_pg_database(template=pg_template)


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A fresh, migrated database of each kind; tests using it run on both."""
    if request.param == "sqlite":
        engine = make_engine(sqlite_url)
        upgrade(engine)
        engine.dispose()
        return sqlite_url
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store.from_url(db_url)
    yield store
    store.close()


@pytest.fixture
def unmigrated_store(
    request: pytest.FixtureRequest, db_url: str, tmp_path: Path
) -> Iterator[Store]:
    """An empty database of the same kind as `db_url`, with no mailqd schema."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("make_pg_database")()
    store = Store.from_url(url)
    yield store
    store.close()


# --- daemon processes (supervisor) ---


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonPool]:
    """Start `mailqd` (or the supervisor with a stand-in worker) as subprocesses.

    ``daemons.mailqd(env, args)`` / ``daemons.supervisor(env, "standin_workers:hung")``;
    every process group started is SIGKILLed at teardown, whatever the test did.
    """
    pool = DaemonPool(tmp_path)
    yield pool
    pool.close()
