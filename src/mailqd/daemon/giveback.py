"""The supervisor's own stores: the schema check before forking, and dead workers' jobs given back.

The supervisor calls the store for these two things only. Its stores are
made lazily, in the parent, one per database URL (after a reload that
changes `database_url`, the old generation's jobs still live in the old
database), and a forked child forgets them without closing them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import structlog

from mailqd.errors import MailqError
from mailqd.store import Store, is_postgresql

__all__ = [
    "DB_CONNECT_TIMEOUT",
    "RESCUE_BATCH",
    "SupervisorStores",
    "death_of",
    "open_store",
]

DB_CONNECT_TIMEOUT = 5
RESCUE_BATCH = 1000

log = structlog.get_logger(component="supervisor")


class StoresByUrl:
    """Stores made lazily, one per database URL, in the supervisor process.

    After a reload that changes `database_url`, the old generation's jobs
    still live in the old database, so a store is kept per URL; a forked
    child forgets them without closing them. `open_store` defaults to
    this module's (connection attempts that give up after a few seconds).
    """

    def __init__(self, open_store: Callable[[str], Store] | None = None) -> None:
        self._open = open_store
        self._stores: dict[str, Store] = {}

    def get(self, url: str) -> Store:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = (self._open or open_store)(url)
        return store

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    def forget_after_fork(self) -> None:
        """In a freshly forked child: the parent's pooled connections must not be used or closed."""
        for store in self._stores.values():
            store.forget_after_fork()
        self._stores.clear()


class SupervisorStores:
    """The supervisor's calls to the store: the schema check and dead workers' jobs."""

    def __init__(self) -> None:
        self._stores = StoresByUrl()

    def close(self) -> None:
        self._stores.close()

    def forget_after_fork(self) -> None:
        """In a freshly forked child: the parent's pooled connections must not be used or closed."""
        self._stores.forget_after_fork()

    def check_database(self, url: str) -> str:
        """The schema revision, or `StoreError` if the database cannot be used by the workers."""
        return self._stores.get(url).check_schema()

    def give_back(
        self, url: str, owner: str, exit_code: int | None = None, *, killed: bool = False
    ) -> int | None:
        """Return the jobs `owner` held to the queue now; None (logged) if the database fails.

        `exit_code` is the worker's, as `os.waitstatus_to_exitcode` gives it
        (-N: killed by signal N), or None if unknown; `killed` says the
        supervisor sent the SIGKILL. Each job's attempt row says how the
        worker ended (`death_of`).
        """
        reason = death_of(owner, exit_code, killed=killed)
        try:
            store = self._stores.get(url)
            rescued = store.rescue(owner=owner, reason=reason, limit=RESCUE_BATCH)
            total = len(rescued)
            while len(rescued) == RESCUE_BATCH:
                rescued = store.rescue(owner=owner, reason=reason, limit=RESCUE_BATCH)
                total += len(rescued)
        except MailqError as exc:
            log.error(
                "could not give back a dead worker's jobs; they return when their lease expires",
                owner=owner,
                error=str(exc),
            )
            return None
        return total


def death_of(owner: str, exit_code: int | None, *, killed: bool = False) -> str:
    """What a dead worker's jobs are recorded with: `worker killed: ...` when a signal ended it.

    Its attempt was cut off at a step nobody left knows (maybe after
    DATA): from a job's second loss on, it is counted (docs/reliability.md).
    """
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        sender = " from the supervisor" if killed and -exit_code == signal.SIGKILL else ""
        return f"worker killed: the worker {owner} was killed by {name}{sender} while holding it"
    how = "ended" if exit_code is None else f"exited with code {exit_code}"
    return f"worker died: the worker {owner} {how} while holding it"


def open_store(url: str) -> Store:
    """A store whose connection attempts give up after a few seconds.

    The supervisor (and `--check-config`) must not freeze on a database host
    that drops packets: the main loop has workers to watch.
    """
    options: dict[str, Any] = {}
    if is_postgresql(url):
        options["connect_args"] = {"connect_timeout": DB_CONNECT_TIMEOUT}
    return Store.from_url(url, application_name="mailqd-supervisor", **options)
