"""The worker's parts, one at a time, on the in-memory fake store: no database, no SMTP, no sleeps.

Each test runs in milliseconds. What the fake does is what PostgreSQL and
SQLite do (tests/test_store_contract.py), so these say something true of
the worker on a real database; tests/test_worker.py runs the assembly on one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fake_store import FakeStore
from mailqd.compose import OutgoingMessage
from mailqd.config import Settings
from mailqd.daemon.completer import Completer
from mailqd.daemon.events import Events
from mailqd.daemon.lease_keeper import LeaseKeeper, LeaseKeeperConfig
from mailqd.daemon.outage import DatabaseOutage
from mailqd.daemon.periodic import Periodic, Schedule
from mailqd.daemon.ports import FixedClock
from mailqd.daemon.producer import Producer, ProducerConfig
from mailqd.daemon.rescuer import Rescuer, RescuerConfig, RescueResult
from mailqd.daemon.screening_purger import ScreeningPurgerConfig
from mailqd.daemon.slots import Slots
from mailqd.daemon.worker import Worker
from mailqd.errors import DatabaseUnavailableError
from mailqd.models import Job, Outcome, Status
from mailqd.store import Completion
from mailqd.transport import SendResult
from mailqd.validation import build_job

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
TIMEOUT = 5.0


class NullTransport:
    """A transport that accepts every message at once."""

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []

    async def send(self, message: OutgoingMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(250, "ok")

    async def close(self) -> None:
        pass


def fake_with_jobs(count: int, at: datetime = T0) -> tuple[FakeStore, list[str]]:
    fake = FakeStore(clock=lambda: at)
    jobs = [build_job(to=f"u{i}@example.com", subject="s", body="b") for i in range(count)]
    return fake, fake.enqueue_many(jobs)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))


def producer_for(
    fake: FakeStore, slots: Slots, started: list[Job], events: Events | None = None
) -> Producer:
    def start(jobs: Sequence[Job]) -> None:
        for job in jobs:
            slots.take()
            started.append(job)

    config = ProducerConfig("w1", LEASE, poll_interval=60.0, claim_batch=2, linger=0.01)
    return Producer(fake, config, slots, start, clock=FixedClock(T0), events=events)


# -- producer and slots ------------------------------------------------------------------


def test_producer_never_claims_more_than_the_free_slots() -> None:
    fake, _ = fake_with_jobs(10)
    slots = Slots(4, NullTransport)
    started: list[Job] = []
    producer = producer_for(fake, slots, started)
    held = [slots.take() for _ in range(3)]

    async def scenario() -> None:
        claim = await producer.run_once()
        assert claim.claimed == 1 and slots.free == 0
        assert (await producer.claim(10, asyncio.Event()))[0].claimed == 0  # none free
        for transport in held:
            slots.put_back(transport, reusable=True)
        assert (await producer.run_once(limit=2)).claimed == 2

    run(scenario)
    assert len(started) == 3 == len(producer.held)
    assert [j.status for j in fake.jobs.values()].count(Status.SENDING) == 3


def test_while_busy_the_producer_claims_at_half_the_slots_or_after_the_linger() -> None:
    fake, _ = fake_with_jobs(20)
    slots = Slots(4, NullTransport)
    started: list[Job] = []
    events = Events()
    producer = producer_for(fake, slots, started, events)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(producer.run(stop))
        await events.wait_for("claimed", lambda e: e.data["count"] == 4)
        slots.put_back(NullTransport(), reusable=True)
        slots.put_back(NullTransport(), reusable=True)  # half free at once: claim 2
        await events.wait_for("claimed", lambda e: e.data["count"] == 2)
        slots.put_back(NullTransport(), reusable=True)  # one free: claimed after the linger
        await events.wait_for("claimed", lambda e: e.data["count"] == 1)
        stop.set()
        await task

    run(scenario)
    assert [e.data["count"] for e in events.seen("claimed")] == [4, 2, 1]


def test_slots_refuse_a_size_below_one_and_a_take_beyond_their_size() -> None:
    with pytest.raises(ValueError, match="at least one delivery slot"):
        Slots(0, NullTransport)
    slots = Slots(1, NullTransport)
    slots.take()
    with pytest.raises(RuntimeError, match="no free delivery slot"):
        slots.take()


@pytest.mark.parametrize(
    "changes",
    [{"owner": ""}, {"lease_seconds": 0}, {"claim_batch": 0}, {"linger": -1}],
)
def test_producer_config_is_validated(changes: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "owner": "w1",
        "lease_seconds": LEASE,
        "poll_interval": 1.0,
        "claim_batch": 2,
        **changes,
    }
    with pytest.raises(ValueError):
        ProducerConfig(**values)


# -- completer -----------------------------------------------------------------------------


def test_completer_records_in_batches_of_at_most_max_batch() -> None:
    fake, ids = fake_with_jobs(7)
    fake.claim_batch("w1", 7, LEASE)
    recorded: list[int] = []
    completer = Completer(fake, on_recorded=lambda batch: recorded.append(len(batch)), max_batch=3)

    async def scenario() -> None:
        for job_id in ids:
            completer.add(Completion(job_id, "w1", 1, Outcome.SENT, T0, 0.1))
        assert completer.pending == 7
        await completer.flush()

    run(scenario)
    assert recorded == [3, 3, 1] and fake.calls.count("complete") == 3
    assert all(fake.get(job_id).status is Status.SENT for job_id in ids)


# -- maintenance services ----------------------------------------------------------------


def test_rescuer_run_once_returns_the_jobs_it_rescued() -> None:
    fake, _ = fake_with_jobs(2)
    [job_id] = [job.id for job in fake.claim_batch("gone", 1, LEASE, now=T0).jobs]
    clock = FixedClock(T0 + timedelta(seconds=LEASE - 1))
    told: list[list[str]] = []
    events = Events()
    rescuer = Rescuer(
        fake, RescuerConfig(1.0, 60.0), clock=clock, events=events, on_rescued=told.append
    )

    async def scenario() -> None:
        assert await rescuer.run_once() == RescueResult(rescued=[])
        clock.at = T0 + timedelta(seconds=LEASE + 1)
        assert await rescuer.run_once() == RescueResult(rescued=[job_id])
        assert (await events.wait_for("rescued")).data["job_ids"] == [job_id]

    run(scenario)
    assert told == [[job_id]]
    assert (fake.get(job_id).status, fake.get(job_id).attempts) == (Status.PENDING, 0)


def test_rescuer_config_covers_leases_longer_than_its_own() -> None:
    config = RescuerConfig.for_lease(30.0, longest_lease=3600.0)
    assert (config.interval, config.longest_lease) == (7.5, 3600.0)
    assert RescuerConfig.for_lease(7200.0, longest_lease=3600.0).longest_lease == 14400.0
    with pytest.raises(ValueError):
        RescuerConfig(0, 60.0)


def test_lease_keeper_extends_only_the_jobs_its_worker_holds() -> None:
    fake, _ = fake_with_jobs(3)
    mine = [j.id for j in fake.claim_batch("w1", 2, LEASE, now=T0).jobs]
    [theirs] = [j.id for j in fake.claim_batch("w2", 1, LEASE, now=T0).jobs]
    held: set[str] = {mine[0]}
    later = T0 + timedelta(seconds=20)
    keeper = LeaseKeeper(
        fake, LeaseKeeperConfig("w1", LEASE), held=lambda: held, clock=FixedClock(later)
    )

    async def scenario() -> None:
        result = await keeper.run_once()
        assert (result.job_ids, result.extended) == ([mine[0]], 1)
        held.clear()
        result = await keeper.run_once()
        assert (result.job_ids, result.asked_store) == ([], False)

    run(scenario)
    expiry = {job_id: fake.get(job_id).lease_expires_at for job_id in [*mine, theirs]}
    assert expiry == {
        mine[0]: later + timedelta(seconds=LEASE),
        mine[1]: T0 + timedelta(seconds=LEASE),
        theirs: T0 + timedelta(seconds=LEASE),
    }
    assert fake.calls.count("extend_leases") == 1
    assert keeper.config.interval == LEASE / 3


def test_screening_purger_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ScreeningPurgerConfig(dedup_window=-1)


# -- the periodic loop --------------------------------------------------------------------


@dataclass
class Ran:
    asked_store: bool = True


class Counting:
    """A stand-in service that counts its runs, and fails while `failing`."""

    def __init__(
        self, name: str, every: float, *, stagger: bool = False, asks_store: bool = True
    ) -> None:
        self.name = name
        self.schedule = Schedule(every, stagger=stagger)
        self.failing = False
        self.asks_store = asks_store

    async def run_once(self) -> Ran:
        if self.failing:
            raise DatabaseUnavailableError("the database is away")
        return Ran(asked_store=self.asks_store)


def test_periodic_runs_each_service_at_its_interval_on_a_fake_clock() -> None:
    fast, slow = Counting("fast", 1.0), Counting("slow", 3.0)
    periodic = Periodic([fast, slow], DatabaseOutage())
    next_due: list[float] = []

    async def scenario() -> None:
        for now in range(10):
            next_due.append(await periodic.run_due(float(now)))

    run(scenario)
    assert periodic.runs == {"fast": 9, "slow": 3}
    assert next_due[:4] == [1.0, 2.0, 3.0, 4.0]


def test_periodic_staggers_first_runs_within_one_interval() -> None:
    services = [Counting(f"s{n}", 10.0, stagger=True) for n in range(5)]
    periodic = Periodic(services, DatabaseOutage(), rng=random.Random(7))
    periodic.start(100.0)
    firsts = [periodic._due[s.name] for s in services]
    assert all(100.0 <= first <= 110.0 for first in firsts) and len(set(firsts)) == 5


def test_periodic_notes_a_failing_service_in_the_outage_and_carries_on() -> None:
    flaky, idle = Counting("flaky", 1.0), Counting("idle", 1.0, asks_store=False)
    events = Events()
    outage = DatabaseOutage(events=events)
    periodic = Periodic([flaky, idle], outage)

    async def scenario() -> None:
        flaky.failing = True
        await periodic.run_due(0.0)
        await periodic.run_due(1.0)
        assert outage.ongoing  # a run that asked the store nothing proves nothing
        assert (await events.wait_for("database_unavailable")).data["during"] == "flaky"
        flaky.failing = False
        await periodic.run_due(2.0)
        await events.wait_for("database_reachable")

    run(scenario)
    assert not outage.ongoing and periodic.runs == {"flaky": 2, "idle": 2}


def test_schedule_is_validated() -> None:
    with pytest.raises(ValueError):
        Schedule(0)
    with pytest.raises(ValueError):
        Schedule(1.0, jitter=1.0)


# -- events -------------------------------------------------------------------------------


def test_events_wait_for_finds_past_and_future_events_and_times_out() -> None:
    events = Events()

    async def scenario() -> None:
        events.emit("claimed", count=1)
        assert (await events.wait_for("claimed")).data == {"count": 1}
        waiting = asyncio.create_task(events.wait_for("recorded", lambda e: e.data["n"] == 2))
        await asyncio.sleep(0)
        events.emit("recorded", n=1)
        events.emit("recorded", n=2)
        assert (await waiting).data == {"n": 2}
        with pytest.raises(TimeoutError):
            await events.wait_for("rescued", timeout=0.01)

    run(scenario)


# -- the assembly, on the fake ------------------------------------------------------------


def test_worker_on_the_fake_store_claims_sends_and_records_everything() -> None:
    fake, ids = fake_with_jobs(9)
    transports: list[NullTransport] = []

    def factory() -> NullTransport:
        transports.append(NullTransport())
        return transports[-1]

    settings = Settings().replace(
        database_url="sqlite://", from_address="sender@example.com", concurrency=4
    )

    async def scenario() -> None:
        # The worker also reads templates and rate-limit buckets through a real
        # Store; these jobs need neither, so the fake stands in for it whole.
        store: Any = fake
        clock = FixedClock(T0)
        async with Worker(settings, store, "w1", factory, listen=False, clock=clock) as worker:
            while (await worker.run_once()).claimed:
                pass
            assert worker.totals.sent == 9 and worker.unrecorded == 0
            assert sum(e.data["count"] for e in worker.events.seen("claimed")) == 9

    run(scenario)
    assert all(fake.get(job_id).status is Status.SENT for job_id in ids)
    assert sum(len(t.sent) for t in transports) == 9 and len(transports) <= 4
    assert {now for _, now in fake.nows} == {T0}  # the injected clock, in every call
    assert {"claim", "complete"} <= {name for name, _ in fake.nows}


def test_running_worker_rescues_an_expired_lease_on_its_clock_and_sends_the_job() -> None:
    fake, _ = fake_with_jobs(1, at=T0 - timedelta(minutes=5))
    [job_id] = [j.id for j in fake.claim_batch("gone", 1, 1.0, now=T0 - timedelta(minutes=5)).jobs]
    settings = Settings().replace(
        database_url="sqlite://",
        from_address="sender@example.com",
        lease_seconds=1.0,
        poll_interval=60.0,
    )
    store: Any = fake

    async def scenario() -> None:
        worker = Worker(settings, store, "w1", NullTransport, listen=False, clock=FixedClock(T0))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        rescued = await worker.events.wait_for("rescued", timeout=TIMEOUT)
        assert rescued.data["job_ids"] == [job_id]
        await worker.wait_until(lambda totals: totals.sent == 1, TIMEOUT)  # woken, not polled
        stop.set()
        await task

    run(scenario)
    assert fake.get(job_id).status is Status.SENT
    assert ("rescue", T0) in fake.nows
