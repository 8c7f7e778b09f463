"""One database as the store's roles see it: its engine, its dialect, and short transactions.

Every connection a role opens comes from here, inside `translate_errors`,
so that no driver error leaves the store untranslated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from mailqd.store.dialects import Dialect, dialect_for
from mailqd.store.translate import translate_errors

__all__ = ["Database"]


class Database:
    """An engine and its `Dialect`. Safe to share between threads, not across fork()."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect_for(engine.dialect.name)

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A short transaction (on SQLite, BEGIN IMMEDIATE: the write lock from the start)."""
        with translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def one_statement(self) -> Iterator[sa.Connection]:
        """A connection for one statement that is atomic on its own (`Dialect.one_statement`)."""
        with translate_errors(), self.dialect.one_statement(self.engine) as conn:
            yield conn

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them.

        Closing would end the parent's sessions on the shared sockets; the
        child opens its own on first use.
        """
        self.engine.dispose(close=False)
