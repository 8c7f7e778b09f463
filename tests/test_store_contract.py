"""The job lease protocol's contract: PostgreSQL, SQLite and the fake store all keep it.

One suite, parametrized over the three: what the worker's parts rely on
(`mailqd.daemon.ports.JobLeases`) holds the same on each, so a unit test of
a part on the fake (tests/test_worker_parts.py) says something true of the
real stores. Times are passed as `now=`, so nothing here sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fake_store import FakeStore
from mailqd.daemon.ports import JobLeases
from mailqd.models import Outcome, Status
from mailqd.store import Completion, Store
from mailqd.store.screening import ScreenRules
from mailqd.validation import build_job

LEASE = 30.0


@pytest.fixture(params=["postgresql", "sqlite", "fake"])
def leases(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Any]:
    if request.param == "fake":
        fake: JobLeases = FakeStore()  # checks that the fake keeps the protocol's signatures
        yield fake
        return
    if request.param == "sqlite":
        from mailqd.store import upgrade
        from mailqd.store.engine import make_engine

        engine = make_engine(sqlite_url)
        upgrade(engine)
        engine.dispose()
        url = sqlite_url
    else:
        url = request.getfixturevalue("pg_url")
    store = Store.from_url(url)
    yield store
    store.close()


def enqueue(leases: Any, count: int = 1, **fields: Any) -> list[str]:
    jobs = [
        build_job(to=f"u{i}@example.com", subject="s", body="b", **fields) for i in range(count)
    ]
    ids: list[str] = leases.enqueue_many(jobs)
    return ids


def later(seconds: float = 1.0) -> datetime:
    """A time just after what the database's clock said at enqueue, so the jobs are due."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


def done(job_id: str, owner: str, outcome: Outcome, **fields: Any) -> Completion:
    return Completion(job_id, owner, 1, outcome, datetime.now(UTC), 0.1, **fields)


def test_claim_takes_highest_priority_first_then_oldest_due(leases: Any) -> None:
    now = later(10)
    [old_low] = enqueue(leases, send_after=now - timedelta(seconds=5))
    [new_high] = enqueue(leases, priority=5, send_after=now - timedelta(seconds=1))
    [old_high] = enqueue(leases, priority=5, send_after=now - timedelta(seconds=3))
    [not_due] = enqueue(leases, priority=9, send_after=now + timedelta(seconds=60))
    claim = leases.claim_batch("w1", 10, LEASE, now=now)
    assert [job.id for job in claim.jobs] == [old_high, new_high, old_low]
    assert all(job.lease_owner == "w1" and job.status is Status.SENDING for job in claim.jobs)
    assert leases.get(not_due).status is Status.PENDING


def test_claim_takes_at_most_limit_and_never_a_held_job(leases: Any) -> None:
    ids = enqueue(leases, 5)
    first = leases.claim_batch("w1", 2, LEASE, now=later())
    second = leases.claim_batch("w1", 10, LEASE, now=later())
    assert (len(first.jobs), len(second.jobs)) == (2, 3)
    assert sorted(j.id for j in first.jobs + second.jobs) == sorted(ids)
    assert leases.claim_batch("w1", 10, LEASE, now=later()).claimed == 0
    assert leases.claim_batch("w1", 0, LEASE, now=later()).claimed == 0


def test_claim_screened_with_no_rules_active_is_a_plain_claim(leases: Any) -> None:
    enqueue(leases, 3)
    claim = leases.claim_screened("w1", 2, LEASE, ScreenRules(), now=later())
    assert (len(claim.jobs), claim.screened) == (2, [])


