"""The delivery worker, in-process, against real databases and a real SMTP server over a socket.

Each test runs a `Worker` inside `asyncio.run`, with settings pointing at the
aiosmtpd test server, and waits on signals with deadlines: the worker's own
counts (`Worker.wait_until`) and the server's received messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from children import exit_code
from mailqd.compose import OutgoingMessage
from mailqd.config import Settings
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.retry import BackoffPolicy
from mailqd.daemon.worker import BatchResult, Worker
from mailqd.daemon.worker_process import run_worker
from mailqd.errors import ConfigError
from mailqd.logging import configure_logging, mask_address, mask_addresses_in
from mailqd.models import Outcome, Status
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from mailqd.store.ratelimit import RateLimits
from mailqd.transport import SendResult, Transport, transport_from_url
from mailqd.validation import build_job
from pg import libpq_url
from smtp_server import HANG, SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

DEADLINE = 15.0
SENDER = "sender@example.com"


def make_settings(db_url: str, smtp_url: str, **changes: Any) -> Settings:
    """Fast settings for tests: tiny backoff and poll interval, short timeouts."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "smtp_url": smtp_url,
        "from_address": SENDER,
        "concurrency": 4,
        "backoff_base": 0.05,
        "backoff_max": 0.2,
        "backoff_jitter": 0.0,
        "poll_interval": 0.05,
        "lease_seconds": 30.0,
        "shutdown_timeout": 2.0,
        "smtp_timeout": 2.0,
    }
    values.update(changes)
    return Settings().replace(**values)


def smtp_factory(settings: Settings) -> Callable[[], Transport]:
    return lambda: transport_from_url(settings.smtp_url, timeout=settings.smtp_timeout)


def enqueue(store: Store, count: int = 1, **fields: Any) -> list[str]:
    jobs = []
    for i in range(count):
        values: dict[str, Any] = {
            "to": f"user{i}@example.com",
            "subject": f"subject {i}",
            "body": f"body {i}",
        }
        values.update(fields)
        jobs.append(build_job(**values))
    return store.enqueue_many(jobs)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """Run the worker in the background; stop it gracefully when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


async def messages(server: SmtpServer, count: int) -> list[Any]:
    """The server's messages once it has `count` (its wait blocks, so not on the loop)."""
    return await asyncio.to_thread(server.wait_for_messages, count, DEADLINE)


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    """A store on a fresh PostgreSQL database, for what only PostgreSQL has (LISTEN)."""
    store = Store.from_url(pg_url)
    yield store
    store.close()


