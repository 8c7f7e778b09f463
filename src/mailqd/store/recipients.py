"""Per-recipient results (`email_recipients`) as the worker reads them: who is settled.

The rows are written with a job's outcome (`mailqd.store.completion`) when
its recipients did not all fare alike; an attempt after such an outcome
sends only to the recipients not yet settled (accepted, or refused for
good), so a message split across relays, or partly refused for now, is
never sent twice to the same recipient by mailqd's own retries.
"""

from __future__ import annotations

import sqlalchemy as sa

from mailqd.models import RecipientStatus
from mailqd.store.database import Database
from mailqd.store.relay_tables import email_recipients as r

__all__ = ["RecipientLedger"]

_SETTLED = (RecipientStatus.ACCEPTED.value, RecipientStatus.REFUSED.value)


class RecipientLedger:
    def __init__(self, db: Database) -> None:
        self._db = db

    def settled(self, job_id: str) -> frozenset[str]:
        """The job's recipients that need nothing more: accepted, or refused permanently."""
        stmt = sa.select(r.c.address).where(r.c.job_id == job_id, r.c.status.in_(_SETTLED))
        with self._db.begin() as conn:
            return frozenset(conn.execute(stmt).scalars())
