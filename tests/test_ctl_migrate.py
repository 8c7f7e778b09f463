"""`mailqctl migrate`, run as an operator would: a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from mailqd.store import Store, check_schema, upgrade
from mailqd.store.migrate import head_revision
from mailqd.validation import build_job


def mailqctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailqd.cli.ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    url: str = request.getfixturevalue("make_pg_database")()
    return url


def test_migrate_creates_the_schema_once(empty_url: str) -> None:
    first = mailqctl("--database-url", empty_url, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"migrated the schema from (none) to {head_revision()}"
    again = mailqctl("--database-url", empty_url, "migrate")
    assert again.returncode == 0
    assert "already at" in again.stdout
    store = Store.from_url(empty_url)
    assert check_schema(store.engine) == head_revision()
    store.close()


def test_unreachable_database_is_one_line_exit_1() -> None:
    result = mailqctl("--database-url", "postgresql://u:s3cret@127.0.0.1:1/x", "migrate")
    assert result.returncode == 1
    assert result.stderr.startswith("mailqctl: database unavailable")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def test_upgrading_keeps_queued_jobs_and_their_keys(empty_url: str) -> None:
    """0006 rebuilds the SQLite table to drop a constraint: nothing queued may be lost."""
    store = Store.from_url(empty_url)
    upgrade(store.engine, "0005")
    with store.engine.begin() as conn:
        for key in ("order-1", None, None):
            conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, subject, body, idempotency_key) "
                    "VALUES ('a@example.com', 'Hi', 'Hello', :key)"
                ),
                {"key": key},
            )
    result = mailqctl("--database-url", empty_url, "migrate")
    assert result.returncode == 0, result.stderr
    assert check_schema(store.engine) == head_revision()
    assert store.counts().pending == 3
    again = store.enqueue(build_job("b@example.com", "Hi", "Hello", idempotency_key="order-1"))
    assert store.get(again).recipient_to == "a@example.com"
    assert len(store.claim("w1", 10, lease_seconds=60)) == 3
    store.close()
