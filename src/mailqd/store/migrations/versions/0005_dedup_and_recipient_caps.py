"""Tables for the content de-duplication window and the per-recipient hourly cap.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Both are written only when a worker claims jobs with `dedup_window` or
`recipient_hourly_cap` set; `email_queue` is unchanged, so enqueueing
costs the same with the features on or off.
"""

import sqlalchemy as sa
from alembic import op

from mailqd.store.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailqd_dedup",
        sa.Column("content_hash", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_mailqd_dedup_first_seen", "mailqd_dedup", ["first_seen_at"])
    op.create_table(
        "mailqd_recipient_counts",
        sa.Column("hour_start", UTCDateTime, primary_key=True),
        sa.Column("recipient", sa.String(320), primary_key=True),
        sa.Column("sent", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mailqd_recipient_counts")
    op.drop_index("ix_mailqd_dedup_first_seen", table_name="mailqd_dedup")
    op.drop_table("mailqd_dedup")
