"""The content de-duplication window and the per-recipient hourly cap (issue #6, item 7).

Against real databases (both kinds) and the real SMTP test server: what a
user notices is which messages arrive, what `mailqctl show`/`stats` say
about the others, and the counters on `/metrics`. The clock is moved by
writing the store's own rows (backdating a hash) or by passing `now` to
the store, never by sleeping.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from ctl_process import invoke, ok_json
from daemon_process import DaemonPool
from mailqd import Client
from mailqd.config import Settings
from mailqd.daemon.ports import FixedClock
from mailqd.daemon.worker import BatchResult, Worker, screen_rules
from mailqd.models import Outcome, Status
from mailqd.secrets import generate_key_file, load_secret_box
from mailqd.store import Completion, Store, upgrade
from mailqd.store.engine import make_engine
from mailqd.store.screening import ScreenRules, content_hash
from sidecar_client import scrape
from smtp_server import SmtpServer, smtp_server_fixture
from test_worker import (
    DEADLINE,
    enqueue,
    eventually,
    make_settings,
    messages,
    run,
    running,
    smtp_factory,
)

__all__ = ["smtp_server_fixture"]

SAME = {"to": "alice@example.com", "subject": "Your code", "body": "123456"}
LEASE = 30.0


def plain_sql_insert(store: Store, to: str, subject: str, body: str) -> None:
    """Enqueue the way an application without the client would."""
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO email_queue (recipient_to, subject, body) VALUES (:t, :s, :b)"),
            {"t": to, "s": subject, "b": body},
        )


def backdate_hashes(store: Store, seconds: float) -> None:
    """Make every held hash look `seconds` older: the window passes without waiting."""
    backdate(store, "mailqd_dedup", "first_seen_at", seconds)


def backdate(store: Store, table: str, column: str, seconds: float) -> None:
    """Move a time column of every row of a screening table `seconds` into the past."""
    with store.engine.begin() as conn:
        for (when,) in list(conn.execute(sa.text(f"SELECT DISTINCT {column} FROM {table}"))):
            if isinstance(when, str):  # SQLite keeps UTC text
                older: object = (
                    datetime.fromisoformat(when) - timedelta(seconds=seconds)
                ).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            else:
                older = when - timedelta(seconds=seconds)
            conn.execute(
                sa.text(f"UPDATE {table} SET {column} = :older WHERE {column} = :when"),
                {"older": older, "when": when},
            )


def by_status(store: Store, ids: list[str]) -> dict[Status, list[str]]:
    found: dict[Status, list[str]] = {}
    for job_id in ids:
        found.setdefault(store.get(job_id).status, []).append(job_id)
    return found


def all_ids(store: Store) -> list[str]:
    with store.engine.begin() as conn:
        return list(conn.execute(sa.text("SELECT id FROM email_queue")).scalars())


# -- the de-duplication window ----------------------------------------------------------


def test_same_content_twice_in_the_window_is_sent_once_and_the_other_says_why(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), dedup_window=600)
    [first] = enqueue(store, **SAME)
    plain_sql_insert(store, "Alice@Example.com", SAME["subject"], SAME["body"])  # any entry point
    [second] = [job_id for job_id in all_ids(store) if job_id != first]

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent + t.deduplicated >= 2, DEADLINE)
        assert (worker.totals.sent, worker.totals.deduplicated) == (1, 1)

    run(scenario)
    assert len(smtp_server.messages) == 1
    assert store.get(first).status is Status.SENT
    duplicate = store.get(second)
    assert duplicate.status is Status.CANCELLED
    assert duplicate.last_error is not None
    assert duplicate.last_error.startswith(f"duplicate of job {first}: ")
    assert "within 10 min (dedup_window)" in duplicate.last_error
    [attempt] = store.attempts(second)
    assert (attempt.outcome, attempt.smtp_text) == (Outcome.DUPLICATE, duplicate.last_error)
    stats = store.queue_stats()
    assert (stats.last_1h.deduplicated, stats.last_1h.cap_deferred) == (1, 0)
    assert stats.last_1h.attempts == 1  # the duplicate was not an attempt to deliver
    assert store.failed_attempts_count() == 0


def test_same_content_after_the_window_is_sent_again(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), dedup_window=600)

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            enqueue(store, **SAME)
            assert (await worker.run_once()).sent == 1
            enqueue(store, **SAME)
            assert (await worker.run_once()).deduplicated == 1
            backdate_hashes(store, 601)
            enqueue(store, **SAME)
            assert await worker.run_once() == BatchResult(claimed=1, sent=1)

    run(scenario)
    assert len(smtp_server.messages) == 2


def test_different_recipients_or_content_are_not_duplicates(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), dedup_window=600)
    enqueue(store, **SAME)
    enqueue(store, **{**SAME, "to": "bob@example.com"})
    enqueue(store, **{**SAME, "cc": "carol@example.com"})
    enqueue(store, **{**SAME, "body": "654321"})

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            assert await worker.run_once() == BatchResult(claimed=4, sent=4)

    run(scenario)
    assert len(smtp_server.messages) == 4


def test_with_the_features_off_duplicates_are_all_delivered(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    assert (settings.dedup_window, settings.recipient_hourly_cap) == (0, 0)
    enqueue(store, 3, **SAME)

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            assert await worker.run_once() == BatchResult(claimed=3, sent=3)

    run(scenario)
    assert len(smtp_server.messages) == 3
    with store.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM mailqd_dedup")).scalar_one() == 0


def test_two_workers_racing_on_duplicates_deliver_exactly_one(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), dedup_window=600, concurrency=2)
    ids = enqueue(store, 12, **SAME)

    async def scenario() -> None:
        workers = [Worker(settings, store, f"w{n}", smtp_factory(settings)) for n in (1, 2)]
        async with running(workers[0]), running(workers[1]):
            await eventually(lambda: _all_finished(store, ids))
        assert sum(w.totals.sent for w in workers) == 1
        assert sum(w.totals.deduplicated for w in workers) == 11

    run(scenario)
    assert len(smtp_server.messages) == 1
    statuses = by_status(store, ids)
    assert len(statuses[Status.SENT]) == 1 and len(statuses[Status.CANCELLED]) == 11


def test_sealed_variables_are_compared_by_what_they_say(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """Encrypted variables differ at every enqueue; duplicates must still be found."""
    key = tmp_path / "secrets.key"
    generate_key_file(key)
    message = {**SAME, "body": None, "template_id": "code", "variables": {"code": "123456"}}
    with Client(db_url, secrets_key_file=str(key)) as client:
        first, second = (client.enqueue(**message) for _ in range(2))
    assert store.get(first).variables != store.get(second).variables  # sealed apart
    settings = Settings(dedup_window=600, secrets_key_file=str(key))
    rules = screen_rules(settings, load_secret_box(settings.secrets_key_file))
    assert rules is not None
    claim = store.claim_screened("w1", 10, LEASE, rules)
    assert [j.id for j in claim.jobs] == [first]
    assert [(s.job.id, s.outcome) for s in claim.screened] == [(second, Outcome.DUPLICATE)]


def test_concurrent_claims_of_duplicates_let_exactly_one_through(store: Store) -> None:
    """The hash's primary key decides, whichever transaction commits first."""
    enqueue(store, 8, **SAME)
    sendable = claim_at_once(store, ScreenRules(dedup_window=600), limit=1)
    assert sorted(sendable) == [0] * 7 + [1]
    counts = store.counts().by_status
    assert (counts.get(Status.SENDING), counts.get(Status.CANCELLED)) == (1, 7)


