"""The sidecar HTTP server (`/metrics`, `/healthz`, `/stats`), tested on the real daemon.

`mailqd` runs as a subprocess with a real SMTP server and real databases;
the test reads the sidecar's address from its log (each daemon listens on a
port of its own) and compares what it serves with what the database holds.
Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa
import structlog

from children import exit_code
from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.daemon.sidecar import ForkLock, Sidecar, parse_listen
from mailqd.daemon.sidecar_db import Cached
from mailqd.daemon.supervisor import open_store
from mailqd.errors import DatabaseUnavailableError
from mailqd.metrics import PoolStatus
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


def test_fork_lock_lets_queries_run_together_and_keeps_a_fork_out_while_any_runs() -> None:
    lock = ForkLock()
    with lock.shared(), lock.shared():
        assert lock.acquire(timeout=0.05) is False
    assert lock.acquire(timeout=5) is True
    entered = threading.Event()

    def query() -> None:
        with lock.shared():
            entered.set()

    thread = threading.Thread(target=query)
    thread.start()
    assert not entered.wait(0.05), "a query ran while a fork held the lock"
    lock.release()
    assert entered.wait(5)
    thread.join()
    assert lock.acquire(blocking=False) is True
    lock.release()


# -- fork safety ---------------------------------------------------------------------


def test_children_forked_while_clients_keep_the_sidecar_busy_can_log_and_query(
    pg_url: str, tmp_path: Path
) -> None:
    """The supervisor's side of a fork, 10 times, while three clients hammer every endpoint.

    Each child does what a worker does first (forget the sidecar, log, query
    the database) and must exit at once: a lock that a sidecar thread held
    at the fork would hang it, and closing its copies of the sidecar's
    sockets must not cut the parent's connections.
    """
    lock = ForkLock()
    status = PoolStatus(
        workers=1, desired=1, stopping=False, worker_deaths=0, jobs_given_back=0, started_at=0.0
    )
    sidecar = Sidecar(
        "127.0.0.1:0",
        status=lambda: status,
        database_url=lambda: pg_url,
        open_store=open_store,
        metrics_dir=str(tmp_path),
        fork_lock=lock,
        cache_seconds=0.0,
    )
    sidecar.start()
    stop = threading.Event()
    served: list[int] = []
    deadline = time.monotonic() + 15
    while get(sidecar.url + "/healthz")[0] != 200:  # the first counts are on their way
        assert time.monotonic() < deadline, "never healthy"
        time.sleep(0.02)

    def hammer(path: str) -> None:
        while not stop.is_set():
            served.append(get(sidecar.url + path)[0])

    paths = ("/metrics", "/stats", "/healthz")
    clients = [threading.Thread(target=hammer, args=(path,)) for path in paths]
    try:
        for client in clients:
            client.start()
        for _ in range(10):
            assert lock.acquire(timeout=5)
            try:
                pid = os.fork()
                if pid == 0:
                    _child_work(sidecar, pg_url)
            finally:
                lock.release()  # the parent's: the child ends in os._exit
            assert exit_code(pid, timeout=15) == 0
    finally:
        stop.set()
        for client in clients:
            client.join()
        sidecar.stop()
    assert len(served) > 20 and set(served) == {200}, set(served)


def _child_work(sidecar: Sidecar, pg_url: str) -> NoReturn:
    code = 1
    try:
        sidecar.forget_after_fork()
        structlog.get_logger().info("forked child running")
        store = Store.from_url(pg_url)
        store.unfinished_counts()
        store.close()
        code = 0
    finally:
        os._exit(code)


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
        "due": 0,
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
        "recipients_refused_1h": 0,
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
            "due": count(
                "SELECT count(*) FROM email_queue WHERE status = 'pending'"
                " AND next_attempt_at <= CURRENT_TIMESTAMP"
            ),
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
