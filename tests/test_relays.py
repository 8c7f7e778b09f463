"""The relay layer (#16): outages delay mail and never fail it, the shared circuit breaker,
failover, routing by domain, and a result per recipient.

In-process `Worker`s (several at once, each with its own view of the relays,
sharing the breaker through the database as a daemon's workers do) against
real SMTP servers over sockets: aiosmtpd (tests/smtp_server.py) and, for the
outage's 421 and AUTH phases, `PhasedRelay` below, a raw socket server
whose every connection is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes
from typing import Any

import pytest
import sqlalchemy as sa

from daemon_process import DaemonPool, daemon_env
from mailqd.config import Settings
from mailqd.daemon.worker import Worker
from mailqd.models import Outcome, RecipientStatus, Status
from mailqd.routes import parse_relays, parse_routes
from mailqd.store import Store
from mailqd.store.relay_tables import email_recipients
from mailqd.validation import build_job
from sidecar_client import get, scrape, wait_until
from smtp_server import SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

DEADLINE = 30.0
SENDER = "sender@example.com"


def settings_for(db_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "from_address": SENDER,
        "concurrency": 4,
        "max_attempts": 3,
        "backoff_base": 1.0,
        "backoff_max": 4.0,
        "backoff_jitter": 0.0,
        "poll_interval": 0.05,
        "lease_seconds": 30.0,
        "shutdown_timeout": 2.0,
        "smtp_timeout": 2.0,
        "relay_probe_interval": 0.3,
        "relay_probe_max": 1.0,
    }
    values.update(changes)
    return Settings().replace(**values)


def enqueue(store: Store, count: int, **fields: Any) -> list[str]:
    jobs = [
        build_job(**{"to": f"user{i}@example.com", "subject": f"s{i}", "body": f"b{i}", **fields})
        for i in range(count)
    ]
    return store.enqueue_many(jobs)


@contextlib.asynccontextmanager
async def workers(settings: Settings, store: Store, count: int) -> AsyncIterator[list[Worker]]:
    """`count` workers delivering until the block ends (then stopped gracefully)."""
    pool = [Worker(settings, store, f"w{n}") for n in range(count)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    try:
        yield pool
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)


async def until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Wait for a condition of the database or a server, which signal nothing."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(scenario: Callable[[], Any], timeout: float = 90.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


class PhasedRelay:
    """A relay on a fixed port that answers every connection with 421, or rejects AUTH.

    `mode` is "421" (the greeting says the service is unavailable) or
    "auth" (a normal session whose AUTH is always refused, 535). Every
    connection and every AUTH command is counted.
    """

    def __init__(self, port: int, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.auths = 0
        self.mails = 0
        self._lock = threading.Lock()
        relay = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with relay._lock:
                    relay.connections += 1
                if relay.mode == "421":
                    self.wfile.write(b"421 4.3.2 service shutting down\r\n")
                    return
                self.wfile.write(b"220 phased ESMTP\r\n")
                for line in self.rfile:
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        self.wfile.write(b"250-phased\r\n250 AUTH PLAIN LOGIN\r\n")
                    elif verb == b"AUTH":
                        with relay._lock:
                            relay.auths += 1
                        self.wfile.write(b"535 5.7.8 authentication failed\r\n")
                    elif verb == b"MAIL":
                        with relay._lock:
                            relay.mails += 1
                        self.wfile.write(b"503 5.5.1 log in first\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"502 5.5.2 what\r\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> PhasedRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def probes(pool: list[Worker]) -> int:
    return sum(len(w.events.seen("relay_probe")) for w in pool)


def attempt_outcomes(store: Store, job_ids: list[str]) -> set[Outcome]:
    return {a.outcome for job_id in job_ids for a in store.attempts(job_id)}


# -- an outage delays mail, never fails it ------------------------------------------------


def test_an_outage_of_the_only_relay_fails_no_mail_and_stays_within_the_probe_schedule(
    store: Store, db_url: str
) -> None:
    """Closed port, then 421 greetings, then AUTH refused: each phase lasts four probes
    (about 30 s in all), far past 3 attempts with a 1 s backoff. No job fails; when the
    relay is back every message arrives exactly once. While the breaker is open, the
    relay sees one connection per probe and at most one AUTH per probe, from 3 workers."""
    port = free_port()
    user, password = "app", "s3cret"
    settings = settings_for(
        db_url,
        smtp_url=f"smtp://{user}:{password}@127.0.0.1:{port}?starttls=off",
        relay_probe_interval=0.5,
        relay_probe_max=3.0,
    )
    job_ids = enqueue(store, 20)

    async def scenario() -> None:
        async with workers(settings, store, 3) as pool:
            await until(lambda: any(not s.up for s in store.relay_health.states()))
            first = probes(pool)
            await until(lambda: probes(pool) >= first + 4)
            for mode in ("421", "auth"):
                with PhasedRelay(port, mode) as relay:
                    start = probes(pool)
                    await until(lambda start=start: probes(pool) >= start + 4)
                    seen = probes(pool) - start
                    assert relay.connections <= seen + 1
                    assert relay.auths <= seen + 1 and relay.mails == 0
            assert {store.get(j).status for j in job_ids} <= {Status.PENDING, Status.SENDING}
            server = SmtpServer(port=port, auth=(user, password))
            await asyncio.to_thread(server.start)
            try:
                await until(lambda: all(store.get(j).status is Status.SENT for j in job_ids))
            finally:
                await asyncio.to_thread(server.stop)
        ids = [message_from_bytes(m.data)["Message-ID"] for m in server.messages]
        assert len(ids) == len(set(ids)) == 20

    run(scenario)
    for job_id in job_ids:
        assert store.get(job_id).attempts == 1  # the attempt that sent it; no other counted
    assert Outcome.FAILED not in attempt_outcomes(store, job_ids)
    assert Outcome.DEFERRED in attempt_outcomes(store, job_ids)


def test_a_dead_relay_is_not_hammered_by_three_workers(store: Store, db_url: str) -> None:
    """A relay answering 421 from the start: after the few sends under way when it went
    down, connections come at the probe schedule's pace, not one per job."""
    port = free_port()
    settings = settings_for(
        db_url, smtp_url=f"smtp://127.0.0.1:{port}", relay_probe_interval=0.3, relay_probe_max=0.6
    )
    enqueue(store, 200)

    async def scenario() -> None:
        with PhasedRelay(port, "421") as relay:
            async with workers(settings, store, 3) as pool:
                await until(lambda: all(w.relays.down and not w.in_flight for w in pool))
                connections, probed = relay.connections, probes(pool)
                # Before every worker knew, only the sends already under way or begun
                # while the shared count was below the threshold reached the relay.
                assert connections <= 2 * 3 * settings.concurrency
                await until(lambda: probes(pool) >= probed + 5)
                since = probes(pool) - probed
                assert relay.connections - connections <= since + 2  # one per probe
        assert relay.connections < 200 // 4

    run(scenario)
    counts = store.counts()
    assert counts.by_status.get(Status.FAILED, 0) == 0