def test_a_retried_holder_keeps_its_hash_and_a_failed_one_frees_it(store: Store) -> None:
    rules = ScreenRules(dedup_window=600)
    [holder] = enqueue(store, **SAME)
    [job] = store.claim_screened("w1", 10, LEASE, rules).jobs
    _complete(store, job.id, "w1", Outcome.RETRY)
    again = store.claim_screened("w1", 10, LEASE, rules)
    assert [j.id for j in again.jobs] == [holder] and not again.screened  # not its own duplicate
    _complete(store, holder, "w1", Outcome.FAILED)
    [successor] = enqueue(store, **SAME)
    claim = store.claim_screened("w1", 10, LEASE, rules)
    assert [j.id for j in claim.jobs] == [successor]  # a failed holder blocks nobody


def test_duplicates_in_one_claim_name_the_one_job_that_is_sent(store: Store) -> None:
    rules = ScreenRules(dedup_window=600)
    ids = enqueue(store, 3, **SAME)
    claim = store.claim_screened("w1", 10, LEASE, rules)
    [kept] = claim.jobs
    assert {s.job.id for s in claim.screened} == set(ids) - {kept.id}
    assert all(s.reason.startswith(f"duplicate of job {kept.id}: ") for s in claim.screened)


def test_the_hash_covers_recipients_in_any_order_and_case_but_not_headers(store: Store) -> None:
    both = "a@example.com, b@example.com"
    ids = [
        *enqueue(store, to="a@example.com, B@example.com", subject="s", body="b"),
        *enqueue(store, to="b@example.com", cc="A@EXAMPLE.COM", subject="s", body="b"),
        *enqueue(store, to=both, subject="s", body="b", headers={"X-A": "1"}),
        *enqueue(store, to=both, subject="s", body="b", from_address="x@example.org"),
    ]
    hashes = {job.id: content_hash(job) for job in store.claim("w1", 10, LEASE)}
    assert len({hashes[job_id] for job_id in ids[:3]}) == 1
    assert hashes[ids[3]] != hashes[ids[0]]


