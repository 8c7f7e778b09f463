"""The store's contract, run against real PostgreSQL and real SQLite alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from mailqd.errors import JobNotFoundError, JobStateError, SchemaError
from mailqd.models import Job, Outcome, Status
from mailqd.store import Completion, Store, check_schema
from mailqd.store.migrate import VERSION_TABLE, head_revision
from mailqd.validation import build_job

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def enqueue(store: Store, **kwargs: object) -> str:
    fields: dict[str, object] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
    fields.update(kwargs)
    return store.enqueue(build_job(**fields))  # type: ignore[arg-type]


def sent(job: Job, owner: str, **kwargs: object) -> Completion:
    values: dict[str, object] = {
        "job_id": job.id,
        "owner": owner,
        "attempt": job.attempts + 1,
        "outcome": Outcome.SENT,
        "started_at": T0,
        "duration_seconds": 0.05,
        "smtp_code": 250,
        "smtp_text": "OK",
    }
    values.update(kwargs)
    return Completion(**values)  # type: ignore[arg-type]


def status_of(store: Store, job_id: str) -> Status:
    return store.get(job_id).status


def test_enqueue_round_trip_keeps_every_field(store: Store) -> None:
    job = build_job(
        "Alice <alice@example.com>, bob@example.org",
        "Grüße",
        "Hello",
        "<p>Hello</p>",
        cc="carol@example.com",
        bcc=["dave@example.com"],
        reply_to="help@example.com",
        from_address="Shop <shop@example.com>",
        headers={"X-Campaign": "42"},
        variables={"name": "Alice", "n": [1, 2]},
        priority=5,
        send_after=T0,
        expires_at=later(3600),
        max_attempts=7,
        idempotency_key="order-1",
    )
    job_id = store.enqueue(job)
    got = store.get(job_id)
    assert job_id == job.id
    assert got.recipient_to == "Alice <alice@example.com>, bob@example.org"
    assert (got.subject, got.body, got.html) == ("Grüße", "Hello", "<p>Hello</p>")
    assert (got.cc, got.bcc, got.reply_to) == (
        "carol@example.com",
        "dave@example.com",
        "help@example.com",
    )
    assert got.from_address == "Shop <shop@example.com>"
    assert got.headers == {"X-Campaign": "42"}
    assert got.variables == {"name": "Alice", "n": [1, 2]}
    assert (got.priority, got.max_attempts, got.idempotency_key) == (5, 7, "order-1")
    assert got.next_attempt_at == T0
    assert got.expires_at == later(3600)
    assert got.status is Status.PENDING
    assert got.attempts == 0


def test_enqueue_many_returns_ids_in_order(store: Store) -> None:
    jobs = [build_job(f"u{i}@example.com", f"s{i}", "b") for i in range(2500)]
    ids = store.enqueue_many(jobs)
    assert ids == [j.id for j in jobs]
    assert store.get(ids[1234]).recipient_to == "u1234@example.com"
    assert store.counts().pending == 2500


def test_same_idempotency_key_yields_one_row_and_the_first_id(store: Store) -> None:
    first = enqueue(store, idempotency_key="k")
    again = enqueue(store, idempotency_key="k", subject="different")
    batch = store.enqueue_many(
        [
            build_job("x@example.com", "s", "b", idempotency_key="k"),
            build_job("x@example.com", "s", "b", idempotency_key="new"),
            build_job("x@example.com", "s", "b", idempotency_key="new"),
        ]
    )
    assert again == first
    assert batch[0] == first
    assert batch[1] == batch[2] != first
    assert store.counts().pending == 2
    assert store.get(first).subject == "Hi"


def test_plain_sql_insert_gets_defaults_and_is_claimable(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (recipient_to, subject, body) "
                "VALUES ('a@example.com', 'Hi', 'Hello')"
            )
        )
    [job] = store.claim("w1", 10, lease_seconds=60)
    assert len(job.id) == 36 and job.id.count("-") == 4
    assert (job.recipient_to, job.subject, job.body) == ("a@example.com", "Hi", "Hello")
    assert (job.priority, job.attempts, job.max_attempts) == (0, 0, None)
    assert job.status is Status.SENDING
    assert job.created_at.tzinfo is not None


def test_plain_sql_upsert_on_the_idempotency_key_queues_once(store: Store) -> None:
    """The README's form for SQL callers; keyless rows never conflict with each other."""
    upsert = sa.text(
        "INSERT INTO email_queue (recipient_to, subject, body, idempotency_key) "
        "VALUES ('a@example.com', 'Hi', 'Hello', :key) "
        "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    )
    with store.engine.begin() as conn:
        for key in ("order-1", "order-1", None, None):
            conn.execute(upsert, {"key": key})
    assert store.counts().pending == 3
    with store.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (recipient_to, subject, body, idempotency_key) "
                "VALUES ('b@example.com', 'Hi', 'Hello', 'order-1')"
            )
        )
    assert store.counts().pending == 3


