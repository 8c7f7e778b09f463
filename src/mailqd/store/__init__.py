"""The queue store: the only part of mailqd that speaks SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailqd.store.engine import is_postgresql
from mailqd.store.schema import NOTIFY_CHANNEL
from mailqd.store.store import Completion, Store

if TYPE_CHECKING:
    from mailqd.store.migrate import check_schema, upgrade

__all__ = [
    "NOTIFY_CHANNEL",
    "Completion",
    "Store",
    "check_schema",
    "is_postgresql",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    # Alembic is imported only by what migrates or checks the schema, so that
    # an application importing the client does not pay for it.
    if name in ("check_schema", "upgrade"):
        from mailqd.store import migrate

        return getattr(migrate, name)
    raise AttributeError(name)
