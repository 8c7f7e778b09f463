"""The shared token bucket behind `rate_limit`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailqd_rate_limit",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("refilled_at", sa.Float, nullable=False),
        sa.Column("granted", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("mailqd_rate_limit")
