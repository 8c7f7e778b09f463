"""`mailqctl migrate`, run as an operator would: a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailqd.store import Store, check_schema
from mailqd.store.migrate import head_revision


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