async def eventually(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Wait for a condition nothing signals (the server's reply script being used up)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _bounded(work: Awaitable[None], timeout: float) -> None:
    await asyncio.wait_for(work, timeout)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(_bounded(scenario(), 45))


# -- the backoff policy and the log masking ------------------------------------


def test_backoff_defaults_are_60_120_240_and_capped() -> None:
    policy = BackoffPolicy.from_settings(Settings().replace(backoff_jitter=0.0))
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [60.0, 120.0, 240.0, 480.0]
    capped = BackoffPolicy.from_settings(
        Settings().replace(backoff_base=1, backoff_factor=3, backoff_max=10, backoff_jitter=0)
    )
    assert [capped.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 10.0]


def test_backoff_jitter_adds_up_to_its_fraction() -> None:
    policy = BackoffPolicy.from_settings(Settings().replace(backoff_jitter=0.1), random.Random(7))
    delays = [policy.delay(2) for _ in range(200)]
    assert all(120.0 <= d <= 132.0 for d in delays)
    assert len(set(delays)) > 100


def test_addresses_are_masked_in_logs() -> None:
    assert mask_address("alice@example.com") == "a***@example.com"
    assert mask_address("Alice Smith <alice@example.com>") == "a***@example.com"
    assert mask_address("not-an-address") == "***"
    text = "550 5.1.1 <bob@example.org>: Recipient address rejected"
    assert mask_addresses_in(text) == "550 5.1.1 <b***@example.org>: Recipient address rejected"


def test_attempt_log_is_json_with_masked_addresses_and_no_content(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), log_format="auto")
    [job_id] = enqueue(store, to="alice@example.com", subject="secret subject", body="secret")
    stream = io.StringIO()  # not a TTY: JSON lines
    configure_logging(settings, stream=stream)  # undone by the isolated_logging fixture

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            assert (await worker.run_once()).sent == 1

    run(scenario)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    [attempt] = [e for e in events if e["event"] == "delivery attempt"]
    assert attempt["job_id"] == job_id
    assert (attempt["attempt"], attempt["outcome"], attempt["smtp_code"]) == (1, "sent", 250)
    assert attempt["to"] == ["a***@example.com"] and attempt["worker"] == "w1"
    assert {"duration_ms", "timestamp", "level"} <= set(attempt)
    assert "secret" not in stream.getvalue() and "alice@" not in stream.getvalue()


# -- delivery ------------------------------------------------------------------


def test_delivers_every_job_once_with_its_headers_and_body(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    ids = enqueue(store, 12, headers={"X-Campaign": "spring"})

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent >= 12, DEADLINE)
            got = await messages(smtp_server, 12)
        assert len(got) == 12  # nothing sent twice
        assert worker.totals == BatchResult(claimed=12, sent=12)
        by_subject = {m.parsed()["Subject"]: m for m in got}
        assert set(by_subject) == {f"subject {i}" for i in range(12)}
        first = by_subject["subject 0"]
        parsed = first.parsed()
        assert first.mail_from == SENDER
        assert first.rcpt_tos == ("user0@example.com",)
        assert parsed["To"] == "user0@example.com"
        assert parsed["X-Campaign"] == "spring"
        assert parsed.get_content().strip() == "body 0"
        job = store.get(ids[0])
        assert (job.status, job.attempts) == (Status.SENT, 1)
        assert job.message_id == parsed["Message-ID"] == f"<{ids[0]}@example.com>"
        assert len({m.connection for m in got}) <= settings.concurrency  # connections reused

    run(scenario)


def test_transient_reply_is_retried_then_sent_with_the_same_message_id(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    smtp_server.mail_replies.append("451 4.3.0 try again later")
    [job_id] = enqueue(store)

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)
        assert (worker.totals.retried, worker.totals.sent) == (1, 1)

    run(scenario)
    job = store.get(job_id)
    assert (job.status, job.attempts) == (Status.SENT, 2)
    attempts = store.attempts(job_id)
    assert [a.outcome for a in attempts] == [Outcome.RETRY, Outcome.SENT]
    assert attempts[0].smtp_code == 451
    assert [m.parsed()["Message-ID"] for m in smtp_server.messages] == [job.message_id]


def test_permanent_reply_fails_after_exactly_one_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    [job_id] = enqueue(store, to="nobody@example.com")

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.failed >= 1, DEADLINE)

    run(scenario)
    job = store.get(job_id)
    assert (job.status, job.attempts) == (Status.FAILED, 1)
    assert job.last_error is not None and "550" in job.last_error
    [attempt] = store.attempts(job_id)
    assert (attempt.outcome, attempt.smtp_code, attempt.worker) == (Outcome.FAILED, 550, "w1")
    assert smtp_server.messages == []


def test_partial_refusal_is_sent_and_names_the_refused_recipient(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    smtp_server.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    [job_id] = enqueue(store, to="ok@example.com, gone@example.com")

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)

    run(scenario)
    [attempt] = store.attempts(job_id)
    assert attempt.outcome is Outcome.SENT
    assert attempt.smtp_text is not None and "gone@example.com: 550" in attempt.smtp_text
    assert smtp_server.messages[0].rcpt_tos == ("ok@example.com",)


def test_smtp_server_down_defers_without_using_attempts_and_delivers_when_it_returns(
    store: Store, db_url: str
) -> None:
    """A relay outage is not the message's fault (#16): deferred, attempts untouched."""
    port = _free_port()
    settings = make_settings(
        db_url,
        f"smtp://127.0.0.1:{port}",
        max_attempts=1,
        relay_probe_interval=0.2,
        relay_probe_max=0.4,
    )
    [job_id] = enqueue(store)

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.relay_deferred >= 2, DEADLINE)
            server = SmtpServer(port=port)
            await asyncio.to_thread(server.start)
            try:
                await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)
                assert len(await messages(server, 1)) == 1
            finally:
                await asyncio.to_thread(server.stop)

    run(scenario)
    job = store.get(job_id)
    assert job.status is Status.SENT and job.attempts == 1  # only the attempt that sent it
    outcomes = [a.outcome for a in store.attempts(job_id)]
    assert outcomes[0] is Outcome.DEFERRED and outcomes[-1] is Outcome.SENT
    assert set(outcomes[:-1]) == {Outcome.DEFERRED}


