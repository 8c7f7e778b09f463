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
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa
import structlog

from children import exit_code
from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.breaker import BreakerPolicy
from mailqd.daemon.sidecar import ForkLock, Sidecar, parse_listen
from mailqd.daemon.sidecar_db import Cached
from mailqd.daemon.supervisor import open_store
from mailqd.errors import DatabaseUnavailableError
from mailqd.metrics import PoolStatus
from mailqd.models import RecipientStatus, Status
from mailqd.routes import RelayPlan, RelaySpec, RouteSpec
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from mailqd.store.relay_tables import email_recipients
from pg import create_database, start_owned_postgres
from sidecar_client import get, scrape, wait_until
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
            "mailqd_email_due_count": 0,  # the 3 pending are scheduled for later
            'mailqd_relay_up{relay="relay1"}': 1,
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
        "deferred_by_relay_1h": 0,
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


# -- relays, and what is due ---------------------------------------------------------

TWO_RELAYS = RelayPlan.build(
    [RelaySpec("primary", "null://"), RelaySpec("backup", "null://")],
    [RouteSpec(relays=("primary", "backup"))],
)
RUNNING = PoolStatus(
    workers=1, desired=1, stopping=False, worker_deaths=0, jobs_given_back=0, started_at=0.0
)


@pytest.fixture
def relay_sidecar(db_url: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a sidecar on `db_url` (no workers) whose configuration has two relays,
    `primary` and `backup`, both on the default route."""
    metrics_dir = tmp_path / "metrics"  # not tmp_path: the SQLite file is a .db too
    metrics_dir.mkdir()
    sidecar = Sidecar(
        "127.0.0.1:0",
        status=lambda: RUNNING,
        database_url=lambda: db_url,
        open_store=open_store,
        metrics_dir=str(metrics_dir),
        fork_lock=ForkLock(),
        relay_plan=lambda: TWO_RELAYS,
        cache_seconds=0.0,
    )
    sidecar.start()
    try:
        yield sidecar.url
    finally:
        sidecar.stop()


def mark_down(store: Store, relay: str, reason: str, error: str) -> None:
    """What a worker records on an AUTH or TLS failure: the breaker opens at once."""
    store.relay_health.failed(
        relay, reason=reason, error=error, policy=BreakerPolicy(), opens_now=True, owner="h:1"
    )


def relays_up(sidecar: str) -> dict[str, float | None]:
    samples = scrape(sidecar)
    return {r: samples.get(f'mailqd_relay_up{{relay="{r}"}}') for r in ("primary", "backup")}


def health_becomes(sidecar: str, status: int, body: str) -> None:
    wait_until(lambda: get(sidecar + "/healthz") == (status, body), f"/healthz {status} {body!r}")


def test_relay_up_is_0_for_a_relay_marked_down_and_1_otherwise(
    relay_sidecar: str, db_url: str
) -> None:
    store = Store.from_url(db_url)
    wait_until(lambda: relays_up(relay_sidecar) == {"primary": 1, "backup": 1}, "both up, no rows")
    # primary counts one failure, below the threshold: still up; backup's AUTH failure opens it.
    store.relay_health.failed(
        "primary", reason="timeout", error="timed out", policy=BreakerPolicy(),
        opens_now=False, owner="h:1",
    )  # fmt: skip
    mark_down(store, "backup", "auth", "535 5.7.8 authentication failed")
    wait_until(lambda: relays_up(relay_sidecar) == {"primary": 1, "backup": 0}, "backup down")
    samples = scrape(relay_sidecar)
    assert samples['mailqd_relay_failures_total{reason="auth",relay="backup"}'] == 0  # no worker
    store.relay_health.succeeded("backup")
    wait_until(lambda: relays_up(relay_sidecar) == {"primary": 1, "backup": 1}, "backup up again")
    store.close()


def test_healthz_is_degraded_while_a_relay_is_down_and_503_once_the_default_route_is(
    relay_sidecar: str, db_url: str
) -> None:
    store = Store.from_url(db_url)
    health_becomes(relay_sidecar, 200, "ok: 1/1 workers, database ok\n")
    mark_down(store, "backup", "auth", "535 5.7.8 authentication failed")
    health_becomes(
        relay_sidecar, 200, "degraded: relay down: backup (auth); 1/1 workers, database ok\n"
    )
    mark_down(store, "primary", "tls", "certificate verify failed")
    health_becomes(
        relay_sidecar, 503, "unhealthy: every relay of the default route is down: primary, backup\n"
    )
    store.relay_health.succeeded("primary")
    health_becomes(
        relay_sidecar, 200, "degraded: relay down: backup (auth); 1/1 workers, database ok\n"
    )
    store.relay_health.succeeded("backup")
    health_becomes(relay_sidecar, 200, "ok: 1/1 workers, database ok\n")
    store.close()


def test_stats_shows_each_relay_and_the_recipients_refused_in_the_last_hour(
    relay_sidecar: str, db_url: str
) -> None:
    store = Store.from_url(db_url)
    mark_down(store, "backup", "unavailable", "421 4.7.0 <ops@example.com> try again later")
    now = datetime.now(UTC)
    rows = [
        ("job-1", "a@example.com", RecipientStatus.REFUSED, now - timedelta(minutes=1)),
        ("job-1", "b@example.com", RecipientStatus.ACCEPTED, now - timedelta(minutes=1)),
        ("job-2", "c@example.com", RecipientStatus.REFUSED, now - timedelta(minutes=30)),
        ("job-2", "d@example.com", RecipientStatus.PENDING, now - timedelta(minutes=30)),
        ("job-3", "e@example.com", RecipientStatus.REFUSED, now - timedelta(hours=2)),
    ]
    with store.engine.begin() as conn:
        conn.execute(
            email_recipients.insert(),
            [
                {"job_id": job, "address": address, "status": status.value, "updated_at": at}
                for job, address, status, at in rows
            ],
        )

    def with_backup_down() -> dict[str, Any] | None:
        status, body = get(relay_sidecar + "/stats")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)["data"]
        return data if [r["up"] for r in data["relays"]] == [True, False] else None

    data = wait_until(with_backup_down, "/stats to show backup down")
    primary, backup = data["relays"]
    assert primary == {
        "name": "primary", "up": True, "since": None, "failures": 0, "last_reason": None,
        "last_error": None, "last_failure_at": None, "next_probe_at": None,
    }  # fmt: skip
    assert backup["name"] == "backup" and backup["failures"] == 1
    assert backup["last_reason"] == "unavailable"
    assert backup["last_error"] == "421 4.7.0 <o***@example.com> try again later"
    since = datetime.fromisoformat(backup["since"])
    assert abs((since - now).total_seconds()) < 60
    assert datetime.fromisoformat(backup["next_probe_at"]) > since
    assert data["performance"]["recipients_refused_1h"] == 2
    assert data["service"]["status"] == "degraded"
    store.close()


def test_due_count_leaves_out_jobs_scheduled_for_later_and_retries_waiting(
    relay_sidecar: str, db_url: str
) -> None:
    store = Store.from_url(db_url)
    with Client(db_url) as client:
        client.enqueue("a@example.com", "due", "x")
        client.enqueue("b@example.com", "due", "x")
    with store.engine.begin() as conn:
        for attempts in (0, 0, 1):  # two scheduled, one waiting for its retry
            conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, subject, body, attempts, "
                    "next_attempt_at) VALUES ('a@example.com', 'later', 'x', :attempts, :later)"
                ),
                {"attempts": attempts, "later": _db_time(db_url, "2999-01-01T00:00:00+00:00")},
            )

    def counted() -> dict[str, float] | None:
        samples = scrape(relay_sidecar)
        return samples if samples.get("mailqd_email_pending_count") == 5 else None

    samples = wait_until(counted, "the 5 pending jobs counted")
    assert samples["mailqd_email_due_count"] == 2
    assert samples["mailqd_email_queue_depth"] == 5
    status, body = get(relay_sidecar + "/stats")
    assert status == 200 and json.loads(body)["data"]["queue"]["due"] == 2, body
    store.close()


def test_a_relay_down_on_a_running_daemon_makes_healthz_503_until_it_is_back(
    daemons: DaemonPool, sqlite_url: str
) -> None:
    """The supervisor hands its configuration's relays to the sidecar: `smtp_url` alone is
    one relay, `relay1`, the whole default route."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    store = Store.from_url(sqlite_url)
    mark_down(store, "relay1", "auth", "535 5.7.8 authentication failed")
    daemon = daemons.supervisor(
        env_for(sqlite_url, "null://", MAILQD_WORKERS="1"), "standin_workers:beating"
    )
    sidecar = daemon.sidecar_url()
    daemon.wait_for_workers(1)
    health_becomes(sidecar, 503, "unhealthy: every relay of the default route is down: relay1\n")
    samples = scrape(sidecar)
    assert samples['mailqd_relay_up{relay="relay1"}'] == 0
    assert samples['mailqd_relay_failures_total{reason="auth",relay="relay1"}'] == 0
    store.relay_health.succeeded("relay1")
    health_becomes(sidecar, 200, "ok: 1/1 workers, database ok\n")
    assert scrape(sidecar)['mailqd_relay_up{relay="relay1"}'] == 1
    stop(daemon)
    store.close()


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
