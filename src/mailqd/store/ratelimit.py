"""A token bucket kept in the database, so one rate limit holds for every daemon sharing it.

Each take, give-back or read is its own short transaction; the statements
are those of `mailqd.store.buckets`, which the claim-time screening also
runs inside a claim for the per-domain limits. Time is the database's
clock (epoch seconds, as a float) unless a `now` is passed, as tests do.
"""

from __future__ import annotations

from mailqd.store import buckets
from mailqd.store.buckets import TokenGrant
from mailqd.store.database import Database
from mailqd.store.dialects import Dialect
from mailqd.store.screening import DOMAIN_BUCKET_PREFIX
from mailqd.store.store import Store

__all__ = ["GLOBAL_BUCKET", "RateLimits", "TokenGrant"]

GLOBAL_BUCKET = "global"
"""The bucket behind `settings.rate_limit` (messages per second, all daemons together)."""


class RateLimits:
    """The token buckets of one database."""

    def __init__(self, store: Store) -> None:
        # The database is looked up at first use: a worker whose rate limit is
        # off never takes a token, and may run on a store without one (tests).
        self._store = store

    @property
    def _db(self) -> Database:
        return self._store.database

    @property
    def _dialect(self) -> Dialect:
        return self._store.database.dialect

    def take(
        self, name: str, want: int, rate: float, burst: float, now: float | None = None
    ) -> TokenGrant:
        """Take up to `want` tokens from bucket `name` (refilling at `rate`/s, holding `burst`).

        A bucket that does not exist yet starts full.
        """
        if want <= 0 or rate <= 0:
            raise ValueError("take() needs want >= 1 and rate > 0")
        with self._db.begin() as conn:
            return buckets.take(conn, self._dialect, name, want, rate, burst, now)

    def give_back(self, name: str, count: int, burst: float) -> None:
        """Return tokens taken for messages that turned out not to exist (an empty claim)."""
        if count <= 0:
            return
        with self._db.begin() as conn:
            buckets.give_back(conn, self._dialect, name, count, burst)

    def domains_booked_ahead(self, now: float | None = None) -> dict[str, float]:
        """Rate-limited domains whose jobs wait for slots: domain → seconds of slots handed out."""
        with self._db.begin() as conn:
            return buckets.booked_ahead(conn, self._dialect, DOMAIN_BUCKET_PREFIX, now)

    def tokens(self, name: str) -> float | None:
        """The bucket's token count as of its last use (None if never used); for tests and stats."""
        with self._db.begin() as conn:
            return buckets.tokens(conn, name)
