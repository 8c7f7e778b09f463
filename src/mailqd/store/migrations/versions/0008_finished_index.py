"""The status/updated_at index holds only finished jobs on PostgreSQL.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28

See `ix_email_queue_finished` in `mailqd.store.schema`: with pending rows
in it, stale statistics could make the planner claim through it (read every
pending row, sort, take 16) instead of through `ix_email_queue_claim`.
Building the index reads the table once; on a large queue run
`mailqctl migrate` while the daemons are stopped or quiet.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_FINISHED = sa.text("status IN ('sent', 'failed', 'cancelled')")


def upgrade() -> None:
    op.drop_index("ix_email_queue_status_updated", table_name="email_queue")
    op.create_index(
        "ix_email_queue_finished",
        "email_queue",
        ["status", "updated_at"],
        postgresql_where=_FINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_email_queue_finished", table_name="email_queue")
    op.create_index("ix_email_queue_status_updated", "email_queue", ["status", "updated_at"])