def test_claim_takes_highest_priority_then_oldest_due(store: Store) -> None:
    low_old = enqueue(store, priority=0, send_after=later(-30))
    high_new = enqueue(store, priority=10, send_after=later(-1))
    low_new = enqueue(store, priority=0, send_after=later(-10))
    future = enqueue(store, priority=100, send_after=later(60))
    claimed = store.claim("w1", 10, lease_seconds=60, now=T0)
    assert [j.id for j in claimed] == [high_new, low_old, low_new]
    assert status_of(store, future) is Status.PENDING
    assert store.claim("w1", 10, lease_seconds=60, now=later(61))[0].id == future


def test_claim_respects_limit_and_sets_lease(store: Store) -> None:
    for _ in range(5):
        enqueue(store, send_after=T0)
    first = store.claim("w1", 3, lease_seconds=90, now=T0)
    second = store.claim("w2", 3, lease_seconds=90, now=T0)
    assert len(first) == 3 and len(second) == 2
    assert not {j.id for j in first} & {j.id for j in second}
    assert all(j.lease_owner == "w1" and j.lease_expires_at == later(90) for j in first)
    assert store.claim("w3", 3, lease_seconds=90, now=T0) == []


def test_complete_sent_records_attempt_and_message_id(store: Store) -> None:
    enqueue(store, send_after=T0)
    [job] = store.claim("w1", 1, lease_seconds=60, now=T0)
    assert store.complete([sent(job, "w1", message_id="<m1@example.com>")], now=later(1)) == 1
    got = store.get(job.id)
    assert got.status is Status.SENT
    assert (got.attempts, got.sent_at, got.message_id) == (1, later(1), "<m1@example.com>")
    assert (got.lease_owner, got.lease_expires_at) == (None, None)
    [attempt] = store.attempts(job.id)
    assert (attempt.attempt, attempt.outcome, attempt.smtp_code) == (1, Outcome.SENT, 250)
    assert attempt.worker == "w1"


def test_retry_reschedules_and_failure_is_final(store: Store) -> None:
    enqueue(store, send_after=T0)
    [job] = store.claim("w1", 1, lease_seconds=60, now=T0)
    retry = sent(job, "w1", outcome=Outcome.RETRY, smtp_code=451, error="451 try later")
    store.complete([Completion(**{**_fields(retry), "retry_in_seconds": 120})], now=T0)
    got = store.get(job.id)
    assert (got.status, got.attempts, got.last_error) == (Status.PENDING, 1, "451 try later")
    assert got.next_attempt_at == later(120)
    assert store.claim("w1", 1, lease_seconds=60, now=later(119)) == []
    [again] = store.claim("w1", 1, lease_seconds=60, now=later(120))
    store.complete(
        [sent(again, "w1", outcome=Outcome.FAILED, smtp_code=550, error="550 no such user")]
    )
    got = store.get(job.id)
    assert (got.status, got.attempts, got.last_error) == (Status.FAILED, 2, "550 no such user")
    assert [a.outcome for a in store.attempts(job.id)] == [Outcome.RETRY, Outcome.FAILED]


def _fields(c: Completion) -> dict[str, object]:
    return {name: getattr(c, name) for name in Completion.__slots__}


def test_outcome_from_a_worker_that_lost_the_lease_changes_nothing(store: Store) -> None:
    enqueue(store, send_after=T0)
    [job] = store.claim("w1", 1, lease_seconds=60, now=T0)
    assert store.rescue(now=later(61)) == [job.id]
    [again] = store.claim("w2", 1, lease_seconds=60, now=later(61))
    assert store.complete([sent(job, "w1")]) == 0
    assert store.get(job.id).lease_owner == "w2"
    assert store.complete([sent(again, "w2")]) == 1
    assert status_of(store, job.id) is Status.SENT


