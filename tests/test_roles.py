"""The enqueue-only PostgreSQL role: it can queue mail every way a client does, and read none.

Both halves run on real PostgreSQL, as a real role made by `mailqctl
grant-enqueue`. Roles belong to the whole cluster, so each test makes one
with a random name and drops it at the end.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from ctl_process import error_line, invoke
from daemon_process import DaemonPool
from mailqd import Client
from mailqd.models import Status
from mailqd.store import Store
from pg import libpq_url
from smtp_server import SmtpServer

pytestmark = pytest.mark.timeout(60)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"
DOCUMENTED_ROLE = "mailqd_enqueue"


@dataclass(frozen=True)
class EnqueueRole:
    name: str
    url: str  # the role's own database URL (the test server trusts local logins)
    owner_url: str  # the tables' owner, as the daemon connects


@pytest.fixture
def enqueue_role(pg_url: str, tmp_path: Path) -> Iterator[EnqueueRole]:
    name = f"mailqd_enqueue_{secrets.token_hex(4)}"
    password_file = tmp_path / "password"
    password_file.write_text("role-Pa55word\n")
    result = invoke(
        "grant-enqueue", name, "--create", "--password-file", str(password_file), db=pg_url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name} may now enqueue mail, and read no job's content\n"
    url = make_url(pg_url).set(username=name, password=None).render_as_string(hide_password=False)
    try:
        yield EnqueueRole(name, url, pg_url)
    finally:
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_role_enqueues_every_way_and_the_daemon_delivers(
    enqueue_role: EnqueueRole, daemons: DaemonPool
) -> None:
    with psycopg.connect(libpq_url(enqueue_role.owner_url), autocommit=True) as listener:
        listener.execute("LISTEN mailqd_jobs")
        with Client(enqueue_role.url) as client:
            single = client.enqueue("one@example.com", "single", "body one")
            keyed = client.enqueue("two@example.com", "keyed", "body two", idempotency_key="k-2")
            again = client.enqueue("two@example.com", "keyed", "body two", idempotency_key="k-2")
            copied = client.enqueue_many(  # no keys: one binary COPY
                [{"to": f"copy{i}@example.com", "subject": "c", "body": "b"} for i in range(3)]
            )
            keyed_many = client.enqueue_many(  # keys: INSERT … ON CONFLICT, then read back ids
                [
                    {
                        "to": "three@example.com",
                        "subject": "k",
                        "body": "b",
                        "idempotency_key": "k-3",
                    },
                    {
                        "to": "two@example.com",
                        "subject": "k",
                        "body": "b",
                        "idempotency_key": "k-2",
                    },
                ]
            )
        with psycopg.connect(libpq_url(enqueue_role.url)) as role:
            [(plain,)] = role.execute(
                "INSERT INTO email_queue (recipient_to, subject, body) "
                "VALUES ('plain@example.com', 'plain SQL', 'body') RETURNING id"
            ).fetchall()
        assert next(listener.notifies(timeout=5, stop_after=1), None) is not None

    assert again == keyed and keyed_many[1] == keyed
    ids = [single, keyed, *copied, keyed_many[0], plain]
    assert len(set(ids)) == 7

    with SmtpServer() as smtp:
        daemon = daemons.mailqd(
            {
                "MAILQD_DATABASE_URL": enqueue_role.owner_url,
                "MAILQD_SMTP_URL": smtp.url(starttls="off"),
                "MAILQD_WORKERS": "1",
                "MAILQD_POLL_INTERVAL": "0.1",
            }
        )
        delivered = smtp.wait_for_messages(7, timeout=30)
        daemon.send(15)
        assert daemon.wait_exit() == 0
    assert "TLS certificate verification is off" not in daemon.log_text()  # on by default
    assert sorted(r for m in delivered for r in m.rcpt_tos) == sorted(
        ["one@example.com", "two@example.com", "three@example.com", "plain@example.com"]
        + [f"copy{i}@example.com" for i in range(3)]
    )
    store = Store.from_url(enqueue_role.owner_url)
    try:
        assert {store.get(i).status for i in ids} == {Status.SENT}
    finally:
        store.close()


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT recipient_to FROM email_queue",
        "SELECT subject FROM email_queue",
        "SELECT body FROM email_queue",
        "SELECT * FROM email_queue",
        "SELECT id FROM email_queue WHERE recipient_to LIKE '%@example.com'",
        "UPDATE email_queue SET status = 'cancelled'",
        "DELETE FROM email_queue",
        "INSERT INTO email_queue (recipient_to, status) VALUES ('x@example.com', 'sent')",
        "SELECT * FROM email_attempts",
        "SELECT * FROM email_templates",
    ],
)
def test_the_role_cannot_read_change_or_delete_jobs(
    enqueue_role: EnqueueRole, statement: str
) -> None:
    with Client(enqueue_role.owner_url) as owner:
        owner.enqueue("victim@example.com", "private subject", "private body")
    with psycopg.connect(libpq_url(enqueue_role.url)) as role:
        assert role.execute("SELECT count(id) FROM email_queue").fetchone() == (1,)
        role.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            role.execute(statement)


def test_mailqctl_as_the_role_is_refused_in_one_line(enqueue_role: EnqueueRole) -> None:
    line = error_line(invoke("failed", db=enqueue_role.url))
    assert re.match(r"mailqctl: .*permission denied", line), line


def test_the_password_is_stored_hashed(enqueue_role: EnqueueRole) -> None:
    with psycopg.connect(libpq_url(enqueue_role.owner_url)) as admin:
        [(stored,)] = admin.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (enqueue_role.name,)
        ).fetchall()
    assert stored.startswith("SCRAM-SHA-256$")
    assert "role-Pa55word" not in stored


def test_grant_enqueue_refuses_sqlite_in_one_line(sqlite_url: str) -> None:
    from mailqd.store import upgrade
    from mailqd.store.engine import make_engine

    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    line = error_line(invoke("grant-enqueue", "app", db=sqlite_url))
    assert line == "mailqctl: database roles exist only on PostgreSQL; SQLite has no permissions"


def test_the_documented_sql_is_what_the_command_runs() -> None:
    result = invoke("grant-enqueue", DOCUMENTED_ROLE, "--create", "--print-sql")
    assert result.returncode == 0, result.stderr
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert result.stdout in blocks, "docs/security.md: paste `--print-sql`'s output"
    assert "SELECT (id, idempotency_key)" in result.stdout