def test_transient_failures_give_up_at_max_attempts(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    """The message's own temporary refusals (4xx to MAIL) use its attempts, then fail it."""
    settings = make_settings(db_url, smtp_server.url())
    smtp_server.mail_replies.extend(["451 4.3.0 try later"] * 2)
    [job_id] = enqueue(store, max_attempts=2)

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.failed >= 1, DEADLINE)

    run(scenario)
    job = store.get(job_id)
    assert (job.status, job.attempts) == (Status.FAILED, 2)
    assert job.last_error is not None and job.last_error.startswith("gave up after 2 attempts")
    assert [a.outcome for a in store.attempts(job_id)] == [Outcome.RETRY, Outcome.FAILED]


def test_expired_job_fails_as_expired_and_is_never_sent(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    [job_id] = enqueue(store, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    [good] = enqueue(store)

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            result = await worker.run_once()
        assert result == BatchResult(claimed=2, sent=1, expired=1)

    run(scenario)
    job = store.get(job_id)
    assert job.status is Status.FAILED
    assert job.last_error is not None and job.last_error.startswith("expired at ")
    assert [a.outcome for a in store.attempts(job_id)] == [Outcome.EXPIRED]
    assert [m.parsed()["Message-ID"] for m in smtp_server.messages] == [store.get(good).message_id]


def test_job_out_of_attempts_after_a_rescue_fails_without_sending(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    [job_id] = enqueue(store, max_attempts=1)
    for _ in range(2):  # the first loss is free; the second uses the one attempt
        store.claim("killed-worker", 1, lease_seconds=30)
        store.rescue(owner="killed-worker")

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            assert await worker.run_once() == BatchResult(claimed=1, failed=1)

    run(scenario)
    job = store.get(job_id)
    assert job.status is Status.FAILED
    assert job.last_error is not None
    assert job.last_error.startswith("gave up after 1 attempts: worker died: ")
    assert smtp_server.messages == []


def test_garbage_row_fails_alone_and_the_jobs_behind_it_are_delivered(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    bad_json = "'not json'" if store.dialect == "sqlite" else "'\"a string\"'::jsonb"
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (id, recipient_to, subject, body, headers, priority) "
                f"VALUES ('bad-headers', 'a@example.com', 'Hi', 'Hello', {bad_json}, 9)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (id, recipient_to, subject, body, priority) "
                "VALUES ('bad-address', 'not an address', 'Hi', 'Hello', 9)"
            )
        )
    good = enqueue(store, 3)

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent + t.failed >= 5, DEADLINE)
        assert (worker.totals.sent, worker.totals.failed) == (3, 2)

    run(scenario)
    bad = store.get("bad-headers")
    assert bad.status is Status.FAILED and bad.attempts == 1
    assert bad.last_error is not None
    assert bad.last_error.startswith("cannot compose message: headers: must be")
    bad_address = store.get("bad-address")
    assert bad_address.status is Status.FAILED
    assert bad_address.last_error is not None and "recipient_to" in bad_address.last_error
    assert all(store.get(job_id).status is Status.SENT for job_id in good)
    assert len(smtp_server.messages) == 3


# -- wake-up, stop, leases ---------------------------------------------------------


def test_notify_wakes_an_idle_worker_long_before_its_poll(
    pg_store: Store, pg_url: str, smtp_server: SmtpServer
) -> None:
    store = pg_store
    settings = make_settings(pg_url, smtp_server.url(), poll_interval=30.0)
    enqueue(store)

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            # Once the first job is sent and LISTEN is up, the worker idles for 30 s.
            await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)
            await worker.wait_listening(DEADLINE)
            started = time.monotonic()
            await asyncio.to_thread(_plain_insert, store)
            await worker.wait_until(lambda t: t.sent >= 2, 3.0)
            assert time.monotonic() - started < 3.0

    run(scenario)


