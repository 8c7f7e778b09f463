"""Attachments in the store: written with their job, read back whole, content once, cleaned up.

On real PostgreSQL and SQLite (the `db_url` fixture), through the client
library as applications use it; the enqueue-only role on PostgreSQL as a
real role.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from ctl_process import invoke
from mailqd import Attachment, Client
from mailqd.errors import LimitExceededError, ValidationError
from mailqd.rules import check_attachments
from mailqd.store import Store
from mailqd.store.sql import q
from mailqd.validation import Limits
from pg import libpq_url

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n"
LOGO = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(3000)


@pytest.fixture
def client(db_url: str) -> Iterator[Client]:
    with Client(db_url) as client:
        yield client


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def counts(store: Store) -> tuple[int, int, int]:
    return tuple(count(store, t) for t in ("email_queue", "email_attachments", "mailqd_blobs"))  # type: ignore[return-value]


def test_bytes_names_and_order_come_back_as_given(client: Client, store: Store) -> None:
    given = [
        Attachment("invoice-2026-12.pdf", PDF),
        Attachment("Überweisung für Jürgen — 請求書.pdf", PDF, "application/pdf"),
        Attachment("logo.png", LOGO, inline=True, content_id="logo@example.com"),
        Attachment("empty.txt", b""),
    ]
    job_id = client.enqueue(
        "a@example.com",
        "Invoice",
        "See attached",
        html='<img src="cid:logo@example.com">',
        attachments=[*given, ("notes.txt", "plain text, é", "text/plain")],
    )
    plain = client.enqueue("b@example.com", "No files", "none")

    back = store.attachments.for_job(job_id)
    assert back[:4] == given
    assert back[4] == Attachment("notes.txt", "plain text, é".encode(), "text/plain")
    assert [a.resolved_content_type for a in back] == [
        "application/pdf",
        "application/pdf",
        "image/png",
        "text/plain",
        "text/plain",
    ]
    both = store.attachments.for_jobs([job_id, plain])
    assert both == {job_id: back, plain: []}

    shown = store.attachments.describe(job_id)
    assert [(i.name, i.size, i.inline, i.content_id) for i in shown] == [
        (a.filename, a.size, a.inline, a.content_id) for a in back
    ]
    assert shown[2].sha256 == hashlib.sha256(LOGO).hexdigest()
    assert not hasattr(shown[0], "content")
    assert store.attachments.describe(plain) == []
    # The job's own row holds none of it; the claim hands the job over as ever.
    [claimed] = [j for j in store.claim("w", 10, lease_seconds=60) if j.id == job_id]
    assert claimed.body == "See attached"
    # What the worker checks at claim, without reading any content.
    check_attachments(store.attachments.describe_jobs([job_id])[job_id], Limits())
    assert counts(store) == (2, 5, 4)  # PDF twice, stored once


def test_the_same_content_enqueued_1000_times_is_stored_once(client: Client, store: Store) -> None:
    many = client.enqueue_many(
        [
            {
                "to": f"user{i}@example.com",
                "subject": f"Invoice {i}",
                "body": "attached",
                "attachments": [
                    Attachment("logo.png", LOGO, inline=True, content_id="logo"),
                    Attachment(f"invoice-{i}.pdf", PDF + str(i).encode()),
                ],
            }
            for i in range(1000)
        ]
    )
    one_by_one = [
        client.enqueue("x@example.com", "again", "b", attachments=[("logo.png", LOGO, None)])
        for _ in range(3)
    ]
    assert counts(store) == (1003, 2003, 1001)
    with store.engine.connect() as conn:
        logo_copies = conn.execute(
            sa.text("SELECT count(*) FROM mailqd_blobs WHERE sha256 = :h"),
            {"h": hashlib.sha256(LOGO).hexdigest()},
        ).scalar_one()
    assert logo_copies == 1
    got = store.attachments.for_jobs([many[0], many[999], one_by_one[2]])
    assert got[many[999]][1].content == PDF + b"999"
    assert got[one_by_one[2]][0].content == LOGO


BAD = [
    pytest.param(
        [Attachment("../etc/passwd", b"x")], "attachments[0].filename", "path", id="dotdot"
    ),
    pytest.param([Attachment("a/b.pdf", b"x")], "attachments[0].filename", "path", id="slash"),
    pytest.param([Attachment("a\\b.pdf", b"x")], "attachments[0].filename", "path", id="backslash"),
    pytest.param([Attachment("a\x00.pdf", b"x")], "attachments[0].filename", "control", id="nul"),
    pytest.param([Attachment("a\r\nb", b"x")], "attachments[0].filename", "control", id="crlf"),
    pytest.param(
        [Attachment("invoice\u202efdp.exe", b"x")],
        "attachments[0].filename",
        "control",
        id="bidi-override",
    ),
    pytest.param([Attachment("", b"x")], "attachments[0].filename", "empty", id="empty"),
    pytest.param([Attachment("..", b"x")], "attachments[0].filename", "'..'", id="dots"),
    pytest.param([Attachment("x" * 256, b"x")], "attachments[0].filename", "255", id="long"),
    pytest.param([Attachment("a.txt", "text")], "attachments[0].content", "bytes", id="str"),  # type: ignore[arg-type]
    pytest.param(
        [Attachment("a", b""), Attachment("b", b"", "pdf")],
        "attachments[1].content_type",
        "MIME type",
        id="bad-type",
    ),
    pytest.param(
        [Attachment("a.png", b"x", inline=True)], "attachments[0].content_id", "inline", id="no-cid"
    ),
    pytest.param(
        [Attachment("a.png", b"x", content_id="<a@b>")],
        "attachments[0].content_id",
        "<>",
        id="angle",
    ),
    pytest.param(
        [Attachment("a.png", b"x", content_id="a b")],
        "attachments[0].content_id",
        "spaces",
        id="space",
    ),
    pytest.param([object()], "attachments[0]", "not object", id="not-an-attachment"),
    pytest.param(
        [Attachment(str(i), b"") for i in range(4)], "attachments", "max_attachments", id="count"
    ),
    pytest.param(
        [Attachment("a", b"x" * 600), Attachment("b", b"x" * 425)],
        "attachments",
        "max_attachment_bytes",
        id="total-size",
    ),
]


@pytest.mark.parametrize(("attachments", "field", "words"), BAD)
def test_bad_attachments_are_refused_naming_the_field_and_nothing_is_written(
    db_url: str, store: Store, attachments: list[object], field: str, words: str
) -> None:
    limits = Limits(max_attachments=3, max_attachment_bytes=1024)
    with Client(db_url, limits=limits) as client:
        with pytest.raises(ValidationError) as single:
            client.enqueue("a@example.com", "s", "b", attachments=attachments)
        ok = {"to": "a@example.com", "subject": "s", "body": "b", "attachments": [("a", b"1")]}
        with pytest.raises(ValidationError) as batch:
            client.enqueue_many([ok, {**ok, "attachments": attachments}])
    assert single.value.field == field and words in single.value.problem, str(single.value)
    assert batch.value.field == f"messages[1].{field}"
    if field == "attachments":
        assert isinstance(single.value, LimitExceededError)
    assert counts(store) == (0, 0, 0)


def test_at_the_limits_is_accepted(db_url: str, store: Store) -> None:
    limits = Limits(max_attachments=2, max_attachment_bytes=1024)
    with Client(db_url, limits=limits) as client:
        client.enqueue(
            "a@example.com",
            "s",
            "b",
            attachments=[Attachment("a", b"x" * 1000), Attachment("b", b"x" * 24)],
        )
    assert counts(store) == (1, 2, 2)


def test_a_repeated_idempotency_key_adds_no_attachments(client: Client, store: Store) -> None:
    first = client.enqueue("a@example.com", "s", "b", idempotency_key="k", attachments=[("a", PDF)])
    again = client.enqueue(
        "a@example.com", "s", "b", idempotency_key="k", attachments=[("b", LOGO)]
    )
    assert again == first
    assert [a.filename for a in store.attachments.for_job(first)] == ["a"]
    assert counts(store) == (1, 1, 1)


def test_the_outbox_commits_and_rolls_back_attachments_with_the_job(
    client: Client, store: Store
) -> None:
    with store.engine.connect() as conn:
        trans = conn.begin()
        client.enqueue("a@example.com", "gone", "x", attachments=[("a.pdf", PDF)], connection=conn)
        client.enqueue_many(
            [{"to": "b@example.com", "subject": "gone", "body": "x", "attachments": [("l", LOGO)]}],
            connection=conn,
        )
        trans.rollback()
    assert counts(store) == (0, 0, 0)
    with store.engine.connect() as conn:
        trans = conn.begin()
        kept = client.enqueue(
            "a@example.com", "kept", "x", attachments=[("a.pdf", PDF)], connection=conn
        )
        trans.commit()
    assert store.attachments.for_job(kept) == [Attachment("a.pdf", PDF)]
    assert counts(store) == (1, 1, 1)


def test_the_outbox_on_a_raw_psycopg_connection(pg_url: str) -> None:
    store = Store.from_url(pg_url)
    with Client(pg_url) as client, psycopg.connect(libpq_url(pg_url)) as raw:
        client.enqueue("a@example.com", "gone", "x", attachments=[("a.pdf", PDF)], connection=raw)
        raw.rollback()
        assert counts(store) == (0, 0, 0)
        kept = client.enqueue_many(
            [
                {
                    "to": "a@example.com",
                    "subject": "kept",
                    "body": "x",
                    "attachments": [Attachment("ü.png", LOGO, inline=True, content_id="l@x")],
                }
            ],
            connection=raw,
        )[0]
        assert counts(store) == (0, 0, 0)  # not committed yet
        raw.commit()
    assert store.attachments.for_job(kept) == [
        Attachment("ü.png", LOGO, inline=True, content_id="l@x")
    ]
    store.close()


def finish(store: Store, job_ids: list[str]) -> None:
    """Mark jobs sent long ago, as cleanup finds them."""
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with store.engine.begin() as conn:
        conn.execute(
            q.update().where(q.c.id.in_(job_ids)).values(status="sent", updated_at=long_ago)
        )


def test_cleanup_takes_attachments_with_their_jobs_and_keeps_shared_content(
    client: Client, store: Store
) -> None:
    old = client.enqueue("a@example.com", "old", "x", attachments=[("logo", LOGO), ("a", PDF)])
    young = client.enqueue("b@example.com", "young", "x", attachments=[("logo", LOGO)])
    finish(store, [old])
    assert store.delete_finished(30) == 1
    assert store.attachments.for_job(old) == []
    assert store.attachments.for_job(young) == [Attachment("logo", LOGO)]  # still there
    assert counts(store) == (1, 1, 1)  # the PDF only the old job had is gone

    finish(store, [young])
    assert store.delete_finished(30) == 1
    assert counts(store) == (0, 0, 0)


def test_orphan_blobs_are_purged_in_batches(client: Client, store: Store) -> None:
    jobs = [
        client.enqueue("a@example.com", "s", "x", attachments=[(f"f{i}", PDF + bytes([i]))])
        for i in range(7)
    ]
    finish(store, jobs[:5])
    with store.engine.begin() as conn:  # only the job rows: the cleanup's own purge comes later
        conn.execute(
            sa.text("DELETE FROM email_attachments WHERE job_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": jobs[:5]},
        )
    assert store.attachments.purge_orphan_blobs(batch=2) == 5
    assert count(store, "mailqd_blobs") == 2
    assert store.attachments.purge_orphan_blobs(batch=2) == 0
    assert [a.filename for a in store.attachments.for_job(jobs[6])] == ["f6"]


def test_a_row_whose_blob_is_missing_fails_the_check_naming_the_field(sqlite_url: str) -> None:
    """SQLite does not enforce the foreign key: plain SQL can refer to content never stored."""
    from mailqd.store import upgrade

    store = Store.from_url(sqlite_url)
    upgrade(store.engine)
    with Client(sqlite_url) as client:
        job = client.enqueue("a@example.com", "s", "x")
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO email_attachments (job_id, position, filename, blob_sha256, size) "
                "VALUES (:job, 0, 'a.pdf', 'feed', 4)"
            ),
            {"job": job},
        )
    [attachment] = store.attachments.for_job(job)
    with pytest.raises(ValidationError, match=r"attachments\[0\].content: has no content"):
        check_attachments([attachment], Limits())
    store.close()


# --- the enqueue-only role (PostgreSQL) ---------------------------------------------------


@pytest.fixture
def role_url(pg_url: str) -> Iterator[str]:
    name = f"mailqd_enqueue_{secrets.token_hex(4)}"
    result = invoke("grant-enqueue", name, "--create", db=pg_url)
    assert result.returncode == 0, result.stderr
    try:
        yield make_url(pg_url).set(username=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_enqueue_role_enqueues_attachments_every_way(role_url: str, pg_url: str) -> None:
    with Client(role_url) as client:
        one = client.enqueue("a@example.com", "s", "x", attachments=[("a.pdf", PDF)])
        again = client.enqueue("a@example.com", "s", "x", attachments=[("b.pdf", PDF)])  # known
        many = client.enqueue_many(
            [{"to": "b@example.com", "subject": "s", "body": "x", "attachments": [("l", LOGO)]}] * 3
        )
        with psycopg.connect(libpq_url(role_url)) as raw:
            outbox = client.enqueue(
                "c@example.com", "s", "x", attachments=[("c.pdf", PDF)], connection=raw
            )
            # Plain SQL as docs/schema.md shows it: the hash computed by the database.
            raw.execute(
                "INSERT INTO email_queue (id, recipient_to, subject, body) "
                "VALUES ('plain-1', 'd@example.com', 'Invoice', 'Attached.')"
            )
            raw.execute(
                "INSERT INTO mailqd_blobs (sha256, size, content) "
                "VALUES (encode(sha256(%(f)s), 'hex'), length(%(f)s), %(f)s) "
                "ON CONFLICT DO NOTHING",
                {"f": LOGO},
            )
            raw.execute(
                "INSERT INTO email_attachments "
                "(job_id, position, filename, content_type, blob_sha256, size) "
                "VALUES ('plain-1', 0, 'logo.png', 'image/png', "
                "encode(sha256(%(f)s), 'hex'), length(%(f)s))",
                {"f": LOGO},
            )
            raw.commit()
    owner = Store.from_url(pg_url)
    try:
        got = owner.attachments.for_jobs([one, again, *many, outbox, "plain-1"])
        assert got[again] == [Attachment("b.pdf", PDF)]
        assert got[many[2]] == [Attachment("l", LOGO)]
        assert got["plain-1"] == [Attachment("logo.png", LOGO, "image/png")]
        assert owner.attachments.blob_count() == 2
    finally:
        owner.close()


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT content FROM mailqd_blobs",
        "SELECT sha256 FROM mailqd_blobs",
        "SELECT count(*) FROM mailqd_blobs",
        "SELECT * FROM email_attachments",
        "SELECT filename FROM email_attachments",
        "UPDATE mailqd_blobs SET content = ''",
        "DELETE FROM mailqd_blobs",
        "DELETE FROM email_attachments",
        # A conflict target needs SELECT on it: the client names none.
        "INSERT INTO mailqd_blobs (sha256, size, content) VALUES "
        "(encode(sha256('\\x00'::bytea), 'hex'), 1, '\\x00'::bytea) "
        "ON CONFLICT (sha256) DO NOTHING",
    ],
)
def test_the_enqueue_role_reads_and_changes_no_attachment(
    role_url: str, pg_url: str, statement: str
) -> None:
    with Client(pg_url) as owner:
        owner.enqueue("victim@example.com", "s", "x", attachments=[("secret.pdf", PDF)])
    with (
        psycopg.connect(libpq_url(role_url)) as role,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
    ):
        role.execute(statement)


def test_the_enqueue_role_cannot_file_other_bytes_under_a_hash(role_url: str, pg_url: str) -> None:
    """Else a later job attaching the real file would be sent the planted bytes."""
    real = hashlib.sha256(PDF).hexdigest()
    with psycopg.connect(libpq_url(role_url)) as role, pytest.raises(psycopg.errors.CheckViolation):
        role.execute(
            "INSERT INTO mailqd_blobs (sha256, size, content) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (real, len(LOGO), LOGO),
        )
    with Client(pg_url) as owner:
        job = owner.enqueue("a@example.com", "s", "x", attachments=[("a.pdf", PDF)])
    store = Store.from_url(pg_url)
    assert store.attachments.for_job(job) == [Attachment("a.pdf", PDF)]
    store.close()


def test_the_purge_waits_for_an_open_enqueue_that_reuses_stored_content(pg_url: str) -> None:
    """Content left by a cleaned-up job, attached again in a transaction still open, is kept.

    The enqueue's blob insert finds the content stored and writes nothing;
    the purge must not delete it before the new attachment row commits.
    """
    store = Store.from_url(pg_url)
    with Client(pg_url) as client, psycopg.connect(libpq_url(pg_url)) as raw:
        old = client.enqueue("a@example.com", "old", "x", attachments=[("a.pdf", PDF)])
        finish(store, [old])
        with store.engine.begin() as conn:  # the cleanup's job batch, without its purge
            conn.execute(sa.text("DELETE FROM email_attachments"))
        again = client.enqueue(
            "b@example.com", "new", "x", attachments=[("b.pdf", PDF)], connection=raw
        )
        with ThreadPoolExecutor(1) as pool:
            purged = pool.submit(store.attachments.purge_orphan_blobs)
            with psycopg.connect(libpq_url(pg_url), autocommit=True) as watcher:
                deadline = time.monotonic() + 10
                while not watcher.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE c.relname = 'mailqd_blobs' AND NOT l.granted"
                ).fetchone()[0]:  # type: ignore[index]
                    assert time.monotonic() < deadline, "the purge never waited for the enqueue"
                    assert not purged.done(), purged.result()
                    time.sleep(0.01)  # polling a condition, with a deadline
            raw.commit()
            assert purged.result(timeout=10) == 0
    assert store.attachments.for_job(again) == [Attachment("b.pdf", PDF)]
    store.close()


def test_the_limits_are_config_keys_and_the_claim_check_needs_no_content(
    client: Client, store: Store
) -> None:
    from mailqd.config import load_settings
    from mailqd.errors import ConfigError

    settings = load_settings(
        env={"MAILQD_MAX_ATTACHMENTS": "1", "MAILQD_MAX_ATTACHMENT_BYTES": "4096"}
    )
    limits = Limits.from_settings(settings)
    assert (limits.max_attachments, limits.max_attachment_bytes) == (1, 4096)
    assert (Limits().max_attachments, Limits().max_attachment_bytes) == (100, 25 * 1024 * 1024)
    with pytest.raises(ConfigError, match="max_attachment_bytes: must be at least 0"):
        load_settings(env={"MAILQD_MAX_ATTACHMENT_BYTES": "-1"})

    # Queued under the client's default limits, over the daemon's: refused at claim.
    job = client.enqueue("a@example.com", "s", "x", attachments=[("a", PDF), ("b", LOGO)])
    described = store.attachments.describe_jobs([job])[job]
    with pytest.raises(LimitExceededError, match=r"more than 1 attachments \(max_attachments\)"):
        check_attachments(described, limits)
    with pytest.raises(LimitExceededError, match=r"max_attachment_bytes"):
        check_attachments(described[:1], limits)