def test_an_smtp_reply_with_a_nul_or_invalid_utf8_is_recorded_not_retried_forever(
    store: Store,
) -> None:
    """aiosmtplib decodes replies with surrogateescape: bad bytes must not block the batch."""
    for _ in range(2):
        enqueue(store, send_after=T0)
    garbled, nul = store.claim("w1", 2, lease_seconds=60, now=T0)
    outcomes = [
        sent(garbled, "w1", outcome=Outcome.FAILED, smtp_code=550, error="550 bad \udcff byte"),
        sent(nul, "w1", smtp_text="250 queued\x00 as 1"),
    ]
    assert store.complete(outcomes, now=later(1)) == 2
    assert store.get(garbled.id).last_error == "550 bad ? byte"
    assert [a.smtp_text for a in store.attempts(nul.id)] == ["250 queued\ufffd as 1"]


def test_release_gives_job_back_without_counting_an_attempt(store: Store) -> None:
    enqueue(store, send_after=T0)
    [job] = store.claim("w1", 1, lease_seconds=60, now=T0)
    assert store.release([job.id], "other") == 0
    assert store.release([job.id], "w1", now=later(5)) == 1
    got = store.get(job.id)
    assert (got.status, got.attempts, got.lease_owner) == (Status.PENDING, 0, None)
    assert store.claim("w2", 1, lease_seconds=60, now=later(5))[0].id == job.id


def test_expired_leases_are_rescued_and_live_ones_are_not(store: Store) -> None:
    for _ in range(2):
        enqueue(store, send_after=T0)
    [short] = store.claim("w1", 1, lease_seconds=10, now=T0)
    [long] = store.claim("w2", 1, lease_seconds=100, now=T0)
    assert store.rescue(now=later(9)) == []
    assert store.rescue(now=later(11)) == [short.id]
    assert status_of(store, long.id) is Status.SENDING
    got = store.get(short.id)
    assert (got.status, got.attempts, got.lease_owner) == (Status.PENDING, 0, None)
    assert "w1" in (got.last_error or "")
    assert [a.outcome for a in store.attempts(short.id)] == [Outcome.LOST]
    assert [j.id for j in store.claim("w3", 5, lease_seconds=10, now=later(11))] == [short.id]


def test_rescue_by_owner_takes_only_that_workers_jobs(store: Store) -> None:
    for _ in range(3):
        enqueue(store, send_after=T0)
    mine = store.claim("dead", 2, lease_seconds=300, now=T0)
    [theirs] = store.claim("alive", 1, lease_seconds=300, now=T0)
    assert sorted(store.rescue(owner="dead", now=later(1))) == sorted(j.id for j in mine)
    assert status_of(store, theirs.id) is Status.SENDING


def test_extend_leases_keeps_a_slow_send_from_being_rescued(store: Store) -> None:
    enqueue(store, send_after=T0)
    [job] = store.claim("w1", 1, lease_seconds=10, now=T0)
    assert store.extend_leases([job.id], "w1", lease_seconds=10, now=later(8)) == 1
    assert store.rescue(now=later(12)) == []
    assert store.rescue(now=later(19)) == [job.id]


def test_requeue_failed_resets_attempts_and_is_due_now(store: Store) -> None:
    ids = [enqueue(store) for _ in range(3)]
    jobs = store.claim("w", 3, lease_seconds=60)
    store.complete([sent(j, "w", outcome=Outcome.FAILED, error="550 nope") for j in jobs])
    assert store.requeue_failed([ids[0]]) == 1
    assert store.requeue_failed(limit=1) == 1
    assert store.counts().by_status == {Status.PENDING: 2, Status.FAILED: 1}
    assert store.requeue_failed() == 1
    got = store.get(ids[0])
    assert (got.status, got.attempts) == (Status.PENDING, 0)
    assert len(store.claim("w", 10, lease_seconds=60)) == 3


def test_cancel_and_requeue_check_state_and_existence(store: Store) -> None:
    job_id = enqueue(store)
    assert store.cancel(job_id).status is Status.CANCELLED
    with pytest.raises(JobStateError, match=r"cannot cancel .* cancelled"):
        store.cancel(job_id)
    assert store.requeue(job_id).status is Status.PENDING
    with pytest.raises(JobStateError, match=r"cannot requeue .* pending"):
        store.requeue(job_id)
    with pytest.raises(JobNotFoundError, match="no job with id nope"):
        store.cancel("nope")
    with pytest.raises(JobNotFoundError):
        store.get("nope")


