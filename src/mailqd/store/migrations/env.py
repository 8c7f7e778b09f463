"""Alembic environment: runs on the connection that `mailqd.store.migrate` hands over."""

from __future__ import annotations

from alembic import context

from mailqd.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    version_table="mailqd_schema_version",
)
with context.begin_transaction():
    context.run_migrations()
