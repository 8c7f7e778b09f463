"""Only rows with an idempotency key are in its unique index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

The unique constraint indexed every row, NULL keys included, so each
enqueue (and, since PostgreSQL updates are not HOT when an indexed column
changes, each claim and outcome) wrote one more index entry for nothing.
A partial unique index keeps the guarantee for keyed rows only; bulk
enqueue of keyless rows cost the server about a sixth less
(bench/bench_store.py). An upsert on the key must now name the predicate:
`ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL`.
SQLite cannot drop a constraint in place, so its table is rebuilt; the
rebuild loses the DESC of the claim index, which is then made again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_NAME = "uq_email_queue_idempotency_key"
_PRESENT = sa.text("idempotency_key IS NOT NULL")
_CLAIM_INDEX = "ix_email_queue_claim"


def upgrade() -> None:
    with op.batch_alter_table("email_queue") as batch:
        batch.drop_constraint(_NAME, type_="unique")
    _restore_claim_index_order()
    op.create_index(
        _NAME,
        "email_queue",
        ["idempotency_key"],
        unique=True,
        postgresql_where=_PRESENT,
        sqlite_where=_PRESENT,
    )


def downgrade() -> None:
    op.drop_index(_NAME, table_name="email_queue")
    with op.batch_alter_table("email_queue") as batch:
        batch.create_unique_constraint(_NAME, ["idempotency_key"])
    _restore_claim_index_order()


def _restore_claim_index_order() -> None:
    """SQLite's table rebuild reflects `priority DESC` as ascending; make it as 0001 did."""
    if op.get_bind().dialect.name != "sqlite":
        return
    pending = sa.text("status = 'pending'")
    op.drop_index(_CLAIM_INDEX, table_name="email_queue")
    op.create_index(
        _CLAIM_INDEX,
        "email_queue",
        [sa.text("priority DESC"), "next_attempt_at", "id"],
        sqlite_where=pending,
    )
