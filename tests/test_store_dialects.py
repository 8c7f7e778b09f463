"""The dialect objects: each operation on both databases, and driver errors by their codes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from mailqd.errors import (
    ConflictError,
    ConstraintError,
    DatabaseUnavailableError,
    JobNotFoundError,
    JobStateError,
    MailqError,
    NotFoundError,
    SchemaError,
    StoreError,
    TemplateExistsError,
    TemplateNotFoundError,
)
from mailqd.models import Job, Outcome, Status
from mailqd.store import Completion, Store
from mailqd.store.dialects import POSTGRESQL, SQLITE, PostgresDialect, SqliteDialect, dialect_for
from mailqd.store.engine import normalize_url
from mailqd.store.schema import NOTIFY_CHANNEL, email_templates, rate_limit
from mailqd.store.screened import admit
from mailqd.store.sql import q
from mailqd.store.translate import sqlstate_of
from mailqd.validation import build_job

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def enqueue(store: Store) -> str:
    return store.enqueue(build_job(to="a@example.com", subject="Hi", body="Hello"))


def held_job(store: Store, owner: str = "w1") -> Job:
    enqueue(store)
    (job,) = store.claim(owner, 1, 60.0, now=T0)
    return job


def scalar(store: Store, expr: sa.ColumnElement[object]) -> object:
    with store.database.begin() as conn:
        return conn.execute(sa.select(expr)).scalar_one()


def test_each_database_gets_its_own_dialect(store: Store) -> None:
    dialect = store.database.dialect
    assert dialect is dialect_for(store.dialect_name)
    assert isinstance(dialect, PostgresDialect if store.is_postgresql else SqliteDialect)
    assert store.dialect_name == store.dialect == dialect.name
    assert dialect.checks_row_types is (not store.is_postgresql)
    with pytest.raises(ValueError, match="does not run on 'mysql'"):
        dialect_for("mysql")


def test_greatest_least_and_floor(store: Store) -> None:
    d = store.database.dialect
    one, two, three = (sa.literal(x) for x in (1.0, 2.5, 3.0))
    assert scalar(store, d.greatest(one, two, three)) == 3.0
    assert scalar(store, d.least(one, two, three)) == 1.0
    assert scalar(store, d.floor_int(sa.literal(2.75))) == 2


def test_epoch_is_the_given_time_or_the_database_clock(store: Store) -> None:
    d = store.database.dialect
    assert scalar(store, d.epoch(1234.5)) == 1234.5
    assert scalar(store, d.epoch()) == pytest.approx(time.time(), abs=5)


def test_time_arithmetic(store: Store) -> None:
    d = store.database.dialect
    at = sa.literal(T0, type_=q.c.created_at.type)
    assert scalar(store, d.add_seconds(at, 90.5)) == T0 + timedelta(seconds=90.5)
    later = d.add_seconds(at, 30)
    assert scalar(store, d.seconds_between(later, at)) == pytest.approx(30.0)


def test_insert_on_conflict(store: Store) -> None:
    d = store.database.dialect
    row = {"name": "b", "tokens": 1.0, "refilled_at": 0.0, "granted": 0}
    first = (
        d.insert(rate_limit)
        .values(row)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(rate_limit.c.name)
    )
    bumped = d.insert(rate_limit).values(row)
    bumped = bumped.on_conflict_do_update(
        index_elements=["name"], set_={"tokens": rate_limit.c.tokens + bumped.excluded.tokens}
    )
    with store.database.begin() as conn:
        assert conn.execute(first).all() == [("b",)]
        assert conn.execute(first).all() == []
        conn.execute(bumped)
        assert conn.execute(sa.select(rate_limit.c.tokens)).scalar_one() == 2.0


def test_one_statement_commits_on_its_own(store: Store) -> None:
    job_id = enqueue(store)
    with store.database.one_statement() as conn:
        if store.is_postgresql:  # one round trip: no BEGIN, no COMMIT
            assert conn.get_execution_options()["isolation_level"] == "AUTOCOMMIT"
        else:  # BEGIN IMMEDIATE: the write lock for the read-then-write
            assert conn.in_transaction()
        conn.execute(q.update().where(q.c.id == job_id).values(priority=7))
    assert store.get(job_id).priority == 7


def test_notify_wakes_a_listener_on_postgresql_and_is_nothing_on_sqlite(store: Store) -> None:
    if not store.is_postgresql:
        with store.database.begin() as conn:
            store.database.dialect.notify(conn)  # SQLite workers poll
        return
    conninfo = normalize_url(store.url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as raw:
        raw.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with store.database.begin() as conn:
            store.database.dialect.notify(conn)
        got = list(raw.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in got] == [NOTIFY_CHANNEL]


def test_batch_complete_records_outcomes_and_attempts(store: Store) -> None:
    job = held_job(store)
    lost = Completion(
        job_id=job.id,
        owner="someone else",
        attempt=1,
        outcome=Outcome.SENT,
        started_at=T0,
        duration_seconds=0.1,
    )
    done = Completion(
        job_id=job.id,
        owner="w1",
        attempt=1,
        outcome=Outcome.SENT,
        started_at=T0,
        duration_seconds=0.1,
        smtp_code=250,
        smtp_text="OK",
        message_id="<m@x>",
    )
    dialect = store.database.dialect
    assert dialect.complete(store.database, [lost], T0) == 0
    assert dialect.complete(store.database, [done], T0) == 1
    after = store.get(job.id)
    assert (after.status, after.sent_at, after.message_id) == (Status.SENT, T0, "<m@x>")
    assert [(a.worker, a.smtp_code) for a in store.attempts(job.id)] == [
        ("someone else", None),
        ("w1", 250),
    ]


def test_batch_delete_takes_jobs_and_their_attempts(store: Store) -> None:
    jobs = [held_job(store) for _ in range(3)]
    store.complete(
        [
            Completion(
                job_id=j.id,
                owner="w1",
                attempt=1,
                outcome=Outcome.FAILED,
                started_at=T0,
                duration_seconds=0.0,
            )
            for j in jobs
        ],
        now=T0,
    )
    cutoff = q.c.status == Status.FAILED
    with store.database.begin() as conn:
        assert store.database.dialect.delete_batch(conn, cutoff, 2) == 2
    with store.database.begin() as conn:
        assert store.database.dialect.delete_batch(conn, cutoff, 2) == 1
        assert conn.execute(sa.text("SELECT count(*) FROM email_attempts")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM email_queue")).scalar_one() == 0


def test_cleanup_pauses_only_on_sqlite() -> None:
    assert POSTGRESQL.pause_after_batch(0.5) == 0.0
    assert SQLITE.pause_after_batch(0.001) == 0.025
    assert SQLITE.pause_after_batch(0.05) == 0.05
    assert SQLITE.pause_after_batch(5.0) == 0.1


# -- driver errors, translated by SQLSTATE / SQLite's result code -----------------------


def test_a_real_unique_violation_is_a_constraint_error(store: Store) -> None:
    row = {"id": "welcome", "subject": "Hi", "text_body": "Hello"}
    with store.database.begin() as conn:
        conn.execute(email_templates.insert().values(row))
    with (
        pytest.raises(ConstraintError, match=r"^database error: ") as caught,
        store.database.begin() as conn,
    ):
        conn.execute(email_templates.insert().values(row))
    assert isinstance(caught.value, StoreError)  # handled as every database error was
    if store.is_postgresql:
        assert sqlstate_of(caught.value.__cause__) == "23505"


def test_a_real_undefined_table_is_a_schema_error(unmigrated_store: Store) -> None:
    with pytest.raises(SchemaError, match="run `mailqctl migrate`") as caught:
        unmigrated_store.counts()
    if unmigrated_store.is_postgresql:
        assert sqlstate_of(caught.value.__cause__) == "42P01"


def test_a_database_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    try:
        with pytest.raises(DatabaseUnavailableError, match=r"^database unavailable: "):
            store.counts()
    finally:
        store.close()


def test_missing_and_conflicting_things_are_not_outages(store: Store) -> None:
    for error in (JobNotFoundError, TemplateNotFoundError):
        assert issubclass(error, NotFoundError) and not issubclass(error, StoreError)
    for error in (JobStateError, TemplateExistsError):
        assert issubclass(error, ConflictError) and not issubclass(error, StoreError)
    assert issubclass(NotFoundError, MailqError) and issubclass(ConflictError, MailqError)
    with pytest.raises(NotFoundError):
        store.get("nope")
    with pytest.raises(NotFoundError):
        store.templates.get("nope")


# -- the screening policies' one admission rule (pure) ------------------------------------


def test_admit_takes_jobs_in_order_while_every_key_has_room(store: Store) -> None:
    jobs = [held_job(store) for _ in range(3)]
    wanted = {jobs[0].id: ["a", "b"], jobs[1].id: ["b"], jobs[2].id: ["a"]}
    room = {"a": 2, "b": 1}
    admitted, refused = admit(jobs, wanted, room)
    assert admitted == [jobs[0], jobs[2]]
    assert refused == [(jobs[1], ["b"])]
    assert room == {"a": 0, "b": 0}
