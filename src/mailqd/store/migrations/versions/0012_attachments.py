"""Attachments: content by hash in `mailqd_blobs`, a job's attachments in `email_attachments`.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02

See `mailqd.store.attachment_tables`. Two new tables, both empty at first;
no change to `email_queue` (the claim reads nothing new). On PostgreSQL the
blob content is stored out of line without compression (most attachments,
PDF, PNG, ZIP, are compressed already) and a CHECK keeps every key the
SHA-256 of its content.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_HASH_MATCHES = "sha256 = encode(sha256(content), 'hex')"


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "mailqd_blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        *([sa.CheckConstraint(_HASH_MATCHES, name="ck_mailqd_blobs_sha256")] if postgresql else []),
    )
    if postgresql:
        op.execute("ALTER TABLE mailqd_blobs ALTER COLUMN content SET STORAGE EXTERNAL")
    op.create_table(
        "email_attachments",
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
    op.create_index("ix_email_attachments_blob", "email_attachments", ["blob_sha256"])


def downgrade() -> None:
    op.drop_index("ix_email_attachments_blob", table_name="email_attachments")
    op.drop_table("email_attachments")
    op.drop_table("mailqd_blobs")
