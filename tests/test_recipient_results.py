"""Per-recipient results in `mailqctl`: `show ID`, `failed --partial`, and `cleanup`.

On PostgreSQL and SQLite. The rows of `email_recipients` are written
here with plain SQL, as the daemon's completion writes them (one per
recipient, when a job's recipients did not all fare alike); the jobs go
through the real store (enqueue, claim, complete).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ctl_process import invoke, ok_json
from mailqd.models import Outcome, RecipientStatus
from mailqd.store import Completion, Store
from mailqd.store.relay_tables import email_recipients
from mailqd.validation import build_job

RECIPIENT_KEYS = {"address", "status", "smtp_code", "smtp_text", "relay", "attempt", "updated_at"}
PARTIAL_KEYS = {"id", "to", "subject", "sent_at", "refused"}
REFUSAL_KEYS = {"address", "smtp_code", "smtp_text", "relay"}
NO_SUCH_USER = "5.1.1 <bob@example.com>: no such user"


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def finished_job(
    store: Store, to: str, outcome: Outcome = Outcome.SENT, seconds_ago: float = 1, **fields: Any
) -> str:
    """A job enqueued, claimed and completed with `outcome`, `seconds_ago` seconds ago."""
    when = ago(seconds_ago)
    values: dict[str, Any] = {"to": to, "subject": "Hi", "body": "Hello"}
    values.update(fields)
    job_id = store.enqueue(build_job(send_after=when - timedelta(seconds=1), **values))
    jobs = store.claim("test", 100, lease_seconds=60, now=when)
    [job] = [j for j in jobs if j.id == job_id]
    store.release([j.id for j in jobs if j.id != job_id], "test", now=when)
    sent = outcome is Outcome.SENT
    completion = Completion(
        job_id=job_id,
        owner="test",
        attempt=job.attempts + 1,
        outcome=outcome,
        started_at=when,
        duration_seconds=0.1,
        smtp_code=250 if sent else 550,
        smtp_text="2.0.0 queued" if sent else "5.1.1 no such user",
        error=None if sent else "550 5.1.1 no such user",
    )
    store.complete([completion], now=when)
    return job_id


def record(
    store: Store, job_id: str, *results: tuple[str, str, int | None, str | None, str]
) -> None:
    """Write (address, status, code, text, relay) rows for a job, as the completion does."""
    rows = [
        {
            "job_id": job_id,
            "address": address,
            "status": status,
            "smtp_code": code,
            "smtp_text": text,
            "relay": relay,
            "attempt": 1,
        }
        for address, status, code, text, relay in results
    ]
    with store.engine.begin() as conn:
        conn.execute(email_recipients.insert(), rows)


def partly_refused(store: Store, seconds_ago: float = 1, subject: str = "Hi") -> str:
    job_id = finished_job(
        store, "alice@example.com, bob@example.com", seconds_ago=seconds_ago, subject=subject
    )
    record(
        store,
        job_id,
        ("bob@example.com", "refused", 550, NO_SUCH_USER, "primary"),
        ("alice@example.com", "accepted", 250, "2.0.0 queued", "primary"),
    )
    return job_id


# -- show -------------------------------------------------------------------------


def test_show_lists_each_recipients_result(store: Store, db_url: str) -> None:
    job_id = finished_job(store, "alice@example.com, bob@example.com, carol@example.org")
    record(
        store,
        job_id,
        ("alice@example.com", "accepted", 250, "2.0.0 queued as 4F2A", "primary"),
        ("bob@example.com", "refused", 550, NO_SUCH_USER, "primary"),
        ("carol@example.org", "pending", None, None, "backup"),
    )

    as_json, human = invoke("show", job_id, "--json", db=db_url), invoke("show", job_id, db=db_url)

    recipients = ok_json(as_json)["recipients"]
    assert [r["address"] for r in recipients] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.org",
    ]
    assert all(set(r) == RECIPIENT_KEYS for r in recipients)
    bob = recipients[1]
    assert (bob["status"], bob["smtp_code"], bob["smtp_text"], bob["relay"]) == (
        "refused",
        550,
        NO_SUCH_USER,
        "primary",
    )
    assert (recipients[2]["status"], recipients[2]["smtp_code"]) == ("pending", None)

    assert human.returncode == 0, human.stderr
    [bob_line] = [line for line in human.stdout.splitlines() if line.startswith("bob@")]
    for shown in ("refused", "550", "no such user", "primary"):
        assert shown in bob_line
    assert "recipient" in human.stdout and "backup" in human.stdout
    assert store.recipients(job_id)[1].status is RecipientStatus.REFUSED


def test_show_of_a_job_whose_recipients_fared_alike_has_no_recipient_table(
    store: Store, db_url: str
) -> None:
    job_id = finished_job(store, "alice@example.com")
    as_json, human = invoke("show", job_id, "--json", db=db_url), invoke("show", job_id, db=db_url)
    assert ok_json(as_json)["recipients"] == []
    assert human.returncode == 0, human.stderr
    assert "recipient " not in human.stdout and "outcome" in human.stdout  # attempts, as before


# -- failed --partial ----------------------------------------------------------------


def test_failed_partial_lists_sent_jobs_with_refused_recipients_newest_first(
    store: Store, db_url: str
) -> None:
    older = partly_refused(store, seconds_ago=30, subject="Older")
    newer = partly_refused(store, seconds_ago=10, subject="Newer")
    # Not partially refused: recipients only deferred; refused but the job failed; no results.
    deferred = finished_job(store, "dan@example.com, eve@example.com")
    record(
        store,
        deferred,
        ("dan@example.com", "accepted", 250, "ok", "primary"),
        ("eve@example.com", "pending", 451, "4.3.0 later", "backup"),
    )
    failed = finished_job(store, "frank@example.com, gina@example.com", Outcome.FAILED)
    record(store, failed, ("frank@example.com", "refused", 550, "5.1.1 unknown", "primary"))
    finished_job(store, "hal@example.com")

    as_json = invoke("failed", "--partial", "--json", db=db_url)
    limited = invoke("failed", "--partial", "--limit", "1", "--json", db=db_url)
    human = invoke("failed", "--partial", db=db_url)

    jobs = ok_json(as_json)["jobs"]
    assert [job["id"] for job in jobs] == [newer, older]
    assert all(set(job) == PARTIAL_KEYS for job in jobs)
    assert jobs[0]["to"] == ["a***@example.com", "b***@example.com"]
    assert jobs[0]["subject"] == "Newer" and jobs[0]["sent_at"] is not None
    [refusal] = jobs[0]["refused"]
    assert set(refusal) == REFUSAL_KEYS
    assert refusal == {
        "address": "b***@example.com",
        "smtp_code": 550,
        "smtp_text": "5.1.1 <b***@example.com>: no such user",
        "relay": "primary",
    }
    assert [job["id"] for job in ok_json(limited)["jobs"]] == [newer]

    assert human.returncode == 0, human.stderr
    assert newer in human.stdout and older in human.stdout
    assert deferred not in human.stdout and failed not in human.stdout
    assert "b***@example.com" in human.stdout and "bob@" not in human.stdout


def test_failed_partial_with_none_says_so(store: Store, db_url: str) -> None:
    finished_job(store, "alice@example.com")
    human = invoke("failed", "--partial", db=db_url)
    assert (human.returncode, human.stdout.strip()) == (0, "no partially refused jobs")
    assert ok_json(invoke("failed", "--partial", "--json", db=db_url)) == {"jobs": []}


# -- cleanup -------------------------------------------------------------------------


def test_cleanup_deletes_a_jobs_recipient_results_with_it(store: Store, db_url: str) -> None:
    old = partly_refused(store, seconds_ago=3 * 86400)
    recent = partly_refused(store, seconds_ago=10)

    result = invoke("cleanup", "--days", "2", "--json", db=db_url)

    assert ok_json(result)["deleted"] == 1
    assert store.recipients(old) == []
    with store.engine.begin() as conn:
        left = {row.job_id for row in conn.execute(email_recipients.select())}
    assert left == {recent}
    assert [r.address for r in store.recipients(recent)] == ["alice@example.com", "bob@example.com"]
    assert [job.id for job, _ in store.list_partially_refused(10)] == [recent]
