"""The sidecar HTTP server (`/metrics`, `/healthz`, `/stats`), tested on the real daemon.

`mailqd` runs as a subprocess with a real SMTP server and real databases;
the test reads the sidecar's address from its log (each daemon listens on a
port of its own) and compares what it serves with what the database holds.
Every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.daemon.sidecar import parse_listen
from mailqd.daemon.sidecar_db import Cached
from mailqd.errors import DatabaseUnavailableError
from mailqd.models import Status
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from pg import create_database, start_owned_postgres
from sidecar_client import get, scrape
from smtp_server import SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

pytestmark = pytest.mark.timeout(120)


# -- helpers -------------------------------------------------------------------------


def sent_rows(store: Store) -> int:
    return store.counts().by_status.get(Status.SENT, 0)


def env_for(db_url: str, smtp_url: str, **extra: str) -> dict[str, str]:
    return {
        "MAILQD_DATABASE_URL": db_url,
        "MAILQD_SMTP_URL": smtp_url,
        "MAILQD_POLL_INTERVAL": "0.2",
        **extra,
    }


def stop(daemon: DaemonProcess) -> None:
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=40) == 0, daemon.log_tail()


# -- units -------------------------------------------------------------------------


def test_cached_reuses_a_value_and_an_error_until_it_is_stale() -> None:
    now = [0.0]
    calls: list[int] = []
    outcomes: list[int | Exception] = [1, DatabaseUnavailableError("down"), 3]

    def compute() -> int:
        calls.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    cached = Cached(compute, ttl=1.0, clock=lambda: now[0])
    assert (cached.get(), cached.get()) == (1, 1)
    now[0] = 1.0
    for _ in range(2):
        with pytest.raises(DatabaseUnavailableError):
            cached.get()
    now[0] = 2.5
    assert cached.get() == 3
    assert len(calls) == 3


def test_parse_listen_takes_ipv4_and_bracketed_ipv6() -> None:
    assert parse_listen("127.0.0.1:9478") == ("127.0.0.1", 9478)
    assert parse_listen("[::1]:0") == ("::1", 0)


# -- /metrics ------------------------------------------------------------------------


def test_sent_counter_equals_sent_rows_before_and_after_a_worker_is_killed(
    daemons: DaemonPool, pg_url: str, smtp_server: SmtpServer
) -> None:
    """Multiprocess counters: a SIGKILLed worker's counts are kept, and not counted twice."""
    total, workers, concurrency = 300, 3, 4
    store = Store.from_url(pg_url)
    gate = threading.Event()
    gate.set()
    smtp_server.data_gate = gate
    with Client(pg_url) as client:
        client.enqueue_many([{"to": "a@example.com", "subject": "x", "body": "y"}] * total)
    daemon = daemons.mailqd(
        env_for(
            pg_url,
            smtp_server.url(starttls="off"),
            MAILQD_WORKERS=str(workers),
            MAILQD_CONCURRENCY=str(concurrency),
        )
    )
    sidecar = daemon.sidecar_url()
    daemon.wait_for(lambda: sent_rows(store) >= 50, "the first 50 messages sent")

    # Mid-run: the server stops answering, so every delivery slot of every
    # worker holds a message, and nothing more is recorded until it answers.
    gate.clear()
    smtp_server.wait_for(lambda: smtp_server.held == workers * concurrency, timeout=20)
    daemon.wait_for(
        lambda: scrape(sidecar)["mailqd_email_sent_total"] == sent_rows(store),
        "the sent counter to equal the sent rows before the kill",
    )
    sent_before = sent_rows(store)
    assert 50 <= sent_before < total

    with store.engine.connect() as conn:
        owners = conn.execute(
            sa.text("SELECT DISTINCT lease_owner FROM email_queue WHERE status = 'sending'")
        ).scalars()
        victim = min(int(owner.rsplit(":", 1)[1]) for owner in owners)
    daemon.signal_worker(victim, signal.SIGKILL)
    daemon.wait_for(
        lambda: len(daemon.worker_pids()) == workers and victim not in daemon.worker_pids(),
        "a replacement worker",
    )
    assert scrape(sidecar)["mailqd_email_sent_total"] == sent_before == sent_rows(store)

    gate.set()
    daemon.wait_for(lambda: sent_rows(store) == total, "every message sent", timeout=60)
    daemon.wait_for(
        lambda: scrape(sidecar)["mailqd_email_sent_total"] == total,
        "the sent counter to reach the total",
    )
    after = scrape(sidecar)
    assert sent_rows(store) == total
    assert after["mailqd_worker_deaths_total"] == 1
    assert after["mailqd_jobs_given_back_total"] == concurrency
    assert after["mailqd_workers"] == after["mailqd_workers_desired"] == workers
    assert after["mailqd_email_failed_total"] == 0
    # Each of the victim's held jobs had one attempt cut short and one that
    # delivered; the attempts counter saw only the latter.
    assert after['mailqd_email_attempts_total{outcome="sent"}'] == total
    assert after["mailqd_email_send_duration_seconds_count"] == total
    # The queue gauges are cached for a second: the next fresh read shows the empty queue.
    daemon.wait_for(
        lambda: scrape(sidecar)["mailqd_email_queue_depth"] == 0, "an empty queue on /metrics"
    )
    stop(daemon)
    store.close()


