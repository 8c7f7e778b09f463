"""A job's attachments: written with the job, read back by the worker, cleaned up after.

Content lives in `mailqd_blobs`, once per distinct SHA-256; a job's
attachments are rows of `email_attachments` naming a blob
(`mailqd.store.attachment_tables`). Nothing here touches `email_queue`,
and nothing in the claim, stats or cleanup's job batches reads a blob.

How the worker learns which claimed jobs have attachments: it asks, once
per claim batch, `describe_jobs(claimed ids)`: one autocommit SELECT on
the `(job_id, position)` primary key that reads no content, and gives the
sizes and names the claim-time check needs. Jobs without attachments pay
one round trip per batch, nothing per row of `email_queue` (no flag
column, so a plain-SQL job cannot set it wrong). A micro-bench on a loaded
2-core machine: 0.6 ms per batch of 32 beside a 3.5 ms claim, 0.8 ms with
50,000 other jobs' attachments stored. The content is read per job, when
it is composed (`for_job`), so a batch never holds every file at once.

Blobs are inserted with `INSERT … ON CONFLICT DO NOTHING` (no conflict
target: with one, PostgreSQL would need the enqueue-only role to SELECT the
key). Cleanup deletes a finished job's `email_attachments` rows with it
(`Dialect.delete_batch`), then blobs no row refers to (`purge_orphan_blobs`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mailqd.attachments import Attachment, content_type_of
from mailqd.errors import DatabaseUnavailableError
from mailqd.store.attachment_tables import blobs as b
from mailqd.store.attachment_tables import email_attachments as ea
from mailqd.store.database import Database
from mailqd.store.translate import sqlstate_of

__all__ = [
    "PURGE_BATCH",
    "AttachmentInfo",
    "AttachmentStore",
    "attachment_rows",
    "blob_rows",
    "sha256_hex",
]

PURGE_BATCH = 1000
_ID_CHUNK = 1000
_LOCK_NOT_AVAILABLE = "55P03"
_PURGE_LOCK_TIMEOUT = "2s"
_PURGE_LOCK_TRIES = 5


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """One attachment of a job, without its content (`mailqctl show`, the claim's checks)."""

    filename: str
    content_type: str | None
    size: int
    inline: bool
    content_id: str | None
    sha256: str

    @property
    def name(self) -> str:
        return self.filename

    @property
    def resolved_content_type(self) -> str:
        """As `Attachment.resolved_content_type`: given, else guessed from the name."""
        return content_type_of(self.filename, self.content_type)


def sha256_hex(content: bytes) -> str:
    """The key of `content` in `mailqd_blobs`: its SHA-256, lower-case hex."""
    return hashlib.sha256(content).hexdigest()


def blob_rows(attachments: Iterable[Attachment]) -> list[dict[str, Any]]:
    """One `mailqd_blobs` row per distinct content among `attachments`."""
    found: dict[str, dict[str, Any]] = {}
    for attachment in attachments:
        key = sha256_hex(attachment.content)
        if key not in found:
            found[key] = {"sha256": key, "size": attachment.size, "content": attachment.content}
    return list(found.values())


def attachment_rows(job_id: str, attachments: Sequence[Attachment]) -> list[dict[str, Any]]:
    """The `email_attachments` rows of one job, in order."""
    return [
        {
            "job_id": job_id,
            "position": position,
            "filename": attachment.filename,
            "content_type": attachment.content_type,
            "inline": attachment.inline,
            "content_id": attachment.content_id,
            "blob_sha256": sha256_hex(attachment.content),
            "size": attachment.size,
        }
        for position, attachment in enumerate(attachments)
    ]


_INFO_COLUMNS = (
    ea.c.job_id,
    ea.c.filename,
    ea.c.content_type,
    ea.c.size,
    ea.c.inline,
    ea.c.content_id,
    ea.c.blob_sha256,
)
_IDS: sa.BindParameter[list[str]] = sa.bindparam("ids", expanding=True)
_DESCRIBE = (
    sa.select(*_INFO_COLUMNS).where(ea.c.job_id.in_(_IDS)).order_by(ea.c.job_id, ea.c.position)
)
"""Built once: constructing a statement costs more than running this one on an empty table."""
# The content as the driver gives it (no LargeBinary processing), so that
# text a plain-SQL row put into SQLite's column reaches the rules, which
# refuse it naming the field, instead of breaking the whole read.
_RAW_CONTENT = sa.type_coerce(b.c.content, sa.types.NullType()).label("content")
_WITH_CONTENT = (
    sa.select(*_INFO_COLUMNS, _RAW_CONTENT)
    .select_from(ea.outerjoin(b, b.c.sha256 == ea.c.blob_sha256))
    .where(ea.c.job_id.in_(_IDS))
    .order_by(ea.c.job_id, ea.c.position)
)


class AttachmentStore:
    """Reading and cleaning up attachments on one database (`Store.attachments`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def describe(self, job_id: str) -> list[AttachmentInfo]:
        """A job's attachments in order, without content; empty for none (or no such job)."""
        return self.describe_jobs([job_id])[job_id]

    def describe_jobs(self, job_ids: Sequence[str]) -> dict[str, list[AttachmentInfo]]:
        """Every given job's attachments, without content: one query per 1,000 ids.

        Every id is a key; a job without attachments maps to `[]`. What the
        worker asks once per claim batch, to know which jobs have any and to
        check their count, sizes and names (`mailqd.rules.check_attachments`).
        """
        found: dict[str, list[AttachmentInfo]] = {job_id: [] for job_id in job_ids}
        for chunk in _chunks(list(found)):
            with self._db.one_statement() as conn:
                for row in conn.execute(_DESCRIBE, {"ids": chunk}):
                    found[row.job_id].append(_info(row))
        return found

    def for_job(self, job_id: str) -> list[Attachment]:
        """A job's attachments with their content, in order."""
        return self.for_jobs([job_id])[job_id]

    def for_jobs(self, job_ids: Sequence[str]) -> dict[str, list[Attachment]]:
        """Every given job's attachments with content: one query (per 1,000 ids).

        Every id is a key (`[]` for none). An attachment whose blob is
        missing (plain SQL on SQLite, which does not enforce the foreign
        key) comes back with `content=None`, which `check_attachments`
        refuses naming the field.
        """
        found: dict[str, list[Attachment]] = {job_id: [] for job_id in job_ids}
        for chunk in _chunks(list(found)):
            with self._db.one_statement() as conn:
                for row in conn.execute(_WITH_CONTENT, {"ids": chunk}):
                    found[row.job_id].append(_attachment(row))
        return found

    def blob_count(self) -> int:
        """How many distinct contents are stored (for tests and `mailqctl stats`-like views)."""
        with self._db.one_statement() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(b)).scalar_one())

    def purge_orphan_blobs(self, batch: int = PURGE_BATCH) -> int:
        """Delete blobs no attachment refers to, `batch` keys examined per transaction.

        Walks the blobs in key order, so each batch reads one range of the
        primary key (no content) and probes `ix_email_attachments_blob` for
        each key. Returns how many blobs were deleted.

        On PostgreSQL each batch first takes `SHARE ROW EXCLUSIVE` on
        `mailqd_blobs`, which waits for the transactions that are inserting
        a blob (even one that was already there) to end: an enqueue that
        found its content stored, and is about to refer to it, cannot have
        it deleted under it. Jobs without attachments never wait on it;
        enqueues with attachments wait at most one batch, or the lock
        timeout (2 s). A batch that cannot get the lock in time is tried
        again a few times; then the purge stops and the next cleanup goes on.
        """
        total = 0
        after = ""
        while True:
            for attempt in range(_PURGE_LOCK_TRIES):
                try:
                    with self._db.begin() as conn:
                        done, deleted, after = self._purge_batch(conn, after, batch)
                    break
                except DatabaseUnavailableError as exc:
                    if exc.__cause__ is None or sqlstate_of(exc.__cause__) != _LOCK_NOT_AVAILABLE:
                        raise
                    if attempt == _PURGE_LOCK_TRIES - 1:
                        return total
            total += deleted
            if done:
                return total

    def _purge_batch(self, conn: sa.Connection, after: str, size: int) -> tuple[bool, int, str]:
        if self._db.dialect.is_postgresql:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{_PURGE_LOCK_TIMEOUT}'")
            conn.exec_driver_sql("LOCK TABLE mailqd_blobs IN SHARE ROW EXCLUSIVE MODE")
        window = sa.select(b.c.sha256).where(b.c.sha256 > after).order_by(b.c.sha256).limit(size)
        keys = list(conn.execute(window).scalars())
        if not keys:
            return True, 0, after
        referenced = sa.exists().where(ea.c.blob_sha256 == b.c.sha256)
        orphans = (
            sa.select(b.c.sha256)
            .where(b.c.sha256.between(keys[0], keys[-1]), ~referenced)
            .with_for_update(skip_locked=True)
        )
        deleted = conn.execute(b.delete().where(b.c.sha256.in_(orphans.scalar_subquery())))
        return len(keys) < size, int(deleted.rowcount), keys[-1]


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]


def _info(row: Any) -> AttachmentInfo:
    return AttachmentInfo(
        filename=row.filename,
        content_type=row.content_type,
        size=row.size,
        inline=bool(row.inline),
        content_id=row.content_id,
        sha256=row.blob_sha256,
    )


def _attachment(row: Any) -> Attachment:
    content = row.content
    if isinstance(content, memoryview | bytearray):
        content = bytes(content)
    return Attachment(
        filename=row.filename,
        content=content,
        content_type=row.content_type,
        inline=bool(row.inline),
        content_id=row.content_id,
    )