def test_graceful_stop_releases_jobs_whose_send_did_not_finish(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), shutdown_timeout=0.3, smtp_timeout=20)
    smtp_server.data_replies.extend([HANG, HANG, HANG])
    ids = enqueue(store, 3)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", smtp_factory(settings))
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: not smtp_server.data_replies)  # all three are in DATA
        assert store.counts().sending == 3
        stop.set()
        await asyncio.wait_for(task, DEADLINE)
        assert worker.totals.recorded == 0

    run(scenario)
    counts = store.counts()
    assert (counts.sending, counts.pending) == (0, 3)
    for job_id in ids:  # cut off after DATA: the server may have them (tests/test_giveback.py)
        job = store.get(job_id)
        assert (job.attempts, job.lease_owner) == (1, None)
        assert [a.outcome for a in store.attempts(job_id)] == [Outcome.AMBIGUOUS]


def test_graceful_stop_lets_a_send_in_flight_finish(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    gate = asyncio.Event()
    [job_id] = enqueue(store)

    async def scenario() -> None:
        factory = gated(smtp_factory(settings), gate)
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", factory)
        task = asyncio.create_task(worker.run(stop))
        await factory.waiting.wait()
        stop.set()
        # The send is released only once the worker is stopping with it in flight.
        await worker.events.wait_for("waiting_for_sends", timeout=DEADLINE)
        gate.set()
        await asyncio.wait_for(task, DEADLINE)
        assert worker.totals.sent == 1

    run(scenario)
    assert store.get(job_id).status is Status.SENT


def test_run_worker_in_a_forked_process_beats_ignores_sigint_and_stops_on_sigterm(
    sqlite_url: str, smtp_server: SmtpServer
) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    store = Store.from_url(sqlite_url)
    settings = make_settings(sqlite_url, smtp_server.url())
    enqueue(store)
    heartbeat = Heartbeat()
    pid = os.fork()
    if pid == 0:  # the child: what the supervisor will run
        code = 1
        try:
            code = run_worker(settings, WorkerIdentity(index=0, owner="forked-w0"), heartbeat)
        finally:
            os._exit(code)
    try:
        smtp_server.wait_for_messages(1)
        assert heartbeat.seconds_since_beat() < 2.0
        os.kill(pid, signal.SIGINT)  # the supervisor's business; the worker carries on
        enqueue(store)
        smtp_server.wait_for_messages(2)
        os.kill(pid, signal.SIGTERM)
        assert exit_code(pid, DEADLINE) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        store.close()
    assert store.counts().by_status == {Status.SENT: 2}


def test_run_worker_refuses_to_start_with_a_bad_smtp_url(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, "smtp://")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    try:
        with pytest.raises(ConfigError, match="smtp_url"):
            run_worker(settings, WorkerIdentity(index=0, owner="w0"), Heartbeat())
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# -- database outages -------------------------------------------------------------


def test_outcome_of_a_send_during_a_database_outage_is_kept_and_recorded(
    pg_store: Store, pg_url: str, pg_admin_url: str, smtp_server: SmtpServer
) -> None:
    store = pg_store
    settings = make_settings(pg_url, smtp_server.url())
    gate = asyncio.Event()
    [job_id] = enqueue(store)
    database = sa.make_url(pg_url).database
    assert database is not None

    async def scenario() -> None:
        factory = gated(smtp_factory(settings), gate)
        async with running(Worker(settings, store, "w1", factory)) as worker:
            await factory.waiting.wait()
            await asyncio.to_thread(_set_database_down, pg_admin_url, database, True)
            gate.set()
            await messages(smtp_server, 1)  # sent while the database is down
            # The completer's write fails; the outcome is kept, not dropped.
            await eventually(lambda: worker.database_unavailable and worker.unrecorded == 1)
            assert worker.totals.sent == 0
            await asyncio.to_thread(_set_database_down, pg_admin_url, database, False)
            await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)
            await worker.wait_listening(DEADLINE)  # the LISTEN connection came back too
            await asyncio.to_thread(_plain_insert, store)
            await worker.wait_until(lambda t: t.sent >= 2, DEADLINE)

    run(scenario)
    assert store.get(job_id).status is Status.SENT
    assert len(smtp_server.messages) == 2


