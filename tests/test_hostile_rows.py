"""Rows that no claim can stall: hostile values in every column of `email_queue`, by plain SQL.

On PostgreSQL the rows are written as the enqueue-only role that `mailqctl
grant-enqueue` makes (the columns it may write; what the server accepts
but psycopg cannot load: infinite and out-of-range timestamps, JSON nested
past Python's parser); on SQLite, which keeps any value in any column, as
the owner. A row that cannot be read must fail alone, at its claim, with
its column in `last_error`; the rows claimed with it must be sent at their
first attempt, by a worker that never stops; and no row may stay `sending`
with no worker holding it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctl_process import invoke, ok_json
from mailqd.daemon.worker import Worker
from mailqd.models import Status
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from pg import libpq_url
from smtp_server import SmtpServer, smtp_server_fixture
from test_roles import EnqueueRole, enqueue_role
from test_worker import enqueue, make_settings, running, smtp_factory

__all__ = ["enqueue_role", "smtp_server_fixture"]

pytestmark = pytest.mark.timeout(180)

GOOD = 20
DEEP = 3000
"""Levels of JSON nesting: the databases store it, Python's parser gives up near 1,000."""


@dataclass(frozen=True)
class Queue:
    """A database under attack: the daemon's store, and who writes the hostile rows."""

    store: Store
    url: str
    writer_url: str
    """The enqueue-only role on PostgreSQL; the tables' owner on SQLite."""

    @property
    def postgres(self) -> bool:
        return self.store.dialect == "postgresql"


@pytest.fixture(params=["postgresql", "sqlite"])
def queue(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Queue]:
    if request.param == "postgresql":
        role: EnqueueRole = request.getfixturevalue("enqueue_role")
        url, writer = role.owner_url, role.url
    else:
        engine = make_engine(sqlite_url)
        upgrade(engine)
        engine.dispose()
        url = writer = sqlite_url
    store = Store.from_url(url)
    yield Queue(store, url, writer)
    store.close()


@dataclass(frozen=True)
class Hostile:
    column: str
    sql: str
    """The value, as an SQL expression."""


DEEP_ARRAY = "[" * DEEP + "]" * DEEP
DEEP_OBJECT = '{"a":' * DEEP + "1" + "}" * DEEP

PG_HOSTILE = [
    Hostile("expires_at", "'infinity'"),
    Hostile("expires_at", "'-infinity'"),
    Hostile("expires_at", "'20000-01-01 00:00:00+00'"),
    Hostile("next_attempt_at", "'-infinity'"),
    Hostile("next_attempt_at", "'4000-01-01 00:00:00+00 BC'"),
    Hostile("variables", f"CAST('{DEEP_ARRAY}' AS jsonb)"),
    Hostile("headers", f"CAST('{DEEP_OBJECT}' AS jsonb)"),
    Hostile("variables", 'CAST(\'{"n": ' + "9" * 5000 + "}' AS jsonb)"),
]
SQLITE_HOSTILE = [
    Hostile("id", "x'0102'"),
    Hostile("id", "CAST(x'ff' AS TEXT)"),
    Hostile("recipient_to", "x'00ff'"),
    Hostile("subject", "CAST(x'c328' AS TEXT)"),
    *(Hostile(c, "x'ff'") for c in ("body", "html", "template_id", "cc", "bcc", "reply_to")),
    *(Hostile(c, "x'ff'") for c in ("from_address", "idempotency_key", "message_id")),
    Hostile("last_error", "x'ff'"),
    Hostile("variables", f"'{DEEP_ARRAY}'"),
    Hostile("headers", f"'{DEEP_OBJECT}'"),
    Hostile("attempts", "'x'"),
    Hostile("attempts", str(2**40)),
    Hostile("priority", "'high'"),
    Hostile("priority", "2.5"),
    Hostile("max_attempts", "'three'"),
    Hostile("max_attempts", "x'03'"),
    Hostile("next_attempt_at", "'0000 is no time'"),
    Hostile("expires_at", "'tomorrow'"),
    Hostile("expires_at", "0"),
    Hostile("expires_at", "'0001-01-01 00:00:00+05:00'"),
    Hostile("created_at", "'garbage'"),
    Hostile("created_at", "x'00'"),
    Hostile("sent_at", "'never'"),
]


