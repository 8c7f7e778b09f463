"""The attachment tables, out of the hot `email_queue` row. Part of `mailqd.store.schema`'s
metadata (imported at its end).

- `mailqd_blobs`: attachment content, one row per distinct content, keyed by
  its SHA-256 (lower-case hex): 10,000 invoices with the same logo hold one
  copy of it. On PostgreSQL a CHECK makes the key the hash of the content,
  so that no writer can file other bytes under a hash that another
  application's identical file will later refer to.
- `email_attachments`: which blobs a job attaches, in order, under which
  name and type. The claim, stats and cleanup's batch statements never read
  content; cleanup deletes a job's rows with the job, and blobs no row
  refers to in batches (`mailqd.store.attachments.AttachmentStore`).

docs/schema.md documents the columns, for applications that insert with SQL.
"""

from __future__ import annotations

import sqlalchemy as sa

from mailqd.store.schema import metadata

__all__ = ["BLOB_HASH_MATCHES", "blobs", "email_attachments"]

BLOB_HASH_MATCHES = "sha256 = encode(sha256(content), 'hex')"
"""PostgreSQL only (SQLite has no sha256 function, and no permissions to protect)."""

blobs = sa.Table(
    "mailqd_blobs",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.CheckConstraint(BLOB_HASH_MATCHES, name="ck_mailqd_blobs_sha256").ddl_if(
        dialect="postgresql"
    ),
)

email_attachments = sa.Table(
    "email_attachments",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("content_type", sa.String(255), nullable=True),
    sa.Column("inline", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("content_id", sa.String(250), nullable=True),
    sa.Column(
        "blob_sha256",
        sa.String(64),
        sa.ForeignKey("mailqd_blobs.sha256", name="fk_email_attachments_blob"),
        nullable=False,
    ),
    sa.Column("size", sa.BigInteger, nullable=False),
)
sa.Index("ix_email_attachments_blob", email_attachments.c.blob_sha256)
