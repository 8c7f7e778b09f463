"""The relay layer's tables: relay health, relays kept in the database, per-recipient results,
and the audit trail. Part of `mailqd.store.schema`'s metadata (imported at its end).

- `mailqd_relay_state`: one row per relay that has failed since it was last
  healthy: the circuit breaker every worker of every daemon shares. No row,
  or `down_since` NULL, means up.
- `mailqd_relays`: relays managed with `mailqctl relays` (the password
  sealed with `secrets_key_file`, never in clear), beside those of the TOML
  file.
- `email_recipients`: a result per recipient, written only when a job's
  recipients did not all fare alike (some refused, or sent through
  different relays, or some still to do); a job with no rows here had every
  recipient accepted together.
- `mailqd_audit`: who changed what (relays, and every queue-changing
  `mailqctl` command), and every unsealing of a relay credential.
"""

from __future__ import annotations

import sqlalchemy as sa

from mailqd.store.schema import UTCDateTime, metadata, utcnow

__all__ = ["audit_log", "email_recipients", "relay_state", "relays"]

relay_state = sa.Table(
    "mailqd_relay_state",
    metadata,
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

relays = sa.Table(
    "mailqd_relays",
    metadata,
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

email_recipients = sa.Table(
    "email_recipients",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("address", sa.String(320), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("smtp_code", sa.Integer, nullable=True),
    sa.Column("smtp_text", sa.Text, nullable=True),
    sa.Column("relay", sa.String(64), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow()),
)

# `/stats` counts the refusals of the last hour; refusals are rare, so a partial index.
REFUSED = sa.text("status = 'refused'")
sa.Index(
    "ix_email_recipients_refused",
    email_recipients.c.updated_at,
    postgresql_where=REFUSED,
    sqlite_where=REFUSED,
)

audit_log = sa.Table(
    "mailqd_audit",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("at", UTCDateTime, nullable=False, server_default=utcnow()),
    sa.Column("db_role", sa.String(255), nullable=True),
    sa.Column("os_user", sa.String(255), nullable=True),
    sa.Column("command", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=True),
    sa.Column("filter", sa.Text, nullable=True),
    sa.Column("affected", sa.Integer, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)
sa.Index("ix_mailqd_audit_at", audit_log.c.at)
