"""Schema migrations (Alembic, shipped inside the package) and the version check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from mailqd.errors import SchemaError
from mailqd.store.translate import translate_errors

VERSION_TABLE = "mailqd_schema_version"
_MIGRATIONS = Path(__file__).with_name("migrations")


@dataclass(frozen=True, slots=True)
class MigrationResult:
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with translate_errors(), engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade(engine: sa.Engine, to: str = "head") -> MigrationResult:
    """Bring the schema to this mailqd's version (or revision `to`); safe to run again."""
    before = current_revision(engine)
    with translate_errors(), engine.begin() as conn:
        command.upgrade(_config(conn), to)
    return MigrationResult(before=before, after=current_revision(engine))


def check_schema(engine: sa.Engine) -> str:
    """Raise `SchemaError` unless the database is at this mailqd's schema version."""
    current = current_revision(engine)
    head = head_revision()
    if current is None:
        raise SchemaError("the database has no mailqd schema; run `mailqctl migrate`")
    if current != head:
        known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
        if current not in known:
            raise SchemaError(
                f"the database schema ({current}) is newer than this mailqd ({head}); "
                "upgrade mailqd"
            )
        raise SchemaError(
            f"the database schema is at {current}, this mailqd needs {head}; run `mailqctl migrate`"
        )
    return current
