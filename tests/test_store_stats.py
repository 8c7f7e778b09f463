"""The store's operator queries (`queue_stats`), on real PostgreSQL and SQLite alike.

Every query is given an exact `now`, so the 5-minute and 1-hour windows are
tested at their edges without sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailqd.models import Job, Outcome, Status
from mailqd.store import Completion, Store
from mailqd.validation import build_job

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def enqueue(store: Store, count: int = 1, **fields: object) -> list[str]:
    values: dict[str, object] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
    values.update(fields)
    return store.enqueue_many([build_job(**values) for _ in range(count)])  # type: ignore[arg-type]


def finish(store: Store, count: int, outcome: Outcome, when: datetime, **fields: object) -> None:
    """Queue `count` jobs due at `when` and record one attempt for each, ending in `outcome`."""
    enqueue(store, count, send_after=when, **fields)
    jobs = store.claim("w", count, lease_seconds=60, now=when)
    assert len(jobs) == count
    store.complete([completion(job, outcome, when) for job in jobs], now=when)


def completion(job: Job, outcome: Outcome, when: datetime, delay: float = 0.0) -> Completion:
    return Completion(
        job_id=job.id,
        owner="w",
        attempt=job.attempts + 1,
        outcome=outcome,
        started_at=when,
        duration_seconds=0.1,
        error=None if outcome is Outcome.SENT else "451 later",
        retry_in_seconds=delay,
    )


def test_empty_queue(store: Store) -> None:
    stats = store.queue_stats(now=T0)
    assert stats.at == T0
    assert stats.counts.by_status == {}
    assert stats.counts.oldest_due_age_seconds is None
    assert (stats.due, stats.retries_waiting, stats.retries_due_soon) == (0, 0, 0)
    assert (stats.last_5m.sent, stats.last_5m.failed, stats.last_5m.attempts) == (0, 0, 0)
    assert stats.last_1h.failure_rate is None


def test_windows_count_jobs_that_ended_in_them(store: Store) -> None:
    now = at(7200)
    finish(store, 3, Outcome.SENT, now - timedelta(seconds=60))  # in both windows
    finish(store, 1, Outcome.FAILED, now - timedelta(seconds=299))  # in both
    finish(store, 2, Outcome.SENT, now - timedelta(seconds=301))  # the hour only
    finish(store, 1, Outcome.FAILED, now - timedelta(seconds=3599))  # the hour only
    finish(store, 4, Outcome.SENT, now - timedelta(seconds=3601))  # neither
    finish(store, 1, Outcome.SENT, now + timedelta(seconds=10))  # after `now`: neither

    stats = store.queue_stats(now=now)
    assert (stats.last_5m.seconds, stats.last_1h.seconds) == (300, 3600)
    assert (stats.last_5m.sent, stats.last_5m.failed) == (3, 1)
    assert (stats.last_1h.sent, stats.last_1h.failed) == (5, 2)
    assert stats.last_5m.failure_rate == pytest.approx(1 / 4)
    assert stats.last_1h.failure_rate == pytest.approx(2 / 7)
    assert (stats.last_5m.attempts, stats.last_1h.attempts) == (4, 7)
    assert stats.counts.by_status == {Status.SENT: 10, Status.FAILED: 2}


def test_attempts_count_retries_too(store: Store) -> None:
    [job_id] = enqueue(store, send_after=T0)
    [job] = store.claim("w", 1, lease_seconds=60, now=T0)
    store.complete([completion(job, Outcome.RETRY, T0, delay=30)], now=T0)
    [job] = store.claim("w", 1, lease_seconds=60, now=at(30))
    store.complete([completion(job, Outcome.SENT, at(30))], now=at(30))

    stats = store.queue_stats(now=at(60))
    assert (stats.last_5m.attempts, stats.last_5m.sent, stats.last_5m.failed) == (2, 1, 0)
    assert store.get(job_id).status is Status.SENT


def test_due_oldest_and_retries_due_soon(store: Store) -> None:
    enqueue(store, 2, send_after=at(-120))  # due for two minutes
    enqueue(store, 1, send_after=at(-10))
    enqueue(store, 1, send_after=at(600))  # scheduled, not a retry
    retried = enqueue(store, 3, send_after=at(-1000))
    jobs = [j for j in store.claim("w", 10, lease_seconds=60, now=at(-1000)) if j.id in retried]
    store.complete(
        [
            completion(jobs[0], Outcome.RETRY, at(-1000), delay=1000 + 30),  # due in 30 s
            completion(jobs[1], Outcome.RETRY, at(-1000), delay=1000 + 59),  # due in 59 s
            completion(jobs[2], Outcome.RETRY, at(-1000), delay=1000 + 3600),  # in an hour
        ],
        now=at(-1000),
    )
    store.release([j.id for j in store.claim("w", 10, lease_seconds=60, now=at(-1000))], "w")

    stats = store.queue_stats(now=T0, soon_seconds=60)
    assert stats.counts.pending == 7
    assert stats.counts.depth == 7
    assert stats.due == 3
    assert stats.counts.oldest_due_age_seconds == pytest.approx(120, abs=0.01)
    assert (stats.retries_waiting, stats.retries_due_soon, stats.soon_seconds) == (3, 2, 60)
    assert store.queue_stats(now=T0, soon_seconds=10).retries_due_soon == 0


def test_sending_jobs_are_depth_but_not_due(store: Store) -> None:
    enqueue(store, 2, send_after=T0)
    store.claim("w", 1, lease_seconds=60, now=T0)
    stats = store.queue_stats(now=at(5))
    assert (stats.counts.pending, stats.counts.sending, stats.counts.depth) == (1, 1, 2)
    assert stats.due == 1
    assert stats.counts.oldest_due_age_seconds == pytest.approx(5, abs=0.01)


def test_database_clock_is_used_without_now(store: Store) -> None:
    finish(store, 1, Outcome.SENT, datetime.now(UTC))
    stats = store.queue_stats()
    assert abs((stats.at - datetime.now(UTC)).total_seconds()) < 60
    assert (stats.last_5m.sent, stats.last_1h.sent) == (1, 1)


def test_attempts_read_oldest_first_across_a_requeue(store: Store) -> None:
    [job_id] = enqueue(store, send_after=T0)
    [job] = store.claim("w", 1, lease_seconds=60, now=T0)
    store.complete([completion(job, Outcome.FAILED, T0)], now=T0)
    assert store.requeue_failed([job_id], now=at(10)) == 1
    [job] = store.claim("w", 1, lease_seconds=60, now=at(10))
    store.complete([completion(job, Outcome.SENT, at(10))], now=at(10))
    history = store.attempts(job_id)
    assert [(x.attempt, x.outcome) for x in history] == [(1, Outcome.FAILED), (1, Outcome.SENT)]