def insert(conn: Any, postgres: bool, values: dict[str, str]) -> Any:
    """One row by plain SQL (values are SQL); its key: PostgreSQL's id, SQLite's rowid."""
    key = "id" if postgres else "rowid"
    sql = (
        f"INSERT INTO email_queue ({', '.join(values)}) "
        f"VALUES ({', '.join(values.values())}) RETURNING {key}"
    )
    return conn.execute(sql).fetchone()[0]


def connect(url: str) -> Any:
    """A DB-API connection of the writer, as another application would hold one."""
    if url.startswith("sqlite"):
        import sqlite3

        return sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    return psycopg.connect(libpq_url(url), autocommit=True)


def quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def by_key(queue: Queue, key: Any) -> tuple[str, int, str | None, list[tuple[str, str]]]:
    """(status, attempts, last_error, attempt rows) of a row found by its key, read by SQL."""
    where = "q.id = :k" if queue.postgres else "q.rowid = :k"
    with queue.store.engine.connect() as conn:
        status, attempts, error = conn.execute(
            sa.text(f"SELECT status, attempts, last_error FROM email_queue AS q WHERE {where}"),
            {"k": key},
        ).one()
        tried = conn.execute(
            sa.text(
                "SELECT a.outcome, a.smtp_text FROM email_attempts AS a "
                f"JOIN email_queue AS q ON a.job_id = q.id WHERE {where} ORDER BY a.id"
            ),
            {"k": key},
        ).all()
    return status, attempts, error, [tuple(t) for t in tried]


def sending_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        query = "SELECT count(*) FROM email_queue WHERE status = 'sending'"
        return int(conn.execute(sa.text(query)).scalar_one())


# -- the poison-row test ---------------------------------------------------------------


