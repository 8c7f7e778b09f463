"""What every reliability scenario does: a database, a faulty server, the daemon, the books.

A `Scenario` owns one migrated PostgreSQL database (on the module's own
server, which the test may stop and restart), a `FaultySmtp`, the daemons it
starts (subprocesses, through `DaemonPool`) and the `Books`. It enqueues
tagged jobs, waits on conditions with deadlines (never on sleeps), and ends
by stopping the daemon with SIGTERM and closing the books.

The daemon runs with settings that make faults play out in seconds:
backoff 0.2 s doubling up to 2 s, 100 attempts (so transient faults end in
delivery), 5 s leases (a dead daemon's jobs return within seconds).
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from books import Books, Tally
from faulty_smtp import TOKEN_HEADER, FaultySmtp

from daemon_process import DaemonPool, DaemonProcess, children_of
from mailqd import Client
from mailqd.errors import StoreError
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from pg import PostgresServer, create_database, unique_database_name

__all__ = [
    "FAST_SETTINGS",
    "MakeScenario",
    "RssSampler",
    "Scenario",
    "migrated_database",
    "wait_until",
]

T = TypeVar("T")

FAST_SETTINGS = {
    "MAILQD_FROM": "Reliability <rel@example.com>",
    "MAILQD_WORKERS": "3",
    "MAILQD_CONCURRENCY": "10",
    "MAILQD_POLL_INTERVAL": "0.2",
    "MAILQD_BACKOFF_BASE": "0.2",
    "MAILQD_BACKOFF_FACTOR": "2",
    "MAILQD_BACKOFF_MAX": "2",
    "MAILQD_MAX_ATTEMPTS": "100",
    "MAILQD_LEASE_SECONDS": "5",
    "MAILQD_SHUTDOWN_TIMEOUT": "10",
    "MAILQD_SMTP_TIMEOUT": "10",
    "MAILQD_LOG_LEVEL": "info",
}
POLL = 0.1
ENQUEUE_CHUNK = 1000

# Log events that mean mailqd itself broke, not the job or the environment.
CRASH_EVENTS = (
    "delivery crashed",
    "composer raised an unexpected error",
    "transport raised an unexpected error",
    "worker service died; stopping",
    "worker crashed",
    "task failed",
)


def migrated_database(server: PostgresServer, prefix: str = "mailqd_rel") -> str:
    """A new database on `server` with the mailqd schema (as `mailqctl migrate` makes it)."""
    url = create_database(server.admin_url, unique_database_name(prefix))
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def hold(seconds: float, daemon: DaemonProcess) -> None:
    """Keep a fault in place for `seconds`, failing at once should the daemon exit meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        assert daemon.returncode is None, f"mailqd exited during the fault\n{daemon.log_tail()}"
        time.sleep(min(0.5, left))


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    daemon: DaemonProcess | None = None,
    interval: float = POLL,
) -> T:
    """Poll `condition` (database errors count as "not yet") until truthy; fail at the deadline.

    Fails early if `daemon` exits.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except StoreError:
            result = None
        if result:
            return result
        if daemon is not None and daemon.returncode is not None:
            raise AssertionError(
                f"mailqd exited with {daemon.returncode} while waiting for {what}\n"
                f"{daemon.log_tail()}"
            )
        if time.monotonic() >= deadline:
            tail = f"\n{daemon.log_tail()}" if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)


class Scenario:
    """One scenario's database, server, daemons and books (see the module docstring)."""

    def __init__(
        self,
        name: str,
        slug: str,
        db_url: str,
        smtp: FaultySmtp,
        daemons: DaemonPool,
        *,
        soak: bool,
    ) -> None:
        self.name = name
        self.slug = slug
        self.db_url = db_url
        self.smtp = smtp
        self.daemons = daemons
        self.soak = soak
        self.store = Store.from_url(db_url)
        self.client = Client(db_url)
        self.books = Books(name, self.store, smtp)
        self.started: list[DaemonProcess] = []
        self._numbers = itertools.count()

    def close(self) -> None:
        self.client.close()
        self.store.close()

    def scale(self, ci: int, soak: int) -> int:
        return soak if self.soak else ci

    # -- the daemon ---------------------------------------------------------------

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            **FAST_SETTINGS,
            "MAILQD_DATABASE_URL": self.db_url,
            "MAILQD_SMTP_URL": self.smtp.url(),
            **overrides,
        }

    def start_daemon(self, *, workers: int = 3, **overrides: str) -> DaemonProcess:
        """Start `mailqd` and return once its workers are running."""
        daemon = self.daemons.mailqd(self.env(MAILQD_WORKERS=str(workers), **overrides))
        self.started.append(daemon)
        daemon.wait_for_workers(workers, timeout=60)
        return daemon

    def stop_daemon(self, daemon: DaemonProcess) -> None:
        """SIGTERM: it must stop gracefully (exit 0) even after everything the scenario did."""
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit(timeout=90)
        assert code == 0, f"mailqd exited with {code} on SIGTERM\n{daemon.log_tail()}"

    def crash_events(self) -> list[dict[str, Any]]:
        """Log records, across every daemon of this scenario, that show mailqd itself failing."""
        found = []
        for daemon in self.started:
            found += [e for e in daemon.events() if e.get("event") in CRASH_EVENTS]
        return found

    # -- enqueueing ---------------------------------------------------------------

    def jobs(
        self,
        count: int,
        *,
        to: str = "user{n}@example.com",
        body_bytes: int = 200,
        **fields: Any,
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """`count` job dicts for `Client.enqueue_many`, each tagged with a unique token."""
        tokens, jobs = [], []
        filler = "All work and no play makes Jack a dull boy. " * (body_bytes // 45 + 1)
        for _ in range(count):
            n = next(self._numbers)
            token = f"{self.slug}.{n}"
            tokens.append(token)
            jobs.append(
                {
                    "to": to.format(n=n),
                    "subject": f"{self.name} #{n}",
                    "body": f"message {token}\n{filler[:body_bytes]}",
                    "headers": {TOKEN_HEADER: token},
                    **fields,
                }
            )
        return tokens, jobs

    def enqueue(
        self, count: int, *, fail_reason: str | None = None, **job_fields: Any
    ) -> list[str]:
        """Enqueue `count` tagged jobs through the client (in bulk) and put them in the books.

        With `fail_reason`, they must end `failed` with a `last_error` matching it.
        """
        tokens, jobs = self.jobs(count, **job_fields)
        ids: list[str] = []
        for start in range(0, count, ENQUEUE_CHUNK):
            ids += self.client.enqueue_many(jobs[start : start + ENQUEUE_CHUNK])
        if fail_reason is None:
            self.books.expect_delivered(ids, tokens)
        else:
            self.books.expect_failed(ids, fail_reason, tokens)
        return ids

    # -- watching the queue -------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {str(status): n for status, n in self.store.counts().by_status.items()}

    def sent(self) -> int:
        return self.counts().get("sent", 0)

    def unfinished(self) -> int:
        counts = self.counts()
        return counts.get("pending", 0) + counts.get("sending", 0)

    def holders(self) -> dict[int, int]:
        """Worker pid -> jobs it holds (`sending` under its lease) right now."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT lease_owner, count(*) FROM email_queue "
                    "WHERE status = 'sending' AND lease_owner IS NOT NULL GROUP BY lease_owner"
                )
            )
            return {int(owner.rsplit(":", 1)[1]): n for owner, n in rows}

    def wait_sent(self, at_least: int, daemon: DaemonProcess, timeout: float = 120) -> int:
        return wait_until(
            lambda: (n := self.sent()) >= at_least and n,
            f"{at_least} jobs sent",
            timeout,
            daemon=daemon,
        )

    def wait_drained(self, daemon: DaemonProcess, timeout: float) -> bool:
        """Wait until no job is pending or sending; False at the deadline (the books say stuck)."""
        try:
            wait_until(lambda: self.unfinished() == 0, "the queue to drain", timeout, daemon=daemon)
        except AssertionError as exc:
            if daemon.returncode is not None:
                raise
            print(f"\n{exc}")
            return False
        return True

    def finish(self, daemon: DaemonProcess, *, drain_timeout: float = 180) -> Tally:
        """Drain, stop gracefully, check that nothing crashed, and close the books."""
        self.wait_drained(daemon, drain_timeout)
        self.stop_daemon(daemon)
        tally = self.books.close()
        crashes = self.crash_events()
        assert not crashes, f"mailqd reported failures of its own: {crashes[:5]}"
        assert tally.balanced, tally.explain()
        return tally


MakeScenario = Callable[[str, str], Scenario]
"""The `make_scenario(name, slug)` fixture."""


# -- memory ---------------------------------------------------------------------


@dataclass
class RssSampler:
    """Samples VmRSS of the supervisor and its workers every `interval` seconds, in a thread."""

    supervisor: int
    interval: float = 0.25
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(monotonic time, pid, RSS in KiB)."""
    marks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in (self.supervisor, *children_of(self.supervisor)):
                rss = read_rss_kib(pid)
                if rss is not None:
                    self.samples.append((now, pid, rss))
            self._stop.wait(self.interval)

    def per_process(self, since: float, until: float = float("inf")) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for at, pid, rss in self.samples:
            if since <= at <= until:
                found.setdefault(pid, []).append(rss)
        return found


def read_rss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None