def test_purge_drops_expired_hashes_and_past_hours_only(store: Store) -> None:
    rules = ScreenRules(dedup_window=600, recipient_hourly_cap=5)
    enqueue(store, **SAME)
    now = _next_hour(datetime.now(UTC)) + timedelta(minutes=10)  # due, far from an hour's end
    store.claim_screened("w1", 10, LEASE, rules, now=now)
    assert store.purge_screening(600, now=now) == 0
    assert store.purge_screening(600, now=now + timedelta(seconds=601)) == 1  # the hash
    assert store.purge_screening(600, now=now + timedelta(hours=2)) == 1  # the hour's count
    with store.engine.begin() as conn:
        for table in ("mailqd_dedup", "mailqd_recipient_counts"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 0


def test_cleanup_drops_stale_screening_rows_and_keeps_live_ones(store: Store, db_url: str) -> None:
    rules = ScreenRules(dedup_window=600, recipient_hourly_cap=5)
    enqueue(store, to="old@example.com", subject="old", body="x")
    store.claim_screened("w1", 10, LEASE, rules)
    backdate(store, "mailqd_dedup", "first_seen_at", 40 * 86400)
    backdate(store, "mailqd_recipient_counts", "hour_start", 40 * 86400)
    enqueue(store, **SAME)
    store.claim_screened("w1", 10, LEASE, rules)
    assert invoke("cleanup", "--days", "30", db=db_url).returncode == 0
    with store.engine.begin() as conn:
        hashes = conn.execute(sa.text("SELECT count(*) FROM mailqd_dedup")).scalar_one()
        rows = conn.execute(sa.text("SELECT recipient FROM mailqd_recipient_counts"))
        recipients = list(rows.scalars())
    assert (hashes, recipients) == (1, ["alice@example.com"])


# -- the per-recipient hourly cap ---------------------------------------------------------


def test_cap_defers_the_excess_to_the_next_hour_without_counting_an_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), recipient_hourly_cap=2)
    capped = enqueue(store, 5, to="busy@example.com")
    others = enqueue(store, 2, to="quiet@example.com")
    # The cap counts per clock hour: a stopped clock keeps every claim in one
    # hour, so the test need not wait for the turn of the hour to pass. It
    # stops just after the enqueue (the jobs are due) and before the stats.
    clock = FixedClock(datetime.now(UTC))

    async def scenario() -> None:
        worker = Worker(settings, store, "w1", smtp_factory(settings), clock=clock)
        async with running(worker):
            await worker.wait_until(lambda t: t.sent + t.deferred >= 7, DEADLINE)
            await messages(smtp_server, 4)
        assert (worker.totals.sent, worker.totals.deferred) == (4, 3)

    run(scenario)
    received = [m.rcpt_tos for m in smtp_server.messages]
    assert sorted(received) == [("busy@example.com",)] * 2 + [("quiet@example.com",)] * 2
    assert all(store.get(job_id).status is Status.SENT for job_id in others)
    statuses = by_status(store, capped)
    assert len(statuses[Status.SENT]) == 2 and len(statuses[Status.PENDING]) == 3
    for job_id in statuses[Status.PENDING]:
        job = store.get(job_id)
        assert job.attempts == 0 and job.lease_owner is None
        assert job.next_attempt_at == _next_hour(job.updated_at)
        assert job.last_error is not None
        assert "recipient busy@example.com reached recipient_hourly_cap (2 per hour)" in (
            job.last_error
        )
        [attempt] = store.attempts(job_id)
        assert attempt.outcome is Outcome.DEFERRED
    stats = store.queue_stats()
    hour = stats.last_1h
    assert (hour.cap_deferred, hour.deduplicated, hour.attempts) == (3, 0, 4)