@pytest.mark.parametrize("screening", [False, True], ids=["plain", "screened"])
def test_each_hostile_row_fails_alone_and_the_good_rows_go_out_at_their_first_attempt(
    queue: Queue, smtp_server: SmtpServer, screening: bool
) -> None:
    hostile = PG_HOSTILE if queue.postgres else SQLITE_HOSTILE
    token = uuid.uuid4().hex[:8]
    good = [f"good{i}-{token}@example.com" for i in range(GOOD)]
    with connect(queue.writer_url) as writer:
        good_keys = [
            insert(
                writer,
                queue.postgres,
                {"recipient_to": quoted(to), "subject": "'hi'", "body": "'b'"},
            )
            for to in good
        ]
        bad_keys = [
            insert(
                writer,
                queue.postgres,
                {
                    "recipient_to": quoted(f"bad{n}-{token}@example.com"),
                    "subject": quoted(f"bad {row.column}"),
                    "body": "'b'",
                    row.column: row.sql,
                },
            )
            for n, row in enumerate(hostile)
        ]
    extra = {"dedup_window": 60.0} if screening else {}
    settings_ = make_settings(queue.url, smtp_server.url(), **extra)
    started = time.monotonic()

    async def scenario() -> None:
        worker = Worker(settings_, queue.store, "w1", smtp_factory(settings_))
        async with running(worker):  # raises here if the worker died
            await worker.wait_until(
                lambda t: t.sent >= GOOD and t.failed >= len(hostile), settings_.lease_seconds
            )
        assert (worker.totals.sent, worker.totals.failed) == (GOOD, len(hostile))

    asyncio.run(scenario())
    assert time.monotonic() - started < settings_.lease_seconds
    received = sorted(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert received == sorted(good)
    for key in good_keys:
        assert by_key(queue, key)[:2] == ("sent", 1)
    for key, row in zip(bad_keys, hostile, strict=True):
        status, attempts, error, tried = by_key(queue, key)
        assert status == "failed", (row, error)
        assert error is not None and error.startswith(f"{row.column}: cannot be read: "), row
        assert tried == [("failed", error)]
        assert attempts == 1 or row.column == "attempts"
    assert sending_rows(queue.store) == 0
    # The failed rows can still be listed (what the driver refuses is shown as absent or
    # with its bytes replaced), and requeued.
    failed = queue.store.list_failed(100)
    assert len(failed) == len(hostile)
    if queue.postgres:
        by_id = {job.id: job for job in failed}
        assert by_id[bad_keys[0]].expires_at is None
        assert by_id[bad_keys[0]].last_error == (
            "expires_at: cannot be read: timestamp too large (after year 10K)"
        )
        assert queue.store.requeue(bad_keys[0]).status is Status.PENDING
    else:
        [utf8] = [
            job
            for job in failed
            if job.last_error == "subject: cannot be read: not valid UTF-8 text"
        ]
        assert "\ufffd" in utf8.subject
        assert queue.store.requeue(utf8.id).status is Status.PENDING


def test_a_claim_returns_the_readable_rows_and_fails_the_others_in_the_same_call(
    queue: Queue,
) -> None:
    hostile = PG_HOSTILE[:2] if queue.postgres else SQLITE_HOSTILE[:3]
    with connect(queue.writer_url) as writer:
        for row in hostile:
            insert(writer, queue.postgres, {"recipient_to": "'x@example.com'", row.column: row.sql})
        insert(writer, queue.postgres, {"recipient_to": "'ok@example.com'", "body": "'b'"})
    claim = queue.store.claim_batch("w", 10, lease_seconds=60)
    assert [job.recipient_to for job in claim.jobs] == ["ok@example.com"]
    assert sorted(u.column for u in claim.unreadable) == sorted(r.column for r in hostile)
    assert claim.claimed == len(hostile) + 1
    assert queue.store.counts().by_status.get(Status.FAILED) == len(hostile)


# -- the client's own values, in a session east of UTC -----------------------------------


def test_year_9999_in_utc_read_in_tokyo_fails_alone(pg_url: str, smtp_server: SmtpServer) -> None:
    """9999-12-31 20:00 UTC is in year 10000 in Tokyo, which psycopg cannot load."""
    database = sa.engine.make_url(pg_url).database
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {database} SET TimeZone = 'Asia/Tokyo'")
    store = Store.from_url(pg_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Tokyo"
        late = datetime(9999, 12, 31, 20, tzinfo=UTC)
        with store.engine.begin() as conn:
            bad = conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, body, expires_at) "
                    "VALUES ('late@example.com', 'b', :late) RETURNING id"
                ),
                {"late": late},
            ).scalar_one()
        good = enqueue(store, 3)
        settings_ = make_settings(pg_url, smtp_server.url())

        async def scenario() -> None:
            worker = Worker(settings_, store, "w1", smtp_factory(settings_))
            async with running(worker):
                await worker.wait_until(lambda t: t.sent + t.failed >= 4, settings_.lease_seconds)

        asyncio.run(scenario())
        status, attempts, error, tried = by_key(Queue(store, pg_url, pg_url), bad)
        assert (status, attempts) == ("failed", 1)
        assert error == "expires_at: cannot be read: timestamp too large (after year 10K)"
        assert tried == [("failed", error)]
        assert {store.get(job_id).status for job_id in good} == {Status.SENT}
        assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == [
            f"user{i}@example.com" for i in range(3)
        ]
    finally:
        store.close()


# -- sending, and held by no worker -----------------------------------------------------