def test_counts_by_status_and_oldest_due_age(store: Store) -> None:
    enqueue(store, send_after=later(-90))
    enqueue(store, send_after=later(-30))
    enqueue(store, send_after=later(500))
    counts = store.counts(now=T0)
    assert counts.by_status == {Status.PENDING: 3}
    assert counts.oldest_due_age_seconds == pytest.approx(90, abs=0.01)
    store.claim("w", 10, lease_seconds=60, now=T0)
    counts = store.counts(now=T0)
    assert (counts.pending, counts.sending, counts.depth) == (1, 2, 3)
    assert counts.oldest_due_age_seconds is None


def test_delete_finished_removes_old_finished_jobs_and_attempts_in_batches(store: Store) -> None:
    old = [enqueue(store, send_after=T0) for _ in range(25)]
    jobs = store.claim("w", 100, lease_seconds=60, now=T0)
    store.complete([sent(j, "w") for j in jobs], now=T0)
    recent = enqueue(store, send_after=later(86400 * 10))
    [fresh] = store.claim("w", 1, lease_seconds=60, now=later(86400 * 10))
    store.complete([sent(fresh, "w")], now=later(86400 * 10))
    pending = enqueue(store, send_after=T0)

    cutoff_now = later(86400 * 12)
    assert store.count_finished(older_than_days=7, now=cutoff_now) == 25
    batches: list[int] = []
    deleted = store.delete_finished(7, batch_size=10, now=cutoff_now, on_batch=batches.append)
    assert (deleted, batches) == (25, [10, 10, 5])
    assert store.attempts(old[0]) == []
    assert status_of(store, recent) is Status.SENT
    assert status_of(store, pending) is Status.PENDING
    with pytest.raises(JobNotFoundError):
        store.get(old[0])


def test_schema_check_names_the_command_to_run(unmigrated_store: Store, store: Store) -> None:
    with pytest.raises(SchemaError, match="run `mailqctl migrate`"):
        check_schema(unmigrated_store.engine)
    with pytest.raises(SchemaError, match="run `mailqctl migrate`"):
        unmigrated_store.counts()
    assert check_schema(store.engine) == head_revision()
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="newer than this mailqd"):
        check_schema(store.engine)


def test_migrations_build_exactly_the_declared_schema(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from mailqd.store.schema import metadata

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = compare_metadata(context, metadata)
    assert diff == []


def email_queue_indexes(pg_url: str) -> dict[str, str]:
    """Each index of `email_queue` on PostgreSQL: name -> its CREATE INDEX statement."""
    store = Store.from_url(pg_url)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'email_queue'"
        ).all()
    store.close()
    return dict(rows)


def test_no_index_but_the_claim_index_leads_with_status_over_pending_rows(pg_url: str) -> None:
    """The planner must have one way to find pending rows: the claim index, in claim order.

    An index on (status, ...) that also held pending rows let stale statistics
    ("few pending", as after a quiet spell) send each claim through it: every
    pending row read and sorted per claim, a 20,000-job backlog drained at half
    speed (bench/bench_daemon.py). Such an index must leave pending rows out.
    """
    definitions = email_queue_indexes(pg_url)
    assert "pending" in definitions["ix_email_queue_claim"]
    leading_status = {
        name: definition
        for name, definition in definitions.items()
        if "btree (status" in definition and name != "ix_email_queue_claim"
    }
    assert leading_status, "the finished-jobs index is expected to lead with status"
    for name, definition in leading_status.items():
        predicate = definition.partition(" WHERE ")[2]
        assert predicate and "pending" not in predicate, f"{name} holds pending rows: {definition}"


def test_the_lease_index_is_not_keyed_on_status_so_by_id_updates_use_the_primary_key(
    pg_url: str,
) -> None:
    """Complete, release and extend find held jobs by id *and* `status = 'sending'`.

    Partial on `status = 'sending'`, the lease index matched those conditions,
    and with few sending rows in the statistics the planner read the whole
    index for each batch instead of the primary key: until VACUUM, that is
    one dead entry per lease ever taken (80,000 deliveries: 1,880 instead of
    3,540 msg/s, bench/bench_daemon.py). Rows with a lease are exactly the
    held rows, and the rescuer and stats still find them through it.
    """
    predicate = email_queue_indexes(pg_url)["ix_email_queue_lease"].partition(" WHERE ")[2]
    assert "lease_expires_at IS NOT NULL" in predicate
    assert "status" not in predicate
