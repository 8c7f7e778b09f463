"""mailqd end to end: the real daemon (a subprocess, started as systemd would),
real databases and a real SMTP server over a socket."""

from __future__ import annotations

import email.policy
import signal
import threading
from collections import Counter
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
import sqlalchemy as sa

from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.models import Outcome, Status
from mailqd.store import Store
from smtp_server import SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

pytestmark = pytest.mark.timeout(120)


def daemon_env(db_url: str, smtp: SmtpServer, **extra: str) -> dict[str, str]:
    return {
        "MAILQD_DATABASE_URL": db_url,
        "MAILQD_SMTP_URL": smtp.url(starttls="off"),
        "MAILQD_FROM": "Shop <shop@example.com>",
        "MAILQD_POLL_INTERVAL": "0.2",
        **extra,
    }


def parse(data: bytes) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(data)  # type: ignore[return-value]


def statuses(store: Store) -> dict[Status, int]:
    return store.counts().by_status


def wait_all(daemon: DaemonProcess, store: Store, status: Status, count: int, what: str) -> None:
    daemon.wait_for(lambda: statuses(store).get(status, 0) == count, what, timeout=60)


def stop(daemon: DaemonProcess) -> None:
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=40) == 0, daemon.log_tail()


def by_message_id(messages: list[EmailMessage]) -> dict[str, EmailMessage]:
    return {str(m["Message-ID"]): m for m in messages}


def test_500_messages_half_client_half_plain_sql_each_delivered_once(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    with Client(db_url) as client:
        client_ids = client.enqueue_many(
            [
                {
                    "to": f"Ünïcode {i} <user{i}@example.com>",
                    "cc": "copy@example.com" if i % 2 else None,
                    "bcc": "hidden@example.com" if i % 3 == 0 else None,
                    "subject": f"Grüße Nr. {i}",
                    "body": f"plain body {i}",
                    "html": f"<p>html body {i}</p>" if i % 5 == 0 else None,
                    "headers": {"X-Order": str(i)},
                }
                for i in range(250)
            ]
        )
    with store.engine.begin() as conn:
        for i in range(250):
            conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, subject, body) "
                    "VALUES (:to, :subject, :body)"
                ),
                {"to": f"sql{i}@example.org", "subject": f"sql {i}", "body": f"sql body {i}"},
            )
        sql_ids = list(
            conn.execute(
                sa.text("SELECT id FROM email_queue WHERE recipient_to LIKE 'sql%'")
            ).scalars()
        )

    daemon = daemons.mailqd(daemon_env(db_url, smtp_server, MAILQD_WORKERS="3"))
    wait_all(daemon, store, Status.SENT, 500, "500 jobs sent")
    stop(daemon)

    received = [m.parsed() for m in smtp_server.messages]
    assert len(received) == 500
    ids = Counter(str(m["Message-ID"]) for m in received)
    assert max(ids.values()) == 1, "a message was delivered twice"
    delivered = by_message_id(received)
    envelopes = {m.parsed()["Message-ID"]: m for m in smtp_server.messages}

    for i, job_id in enumerate(client_ids):
        job = store.get(job_id)
        message = delivered[job.message_id]
        assert str(message["Subject"]) == f"Grüße Nr. {i}"
        assert str(message["To"]) == f"Ünïcode {i} <user{i}@example.com>"
        assert str(message["From"]) == "Shop <shop@example.com>"
        assert message["X-Order"] == str(i)
        assert message["Bcc"] is None
        assert (message["Cc"] is not None) == bool(i % 2)
        assert message.get_body(("plain",)).get_content().strip() == f"plain body {i}"
        if i % 5 == 0:
            assert "html body" in message.get_body(("html",)).get_content()
        envelope = envelopes[job.message_id]
        assert ("hidden@example.com" in envelope.rcpt_tos) == (i % 3 == 0)
        assert envelope.mail_from == "shop@example.com"
    for job_id in sql_ids:
        job = store.get(job_id)
        message = delivered[job.message_id]
        assert message.get_content().strip() == job.body
        assert str(message["To"]) == job.recipient_to


