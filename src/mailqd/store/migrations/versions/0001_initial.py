"""The queue, the attempts table, claim indexes and the NOTIFY trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

The column types and defaults come from `mailqd.store.schema` (UTCDateTime,
JSONValue, utcnow, new_uuid): they render per database, and a later change to
them must come with a migration of its own.
"""

import sqlalchemy as sa
from alembic import op

from mailqd.store.schema import JSONValue, UTCDateTime, new_uuid, utcnow

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION mailqd_notify_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per statement, however many rows it inserted.
    IF EXISTS (SELECT 1 FROM inserted WHERE status = 'pending') THEN
        PERFORM pg_notify('mailqd_jobs', '');
    END IF;
    RETURN NULL;
END
$$
"""
_NOTIFY_TRIGGER = """
CREATE TRIGGER email_queue_notify_pending
AFTER INSERT ON email_queue
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT EXECUTE FUNCTION mailqd_notify_pending()
"""


def upgrade() -> None:
    op.create_table(
        "email_queue",
        sa.Column("id", sa.String(64), primary_key=True, server_default=new_uuid()),
        sa.Column("recipient_to", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False, server_default=""),
        sa.Column("body", sa.Text),
        sa.Column("html", sa.Text),
        sa.Column("template_id", sa.String(200)),
        sa.Column("variables", JSONValue),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("cc", sa.Text),
        sa.Column("bcc", sa.Text),
        sa.Column("reply_to", sa.Text),
        sa.Column("from_address", sa.Text),
        sa.Column("headers", JSONValue),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("max_attempts", sa.Integer),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires_at", UTCDateTime),
        sa.Column("message_id", sa.Text),
        sa.Column("sent_at", UTCDateTime),
        sa.CheckConstraint(
            "status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')",
            name="ck_email_queue_status",
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_email_queue_idempotency_key"),
    )
    pending = sa.text("status = 'pending'")
    sending = sa.text("status = 'sending'")
    op.create_index(
        "ix_email_queue_claim",
        "email_queue",
        [sa.text("priority DESC"), "next_attempt_at", "id"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    op.create_index(
        "ix_email_queue_lease",
        "email_queue",
        ["lease_expires_at"],
        postgresql_where=sending,
        sqlite_where=sending,
    )
    op.create_index("ix_email_queue_status_updated", "email_queue", ["status", "updated_at"])

    op.create_table(
        "email_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("smtp_code", sa.Integer),
        sa.Column("smtp_text", sa.Text),
        sa.Column("worker", sa.String(255)),
    )
    op.create_index("ix_email_attempts_job", "email_attempts", ["job_id", "attempt"])
    op.create_index("ix_email_attempts_started", "email_attempts", ["started_at"])

    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY_FUNCTION)
        op.execute(_NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS email_queue_notify_pending ON email_queue")
        op.execute("DROP FUNCTION IF EXISTS mailqd_notify_pending()")
    op.drop_table("email_attempts")
    op.drop_table("email_queue")
