"""Every PostgreSQL connection says who opened it, in `pg_stat_activity.application_name`.

`mailqctl`, `mailqd-supervisor` and `mailqd-worker-N`, so an operator looking
at the server's sessions (or at a lock held too long) sees which part of
mailqd holds it.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from daemon_process import DaemonPool
from mailqd.cli.context import Context
from mailqd.daemon.supervisor import open_store
from mailqd.store.engine import make_engine

pytestmark = pytest.mark.timeout(60)

OWN_NAME = sa.text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
NAMES = sa.text("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")


def name_of(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(OWN_NAME).scalar_one())


def test_make_engine_sets_the_application_name(pg_url: str) -> None:
    engine = make_engine(
        pg_url, application_name="mailqd-test", connect_args={"connect_timeout": 5}
    )
    try:
        assert name_of(engine) == "mailqd-test"
    finally:
        engine.dispose()


def test_sqlite_ignores_the_application_name(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url, application_name="mailqctl")
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_mailqctl_and_the_supervisor_name_their_connections(pg_url: str) -> None:
    context = Context(None, pg_url)
    supervisor_store = open_store(pg_url)
    try:
        assert name_of(context.unchecked_store.engine) == "mailqctl"
        assert name_of(supervisor_store.engine) == "mailqd-supervisor"
    finally:
        context.close()
        supervisor_store.close()


def test_each_worker_names_its_connections(daemons: DaemonPool, pg_url: str) -> None:
    env = {"MAILQD_DATABASE_URL": pg_url, "MAILQD_SMTP_URL": "null://", "MAILQD_WORKERS": "2"}
    daemon = daemons.mailqd(env)
    daemon.wait_for_workers(2)
    engine = make_engine(pg_url)
    expected = {"mailqd-worker-0", "mailqd-worker-1"}

    def workers_connected() -> set[str] | None:
        with engine.connect() as conn:
            names = {str(name) for name in conn.execute(NAMES).scalars()}
        return names if expected <= names else None

    try:
        names = daemon.wait_for(workers_connected, "both workers connected")
        assert {name for name in names if name.startswith("mailqd-worker-")} == expected
    finally:
        engine.dispose()