def test_transient_permanent_and_outage_outcomes(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    smtp_server.data_replies.append("451 4.3.0 try again later")
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    env = daemon_env(
        db_url,
        smtp_server,
        MAILQD_WORKERS="1",
        MAILQD_CONCURRENCY="1",
        MAILQD_BACKOFF_BASE="0.3",
        MAILQD_RELAY_PROBE_INTERVAL="0.5",
    )
    with Client(db_url) as client:
        retried = client.enqueue("a@example.com", "retried", "x")
    daemon = daemons.mailqd(env)
    daemon.wait_for(lambda: store.get(retried).status is Status.SENT, "the 451 job to be sent")
    assert [a.outcome for a in store.attempts(retried)] == [Outcome.RETRY, Outcome.SENT]
    assert store.attempts(retried)[0].smtp_code == 451

    with Client(db_url) as client:
        bounced = client.enqueue("nobody@example.com", "bounced", "x")
    daemon.wait_for(lambda: store.get(bounced).status is Status.FAILED, "the 550 job to fail")
    [attempt] = store.attempts(bounced)
    assert (attempt.outcome, attempt.smtp_code) == (Outcome.FAILED, 550)
    assert "550" in (store.get(bounced).last_error or "")

    # The server goes away: the job is deferred (no attempt used: the relay failed, not
    # the message), and delivered once it is back.
    smtp_server.stop()
    with Client(db_url) as client:
        waited = client.enqueue("b@example.com", "waited", "x")
    daemon.wait_for(
        lambda: any(a.outcome is Outcome.DEFERRED for a in store.attempts(waited)),
        "a deferral while the server is down",
    )
    assert store.get(waited).attempts == 0
    back = SmtpServer(port=smtp_server.port)
    with back:
        daemon.wait_for(
            lambda: store.get(waited).status is Status.SENT, "delivery after the outage"
        )
        assert [m.parsed()["Subject"] for m in back.messages] == ["waited"]
        stop(daemon)
    assert store.get(waited).attempts == 1


def test_killed_worker_mid_send_is_replaced_and_the_job_sent_with_the_same_message_id(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    gate = threading.Event()
    smtp_server.data_gate = gate
    daemon = daemons.mailqd(daemon_env(db_url, smtp_server, MAILQD_WORKERS="2"))
    daemon.wait_for_workers(2)
    with Client(db_url) as client:
        job_id = client.enqueue("a@example.com", "slow", "x")
    smtp_server.wait_for(lambda: smtp_server.held == 1)
    holder = store.get(job_id).lease_owner
    assert holder is not None
    victim = int(holder.rsplit(":", 1)[1])
    first_try = smtp_server.contents[0]

    daemon.signal_worker(victim, signal.SIGKILL)
    daemon.wait_for(
        lambda: len(daemon.worker_pids()) == 2 and victim not in daemon.worker_pids(),
        "a replacement worker",
    )
    gate.set()
    daemon.wait_for(lambda: store.get(job_id).status is Status.SENT, "the job to be re-sent")
    stop(daemon)

    [delivered] = [m.parsed() for m in smtp_server.messages]
    first_id = parse(first_try)["Message-ID"]
    assert delivered["Message-ID"] == first_id == store.get(job_id).message_id
    assert [a.outcome for a in store.attempts(job_id)] == [Outcome.LOST, Outcome.SENT]


def test_sigterm_lets_in_flight_sends_finish_and_exits_0(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    gate = threading.Event()
    smtp_server.data_gate = gate
    daemon = daemons.mailqd(daemon_env(db_url, smtp_server, MAILQD_WORKERS="2"))
    daemon.wait_for_workers(2)
    with Client(db_url) as client:
        ids = client.enqueue_many([{"to": "a@example.com", "subject": "x", "body": "y"}] * 4)
    smtp_server.wait_for(lambda: smtp_server.held == 4)

    daemon.send(signal.SIGTERM)
    daemon.wait_for_event("stopping gracefully")
    gate.set()
    assert daemon.wait_exit(timeout=40) == 0, daemon.log_tail()

    assert len(smtp_server.messages) == 4
    assert [store.get(i).status for i in ids] == [Status.SENT] * 4
    assert Status.SENDING not in statuses(store)


@pytest.mark.slow
def test_two_daemons_share_one_rate_limit(
    daemons: DaemonPool, pg_url: str, smtp_server: SmtpServer
) -> None:
    store = Store.from_url(pg_url)
    with Client(pg_url) as client:
        client.enqueue_many([{"to": "a@example.com", "subject": "x", "body": "y"}] * 1600)
    env = daemon_env(pg_url, smtp_server, MAILQD_WORKERS="2", MAILQD_RATE_LIMIT="50")
    first, second = daemons.mailqd(env), daemons.mailqd(env)

    def sent_times() -> list[datetime]:
        with store.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT sent_at FROM email_queue WHERE sent_at IS NOT NULL")
            ).scalars()
            return sorted(rows)

    first.wait_for(lambda: len(sent_times()) > 0, "the first delivery")
    start = sent_times()[0] + timedelta(seconds=2)  # past the initial burst
    end = start + timedelta(seconds=20)
    first.wait_for(lambda: sent_times()[-1] > end, "20 s of rate-limited sending", timeout=40)
    for daemon in (first, second):
        stop(daemon)

    in_window = [t for t in sent_times() if start <= t < end]
    rate = len(in_window) / 20
    owners = _workers_that_sent(store)
    store.close()
    assert 45 <= rate <= 55, f"{rate:.1f} messages/s, expected 50 ± 10 %"
    assert len({o.split(":")[1] for o in owners}) == 2, "both daemons should have sent"


def _workers_that_sent(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT DISTINCT worker FROM email_attempts WHERE outcome = 'sent'")
            ).scalars()
        )