def test_two_owners_claiming_at_once_never_get_the_same_job(leases: Any) -> None:
    ids = enqueue(leases, 40)
    barrier = threading.Barrier(2)
    got: dict[str, list[str]] = {}

    def claimer(owner: str) -> None:
        barrier.wait()
        mine: list[str] = []
        while claim := leases.claim_batch(owner, 3, LEASE, now=later()).jobs:
            mine += [job.id for job in claim]
        got[owner] = mine

    threads = [threading.Thread(target=claimer, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(ids)
    assert all(leases.get(job_id).lease_owner == owner for owner in got for job_id in got[owner])


def test_rescue_takes_back_an_expired_lease_and_records_it_lost(leases: Any) -> None:
    now = later()
    [job_id] = enqueue(leases)
    leases.claim_batch("w1", 1, LEASE, now=now)
    assert leases.rescue(now=now + timedelta(seconds=LEASE - 1)) == []
    assert leases.rescue(now=now + timedelta(seconds=LEASE + 1)) == [job_id]
    job = leases.get(job_id)
    assert (job.status, job.attempts, job.lease_owner) == (Status.PENDING, 0, None)
    assert job.last_error is not None and job.last_error.startswith("lease expired: ")
    [row] = leases.attempts(job_id)
    assert (row.attempt, row.outcome, row.smtp_text) == (1, Outcome.LOST, job.last_error)
    assert leases.rescue(now=now + timedelta(seconds=LEASE + 2)) == []


def test_a_job_lost_again_uses_an_attempt_each_time_after_the_first(leases: Any) -> None:
    now = later()
    [job_id] = enqueue(leases)
    for n in range(3):
        leases.claim_batch("w1", 1, LEASE, now=now)
        assert leases.rescue(owner="w1", reason=f"lost {n}", now=now) == [job_id]
    assert leases.get(job_id).attempts == 2
    rows = [(a.attempt, a.outcome, a.smtp_text) for a in leases.attempts(job_id)]
    assert rows == [
        (1, Outcome.LOST, "lost 0"),
        (1, Outcome.LOST, "lost 1"),
        (2, Outcome.LOST, "lost 2"),
    ]


def test_rescue_of_an_owner_takes_back_its_jobs_at_once_and_no_one_elses(leases: Any) -> None:
    now = later()
    [mine, theirs] = enqueue(leases, 2)
    leases.claim_batch("dead", 1, LEASE, now=now)
    leases.claim_batch("alive", 1, LEASE, now=now)
    held_by_dead = [j for j in (mine, theirs) if leases.get(j).lease_owner == "dead"]
    assert leases.rescue(owner="dead", now=now) == held_by_dead


def test_a_lease_longer_than_any_worker_gives_is_rescued(leases: Any) -> None:
    now = later()
    [job_id] = enqueue(leases)
    leases.claim_batch("w1", 1, 10_000.0, now=now)
    assert leases.rescue(now=now, longest_lease=60.0) == [job_id]


def test_complete_records_each_outcome_and_the_attempt(leases: Any) -> None:
    now = later()
    sent, retried, failed = enqueue(leases, 3)
    leases.claim_batch("w1", 3, LEASE, now=now)
    changed = leases.complete(
        [
            done(sent, "w1", Outcome.SENT, smtp_code=250, message_id="<m@x>"),
            done(retried, "w1", Outcome.RETRY, error="451 later", retry_in_seconds=60.0),
            done(failed, "w1", Outcome.FAILED, error="550 no"),
        ],
        now=now,
    )
    assert changed == 3
    assert [(leases.get(j).status, leases.get(j).attempts) for j in (sent, retried, failed)] == [
        (Status.SENT, 1),
        (Status.PENDING, 1),
        (Status.FAILED, 1),
    ]
    assert leases.get(sent).message_id == "<m@x>"
    assert leases.get(failed).last_error == "550 no"
    assert leases.claim_batch("w1", 10, LEASE, now=now + timedelta(seconds=59)).claimed == 0
    assert [
        j.id for j in leases.claim_batch("w1", 10, LEASE, now=now + timedelta(seconds=61)).jobs
    ] == [retried]
    assert all(len(leases.attempts(j)) == 1 for j in (sent, retried, failed))


def test_complete_after_the_lease_was_lost_changes_nothing_but_keeps_the_attempt(
    leases: Any,
) -> None:
    now = later()
    [job_id] = enqueue(leases)
    leases.claim_batch("w1", 1, LEASE, now=now)
    assert leases.rescue(now=now + timedelta(seconds=LEASE + 1)) == [job_id]
    assert leases.complete([done(job_id, "w1", Outcome.SENT)], now=now) == 0
    job = leases.get(job_id)
    assert (job.status, job.attempts) == (Status.PENDING, 0)
    assert [a.outcome for a in leases.attempts(job_id)] == [Outcome.LOST, Outcome.SENT]
    assert leases.complete([done(job_id, "w2", Outcome.SENT)]) == 0


def test_release_gives_jobs_back_unsent_without_counting_an_attempt(leases: Any) -> None:
    now = later()
    ids = enqueue(leases, 2)
    leases.claim_batch("w1", 2, LEASE, now=now)
    assert leases.release(ids, "someone else", now=now) == 0
    assert leases.release(ids, "w1", now=now, reasons={ids[0]: "shutdown: not started"}) == 2
    for job_id in ids:
        job = leases.get(job_id)
        assert (job.status, job.attempts, job.lease_owner) == (Status.PENDING, 0, None)
        [row] = leases.attempts(job_id)
        assert (row.attempt, row.outcome, row.worker) == (1, Outcome.RELEASED, "w1")
    assert leases.attempts(ids[0])[0].smtp_text == "shutdown: not started"
    assert len(leases.claim_batch("w2", 10, LEASE, now=now).jobs) == 2


def test_release_of_a_job_past_data_counts_its_attempt_as_ambiguous(leases: Any) -> None:
    now = later()
    unsent, past_data = enqueue(leases, 2)
    leases.claim_batch("w1", 2, LEASE, now=now)
    reason = "shutdown: cancelled after its content was sent"
    released = leases.release(
        [unsent, past_data], "w1", now=now, reasons={past_data: reason}, counted={past_data}
    )
    assert released == 2
    job = leases.get(past_data)
    assert (job.status, job.attempts, job.last_error) == (Status.PENDING, 1, reason)
    [row] = leases.attempts(past_data)
    assert (row.attempt, row.outcome, row.smtp_text) == (1, Outcome.AMBIGUOUS, reason)
    assert (leases.get(unsent).attempts, leases.get(unsent).last_error) == (0, None)
    assert [a.outcome for a in leases.attempts(unsent)] == [Outcome.RELEASED]


def test_rescue_of_an_owner_records_the_reason_given(leases: Any) -> None:
    now = later()
    [job_id] = enqueue(leases)
    leases.claim_batch("dead", 1, LEASE, now=now)
    reason = "worker killed: the worker dead was killed by SIGKILL while holding it"
    assert leases.rescue(owner="dead", reason=reason, now=now) == [job_id]
    job = leases.get(job_id)
    assert (job.status, job.attempts, job.last_error) == (Status.PENDING, 0, reason)
    [row] = leases.attempts(job_id)
    assert (row.outcome, row.smtp_text, row.worker) == (Outcome.LOST, reason, "dead")


def test_extend_leases_pushes_back_expiry_of_the_owners_jobs_only(leases: Any) -> None:
    now = later()
    [job_id] = enqueue(leases)
    leases.claim_batch("w1", 1, LEASE, now=now)
    assert leases.extend_leases([job_id], "w2", LEASE, now=now + timedelta(seconds=20)) == 0
    assert leases.extend_leases([job_id], "w1", LEASE, now=now + timedelta(seconds=20)) == 1
    assert leases.rescue(now=now + timedelta(seconds=LEASE + 1)) == []
    assert leases.rescue(now=now + timedelta(seconds=20 + LEASE + 1)) == [job_id]
    assert leases.extend_leases([job_id], "w1", LEASE, now=now) == 0  # no longer held