def test_queue_gauges_come_from_the_database(
    daemons: DaemonPool, db_url: str, smtp_server: SmtpServer
) -> None:
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    later = "2999-01-01T00:00:00+00:00"
    store = Store.from_url(db_url)
    with Client(db_url) as client:
        client.enqueue("nobody@example.com", "bounced", "x")
        client.enqueue("a@example.com", "sent", "x")
    with store.engine.begin() as conn:
        for _ in range(3):
            conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, subject, body, next_attempt_at) "
                    "VALUES ('a@example.com', 'later', 'x', :later)"
                ),
                {"later": _db_time(db_url, later)},
            )
    daemon = daemons.mailqd(env_for(db_url, smtp_server.url(starttls="off"), MAILQD_WORKERS="1"))
    sidecar = daemon.sidecar_url()

    def settled() -> dict[str, float] | None:
        samples = scrape(sidecar)
        wanted = {
            "mailqd_email_pending_count": 3,
            "mailqd_email_queue_depth": 3,
            "mailqd_email_failed_count": 1,
            "mailqd_email_sending_count": 0,
            "mailqd_email_sent_total": 1,
            "mailqd_email_failed_total": 1,
            "mailqd_database_up": 1,
        }
        return samples if all(samples.get(k) == v for k, v in wanted.items()) else None

    samples = daemon.wait_for(settled, "the gauges to show 3 pending and 1 failed")
    assert samples["mailqd_email_oldest_due_age_seconds"] == 0  # the pending ones are not due
    assert samples['mailqd_email_attempts_total{outcome="failed"}'] == 1
    stop(daemon)
    store.close()


def _db_time(db_url: str, iso: str) -> str:
    """A timestamp literal as each database stores it (SQLite: UTC text)."""
    return "2999-01-01 00:00:00.000" if db_url.startswith("sqlite") else iso


# -- /healthz ------------------------------------------------------------------------


def test_healthz_is_503_while_the_database_is_down_and_200_when_it_is_back(
    daemons: DaemonPool,
) -> None:
    with start_owned_postgres() as server:
        url = create_database(server.admin_url, "mailqd_health")
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        daemon = daemons.mailqd(env_for(url, "null://", MAILQD_WORKERS="2"))
        sidecar = daemon.sidecar_url()

        def health_is(code: int) -> tuple[int, str] | None:
            status, body = get(sidecar + "/healthz")
            return (status, body) if status == code else None

        assert daemon.wait_for(lambda: health_is(200), "healthy")[1] == (
            "ok: 2/2 workers, database ok\n"
        )
        server.stop()
        _, body = daemon.wait_for(lambda: health_is(503), "unhealthy with the database down")
        assert body.startswith("unhealthy: database unavailable"), body
        assert scrape(sidecar)["mailqd_database_up"] == 0
        server.start()
        daemon.wait_for(lambda: health_is(200), "healthy again", timeout=30)
        assert scrape(sidecar)["mailqd_database_up"] == 1
        stop(daemon)


