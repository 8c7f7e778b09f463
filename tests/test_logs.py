"""What mailqd logs: one structured event per delivery attempt, and nothing it must not.

A full run of the real daemon (sent, permanently failed and retried mail,
an SMTP password in the URL) is grepped for message bodies, subjects,
recipient addresses and the password; none may appear.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal

import pytest
import structlog

from daemon_process import DaemonPool
from mailqd import Client
from mailqd.config import Settings
from mailqd.logging import configure_logging
from mailqd.models import Status
from mailqd.store import Store
from smtp_server import SmtpServer

pytestmark = pytest.mark.timeout(90)

PASSWORD = "pw-Zq8!never-logged"
BODY, HTML, SUBJECT = "BODY-7f3a2e", "HTML-9c2e51", "SUBJECT-41d0bb"
ADDRESSES = ("alice.secret@example.com", "bob.hidden@example.com", "carol.retry@example.org")
ATTEMPT_FIELDS = {"job_id", "attempt", "outcome", "smtp_code", "duration_ms", "worker", "to"}


def test_a_full_run_logs_every_attempt_and_no_body_subject_address_or_secret(
    daemons: DaemonPool, db_url: str
) -> None:
    alice, bob, carol = ADDRESSES
    with SmtpServer(auth=("mailer", PASSWORD)) as smtp:
        smtp.rcpt_replies[bob] = f"550 5.1.1 <{bob}>: no such user"
        smtp.data_replies.append(f"451 4.3.0 {carol} greylisted, try later")
        with Client(db_url) as client:
            ids = [
                client.enqueue(
                    f"Carol Retry <{carol}>", f"{SUBJECT} 1", f"{BODY} 1", html=f"<p>{HTML}</p>"
                ),
                client.enqueue(f"Alice Secret <{alice}>", f"{SUBJECT} 2", f"{BODY} 2"),
                client.enqueue(bob, f"{SUBJECT} 3", f"{BODY} 3"),
                client.enqueue(alice, f"{SUBJECT} 4", f"{BODY} 4", cc=bob),  # bob refused
            ]
        daemon = daemons.mailqd(
            {
                "MAILQD_DATABASE_URL": db_url,
                "MAILQD_SMTP_URL": smtp.url(user=f"mailer:{PASSWORD}", starttls="off"),
                "MAILQD_WORKERS": "1",
                "MAILQD_CONCURRENCY": "1",
                "MAILQD_BACKOFF_BASE": "0.2",
                "MAILQD_POLL_INTERVAL": "0.1",
                "MAILQD_LOG_FORMAT": "auto",  # not a terminal: JSON
                "MAILQD_LOG_LEVEL": "debug",
            }
        )
        store = Store.from_url(db_url)

        def finished() -> bool:
            statuses = [store.get(i).status for i in ids]
            return statuses == [Status.SENT, Status.SENT, Status.FAILED, Status.SENT]

        daemon.wait_for(finished, "three sent and one bounced")
        store.close()
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit() == 0

    log = daemon.log_text()
    records = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    for secret in (PASSWORD, BODY, HTML, SUBJECT, "Alice Secret", "Carol Retry", *ADDRESSES):
        assert secret not in log, f"{secret!r} appears in the log"

    attempts = [r for r in records if r.get("event") == "delivery attempt"]
    assert all(set(r) >= ATTEMPT_FIELDS for r in attempts), attempts
    assert {r["job_id"] for r in attempts} == set(ids)
    by_outcome = {(r["job_id"], r["outcome"]): r for r in attempts}
    retried, delivered = by_outcome[(ids[0], "retry")], by_outcome[(ids[0], "sent")]
    assert (retried["attempt"], retried["smtp_code"]) == (1, 451)
    assert (delivered["attempt"], delivered["smtp_code"]) == (2, 250)
    assert retried["to"] == ["c***@example.org"]
    assert "c***@example.org" in retried["error"]
    bounced = by_outcome[(ids[2], "failed")]
    assert bounced["smtp_code"] == 550
    assert "b***@example.com" in bounced["error"]
    partial = by_outcome[(ids[3], "sent")]
    assert "refused 1 recipient(s): b***@example.com: 550" in partial["partial"]
    assert all(re.fullmatch(r".+:[0-9a-f]{8}:\d+", r["worker"]) for r in attempts)  # host:nonce:pid


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_are_readable_lines_on_a_terminal_and_json_elsewhere() -> None:
    terminal, pipe = _Terminal(), io.StringIO()
    configure_logging(Settings(log_format="auto"), stream=terminal)
    structlog.get_logger().info("delivery attempt", job_id="j1", outcome="sent")
    configure_logging(Settings(log_format="auto"), stream=pipe)
    structlog.get_logger().info("delivery attempt", job_id="j1", outcome="sent")
    configure_logging(Settings(log_format="json"), stream=terminal)
    structlog.get_logger().info("forced json")

    console_line, json_line = terminal.getvalue().splitlines()
    assert "delivery attempt" in console_line and "job_id" in console_line
    assert not console_line.startswith("{")
    assert json.loads(json_line)["event"] == "forced json"
    record = json.loads(pipe.getvalue())
    assert (record["event"], record["job_id"]) == ("delivery attempt", "j1")
    assert record["level"] == "info"


def test_library_warnings_are_json_lines_too_with_addresses_masked() -> None:
    pipe = io.StringIO()
    configure_logging(Settings(log_format="auto"), stream=pipe)
    logging.getLogger("aiosmtplib").warning("server said: 550 <bob.hidden@example.com> unknown")
    logging.getLogger("sqlalchemy.pool").info("below the threshold: not shown")
    [record] = [json.loads(line) for line in pipe.getvalue().splitlines()]
    assert record["event"] == "server said: 550 <b***@example.com> unknown"
    assert (record["level"], record["logger"]) == ("warning", "aiosmtplib")
    assert "timestamp" in record
