"""Per-recipient-domain rate limits: where a bucket's waiting jobs were given slots up to.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28

`domain_rate_limits` keeps one token bucket per limited domain in
`mailqd_rate_limit` (named `domain:<domain>`). Jobs that find their
domain's bucket empty at claim are given times to come back, 1/rate
apart, after those already given out: `reserved_until` is the end of
those slots. Nullable, so adding it rewrites nothing.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mailqd_rate_limit", sa.Column("reserved_until", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mailqd_rate_limit") as batch:
        batch.drop_column("reserved_until")