def test_healthz_is_503_while_a_killed_worker_awaits_its_replacement(
    daemons: DaemonPool, sqlite_url: str
) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    # A worker that keeps dying is replaced ever more slowly: the gap is visible.
    daemon = daemons.supervisor(
        env_for(sqlite_url, "null://", MAILQD_WORKERS="1"), "standin_workers:crash_at_boot"
    )
    sidecar = daemon.sidecar_url()
    daemon.wait_for_event("worker restart scheduled", at_least=4)

    def unhealthy() -> str | None:
        status, body = get(sidecar + "/healthz")
        return body if status == 503 else None

    assert daemon.wait_for(unhealthy, "a 503 between restarts") == (
        "unhealthy: 0 of 1 workers running\n"
    )
    assert scrape(sidecar)["mailqd_worker_deaths_total"] >= 4


# -- /stats --------------------------------------------------------------------------


def test_stats_has_the_seed_shape_and_matches_the_database(
    daemons: DaemonPool, db_url: str, smtp_server: SmtpServer
) -> None:
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    smtp_server.rcpt_replies["later@example.com"] = "451 4.3.0 try again later"
    store = Store.from_url(db_url)
    with Client(db_url) as client:
        for i in range(4):
            client.enqueue(f"user{i}@example.com", "hello", "x")
        client.enqueue("nobody@example.com", "bounced", "x")
        client.enqueue("later@example.com", "retried", "x")
    daemon = daemons.mailqd(
        env_for(
            db_url,
            smtp_server.url(starttls="off"),
            MAILQD_WORKERS="1",
            MAILQD_BACKOFF_BASE="3600",
            MAILQD_BACKOFF_MAX="7200",
        )
    )
    sidecar = daemon.sidecar_url()
    daemon.wait_for(
        lambda: (
            store.counts().by_status.get(Status.PENDING) == 1
            and store.counts().by_status.get(Status.SENT) == 4
            and store.counts().by_status.get(Status.FAILED) == 1
        ),
        "4 sent, 1 failed, 1 waiting for its retry",
    )

    def matches() -> dict[str, Any] | None:
        status, body = get(sidecar + "/stats")
        assert status == 200, body
        page = json.loads(body)
        return page if page["data"]["queue"] == expected_queue(store) else None

    page = daemon.wait_for(matches, "/stats to match the database")
    assert page["success"] is True
    data = page["data"]
    assert set(data) >= {"service", "queue", "performance"}
    assert data["queue"] == {
        "pending": 1,
        "retry_queue": 1,
        "permanent_failed": 1,
        "total_sent": 4,
        "total_failed": 2,
        "queue_depth": 1,
    }
    # Jobs that ended in the last hour: 4 sent, 1 failed; attempts: 6.
    assert data["performance"] == {
        "failure_rate_1h_percent": 20.0,
        "recent_attempts_1h": 6,
        "deduplicated_1h": 0,
        "deferred_by_recipient_cap_1h": 0,
    }
    service = data["service"]
    assert service["name"] == "mailqd"
    assert service["status"] == "running", (service, daemon.log_tail())
    assert service["workers"] == {"running": 1, "configured": 1}
    assert service["pid"] == daemon.pid
    stop(daemon)
    store.close()


def expected_queue(store: Store) -> dict[str, int]:
    """The `/stats` queue numbers, computed here with plain SQL."""
    with store.engine.connect() as conn:

        def count(sql: str) -> int:
            return int(conn.execute(sa.text(sql)).scalar_one())

        pending = count("SELECT count(*) FROM email_queue WHERE status = 'pending'")
        sending = count("SELECT count(*) FROM email_queue WHERE status = 'sending'")
        return {
            "pending": pending,
            "retry_queue": count(
                "SELECT count(*) FROM email_queue WHERE status = 'pending' AND attempts > 0"
            ),
            "permanent_failed": count("SELECT count(*) FROM email_queue WHERE status = 'failed'"),
            "total_sent": count("SELECT count(*) FROM email_queue WHERE status = 'sent'"),
            "total_failed": count("SELECT count(*) FROM email_attempts WHERE outcome <> 'sent'"),
            "queue_depth": pending + sending,
        }


# -- the listening address -----------------------------------------------------------


def test_a_taken_metrics_port_stops_mailqd_at_start_with_one_line(
    daemons: DaemonPool, sqlite_url: str
) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemons.mailqd(
            env_for(sqlite_url, "null://", MAILQD_METRICS_LISTEN=f"127.0.0.1:{port}")
        )
        assert daemon.wait_exit() == 1
    assert daemon.log_text() == (
        f"mailqd: config metrics_listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )
