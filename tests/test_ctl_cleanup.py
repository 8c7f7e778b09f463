"""`mailqctl cleanup` on a big table while delivery goes on.

200,000 old finished jobs (and an attempt row each) are inserted with
plain SQL; `mailqctl cleanup` deletes them as a subprocess while this
process keeps claiming (and releasing) pending jobs, timing every claim.
Cleanup deletes in batches, each its own short transaction, so no claim
may wait longer than about one batch (the command reports its longest:
the time from one batch's end to the next one's, pause included).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import sqlalchemy as sa

from ctl_process import MAILQCTL, TIMEOUT, ctl_env
from mailqd.models import Status
from mailqd.store import Store, upgrade
from mailqd.validation import build_job

OLD_ROWS = 200_000
PENDING = 20

FILL_PG = [
    """
    INSERT INTO email_queue (id, recipient_to, subject, body, status, attempts,
                             created_at, updated_at, sent_at)
    SELECT 'old-' || n, 'user' || n || '@example.com', 'old', 'body',
           CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'sent' END, 1,
           now() - interval '40 days', now() - interval '40 days' + n * interval '1 ms',
           CASE WHEN n % 10 = 0 THEN NULL ELSE now() - interval '40 days' END
    FROM generate_series(1, :rows) AS n
    """,
    """
    INSERT INTO email_attempts (job_id, attempt, started_at, duration_seconds, outcome)
    SELECT id, 1, updated_at, 0.1, status FROM email_queue WHERE id LIKE 'old-%'
    """,
    "ANALYZE email_queue",
    "ANALYZE email_attempts",
]

FILL_SQLITE = [
    """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
    INSERT INTO email_queue (id, recipient_to, subject, body, status, attempts,
                             created_at, updated_at, sent_at)
    SELECT 'old-' || i, 'user' || i || '@example.com', 'old', 'body',
           CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'sent' END, 1,
           strftime('%Y-%m-%d %H:%M:%f', 'now', '-40 days'),
           strftime('%Y-%m-%d %H:%M:%f', 'now', '-40 days'),
           CASE WHEN i % 10 = 0 THEN NULL
                ELSE strftime('%Y-%m-%d %H:%M:%f', 'now', '-40 days') END
    FROM n
    """,
    """
    INSERT INTO email_attempts (job_id, attempt, started_at, duration_seconds, outcome)
    SELECT id, 1, updated_at, 0.1, status FROM email_queue WHERE id LIKE 'old-%'
    """,
    "ANALYZE",
]


def fill(store: Store, rows: int) -> None:
    statements = FILL_PG if store.dialect == "postgresql" else FILL_SQLITE
    with store.engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement), {"rows": rows})


@pytest.fixture(params=["postgresql", "sqlite"])
def big_table(request: pytest.FixtureRequest, sqlite_url: str) -> tuple[str, int, int]:
    """A migrated database, how many old rows to fill it with, and the batch size.

    PostgreSQL gets the full 200,000 in the default batches. SQLite, where
    a batch holds the one write lock that claims need, gets 25,000 in 100
    small batches: enough back-to-back batches that a claim would often
    starve (measured: 0.8 s) if cleanup did not let waiters in between them.
    """
    if request.param == "sqlite":
        store = Store.from_url(sqlite_url)
        upgrade(store.engine)
        store.close()
        return sqlite_url, OLD_ROWS // 8, 250
    url: str = request.getfixturevalue("pg_url")
    return url, OLD_ROWS, 1000


@pytest.mark.slow
def test_cleanup_of_a_big_table_never_blocks_a_claim_for_more_than_a_batch(
    big_table: tuple[str, int, int],
) -> None:
    url, rows, batch = big_table
    store = Store.from_url(url)
    try:
        fill(store, rows)
        cleanup = ["cleanup", "--days", "30", "--json"]
        pending = store.enqueue_many(
            [build_job(f"p{i}@example.com", "pending", "body") for i in range(PENDING)]
        )
        claims = _claim_while(
            store,
            subprocess.Popen(
                [MAILQCTL, "--database-url", url, *cleanup, "--batch-size", str(batch)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ctl_env(),
            ),
        )
        report = claims.report
        assert report["deleted"] == rows
        assert report["batches"] == rows // batch
        longest_batch = report["longest_batch_seconds"]
        # Claims ran all through the cleanup, not just before or after it.
        during = claims.during
        assert len(during) >= report["batches"], (len(during), report)
        # A claim's own work is a few milliseconds; the slack is for a busy machine.
        slowest = max(during)
        assert slowest <= 2 * longest_batch + 0.1, (slowest, longest_batch, report)

        assert store.counts().by_status == {Status.PENDING: PENDING}
        with store.engine.connect() as conn:
            # The deleted jobs' attempts went with them; the `released` rows the probing
            # claims wrote belong to the pending jobs, which stay.
            left = conn.execute(
                sa.text(
                    "SELECT count(*) FROM email_attempts a WHERE NOT EXISTS "
                    "(SELECT 1 FROM email_queue q WHERE q.id = a.job_id)"
                )
            ).scalar_one()
        assert left == 0
        assert sorted(j.id for j in store.claim("t", PENDING, lease_seconds=60)) == sorted(pending)
    finally:
        store.close()


class _Claims:
    """Each claim's start and duration, the cleanup's report, and when it exited."""

    def __init__(self) -> None:
        self.timed: list[tuple[float, float]] = []
        self.report: dict[str, float] = {}
        self.exited = 0.0

    @property
    def during(self) -> list[float]:
        """Durations of the claims that started while cleanup was deleting.

        The command times its deletion (`seconds`) up to just before it
        exits, so that window ends no later than `exited`.
        """
        began = self.exited - self.report["seconds"]
        return [duration for started, duration in self.timed if started >= began]


def _claim_while(store: Store, process: subprocess.Popen[str]) -> _Claims:
    """Claim one job and give it back, over and over, until `process` exits; time each claim."""
    claims = _Claims()
    deadline = time.monotonic() + TIMEOUT
    with process:
        while process.poll() is None:
            assert time.monotonic() < deadline, "cleanup did not finish in time"
            started = time.monotonic()
            jobs = store.claim("prober", 1, lease_seconds=60)
            claims.timed.append((started, time.monotonic() - started))
            assert len(jobs) == 1
            store.release([jobs[0].id], "prober")
        claims.exited = time.monotonic()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr
    claims.report = json.loads(stdout)
    return claims
