"""Compress message bodies with lz4 on PostgreSQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

pglz compression of a 2 KB body was about half of the server's CPU per
enqueued row (bench/bench_store.py); lz4 roughly halves that for ~20 % more
disk. Needs PostgreSQL 14+ built with lz4 (Debian's and most distributions'
are); elsewhere the columns keep the server's default, with a notice.
Only new values are written with lz4; existing rows keep their compression.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_SET = """
DO $$
BEGIN
    ALTER TABLE email_queue ALTER COLUMN body SET COMPRESSION {method};
    ALTER TABLE email_queue ALTER COLUMN html SET COMPRESSION {method};
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'mailqd: column compression {method} not available; keeping the default';
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SET.format(method="lz4"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SET.format(method="default"))
