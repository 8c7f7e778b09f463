"""Give-backs are honest (issue 16, item 8): what happened, when, and whether it used an attempt.

A job handed back because its worker stopped, was killed, or lost its lease
gets one attempt-history row saying which, stamped with the time of the
give-back, and uses an attempt only if its content may be with the server
(docs/reliability.md has the table). On PostgreSQL and SQLite, with the
real worker against the aiosmtpd test server, the real supervisor for a
killed worker, and the rescuer on an injected clock for an expired lease.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ctl_process import invoke, ok_json
from daemon_process import DaemonPool
from mailqd import Client
from mailqd.compose import OutgoingMessage
from mailqd.daemon.giveback import SupervisorStores, death_of
from mailqd.daemon.ports import FixedClock
from mailqd.daemon.rescuer import Rescuer, RescuerConfig
from mailqd.daemon.worker import BatchResult, Worker
from mailqd.models import Attempt, Outcome, Status
from mailqd.store import Store
from mailqd.store.templates import TemplateStore
from mailqd.transport import SendResult, Transport
from smtp_server import HANG, SmtpServer, smtp_server_fixture
from test_supervisor import base_env, stop_and_check_exit, wait_supervisor_event
from test_worker import DEADLINE, enqueue, eventually, make_settings, run, smtp_factory

__all__ = ["smtp_server_fixture"]

CLOCK_SLACK = timedelta(milliseconds=5)
"""SQLite keeps milliseconds: a time it wrote may read up to 1 ms before the true one."""


def only_attempt(store: Store, job_id: str) -> Attempt:
    [attempt] = store.attempts(job_id)
    return attempt


def assert_between(when: datetime, start: datetime, end: datetime) -> None:
    assert start - CLOCK_SLACK <= when <= end + CLOCK_SLACK, (start, when, end)


async def stop_worker(worker: Worker, task: asyncio.Task[None], stop: asyncio.Event) -> datetime:
    """Stop the worker gracefully; returns when the stop began."""
    stopped_at = datetime.now(UTC)
    stop.set()
    await asyncio.wait_for(task, DEADLINE)
    return stopped_at


# -- a graceful stop ---------------------------------------------------------------


def test_a_stop_before_the_send_began_records_shutdown_and_uses_no_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.templates.put("welcome", "Welcome", "Hello {{ name }}", None)
    [job_id] = enqueue(store, template_id="welcome", variables={"name": "Ann"})
    held = HeldTemplateReads(store.templates)
    monkeypatch.setattr(store, "templates", held)
    settings = make_settings(db_url, smtp_server.url(), shutdown_timeout=0.3)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", smtp_factory(settings))
        task = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(held.reading.wait, DEADLINE)  # composing: reading its template
        try:
            stopped_at = await stop_worker(worker, task, stop)
        finally:
            held.gate.set()
        attempt = only_attempt(store, job_id)
        assert_between(attempt.started_at, stopped_at, datetime.now(UTC))

    run(scenario)
    job = store.get(job_id)
    assert (job.status, job.attempts, job.last_error) == (Status.PENDING, 0, None)
    attempt = only_attempt(store, job_id)
    assert (attempt.attempt, attempt.outcome, attempt.worker) == (1, Outcome.RELEASED, "w1")
    assert attempt.smtp_text == "shutdown: given back before its send started"
    assert smtp_server.messages == []


def test_a_send_cut_off_after_data_at_shutdown_uses_one_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), shutdown_timeout=0.3, smtp_timeout=20)
    smtp_server.data_replies.append(HANG)  # the content arrives; its reply never comes
    [job_id] = enqueue(store)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", smtp_factory(settings))
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: not smtp_server.data_replies)
        stopped_at = await stop_worker(worker, task, stop)
        assert_between(only_attempt(store, job_id).started_at, stopped_at, datetime.now(UTC))
        async with Worker(settings, store, "w2", smtp_factory(settings)) as again:
            assert await again.run_once() == BatchResult(claimed=1, sent=1)

    run(scenario)
    cut_off, sent = store.attempts(job_id)
    assert (cut_off.attempt, cut_off.outcome) == (1, Outcome.AMBIGUOUS)
    assert cut_off.smtp_text is not None
    assert cut_off.smtp_text.startswith("shutdown: send cancelled as the worker stopped, ")
    assert (sent.attempt, sent.outcome) == (2, Outcome.SENT)
    assert store.get(job_id).attempts == 2


def test_a_send_cut_off_before_data_uses_no_attempt_when_its_transport_says_so(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), shutdown_timeout=0.3, smtp_timeout=20)
    smtp_server.mail_replies.append(HANG)  # MAIL FROM is never answered: no DATA
    [job_id] = enqueue(store)
    real = smtp_factory(settings)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", lambda: SaysNoContentSent(real()))
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: not smtp_server.mail_replies)
        await stop_worker(worker, task, stop)

    run(scenario)
    job = store.get(job_id)
    assert (job.status, job.attempts) == (Status.PENDING, 0)
    attempt = only_attempt(store, job_id)
    assert (attempt.attempt, attempt.outcome) == (1, Outcome.RELEASED)
    assert attempt.smtp_text == "shutdown: send cancelled as the worker stopped, before DATA"


def test_an_smtp_send_cut_off_before_data_uses_no_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), shutdown_timeout=0.3, smtp_timeout=20)
    smtp_server.mail_replies.append(HANG)
    [job_id] = enqueue(store)

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = Worker(settings, store, "w1", smtp_factory(settings))
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: not smtp_server.mail_replies)
        await stop_worker(worker, task, stop)

    run(scenario)
    assert store.get(job_id).attempts == 0
    assert only_attempt(store, job_id).outcome is Outcome.RELEASED


# -- a killed worker, an expired lease ---------------------------------------------


def test_a_killed_workers_job_records_worker_killed_at_the_give_back_time(
    daemons: DaemonPool, db_url: str, store: Store
) -> None:
    daemon = daemons.mailqd(base_env(db_url, MAILQD_WORKERS="1"))
    [victim] = daemon.wait_for_workers(1)
    [started] = wait_supervisor_event(daemon, "worker started", pid=victim)
    owner = str(started["owner"])
    # Held by the victim for an hour, scheduled ahead so the replacement does not send it
    # before it is read here: only the supervisor's give-back can bring it back now.
    later = datetime.now(UTC) + timedelta(hours=1)
    with Client(db_url) as client:
        job_id = client.enqueue("a@example.com", "held", "x", send_after=later)
    [held] = store.claim(owner, limit=1, lease_seconds=3600, now=later + timedelta(minutes=1))
    assert held.id == job_id

    killed_at = datetime.now(UTC)
    daemon.signal_worker(victim, signal.SIGKILL)
    wait_supervisor_event(daemon, "jobs given back", owner=owner, count=1)
    given_back_by = datetime.now(UTC)
    stop_and_check_exit(daemon)

    job = store.get(job_id)
    reason = f"worker killed: the worker {owner} was killed by SIGKILL while holding it"
    assert (job.status, job.attempts, job.last_error) == (Status.PENDING, 0, reason)
    attempt = only_attempt(store, job_id)
    assert (attempt.attempt, attempt.outcome, attempt.smtp_text) == (1, Outcome.LOST, reason)
    assert attempt.worker == owner
    assert_between(attempt.started_at, killed_at, given_back_by)


def test_an_expired_lease_records_lease_expired_at_the_rescue_time(store: Store) -> None:
    [job_id] = enqueue(store)
    claimed_at = datetime.now(UTC) + timedelta(seconds=1)
    store.claim("gone", 1, lease_seconds=30, now=claimed_at)
    rescued_at = claimed_at + timedelta(seconds=45)
    rescuer = Rescuer(store, RescuerConfig(1.0, 60.0), clock=FixedClock(rescued_at))

    assert asyncio.run(rescuer.run_once()).rescued == [job_id]
    job = store.get(job_id)
    reason = "lease expired: the worker gone stopped renewing it during delivery"
    assert (job.status, job.attempts, job.last_error) == (Status.PENDING, 0, reason)
    attempt = only_attempt(store, job_id)
    assert (attempt.attempt, attempt.outcome, attempt.smtp_text) == (1, Outcome.LOST, reason)
    assert abs(attempt.started_at - rescued_at) <= CLOCK_SLACK


def test_a_job_that_kills_every_worker_that_tries_it_still_ends_failed(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    """An OOM in compose, say: each death but the first uses an attempt, so it cannot loop."""
    [job_id] = enqueue(store, max_attempts=2)
    supervisor = SupervisorStores()
    try:
        for death in range(3):
            owner = f"host:nonce:{death}"
            assert [job.id for job in store.claim(owner, 1, lease_seconds=30)] == [job_id]
            assert supervisor.give_back(db_url, owner, -signal.SIGKILL) == 1
    finally:
        supervisor.close()
    assert store.get(job_id).attempts == 2
    settings = make_settings(db_url, smtp_server.url())

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            assert await worker.run_once() == BatchResult(claimed=1, failed=1)

    run(scenario)
    job = store.get(job_id)
    assert job.status is Status.FAILED
    assert job.last_error == (
        "gave up after 2 attempts: worker killed: the worker host:nonce:2 was killed by "
        "SIGKILL while holding it"
    )
    assert [a.attempt for a in store.attempts(job_id)] == [1, 1, 2, 3]
    assert smtp_server.messages == []


def test_a_dead_worker_is_described_by_how_it_ended() -> None:
    assert death_of("h:n:1", -signal.SIGKILL) == (
        "worker killed: the worker h:n:1 was killed by SIGKILL while holding it"
    )
    assert death_of("h:n:1", -signal.SIGKILL, killed=True) == (
        "worker killed: the worker h:n:1 was killed by SIGKILL from the supervisor while holding it"
    )
    assert death_of("h:n:1", -99) == (
        "worker killed: the worker h:n:1 was killed by signal 99 while holding it"
    )
    assert (
        death_of("h:n:1", 1) == "worker died: the worker h:n:1 exited with code 1 while holding it"
    )
    assert death_of("h:n:1", None) == "worker died: the worker h:n:1 ended while holding it"


# -- what the operator sees ----------------------------------------------------------


def test_released_rows_are_shown_and_are_not_counted_as_delivery_attempts(
    store: Store, db_url: str
) -> None:
    [job_id] = enqueue(store)
    store.claim("w1", 1, lease_seconds=30)
    reason = "shutdown: given back before its send started"
    assert store.release([job_id], "w1", reasons={job_id: reason}) == 1

    stats = store.queue_stats()
    assert (stats.last_5m.attempts, stats.last_1h.attempts) == (0, 0)
    assert store.failed_attempts_count() == 0
    [shown] = ok_json(invoke("show", job_id, "--json", db=db_url))["attempts"]
    assert (shown["outcome"], shown["smtp_text"], shown["worker"]) == ("released", reason, "w1")
    table = invoke("show", job_id, db=db_url).stdout
    assert "released" in table and "shutdown: given back" in table


# -- stand-ins ----------------------------------------------------------------------


class HeldTemplateReads:
    """The store's templates, whose reads wait for `gate`: a worker held while composing."""

    def __init__(self, templates: TemplateStore) -> None:
        self._templates = templates
        self.reading = threading.Event()
        self.gate = threading.Event()

    def get(self, template_id: str) -> Any:
        self.reading.set()
        self.gate.wait(DEADLINE)
        return self._templates.get(template_id)


class SaysNoContentSent:
    """The real SMTP transport, saying `content_sent` is False: the test's server never got DATA.

    What `SmtpTransport` itself is to say (`mailqd.daemon.cutoff`); here the
    test knows it, having scripted the server to hang at MAIL FROM.
    """

    content_sent = False

    def __init__(self, inner: Transport) -> None:
        self._inner = inner

    async def send(self, message: OutgoingMessage) -> SendResult:
        return await self._inner.send(message)

    async def close(self) -> None:
        await self._inner.close()