def test_sending_rows_no_worker_holds_are_counted_rescued_and_then_sent(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    far = "'infinity'" if store.dialect == "postgresql" else "'9999-01-01 00:00:00.000'"
    soon = datetime.now(UTC) + timedelta(hours=1)
    rows = {
        "no lease": "NULL, NULL",
        "owner, no expiry": "'ghost', NULL",
        "expiry, no owner": f"NULL, {quoted(soon.strftime('%Y-%m-%d %H:%M:%S.000'))}",
        "a lease for ever": f"'ghost', {far}",
    }
    ids = {}
    with store.engine.begin() as conn:
        for n, (name, lease) in enumerate(rows.items()):
            ids[name] = conn.execute(
                sa.text(
                    "INSERT INTO email_queue (recipient_to, subject, body, status, lease_owner, "
                    f"lease_expires_at) VALUES ('r{n}@example.com', :s, 'b', 'sending', {lease}) "
                    "RETURNING id"
                ),
                {"s": name},
            ).scalar_one()
    assert store.queue_stats().unleased == 3
    assert ok_json(invoke("stats", "--json", db=db_url))["sending_without_lease"] == 3

    assert sorted(store.rescue()) == sorted(ids.values())
    assert store.queue_stats().unleased == 0
    assert store.get(ids["no lease"]).last_error == "sending with no lease: no worker held it"
    assert store.get(ids["a lease for ever"]).last_error == (
        "lease longer than any worker gives: the worker ghost cannot hold it"
    )
    settings_ = make_settings(db_url, smtp_server.url())

    async def scenario() -> None:
        async with Worker(settings_, store, "w1", smtp_factory(settings_)) as worker:
            result = await worker.run_once()
        assert result.sent == 4

    asyncio.run(scenario())
    assert {store.get(i).status for i in ids.values()} == {Status.SENT}


def test_a_sending_row_whose_id_is_not_utf8_is_rescued_with_the_others(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    store = Store.from_url(sqlite_url)
    try:
        with store.engine.begin() as conn:
            for job_id in ("CAST(x'ff' AS TEXT)", "'plain'"):
                conn.execute(
                    sa.text(
                        "INSERT INTO email_queue (id, recipient_to, body, status) "
                        f"VALUES ({job_id}, 'a@x.org', 'b', 'sending')"
                    )
                )
        assert sorted(store.rescue()) == ["plain", "\ufffd"]
        assert sending_rows(store) == 0
    finally:
        store.close()


def test_a_lease_a_worker_could_have_given_is_left_alone(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO email_queue (recipient_to, body) VALUES ('a@x.org', 'b')")
        )
    [job] = store.claim("busy", 1, lease_seconds=3600)
    assert store.rescue() == []
    assert store.queue_stats().unleased == 0
    assert store.get(job.id).status is Status.SENDING


def test_a_status_outside_the_five_is_refused_by_the_database(store: Store) -> None:
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO email_queue (recipient_to, status) VALUES ('a@x.org', 'stuck')")
        )


# -- every column, random values ---------------------------------------------------------

_COLUMNS_PG = {
    "timestamp": ("next_attempt_at", "expires_at", "created_at", "sent_at"),
    "integer": ("priority", "attempts", "max_attempts"),
    "json": ("variables", "headers"),
    "text": (
        "recipient_to", "subject", "body", "html", "template_id", "cc", "bcc", "reply_to",
        "from_address", "idempotency_key", "message_id", "last_error",
    ),
}  # fmt: skip
_PG_CAST = {"timestamp": "timestamptz", "integer": "integer", "json": "jsonb", "text": "text"}
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)


