"""The queue store: the only part of mailqd that speaks SQL."""

from mailqd.store.migrate import check_schema, upgrade
from mailqd.store.schema import NOTIFY_CHANNEL
from mailqd.store.store import Completion, Store

__all__ = ["NOTIFY_CHANNEL", "Completion", "Store", "check_schema", "upgrade"]
