"""An index of the `sending` rows that have no lease, for the rescuer and stats.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

See `ix_email_queue_unleased` in `mailqd.store.schema`: such a row (written
by plain SQL; mailqd's claim always sets a lease) was held by no worker and
stayed `sending` for ever, invisible to the rescuer and to stats. The index
is empty in normal operation; building it reads the table once.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_UNLEASED = "status = 'sending' AND (lease_owner IS NULL OR lease_expires_at IS NULL)"


def upgrade() -> None:
    op.create_index(
        "ix_email_queue_unleased",
        "email_queue",
        ["id"],
        postgresql_where=sa.text(_UNLEASED),
        sqlite_where=sa.text(_UNLEASED),
    )


def downgrade() -> None:
    op.drop_index("ix_email_queue_unleased", table_name="email_queue")
