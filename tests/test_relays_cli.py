"""`mailqctl relays` and `mailqctl audit`, on PostgreSQL and SQLite, as an operator runs them.

The password of a database relay is read from stdin or a file, sealed
with `secrets_key_file`, and never shown: not in the table, not in any
output; `list` says only whether one is set. Every change leaves an audit
row naming the OS user (and, on PostgreSQL, the database role).
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from ctl_process import error_line, invoke, mailqctl, ok_json
from mailqd.breaker import BreakerPolicy
from mailqd.secrets import generate_key_file, load_secret_box
from mailqd.store import Store
from pg import libpq_url

pytestmark = pytest.mark.timeout(60)

PASSWORD = "Relay-S3cret-pw"
OS_USER = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.key"
    generate_key_file(path)
    return path


@pytest.fixture
def env(key_file: Path) -> dict[str, str]:
    return {"MAILQD_SECRETS_KEY_FILE": str(key_file), "MAILQD_SMTP_URL": "null://"}


@pytest.fixture
def db(store: Store, db_url: str) -> Iterator[str]:
    yield db_url


def relays(db_url: str, env: dict[str, str]) -> dict[str, dict[str, object]]:
    listed = ok_json(invoke("relays", "list", "--json", db=db_url, env=env))
    return {row["name"]: row for row in listed["relays"]}


def audit_entries(db_url: str, env: dict[str, str]) -> list[dict[str, object]]:
    return list(ok_json(invoke("audit", "--json", db=db_url, env=env))["entries"])


def test_add_set_remove_and_list_round_trip(db: str, env: dict[str, str]) -> None:
    added = invoke(
        "relays", "add", "backup", "smtp://mailer@127.0.0.1:2525", "--password-stdin",
        "--max-connections", "4", "--rate-limit", "20", db=db, env=env, input=PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout == "added relay backup (password set)\n"
    eu = invoke(
        "relays", "add", "eu", "smtp://mx-eu.internal", "--domains", "Example.DE,*.example.eu",
        "--position", "0", db=db, env=env,
    )  # fmt: skip
    assert eu.returncode == 0, eu.stderr

    listed = relays(db, env)
    assert listed["relay1"]["source"] == "config"  # the smtp_url relay
    backup = listed["backup"]
    assert backup["source"] == "database"
    assert backup["url"] == "smtp://mailer@127.0.0.1:2525"
    assert backup["password_set"] is True
    assert (backup["max_connections"], backup["rate_limit"]) == (4, 20.0)
    assert backup["routes"] == ["default"]
    assert (backup["state"], backup["failures"]) == ("up", 0)
    assert listed["eu"]["routes"] == ["example.de,*.example.eu"]
    assert listed["eu"]["password_set"] is False

    changed = invoke(
        "relays", "set", "backup", "--rate-limit", "5", "--no-password", "--url",
        "smtp://127.0.0.1:2526", db=db, env=env,
    )  # fmt: skip
    assert changed.stdout == "changed relay backup\n", changed.stderr
    backup = relays(db, env)["backup"]
    assert (backup["url"], backup["password_set"], backup["rate_limit"]) == (
        "smtp://127.0.0.1:2526",
        False,
        5.0,
    )
    assert backup["max_connections"] == 4  # not given: kept

    removed = invoke("relays", "remove", "eu", db=db, env=env)
    assert removed.stdout == "removed relay eu\n"
    assert set(relays(db, env)) == {"relay1", "backup"}
    again = invoke("relays", "remove", "eu", db=db, env=env)
    assert error_line(again) == "mailqctl: no relay named 'eu' in the database"
    taken = invoke("relays", "add", "backup", "null://", db=db, env=env)
    assert "exists already" in error_line(taken)


def test_the_password_is_sealed_and_never_shown(
    db: str, env: dict[str, str], key_file: Path, tmp_path: Path
) -> None:
    password_file = tmp_path / "relay.pass"
    password_file.write_text(PASSWORD + "\n")
    add = ("relays", "add", "primary", "smtp://app@127.0.0.1:2525")
    outputs = [
        mailqctl(*add, "--password-file", str(password_file), db=db, env=env),
        mailqctl("relays", "list", db=db, env=env),
        mailqctl("relays", "list", "--json", db=db, env=env),
        mailqctl("audit", db=db, env=env),
        mailqctl("audit", "--json", db=db, env=env),
    ]
    for result in outputs:
        assert result.returncode == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    assert "set" in outputs[1].stdout.splitlines()[-3]  # the password column of the last row

    store = Store.from_url(db)
    try:
        with store.engine.connect() as conn:
            [row] = conn.execute(sa.text("SELECT * FROM mailqd_relays")).all()
            audit_rows = conn.execute(sa.text("SELECT * FROM mailqd_audit")).all()
        assert PASSWORD not in repr(tuple(row)) + repr(audit_rows)
        assert row.url == "smtp://app@127.0.0.1:2525"
        # Sealed, not hashed: the daemon's key opens it.
        stored = store.relay_registry.get("primary")
        assert stored.password(load_secret_box(key_file)) == PASSWORD
    finally:
        store.close()


def test_a_password_written_in_the_url_is_refused_and_not_echoed(
    db: str, env: dict[str, str]
) -> None:
    result = invoke("relays", "add", "x", f"smtp://app:{PASSWORD}@127.0.0.1", db=db, env=env)
    line = error_line(result)
    assert PASSWORD not in line and "--password-file or --password-stdin" in line
    assert audit_entries(db, env) == []


def test_without_a_secrets_key_no_password_is_stored(db: str) -> None:
    env = {"MAILQD_SMTP_URL": "null://"}
    result = invoke(
        "relays", "add", "x", "smtp://app@127.0.0.1", "--password-stdin",
        db=db, env=env, input=PASSWORD + "\n",
    )  # fmt: skip
    line = error_line(result)
    assert line.startswith("mailqctl: config secrets_key_file: is not set")
    assert "mailqctl secrets generate-key" in line
    assert "x" not in relays(db, env) and audit_entries(db, env) == []
    # A relay without a password needs no key.
    assert invoke("relays", "add", "plain", "smtp://127.0.0.1", db=db, env=env).returncode == 0


def test_bad_input_is_one_line_and_writes_nothing(db: str, env: dict[str, str]) -> None:
    cases = [
        (["relays", "add", "b@d", "null://"], "relay name"),
        (["relays", "add", "x", "ftp://host"], "url: scheme must be"),
        (["relays", "add", "x", "smtp://app@host"], "no password is given"),
        (["relays", "add", "x", "null://", "--domains", "not a domain"], "domains"),
        (["relays", "add", "relay1", "null://"], "relay of the config file"),
        (["relays", "set", "nope", "--rate-limit", "1"], "no relay named 'nope'"),
    ]
    for args, expected in cases:
        assert expected in error_line(invoke(*args, db=db, env=env)), args
    assert set(relays(db, env)) == {"relay1"}
    assert audit_entries(db, env) == []


def test_every_change_is_audited_with_who_made_it(db: str, env: dict[str, str]) -> None:
    for args in (
        ["relays", "add", "backup", "smtp://mailer@127.0.0.1:2525", "--password-stdin"],
        ["relays", "set", "backup", "--position", "3"],
        ["relays", "remove", "backup"],
    ):
        assert invoke(*args, db=db, env=env, input=PASSWORD + "\n").returncode == 0
    entries = audit_entries(db, env)
    assert [(e["command"], e["target"], e["affected"]) for e in entries] == [
        ("relays remove", "backup", 1),
        ("relays set", "backup", 1),
        ("relays add", "backup", 1),
    ]
    assert {e["os_user"] for e in entries} == {OS_USER}
    if db.startswith("postgresql"):
        with psycopg.connect(libpq_url(db)) as conn:
            [(role,)] = conn.execute("SELECT current_user").fetchall()
        assert {e["db_role"] for e in entries} == {role}
    else:
        assert {e["db_role"] for e in entries} == {None}
    added = json.loads(str(entries[2]["detail"]))
    assert added["password"] == "set" and added["url"] == "smtp://mailer@127.0.0.1:2525"
    assert json.loads(str(entries[1]["detail"])) == {"position": 3}

    table = invoke("audit", "--since", "1h", db=db, env=env).stdout
    assert "relays remove" in table and OS_USER in table
    assert ok_json(invoke("audit", "--limit", "1", "--json", db=db, env=env))["entries"] == [
        entries[0]
    ]
    future = invoke("audit", "--since", "2999-01-01T00:00:00", "--json", db=db, env=env)
    assert ok_json(future)["entries"] == []


def test_list_shows_a_down_relay_with_its_last_error(
    db: str, env: dict[str, str], store: Store
) -> None:
    assert (
        invoke("relays", "add", "backup", "smtp://127.0.0.1:2525", db=db, env=env).returncode == 0
    )
    store.relay_health.failed(
        "backup",
        reason="refused",
        error="connection refused by 127.0.0.1:2525",
        policy=BreakerPolicy(threshold=1),
        opens_now=False,
        owner="test",
    )
    row = relays(db, env)["backup"]
    assert (row["state"], row["failures"], row["last_reason"]) == ("down", 1, "refused")
    assert row["down_since"] is not None
    assert row["last_error"] == "connection refused by 127.0.0.1:2525"
    text = invoke("relays", "list", db=db, env=env).stdout
    [line] = [line for line in text.splitlines() if line.startswith("backup")]
    assert "down" in line and "refused: connection refused" in line
    assert text.rstrip().endswith("2 relays, 1 down")

    # Removing the relay forgets its health too.
    assert invoke("relays", "remove", "backup", db=db, env=env).returncode == 0
    assert [s.relay for s in store.relay_health.states()] == []


def test_the_enqueue_role_cannot_read_relays_or_the_audit(pg_url: str, env: dict[str, str]) -> None:
    assert invoke("relays", "add", "r", "null://", db=pg_url, env=env).returncode == 0
    name = f"mailqd_enqueue_{os.urandom(4).hex()}"
    assert invoke("grant-enqueue", name, "--create", db=pg_url).returncode == 0
    role_url = libpq_url(
        make_url(pg_url).set(username=name, password=None).render_as_string(hide_password=False)
    )
    try:
        for statement in (
            "SELECT * FROM mailqd_relays",
            "SELECT name FROM mailqd_relays",
            "SELECT * FROM mailqd_audit",
            "INSERT INTO mailqd_audit (command) VALUES ('forged')",
            "UPDATE mailqd_relays SET url = 'smtp://evil'",
            "DELETE FROM mailqd_audit",
        ):
            with (
                psycopg.connect(role_url) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute(statement)
    finally:
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_audit_record_is_there_for_any_command_and_since_filters(
    db: str, env: dict[str, str], store: Store
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=3)
    store.audit.record("retry", filter="--all", affected=3, now=long_ago)
    store.audit.record("cancel", target="0190aa", affected=1, detail={"was": "pending"})
    recent = ok_json(invoke("audit", "--since", "2d", "--json", db=db, env=env))["entries"]
    assert [(e["command"], e["target"], e["detail"]) for e in recent] == [
        ("cancel", "0190aa", '{"was":"pending"}')
    ]
    every = store.audit.entries()
    assert [(e.command, e.filter, e.affected, e.os_user) for e in every] == [
        ("cancel", None, 1, OS_USER),
        ("retry", "--all", 3, OS_USER),
    ]
    text = invoke("audit", db=db, env=env).stdout
    assert "retry" in text and "--all" in text and text.rstrip().endswith("2 entries")
