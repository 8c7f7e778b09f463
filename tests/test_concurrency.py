"""Many OS processes claiming from one PostgreSQL queue never share a job."""

from __future__ import annotations

import multiprocessing
import select
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from mailqd.models import Outcome, Status
from mailqd.store import NOTIFY_CHANNEL, Completion, Store
from mailqd.validation import build_job
from pg import libpq_url

JOBS = 10_000
PROCESSES = 4


def claim_until_empty(
    url: str, owner: str, out: str, start: multiprocessing.synchronize.Event
) -> None:
    """One claimer process: claim batches, complete them, log every id it held."""
    store = Store.from_url(url)
    held: list[str] = []
    start.wait()
    while True:
        jobs = store.claim(owner, 50, lease_seconds=600)
        if not jobs:
            break
        held.extend(j.id for j in jobs)
        now = datetime.now(UTC)
        done = store.complete(
            [Completion(j.id, owner, j.attempts + 1, Outcome.SENT, now, 0.0) for j in jobs]
        )
        if done != len(jobs):
            raise AssertionError(f"{owner}: completed {done} of {len(jobs)} jobs it claimed")
    Path(out).write_text("\n".join(held))
    store.close()


@pytest.mark.slow
def test_four_processes_complete_every_job_exactly_once(pg_url: str, tmp_path: Path) -> None:
    store = Store.from_url(pg_url)
    store.enqueue_many([build_job(f"u{i}@example.com", "s", "b") for i in range(JOBS)])
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outs = [str(tmp_path / f"claimer{i}.txt") for i in range(PROCESSES)]
    procs = [
        ctx.Process(target=claim_until_empty, args=(pg_url, f"claimer{i}", outs[i], start))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"claimer exited with {p.exitcode}"

    held = [Path(o).read_text().split() for o in outs]
    all_ids = [job_id for ids in held for job_id in ids]
    assert len(all_ids) == len(set(all_ids)), "two processes held the same job"
    assert len(all_ids) == JOBS
    assert all(ids for ids in held), "a claimer got no work: the test did not run concurrently"
    assert store.counts().by_status == {Status.SENT: JOBS}
    with store.engine.connect() as conn:
        attempts = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT job_id), max(attempt) FROM email_attempts")
        ).one()
    assert tuple(attempts) == (JOBS, JOBS, 1)
    store.close()


def test_plain_sql_insert_notifies_listeners(pg_url: str) -> None:
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as app:
            app.execute(
                "INSERT INTO email_queue (recipient_to, subject, body) "
                "VALUES ('a@example.com', 'Hi', 'Hello'), ('b@example.com', 'Hi', 'Hello')"
            )
        ready, _, _ = select.select([listener.fileno()], [], [], 10)
        assert ready, "no notification within 10 s of a plain INSERT"
        notifies = list(listener.notifies(timeout=1, stop_after=1))
        assert [n.channel for n in notifies] == [NOTIFY_CHANNEL]
