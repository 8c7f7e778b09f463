"""`mailqctl drain` and `retry` as subprocesses, delivering to a real SMTP server (aiosmtpd).

drain runs the daemon's own delivery code, so the outcomes asserted here
are the daemon's rules: 4xx is retried later with backoff, 5xx fails the
job at once, every attempt is recorded with the server's reply.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ctl_process import DRAIN_KEYS, MAILQCTL, TIMEOUT, ctl_env, mailqctl, ok_json
from mailqd.models import Outcome, Status
from mailqd.store import Store, upgrade
from mailqd.validation import build_job
from smtp_server import SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

SENDER = "ops@example.com"


def drain_env(smtp_url: str, **extra: str) -> dict[str, str]:
    return {"MAILQD_SMTP_URL": smtp_url, "MAILQD_FROM": SENDER, "MAILQD_SMTP_TIMEOUT": "5", **extra}


def enqueue(store: Store, to: str, **fields: object) -> str:
    values: dict[str, object] = {"to": to, "subject": f"for {to}", "body": "Hello"}
    values.update(fields)
    return store.enqueue(build_job(**values))  # type: ignore[arg-type]


def test_drain_sends_retries_4xx_and_fails_5xx_like_the_daemon(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    delivered = enqueue(store, "ok@example.com")
    deferred = enqueue(store, "later@example.com")
    bounced = enqueue(store, "nobody@example.com")
    smtp_server.rcpt_replies["later@example.com"] = "451 4.3.0 try again later"
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"

    result = mailqctl("drain", "--json", db=db_url, env=drain_env(smtp_server.url()))
    assert result.returncode == 1, result.stderr  # not everything was delivered
    document = json.loads(result.stdout)
    assert set(document) == DRAIN_KEYS
    assert document == {
        "rescued": 0,
        "claimed": 3,
        "sent": 1,
        "retried": 1,
        "ambiguous": 0,
        "failed": 1,
        "expired": 0,
        "deduplicated": 0,
        "deferred_by_recipient_cap": 0,
        "throttled_by_domain_limit": 0,
        "deferred_by_relay": 0,
    }

    [message] = smtp_server.messages
    assert message.rcpt_tos == ("ok@example.com",)
    assert message.mail_from == SENDER
    sent = store.get(delivered)
    assert (sent.status, sent.attempts) == (Status.SENT, 1)
    assert message.parsed()["Message-ID"] == sent.message_id

    retry = store.get(deferred)
    assert (retry.status, retry.attempts) == (Status.PENDING, 1)
    assert retry.next_attempt_at > datetime.now(UTC) + timedelta(seconds=30)  # backoff: 60 s
    [attempt] = store.attempts(deferred)
    assert (attempt.outcome, attempt.smtp_code) == (Outcome.RETRY, 451)

    failed = store.get(bounced)
    assert failed.status is Status.FAILED
    assert "550 5.1.1 no such user" in (failed.last_error or "")
    [attempt] = store.attempts(bounced)
    assert (attempt.outcome, attempt.smtp_code) == (Outcome.FAILED, 550)
    assert attempt.worker is not None and attempt.worker.startswith("mailqctl-drain@")

    # Problems are logged on stderr, masked like the daemon's logs.
    assert "n***@example.com" in result.stderr and "nobody@example.com" not in result.stderr


def test_drain_max_bounds_the_work_and_summarises(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    nothing = mailqctl("drain", db=db_url, env=drain_env(smtp_server.url()))
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "nothing to deliver: no job is due")

    for i in range(5):
        enqueue(store, f"user{i}@example.com")
    result = mailqctl("drain", "--max", "2", db=db_url, env=drain_env(smtp_server.url()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "drained 2 jobs: 2 sent, 0 retried later, 0 failed"
    assert len(smtp_server.messages) == 2
    assert store.counts().by_status == {Status.SENT: 2, Status.PENDING: 3}


def test_drain_returns_jobs_of_a_dead_daemon_first(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    job_id = enqueue(store, "stuck@example.com", send_after=datetime.now(UTC) - timedelta(hours=1))
    store.claim("dead-daemon", 1, lease_seconds=1, now=datetime.now(UTC) - timedelta(minutes=30))

    document = ok_json(mailqctl("drain", "--json", db=db_url, env=drain_env(smtp_server.url())))
    assert (document["rescued"], document["sent"]) == (1, 1)
    assert [a.outcome for a in store.attempts(job_id)] == [Outcome.LOST, Outcome.SENT]
    assert smtp_server.messages[0].rcpt_tos == ("stuck@example.com",)


def test_drain_during_an_smtp_outage_defers_and_a_later_drain_delivers_each_job_once(
    store: Store, db_url: str
) -> None:
    """A relay outage fails nothing, even with one attempt allowed (#16): the jobs are
    deferred, their attempt not used, and the next drain once the relay is back sends
    each exactly once."""
    port = _free_port()
    ids = [enqueue(store, f"user{i}@example.com") for i in range(8)]
    env = drain_env(f"smtp://127.0.0.1:{port}", MAILQD_MAX_ATTEMPTS="1")

    outage = mailqctl("drain", "--json", db=db_url, env=env)  # nothing listens on the port
    assert outage.returncode == 0
    document = json.loads(outage.stdout)
    assert (document["failed"], document["deferred_by_relay"]) == (0, 8)
    assert ok_json(mailqctl("failed", "--json", db=db_url))["jobs"] == []
    assert {store.get(j).attempts for j in ids} == {0}
    assert all("connect" in (store.get(j).last_error or "") for j in ids)

    with store.engine.begin() as conn:  # due now, as if the relay's next probe had come
        conn.execute(sa.text("UPDATE email_queue SET next_attempt_at = CURRENT_TIMESTAMP"))
        conn.execute(sa.text("DELETE FROM mailqd_relay_state"))
    with SmtpServer(port=port) as server:  # the relay is back
        document = ok_json(mailqctl("drain", "--json", db=db_url, env=env))
        assert (document["claimed"], document["sent"]) == (8, 8)
        received = server.wait_for_messages(8)
    assert sorted(m.rcpt_tos[0] for m in received) == sorted(
        f"user{i}@example.com" for i in range(8)
    )
    assert len({m.parsed()["Message-ID"] for m in received}) == 8
    assert store.counts().by_status == {Status.SENT: 8}
    for job_id in ids:
        assert [a.outcome for a in store.attempts(job_id)] == [Outcome.DEFERRED, Outcome.SENT]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- on a terminal ------------------------------------------------------------------


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[Store]:
    store = Store.from_url(sqlite_url)
    upgrade(store.engine)
    yield store
    store.close()


def test_drain_shows_a_progress_bar_on_a_terminal(
    sqlite_store: Store, sqlite_url: str, smtp_server: SmtpServer
) -> None:
    for i in range(20):
        enqueue(sqlite_store, f"user{i}@example.com")
    output = _run_on_a_terminal(
        ["--database-url", sqlite_url, "drain"],
        env=drain_env(smtp_server.url(), TERM="xterm", COLUMNS="100"),
    )
    assert "delivering" in output  # the bar, while it ran
    assert "drained 20 jobs: 20 sent, 0 retried later, 0 failed" in output


def _run_on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run mailqctl with a pseudo-terminal as stdout and stderr; return all it wrote."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [MAILQCTL, *args], stdout=terminal, stderr=terminal, env=ctl_env(env)
    ) as process:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        assert process.wait(TIMEOUT) == 0
    return b"".join(chunks).decode(errors="replace")