# -- the rate limiter ---------------------------------------------------------------


def test_rate_limiter_never_grants_more_than_burst_plus_rate_times_elapsed(
    store: Store,
) -> None:
    limits = RateLimits(store)
    rate, burst = 20.0, 20.0
    start = 1_000_000.0
    rng = random.Random(3)
    now, granted = start, 0
    for _ in range(200):
        now += rng.uniform(0.0, 0.03)
        grant = limits.take("test", rng.randint(1, 10), rate, burst, now=now)
        granted += grant.granted
        if not grant.granted:
            assert grant.wait_seconds > 0
    elapsed = now - start
    assert granted <= burst + rate * elapsed
    assert granted >= rate * elapsed - 1  # and it does grant what the rate allows


def test_rate_limiter_grants_what_is_there_and_says_how_long_to_wait(store: Store) -> None:
    limits = RateLimits(store)
    assert limits.take("b", 6, rate=10, burst=10, now=100.0).granted == 6
    assert limits.take("b", 6, rate=10, burst=10, now=100.0).granted == 4
    empty = limits.take("b", 1, rate=10, burst=10, now=100.0)
    assert empty.granted == 0
    assert empty.wait_seconds == pytest.approx(0.1)
    assert limits.take("b", 6, rate=10, burst=10, now=100.35).granted == 3
    limits.give_back("b", 2, burst=10)
    assert limits.tokens("b") == pytest.approx(2.5)
    assert limits.take("b", 50, rate=10, burst=10, now=200.0).granted == 10  # refill caps at burst


def test_rate_limiter_is_atomic_under_concurrent_takers(store: Store) -> None:
    limits = RateLimits(store)
    limits.take("c", 1, rate=5, burst=10, now=500.0)  # create the bucket: 9 tokens left
    results: list[int] = []
    barrier = threading.Barrier(8)

    def taker() -> None:
        barrier.wait()
        results.append(limits.take("c", 3, rate=5, burst=10, now=500.0).granted)

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 9


def test_worker_respects_the_rate_limit(store: Store, db_url: str, smtp_server: SmtpServer) -> None:
    settings = make_settings(db_url, smtp_server.url(), rate_limit=10.0)
    enqueue(store, 15)

    async def scenario() -> None:
        started = time.monotonic()
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent >= 15, DEADLINE)
        # A full bucket holds 10; the other 5 need half a second of refill.
        assert time.monotonic() - started >= 0.45
        assert worker.totals.claimed == 15

    run(scenario)
    assert len(smtp_server.messages) == 15


# -- helpers ------------------------------------------------------------------------


class gated:
    """A transport factory whose transports wait for `gate` before sending.

    The transport underneath is the real one; the gate only holds a send in
    flight at a moment the test chooses.
    """

    def __init__(self, factory: Callable[[], Transport], gate: asyncio.Event) -> None:
        self._factory = factory
        self._gate = gate
        self.waiting = asyncio.Event()

    def __call__(self) -> Transport:
        return _GatedTransport(self._factory(), self._gate, self.waiting)


class _GatedTransport:
    def __init__(self, inner: Transport, gate: asyncio.Event, waiting: asyncio.Event) -> None:
        self._inner = inner
        self._gate = gate
        self._waiting = waiting

    async def send(self, message: OutgoingMessage) -> SendResult:
        self._waiting.set()
        await self._gate.wait()
        return await self._inner.send(message)

    async def close(self) -> None:
        await self._inner.close()


def _free_port() -> int:
    """A port nothing listens on (until a test starts a server there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _plain_insert(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (recipient_to, subject, body) "
                "VALUES ('a@example.com', 'Hi', 'Hello')"
            )
        )


def _set_database_down(admin_url: str, database: str, down: bool) -> None:
    """Refuse new connections to `database` and cut the open ones, as a restart would."""
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database),
                sql.SQL("false" if down else "true"),
            )
        )
        if down:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
