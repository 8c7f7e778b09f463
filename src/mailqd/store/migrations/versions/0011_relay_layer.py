"""The relay layer: relay health, relays in the database, per-recipient results, audit.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02

See `mailqd.store.relay_tables`. Four new tables, all empty at first; no
change to `email_queue` (the claim reads nothing new).
"""

import sqlalchemy as sa
from alembic import op

from mailqd.store.schema import UTCDateTime, utcnow

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def _id() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    )


def upgrade() -> None:
    op.create_table(
        "mailqd_relay_state",
        sa.Column("relay", sa.String(64), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("down_since", UTCDateTime, nullable=True),
        sa.Column("probe_at", UTCDateTime, nullable=True),
        sa.Column("probe_interval", sa.Float, nullable=False, server_default="0"),
        sa.Column("probe_owner", sa.String(255), nullable=True),
        sa.Column("last_reason", sa.String(32), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_failure_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
    )
    op.create_table(
        "mailqd_relays",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("password_sealed", sa.Text, nullable=True),
        sa.Column("max_connections", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rate_limit", sa.Float, nullable=False, server_default="0"),
        sa.Column("position", sa.Integer, nullable=False, server_default="0"),
        sa.Column("recipient_domains", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("updated_by", sa.Text, nullable=True),
    )
    op.create_table(
        "email_recipients",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("smtp_code", sa.Integer, nullable=True),
        sa.Column("smtp_text", sa.Text, nullable=True),
        sa.Column("relay", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
    )
    refused = sa.text("status = 'refused'")
    op.create_index(
        "ix_email_recipients_refused",
        "email_recipients",
        ["updated_at"],
        postgresql_where=refused,
        sqlite_where=refused,
    )
    op.create_table(
        "mailqd_audit",
        _id(),
        sa.Column("at", UTCDateTime, nullable=False, server_default=utcnow()),
        sa.Column("db_role", sa.String(255), nullable=True),
        sa.Column("os_user", sa.String(255), nullable=True),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("target", sa.Text, nullable=True),
        sa.Column("filter", sa.Text, nullable=True),
        sa.Column("affected", sa.Integer, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_mailqd_audit_at", "mailqd_audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_mailqd_audit_at", table_name="mailqd_audit")
    op.drop_index("ix_email_recipients_refused", table_name="email_recipients")
    for table in ("mailqd_audit", "email_recipients", "mailqd_relays", "mailqd_relay_state"):
        op.drop_table(table)