def test_queue_lifetime_expires_a_job_its_relay_never_took(store: Store, db_url: str) -> None:
    settings = settings_for(db_url, smtp_url=f"smtp://127.0.0.1:{free_port()}", queue_lifetime=1)
    [job_id] = enqueue(store, 1)

    async def scenario() -> None:
        async with workers(settings, store, 1):
            await until(lambda: store.get(job_id).status is Status.FAILED)

    run(scenario)
    job = store.get(job_id)
    assert job.last_error is not None and "queue_lifetime" in job.last_error
    assert "connect failed" in job.last_error  # the last reason is kept
    assert store.attempts(job_id)[-1].outcome is Outcome.EXPIRED


# -- several relays ---------------------------------------------------------------------


def test_failover_sends_everything_through_the_second_relay(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    dead = f"smtp://127.0.0.1:{free_port()}"
    settings = settings_for(db_url, smtp_url=f"{dead} {smtp_server.url()}")
    job_ids = enqueue(store, 12)

    async def scenario() -> None:
        async with workers(settings, store, 2):
            await until(lambda: all(store.get(j).status is Status.SENT for j in job_ids))

    run(scenario)
    assert len(smtp_server.messages) == 12
    assert {store.get(j).attempts for j in job_ids} == {1}
    states = {s.relay: s for s in store.relay_health.states()}
    assert not states["relay1"].up
    assert "relay2" not in states or states["relay2"].up


def test_routes_send_each_recipient_through_its_relay_with_one_message_id(
    store: Store, db_url: str
) -> None:
    with SmtpServer() as primary, SmtpServer() as backup:
        settings = settings_for(
            db_url,
            relays=parse_relays(
                {"primary": {"url": primary.url()}, "backup": {"url": backup.url()}}
            ),
            routes=parse_routes(
                [
                    {"recipient_domains": ["*.example.org"], "relays": ["backup"]},
                    {"relays": ["primary"]},
                ]
            ),
        )
        [plain] = enqueue(store, 1, to="a@example.com")
        [routed] = enqueue(store, 1, to="b@mail.example.org")
        [split] = enqueue(store, 1, to=["c@example.com", "d@lists.example.org"])

        async def scenario() -> None:
            async with workers(settings, store, 1):
                await until(
                    lambda: all(store.get(j).status is Status.SENT for j in (plain, routed, split))
                )

        run(scenario)
        to_primary = {tuple(m.rcpt_tos): m for m in primary.messages}
        to_backup = {tuple(m.rcpt_tos): m for m in backup.messages}
    assert set(to_primary) == {("a@example.com",), ("c@example.com",)}
    assert set(to_backup) == {("b@mail.example.org",), ("d@lists.example.org",)}
    first = message_from_bytes(to_primary[("c@example.com",)].data)
    second = message_from_bytes(to_backup[("d@lists.example.org",)].data)
    assert first["Message-ID"] == second["Message-ID"] == store.get(split).message_id
    rows = recipient_rows(store, split)
    assert rows == {
        "c@example.com": ("accepted", "primary"),
        "d@lists.example.org": ("accepted", "backup"),
    }


def test_a_split_message_waits_for_its_down_route_and_never_resends_to_the_other(
    store: Store, db_url: str
) -> None:
    backup_port = free_port()
    with SmtpServer() as primary:
        settings = settings_for(
            db_url,
            relays=parse_relays(
                {
                    "primary": {"url": primary.url()},
                    "backup": {"url": f"smtp://127.0.0.1:{backup_port}"},
                }
            ),
            routes=parse_routes(
                [
                    {"recipient_domains": ["example.org"], "relays": ["backup"]},
                    {"relays": ["primary"]},
                ]
            ),
        )
        [split] = enqueue(store, 1, to=["c@example.com", "d@example.org"])

        async def scenario() -> None:
            async with workers(settings, store, 1):
                # Its results are written just before its outcome: wait for both (c taken,
                # d waiting, the job pending again between two deferrals).
                await until(
                    lambda: (
                        recipient_rows(store, split).get("d@example.org", ("",))[0] == "pending"
                        and store.get(split).status is Status.PENDING
                    )
                )
                backup = SmtpServer(port=backup_port)
                await asyncio.to_thread(backup.start)
                try:
                    await until(lambda: store.get(split).status is Status.SENT)
                    assert [m.rcpt_tos for m in backup.messages] == [("d@example.org",)]
                finally:
                    await asyncio.to_thread(backup.stop)

        run(scenario)
        assert [m.rcpt_tos for m in primary.messages] == [("c@example.com",)]  # once only
    job = store.get(split)
    assert job.attempts == 1  # the relay's outage used no attempt
    assert recipient_rows(store, split) == {
        "c@example.com": ("accepted", "primary"),
        "d@example.org": ("accepted", "backup"),
    }


def test_a_refused_recipient_never_fails_over_and_is_recorded(store: Store, db_url: str) -> None:
    with SmtpServer() as primary, SmtpServer() as backup:
        primary.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
        settings = settings_for(db_url, smtp_url=f"{primary.url()} {backup.url()}")
        [job_id] = enqueue(store, 1, to=["gone@example.com", "here@example.com"])

        async def scenario() -> None:
            async with workers(settings, store, 1):
                await until(lambda: store.get(job_id).status is Status.SENT)

        run(scenario)
        assert backup.messages == []
        assert [m.rcpt_tos for m in primary.messages] == [("here@example.com",)]
    rows = recipient_rows(store, job_id)
    assert rows["gone@example.com"] == (RecipientStatus.REFUSED.value, "relay1")
    assert rows["here@example.com"] == (RecipientStatus.ACCEPTED.value, "relay1")


def recipient_rows(store: Store, job_id: str) -> dict[str, tuple[str, str | None]]:
    r = email_recipients
    with store.engine.connect() as conn:
        rows = conn.execute(r.select().where(r.c.job_id == job_id).order_by(r.c.address)).all()
    return {row.address: (row.status, row.relay) for row in rows}


@pytest.mark.parametrize("reason_url", ["smtps", "auth"])
def test_tls_and_auth_failures_open_the_breaker_at_once(
    store: Store, db_url: str, reason_url: str
) -> None:
    """A wrong password, or TLS the relay does not speak: one failure marks it down."""
    port = free_port()
    if reason_url == "smtps":
        url, mode = f"smtps://127.0.0.1:{port}?tls_verify=false", "auth"
    else:
        url, mode = f"smtp://app:wrong@127.0.0.1:{port}?starttls=off", "auth"
    settings = settings_for(db_url, smtp_url=url, relay_probe_interval=60, relay_probe_max=60)
    enqueue(store, 30)

    async def scenario() -> None:
        with PhasedRelay(port, mode) as relay:
            async with workers(settings, store, 1):
                await until(lambda: any(not s.up for s in store.relay_health.states()))
                [state] = store.relay_health.states()
                assert state.failures <= settings.concurrency
                assert state.last_reason == ("tls" if reason_url == "smtps" else "auth")
            assert relay.auths <= settings.concurrency  # not one per job

    run(scenario)


def test_a_relays_rate_limit_holds_for_all_workers(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    """`rate_limit = 5` on the relay: 15 messages from 2 workers take at least 2 s (the
    first 5 at once, then 5 a second), whatever the workers' own speed."""
    settings = settings_for(
        db_url, relays=parse_relays({"limited": {"url": smtp_server.url(), "rate_limit": 5}})
    )
    job_ids = enqueue(store, 15)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with workers(settings, store, 2):
            await until(lambda: all(store.get(j).status is Status.SENT for j in job_ids))
            return loop.time() - started

    elapsed = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert elapsed >= 1.6
    assert len(smtp_server.messages) == 15
    with store.engine.connect() as conn:  # the shared bucket, not a per-process pace
        names = conn.execute(sa.text("SELECT name FROM mailqd_rate_limit")).scalars().all()
    assert "relay:limited" in names


# -- a real daemon: failover seen in /metrics and /healthz ------------------------------


def test_a_daemon_fails_over_and_its_sidecar_shows_which_relay_is_down(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    dead = f"smtp://127.0.0.1:{free_port()}"
    env = daemon_env(
        {
            "MAILQD_DATABASE_URL": db_url,
            "MAILQD_SMTP_URL": f"{dead} {smtp_server.url()}",
            "MAILQD_FROM": SENDER,
            "MAILQD_WORKERS": "2",
            "MAILQD_POLL_INTERVAL": "0.2",
        }
    )
    job_ids = enqueue(store, 30)
    daemon = daemons.mailqd(env)
    daemon.wait_for(
        lambda: all(store.get(j).status is Status.SENT for j in job_ids), "every job sent"
    )
    sidecar = daemon.sidecar_url()
    samples = wait_until(
        lambda: ((s := scrape(sidecar)).get('mailqd_relay_up{relay="relay1"}') == 0 and s) or None,
        "relay1 shown down",
    )
    assert samples['mailqd_relay_up{relay="relay2"}'] == 1
    assert samples['mailqd_relay_failures_total{reason="refused",relay="relay1"}'] >= 1
    status, body = get(sidecar + "/healthz")
    assert status == 200 and "degraded" in body and "relay1" in body
    assert len(smtp_server.messages) == 30
    assert {store.get(j).attempts for j in job_ids} == {1}