def test_deferred_jobs_are_sent_in_the_next_hour(store: Store) -> None:
    rules = ScreenRules(recipient_hourly_cap=1)
    enqueue(store, 2, to="busy@example.com")
    now = _next_hour(datetime.now(UTC)) + timedelta(minutes=10)  # due, far from an hour's end
    first = store.claim_screened("w1", 10, LEASE, rules, now=now)
    assert (len(first.jobs), first.count(Outcome.DEFERRED)) == (1, 1)
    assert store.claim_screened("w1", 10, LEASE, rules, now=now + timedelta(seconds=1)).claimed == 0
    later = store.claim_screened("w1", 10, LEASE, rules, now=_next_hour(now))
    assert [j.id for j in later.jobs] == [first.screened[0].job.id]


def test_a_job_with_one_capped_recipient_waits_whole_and_uses_none_of_the_others_room(
    store: Store,
) -> None:
    rules = ScreenRules(recipient_hourly_cap=1)
    [solo] = enqueue(store, to="a@example.com", priority=3)
    [pair] = enqueue(store, to="a@example.com", cc="b@example.com", priority=2)
    [other] = enqueue(store, to="B@example.com", priority=1)
    claim = store.claim_screened("w1", 10, LEASE, rules)
    assert [j.id for j in claim.jobs] == [solo, other]
    assert [(s.job.id, s.outcome) for s in claim.screened] == [(pair, Outcome.DEFERRED)]
    with store.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT recipient, sent FROM mailqd_recipient_counts"))
        counts = {recipient: sent for recipient, sent in rows}
    assert counts == {"a@example.com": 1, "b@example.com": 1}


# -- what operators see -----------------------------------------------------------------


def test_stats_and_metrics_show_duplicates_and_deferrals(
    daemons: DaemonPool, sqlite_url: str, smtp_server: SmtpServer
) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    _clear_of_the_hour_turn()
    with Client(sqlite_url) as client:
        for _ in range(2):
            client.enqueue("alice@example.com", "Your code", "123456")
        for n in range(3):
            client.enqueue("busy@example.com", f"note {n}", "x")
    env = {
        "MAILQD_DATABASE_URL": sqlite_url,
        "MAILQD_SMTP_URL": smtp_server.url(),
        "MAILQD_WORKERS": "1",
        "MAILQD_POLL_INTERVAL": "0.2",
        "MAILQD_DEDUP_WINDOW": "600",
        "MAILQD_RECIPIENT_HOURLY_CAP": "2",
    }
    daemon = daemons.mailqd(env)
    sidecar = daemon.sidecar_url()
    wanted = {
        "mailqd_deduplicated_total": 1,
        "mailqd_recipient_cap_deferred_total": 1,
        "mailqd_email_sent_total": 3,
    }

    def settled() -> dict[str, float] | None:
        samples = scrape(sidecar)
        return samples if all(samples.get(k) == v for k, v in wanted.items()) else None

    samples = daemon.wait_for(settled, "3 sent, a duplicate and a deferral counted")
    assert samples['mailqd_email_attempts_total{outcome="sent"}'] == 3  # nothing else tried
    with urllib.request.urlopen(sidecar + "/stats", timeout=10) as response:
        performance = json.loads(response.read())["data"]["performance"]
    assert (performance["deduplicated_1h"], performance["deferred_by_recipient_cap_1h"]) == (1, 1)
    assert performance["recent_attempts_1h"] == 3
    assert samples["mailqd_email_failed_total"] == 0
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=40) == 0, daemon.log_tail()
    document = ok_json(invoke("stats", "--json", db=sqlite_url))
    assert document["last_1h"]["deduplicated"] == 1
    assert document["last_1h"]["deferred_by_recipient_cap"] == 1
    text = invoke("stats", db=sqlite_url, env=_feature_env()).stdout
    assert "deduplicated (last hour)" in text and "deferred by recipient cap (last hour)" in text


