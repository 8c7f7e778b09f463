"""The client library: validation before any write, transactions, idempotency, asyncio."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from mailqd import AsyncClient, Client
from mailqd.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    MissingContentError,
    ValidationError,
)
from mailqd.models import Status
from mailqd.store import Store
from pg import libpq_url


@pytest.fixture
def client(db_url: str) -> Client:
    with Client(db_url) as client:
        yield client  # type: ignore[misc]


def row_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM email_queue")).scalar_one())


def test_enqueue_returns_the_id_of_a_pending_job(client: Client, store: Store) -> None:
    job_id = client.enqueue(["alice@example.com", "Bob <bob@example.org>"], "Hi", "Hello")
    job = store.get(job_id)
    assert job.status is Status.PENDING
    assert job.recipient_to == "alice@example.com, Bob <bob@example.org>"


BAD_CALLS = [
    pytest.param({"to": []}, InvalidAddressError, "at least one recipient", id="no-recipient"),
    pytest.param({"to": "not-an-address"}, InvalidAddressError, "not a valid", id="bad-address"),
    pytest.param({"to": "a@example.com, b@"}, InvalidAddressError, "b@", id="one-bad-of-two"),
    pytest.param({"cc": "x@@example.com"}, InvalidAddressError, "cc", id="bad-cc"),
    pytest.param(
        {"to": "a@example.com\r\nBcc: victim@example.com"},
        HeaderInjectionError,
        "CR, LF or NUL",
        id="crlf-in-to",
    ),
    pytest.param(
        {"subject": "Hi\r\nBcc: victim@example.com"},
        HeaderInjectionError,
        "subject",
        id="crlf-subj",
    ),
    pytest.param({"subject": "Hi\x00"}, HeaderInjectionError, "subject", id="nul-in-subject"),
    pytest.param(
        {"headers": {"X-Evil": "a\nBcc: v@example.com"}},
        HeaderInjectionError,
        "X-Evil",
        id="lf-in-header-value",
    ),
    pytest.param(
        {"headers": {"X-Evil\r\nBcc": "v"}}, HeaderInjectionError, "header name", id="crlf-name"
    ),
    pytest.param({"headers": {"Bad Name": "v"}}, ValidationError, "header name", id="space-name"),
    pytest.param({"headers": {"From": "x@example.com"}}, ValidationError, "From", id="reserved"),
    pytest.param({"body": None}, MissingContentError, "body, html or template", id="no-content"),
    pytest.param({"priority": "high"}, ValidationError, "priority", id="priority-type"),
    pytest.param({"max_attempts": 0}, ValidationError, "max_attempts", id="attempts-zero"),
    pytest.param(
        {"send_after": datetime(2030, 1, 1)}, ValidationError, "timezone-aware", id="naive-time"
    ),
    pytest.param(
        {"to": [f"u{i}@example.com" for i in range(101)]},
        ValidationError,
        "more than 100 recipients",
        id="too-many-recipients",
    ),
    pytest.param({"to": "a" * 250 + "@example.com"}, InvalidAddressError, "longer", id="long"),
]


@pytest.mark.parametrize(("change", "error", "text"), BAD_CALLS)
def test_bad_calls_raise_a_named_error_and_write_nothing(
    client: Client, store: Store, change: dict[str, object], error: type[Exception], text: str
) -> None:
    call: dict[str, object] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
    call.update(change)
    with pytest.raises(error, match=text):
        client.enqueue(**call)  # type: ignore[arg-type]
    assert row_count(store) == 0


def test_one_bad_message_in_a_batch_writes_none_and_names_its_index(
    client: Client, store: Store
) -> None:
    good = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
    with pytest.raises(InvalidAddressError, match=r"messages\[2\]\.to"):
        client.enqueue_many([good, good, {**good, "to": "nope"}, good])
    assert row_count(store) == 0


def test_enqueue_many_is_one_transaction_and_keeps_order(client: Client, store: Store) -> None:
    messages = [{"to": f"u{i}@example.com", "subject": f"n{i}", "body": "b"} for i in range(1500)]
    ids = client.enqueue_many(messages)
    assert len(set(ids)) == 1500
    assert store.get(ids[1499]).subject == "n1499"


def test_same_idempotency_key_twice_is_one_row_and_one_id(client: Client, store: Store) -> None:
    first = client.enqueue("a@example.com", "Hi", "Hello", idempotency_key="signup-42")
    second = client.enqueue("a@example.com", "Hi", "Hello", idempotency_key="signup-42")
    assert first == second
    assert row_count(store) == 1


def test_scheduling_fields_reach_the_job(client: Client, store: Store) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    job_id = client.enqueue(
        "a@example.com", "Hi", "Hello", send_after=when, expires_at=when + timedelta(days=1)
    )
    job = store.get(job_id)
    assert abs((job.next_attempt_at - when).total_seconds()) < 0.001
    assert store.claim("w", 10, lease_seconds=60) == []


def test_transactional_enqueue_follows_the_callers_transaction(
    client: Client, store: Store
) -> None:
    with store.engine.connect() as conn:
        trans = conn.begin()
        client.enqueue("a@example.com", "rolled back", "x", connection=conn)
        trans.rollback()
    assert row_count(store) == 0
    with store.engine.connect() as conn:
        trans = conn.begin()
        job_id = client.enqueue("a@example.com", "committed", "x", connection=conn)
        if store.dialect == "postgresql":  # SQLite readers would wait for the write lock
            assert row_count(store) == 0
        trans.commit()
    assert store.get(job_id).subject == "committed"
    assert row_count(store) == 1


def test_transactional_enqueue_on_a_raw_psycopg_connection(pg_url: str) -> None:
    store = Store.from_url(pg_url)
    with Client(pg_url) as client, psycopg.connect(libpq_url(pg_url)) as raw:
        client.enqueue("a@example.com", "rolled back", "x", variables={"k": 1}, connection=raw)
        raw.rollback()
        job_id = client.enqueue("a@example.com", "kept", "x", headers={"X-A": "1"}, connection=raw)
        assert row_count(store) == 0
        raw.commit()
    job = store.get(job_id)
    assert (job.subject, job.headers) == ("kept", {"X-A": "1"})
    assert row_count(store) == 1
    store.close()


def test_async_client_enqueues_and_joins_async_transactions(pg_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def scenario() -> tuple[str, str]:
        async with AsyncClient(pg_url) as client:
            plain = await client.enqueue("a@example.com", "plain", "x")
            ids = await client.enqueue_many(
                [{"to": "b@example.com", "subject": "bulk", "body": "x"}] * 3
            )
            engine = create_async_engine(pg_url)
            async with engine.connect() as conn:
                await conn.begin()
                await client.enqueue("c@example.com", "rolled back", "x", connection=conn)
                await conn.rollback()
            async with engine.begin() as conn:
                kept = await client.enqueue("c@example.com", "outbox", "x", connection=conn)
            await engine.dispose()
            assert len(set(ids)) == 3
            return plain, kept

    plain, kept = asyncio.run(scenario())
    store = Store.from_url(pg_url)
    assert store.get(plain).subject == "plain"
    assert store.get(kept).subject == "outbox"
    assert row_count(store) == 5
    store.close()