def pg_values(kind: str) -> st.SearchStrategy[str]:
    """Text PostgreSQL accepts for a column of `kind` (cast by the server), extremes first."""
    if kind == "timestamp":
        return st.one_of(
            st.sampled_from(["infinity", "-infinity", "epoch", "now"]),
            st.integers(1, 294276).map(lambda y: f"{y:04d}-06-01 12:00:00+00"),
            st.integers(1, 4713).map(lambda y: f"{y:04d}-06-01 12:00:00+00 BC"),
            st.integers(0, 15).map(lambda h: f"9999-12-31 23:00:00-{h:02d}"),
            st.integers(0, 15).map(lambda h: f"0001-01-01 00:30:00+{h:02d}"),
        )
    if kind == "integer":
        return st.integers(-(2**31), 2**31 - 1).map(str)
    if kind == "json":
        return st.one_of(
            st.integers(1, 4000).map(lambda n: "[" * n + "]" * n),
            st.integers(4000, 6000).map(lambda n: "9" * n),
            st.recursive(
                st.none() | st.booleans() | st.floats(allow_nan=False) | _TEXT,
                lambda inner: (
                    st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3)
                ),
                max_leaves=8,
            ).map(json.dumps),
        )
    return _TEXT


class Raw(str):
    """An SQL expression to put in the row as it is (values SQLite's driver cannot bind)."""


def sqlite_values() -> st.SearchStrategy[Any]:
    """Anything SQLite keeps in any column."""
    return st.one_of(
        st.none(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.binary(max_size=6),
        _TEXT,
        st.sampled_from(["0", "tomorrow", "9999-12-31 23:59:59.999", "0001-01-01T00:00:00+05:00"]),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
        st.integers(4300, 6000).map(lambda n: "9" * n),
        st.binary(min_size=1, max_size=4).map(lambda b: Raw(f"CAST(x'{b.hex()}ff' AS TEXT)")),
    )


@st.composite
def hostile_rows(draw: st.DrawFn, postgres: bool) -> dict[str, Any]:
    kinds = {column: kind for kind, columns in _COLUMNS_PG.items() for column in columns}
    if not postgres:
        kinds["id"] = "text"
    columns = draw(st.lists(st.sampled_from(sorted(kinds)), min_size=1, max_size=4, unique=True))
    if postgres:
        return {column: draw(pg_values(kinds[column])) for column in columns}
    return {column: draw(sqlite_values()) for column in columns}


def test_random_hostile_values_in_every_column_never_stall_a_claim_or_a_worker(
    store: Store, db_url: str, smtp_server: SmtpServer, request: pytest.FixtureRequest
) -> None:
    postgres = store.dialect == "postgresql"
    settings_ = make_settings(db_url, smtp_server.url(), concurrency=8)
    soak = bool(request.config.getoption("--soak"))

    @settings(
        max_examples=300 if soak else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(row=hostile_rows(postgres))
    def check(row: dict[str, Any]) -> None:
        with store.engine.begin() as conn:
            for table in ("email_attempts", "email_queue", "mailqd_dedup"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
        token = uuid.uuid4().hex[:8]
        good = enqueue(store, 2, to=f"good-{token}@example.com")
        names = ", ".join(["recipient_to", "body", *row])
        values = ", ".join(
            [
                "'hostile@example.com'",
                "'b'",
                *(
                    f"CAST(:{c} AS {_PG_CAST[_kind(c)]})" if postgres
                    else v if isinstance(v, Raw) else f":{c}"
                    for c, v in row.items()
                ),
            ]
        )  # fmt: skip
        try:
            with store.engine.begin() as conn:
                conn.execute(
                    sa.text(f"INSERT INTO email_queue ({names}) VALUES ({values})"),
                    {c: v for c, v in row.items() if not isinstance(v, Raw)},
                )
        except sa.exc.DBAPIError:  # the database itself refused the value: nothing to read
            pass

        async def one_pass() -> None:
            async with Worker(settings_, store, f"w-{token}", smtp_factory(settings_)) as worker:
                await worker.run_once()  # raises if the claim or the worker failed

        asyncio.run(one_pass())
        assert {store.get(job_id).status for job_id in good} == {Status.SENT}
        assert sending_rows(store) == 0

    check()


def _kind(column: str) -> str:
    return next(kind for kind, columns in _COLUMNS_PG.items() if column in columns)