def test_stats_leave_the_lines_out_when_the_features_are_off_and_idle(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    text = invoke("stats", db=sqlite_url).stdout
    assert "deduplicated" not in text and "recipient cap" not in text
    document = json.loads(invoke("stats", "--json", db=sqlite_url).stdout)
    assert document["last_1h"]["deduplicated"] == 0


def test_drain_counts_a_duplicate_as_done_and_a_deferral_as_not(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    env = {"MAILQD_SMTP_URL": smtp_server.url(), "MAILQD_FROM": "sender@example.com"}
    enqueue(store, 2, **SAME)
    duplicates = invoke("drain", "--json", db=db_url, env={**env, "MAILQD_DEDUP_WINDOW": "600"})
    assert duplicates.returncode == 0, duplicates.stderr
    assert ok_json(duplicates)["deduplicated"] == 1
    enqueue(store, 2, to="busy@example.com")
    capped = invoke("drain", db=db_url, env={**env, "MAILQD_RECIPIENT_HOURLY_CAP": "1"})
    assert capped.returncode == 1
    assert capped.stdout.strip().endswith(
        "1 sent, 0 retried later, 0 failed, 0 duplicates not sent, 1 deferred by recipient cap"
    )
    assert len(smtp_server.messages) == 2


# -- helpers ----------------------------------------------------------------------------


def claim_at_once(
    store: Store, rules: ScreenRules, limit: int, now: datetime | None = None, claimers: int = 8
) -> list[int]:
    """`claimers` threads each make one screened claim at the same moment; how many jobs
    each may send."""
    barrier = threading.Barrier(claimers)
    sendable: list[int] = []

    def claimer(n: int) -> None:
        barrier.wait()
        claim = store.claim_screened(f"c{n}", limit, LEASE, rules, now=now)
        sendable.append(len(claim.jobs))

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    return sendable


def _feature_env() -> dict[str, str]:
    return {"MAILQD_DEDUP_WINDOW": "600", "MAILQD_RECIPIENT_HOURLY_CAP": "2"}


def _next_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def _clear_of_the_hour_turn(margin: float = 60.0) -> None:
    """Return once the next turn of the clock hour is more than `margin` seconds away.

    The cap counts per clock hour; a test on the real clock whose claims
    straddled a turn would see the counts start again. Waits at most
    `margin` seconds, and only in the last `margin` seconds of an hour.
    """
    deadline = time.monotonic() + margin + 5.0
    while (_next_hour(datetime.now(UTC)) - datetime.now(UTC)).total_seconds() <= margin:
        assert time.monotonic() < deadline, "the clock did not pass the turn of the hour"
        time.sleep(0.5)


def _complete(store: Store, job_id: str, owner: str, outcome: Outcome) -> None:
    started = datetime.now(UTC)
    store.complete([Completion(job_id, owner, 1, outcome, started, 0.0, error="test")])


def _all_finished(store: Store, ids: list[str]) -> bool:
    statuses = by_status(store, ids)
    return Status.PENDING not in statuses and Status.SENDING not in statuses
