"""The whole daemon, end to end: throughput, idle latency, memory. Prints figures, asserts nothing.

    .venv/bin/python bench/bench_daemon.py [--messages 20000] [--quick] [--relays 1|2]
        [--database-url URL]

It runs the real `mailqd` command (supervisor + 3 forked workers) against
PostgreSQL, delivering to a local SMTP sink, and measures:

1. the sink alone, so the daemon's figures can be read against its ceiling;
2. throughput, live: the daemon runs idle, N ~2 KB messages are bulk-enqueued
   with `Client.enqueue_many` (1,000 per transaction), and the clock stops
   when none is pending or sending any more (polled every 50 ms);
3. throughput, backlog: the same N are queued with the daemon stopped, then
   it is started; timed from the start of the process and from its first
   delivery;
4. idle latency: one message at a time, each waited for before the next,
   measured as `sent_at - created_at` (both by the database's clock) and on
   the client's clock from the enqueue call to seeing the row `sent`;
5. memory: VmRSS of the supervisor and of each worker, sampled every 100 ms,
   and their VmHWM (peak RSS) read from /proc at the end of each run.

The sink is Postfix's `smtp-sink` (C; Debian: `apt-get install postfix`, then
make sure the Postfix MTA itself is not left running: `postfix stop`). A
Python sink (aiosmtpd) tops out near 1,500 msg/s on a 2-core machine and so
would measure itself, not mailqd; it is used only as a fallback, with a
warning. The sink alone is measured with Postfix's `smtp-source` when it is
installed, else with a minimal asyncio client.

`--relays 2` runs two sinks, on two ports, and gives mailqd two relays and
two routes by a TOML file: recipients alternate between `@a.example` (route
`a.example` -> relay `a`) and `@b.example` (the default route -> relay `b`),
so each relay carries half of the mail; the sinks' counts are reported per
relay. The default, one relay (`smtp_url`, recipients `@example.com`), is
the run older figures were taken with. The sink alone is measured on the
first sink only.

`--profile` attaches `py-spy record` (the `bench` extra) to every worker
during the live and the backlog runs and prints where the workers' CPU went
per message: bench/coldprofile.py's buckets, then the mailqd functions
found on most samples (inclusive, so they overlap). py-spy costs the
workers CPU; a profiled run's rates are not the bench's figures.

Without `--database-url` the bench creates a throwaway database on the server
the test suite uses (tests/pg.py: MAILQD_TEST_PG_URL, else 127.0.0.1:5432,
else a cluster of its own) and drops it at the end. A given database must be
empty of jobs: the bench empties it between measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg

from benchdb import add_database_url_option, run_bench
from coldprofile import WAITING, Profiler, Split, bucket_of
from mailqd import Client
from mailqd.store import Store, upgrade
from rawsmtp import raw_smtp_rate

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.05
MEMORY_SAMPLE_SECONDS = 0.1
ENQUEUE_BATCH = 1000
READY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0
SINK_CANDIDATES = ("/usr/sbin/smtp-sink", "/usr/lib/postfix/smtp-sink")
SOURCE_CANDIDATES = ("/usr/sbin/smtp-source", "/usr/lib/postfix/smtp-source")
SINK_ALONE_SESSIONS = 10

TARGET_RATE = 3000.0
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 80.0

BODY_CHARS = 2_000
_VOCABULARY = (
    "the order your we will you for and to of a in is it that on with as be this account "
    "delivery shipping invoice return policy package tracking number thank please contact "
    "support team address payment confirmed item items total price discount week day today "
    "tomorrow ready soon arrive estimated carrier reference details customer service"
)


@dataclass(frozen=True, slots=True)
class Sizes:
    messages: int
    latency_samples: int


FULL = Sizes(messages=20_000, latency_samples=500)
QUICK = Sizes(messages=2_000, latency_samples=50)


def _corpus(chars: int = 64_000, seed: int = 2026) -> str:
    rng = random.Random(seed)
    words = _VOCABULARY.split(" ")
    parts: list[str] = []
    length = 0
    while length < chars:
        sentence = " ".join(rng.choices(words, k=rng.randint(6, 18))).capitalize() + ".\n"
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)


CORPUS = _corpus()


# The recipients' domains, one relay each, with `--relays 2` (`relay_config`).
RELAY_DOMAINS = ("a.example", "b.example")
_domains: tuple[str, ...] = ("example.com",)


def message(i: int, tag: str) -> dict[str, Any]:
    """Message `i`: ~2 KB of prose-like text, a different window of the corpus each time.

    Its recipient's domain cycles through `_domains` (one domain unless `--relays 2`).
    """
    start = (i * 7919) % (len(CORPUS) - BODY_CHARS)
    return {
        "to": f"Customer {i} <customer{i}@{_domains[i % len(_domains)]}>",
        "subject": f"Your order #{i} ({tag}) has been received",
        "body": CORPUS[start : start + BODY_CHARS],
    }


# -- small helpers ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.05)


def find_program(candidates: Sequence[str], name: str) -> str | None:
    return shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (`share` in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kb(pid: int, key: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/PID/status, in kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# -- the SMTP sink ------------------------------------------------------------------

_AIOSMTPD_SINK = """\
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: queued"

async def serve():
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(Sink(), hostname="sink.test"), "127.0.0.1",
                             int(sys.argv[1]), backlog=1000)
    await asyncio.Event().wait()

asyncio.run(serve())
"""


class Sink:
    """A local SMTP server that accepts and discards everything, in its own process."""

    def __init__(self, workdir: Path, force_python: bool = False, name: str = "sink") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.name = name
        self.program = None if force_python else find_program(SINK_CANDIDATES, "smtp-sink")
        self.kind = "smtp-sink (Postfix, C)" if self.program else "aiosmtpd (Python)"
        self._counter_file = workdir / f"{name}-counters.txt"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.program:
            argv = [self.program, "-c"]
            if os.geteuid() == 0:
                argv += ["-u", _unprivileged_user()]
            # -m: connections at once (default 256); backlog 1000.
            argv += ["-m", "1000", f"127.0.0.1:{self.port}", "1000"]
            out = self._counter_file.open("wb")
        else:
            print(
                "WARNING: Postfix's smtp-sink is not installed; falling back to aiosmtpd, which "
                "tops out near 1,500 msg/s on 2 cores: the THROUGHPUT FIGURES BELOW MEASURE THE "
                "SINK, NOT MAILQD. Install it with: apt-get install postfix (and `postfix stop` "
                "if the install started the MTA).",
                file=sys.stderr,
            )
            argv = [sys.executable, "-c", _AIOSMTPD_SINK, str(self.port)]
            out = self._counter_file.open("wb")
        with out:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def received(self) -> int | None:
        """Messages accepted so far (smtp-sink's `-c` counters); None for aiosmtpd."""
        if not self.program:
            return None
        try:
            with self._counter_file.open("rb") as counters:
                # The file grows by a line a message: read its tail only, so
                # polling it often costs the same at the 20,000th message.
                counters.seek(max(0, counters.seek(0, os.SEEK_END) - 200))
                text = counters.read().decode("ascii", "replace")
        except OSError:
            return None
        counts = re.findall(r"mesg=(\d+)", text)
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _unprivileged_user() -> str:
    for name in ("postfix", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise SystemExit("smtp-sink runs as root only with -u USER; no postfix or nobody user here")


def sink_alone(sink: Sink, total: int) -> tuple[str, float]:
    """The sink's own ceiling, with ~2 KB messages over reused connections."""
    source = find_program(SOURCE_CANDIDATES, "smtp-source")
    if source:
        argv = [
            source, "-d", "-s", str(SINK_ALONE_SESSIONS), "-m", str(total), "-l", "2000",
            "-M", "bench.test", "-f", "bench@example.com", "-t", "sink@example.com",
            f"127.0.0.1:{sink.port}",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
        label = f"smtp-source, {SINK_ALONE_SESSIONS} reused connections"
        return label, total / (time.perf_counter() - started)
    import asyncio

    per_second = asyncio.run(_raw_client(sink.port, total, SINK_ALONE_SESSIONS))
    return f"raw asyncio client, {SINK_ALONE_SESSIONS} reused connections", per_second


async def _raw_client(port: int, total: int, sessions: int) -> float:
    payload = ("Subject: sink alone\r\n\r\n" + "x" * 76 + "\r\n") * 26 + ".\r\n"
    lines = [
        b"MAIL FROM:<bench@example.com>\r\n",
        b"RCPT TO:<sink@example.com>\r\n",
        b"DATA\r\n",
        payload.encode(),
    ]
    return await raw_smtp_rate(port, lines, total, sessions)


# -- the database -----------------------------------------------------------------


class Queue:
    """The bench's own view of the queue: a raw autocommit connection, cheap indexed counts."""

    def __init__(self, url: str) -> None:
        self.store = Store.from_url(url)
        self.conn = psycopg.connect(libpq_url(url), autocommit=True)

    def close(self) -> None:
        self.conn.close()
        self.store.close()

    def prepare(self) -> None:
        """Migrate; refuse a database that already holds jobs, since the bench empties it."""
        if self.store.dialect != "postgresql":
            raise SystemExit("the daemon bench needs PostgreSQL")
        upgrade(self.store.engine)
        if self.scalar("SELECT EXISTS (SELECT 1 FROM email_queue)"):
            raise SystemExit("email_queue holds jobs; give the bench an empty database")

    def empty(self) -> None:
        """Remove every job, its attempts and (since the relay layer) its per-recipient rows."""
        tables = ["email_queue", "email_attempts"]
        if self.scalar("SELECT to_regclass('email_recipients') IS NOT NULL"):
            tables.append("email_recipients")  # absent before migration 0011
        self.conn.execute("TRUNCATE " + ", ".join(tables))
        for table in tables:
            self.conn.execute(f"VACUUM ANALYZE {table}")

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def unfinished(self) -> bool:
        """Whether any job is still pending or sending.

        EXISTS stops at the first such row, so polling costs next to nothing
        while the daemon works; counting them instead read every pending
        entry (~9 ms per poll with 20,000 queued), and at one poll every
        50 ms took about a sixth of a core from the daemon being measured
        (seen in pg_stat_statements).
        """
        return bool(
            self.scalar(
                "SELECT EXISTS (SELECT 1 FROM email_queue WHERE status = 'pending')"
                " OR EXISTS (SELECT 1 FROM email_queue WHERE status = 'sending')"
            )
        )

    def by_status(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, count(*) FROM email_queue GROUP BY status")
        return {status: count for status, count in rows}

    def status_of(self, job_id: str) -> str | None:
        value = self.scalar("SELECT status FROM email_queue WHERE id = %s", (job_id,))
        return None if value is None else str(value)

    def db_now(self) -> float:
        return float(self.scalar("SELECT extract(epoch FROM clock_timestamp())"))

    def sent_span(self) -> tuple[float, float]:
        """Epoch seconds of the first and last `sent_at`."""
        row = self.conn.execute(
            "SELECT extract(epoch FROM min(sent_at)), extract(epoch FROM max(sent_at))"
            " FROM email_queue WHERE status = 'sent'"
        ).fetchone()
        assert row is not None
        return float(row[0]), float(row[1])

    def latencies_ms(self, job_ids: Sequence[str]) -> list[float]:
        rows = self.conn.execute(
            "SELECT extract(epoch FROM sent_at - created_at) * 1000 FROM email_queue"
            " WHERE id = ANY(%s) AND status = 'sent'",
            (list(job_ids),),
        )
        return [float(r[0]) for r in rows]

    def latency_parts_ms(self, job_ids: Sequence[str]) -> dict[str, list[float]]:
        """Where the time went, per message: to the attempt's start, the send, the recording.

        `started_at` is stamped by the worker's clock; on one host it is the database's.
        """
        rows = self.conn.execute(
            "SELECT extract(epoch FROM a.started_at - q.created_at) * 1000,"
            " a.duration_seconds * 1000,"
            " extract(epoch FROM q.sent_at - a.started_at) * 1000 - a.duration_seconds * 1000"
            " FROM email_queue q JOIN email_attempts a ON a.job_id = q.id"
            " WHERE q.id = ANY(%s) AND a.outcome = 'sent'",
            (list(job_ids),),
        ).fetchall()
        return {
            "enqueue -> attempt starts": [float(r[0]) for r in rows],
            "attempt (compose + SMTP)": [float(r[1]) for r in rows],
            "attempt end -> recorded": [float(r[2]) for r in rows],
        }

    def backend_pids(self, *, autovacuum: bool) -> list[int]:
        """Server processes working on this database, other than the bench's own.

        The daemon's (and the client's) connections, or the autovacuum workers
        cleaning up after them.
        """
        kind = "=" if autovacuum else "<>"
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            f" AND pid <> pg_backend_pid() AND backend_type {kind} 'autovacuum worker'"
        )
        return [int(r[0]) for r in rows]

    def listeners(self) -> int:
        """Worker LISTEN connections on this database (their last statement was LISTEN)."""
        return int(
            self.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN %%'"
            )
        )


def libpq_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- the daemon and its memory ------------------------------------------------------


@dataclass
class ProcessMemory:
    role: str
    peak_rss_kb: int = 0  # the largest VmRSS sample
    hwm_kb: int = 0  # VmHWM, read at the end
    cpu_start: float | None = None
    cpu_end: float | None = None


@dataclass
class MemoryReport:
    processes: dict[int, ProcessMemory] = field(default_factory=dict)

    def merge(self, other: MemoryReport) -> None:
        self.processes.update(other.processes)

    def worst(self, role: str) -> int:
        return max(
            (max(p.hwm_kb, p.peak_rss_kb) for p in self.processes.values() if p.role == role),
            default=0,
        )


class Daemon:
    """`mailqd` as a subprocess, in a session of its own; its memory sampled in a thread."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int) -> None:
        self.env = env
        self.log_path = log_path
        self.workers = workers
        self.memory = MemoryReport()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> float:
        """Start `mailqd` (see `wait_ready`); returns the perf_counter at exec."""
        mailqd = Path(sys.executable).with_name("mailqd")
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self._proc = subprocess.Popen(
                [str(mailqd)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.memory = MemoryReport()
        self._sampling.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return started

    def wait_ready(self, queue: Queue) -> float:
        """Wait until all workers LISTEN; returns how long that took."""
        started = time.perf_counter()
        deadline = started + READY_TIMEOUT
        while queue.listeners() < self.workers:
            self.check_alive()
            if time.perf_counter() > deadline:
                raise SystemExit(f"mailqd workers not listening after {READY_TIMEOUT} s")
            time.sleep(0.02)
        return time.perf_counter() - started

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise SystemExit("mailqd exited:\n" + "\n".join(tail))

    def worker_pids(self) -> list[int]:
        return children_of(self.pid) if self.pid else []

    def _sample(self) -> None:
        while not self._sampling.is_set():
            self._record()
            self._sampling.wait(MEMORY_SAMPLE_SECONDS)

    def _record(self) -> None:
        if self._proc is None:
            return
        pids = {
            self._proc.pid: "supervisor",
            **dict.fromkeys(children_of(self._proc.pid), "worker"),
        }
        for pid, role in pids.items():
            entry = self.memory.processes.setdefault(pid, ProcessMemory(role))
            entry.peak_rss_kb = max(entry.peak_rss_kb, status_kb(pid, "VmRSS") or 0)
            entry.hwm_kb = max(entry.hwm_kb, status_kb(pid, "VmHWM") or 0)

    def stop(self) -> int:
        """SIGTERM (graceful), SIGKILL the group if it hangs; returns the exit code."""
        if self._proc is None:
            return 0
        self._record()  # VmHWM of everyone, before they exit
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            code = self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            code = self._proc.wait()
        self._proc = None
        return code

    def kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc = None


# -- the measurements ---------------------------------------------------------------


class Processes(Protocol):
    """What `CpuMeter` reads of a system under test: a supervisor (if any) and its workers."""

    @property
    def pid(self) -> int | None: ...

    def worker_pids(self) -> list[int]: ...


class CpuMeter:
    """CPU seconds used in a window by the daemon, its PostgreSQL backends and the sink.

    The total per message bounds the rate on this machine from above,
    whatever else runs on it: 2 cores / (CPU seconds per message).
    `daemon` is `mailqd` or any other system under test (bench_coldstart.py).
    """

    def __init__(self, queue: Queue, daemon: Processes, sink: Sink | Sequence[Sink]) -> None:
        self.queue, self.daemon = queue, daemon
        self.sinks = [sink] if isinstance(sink, Sink) else list(sink)
        self._start: dict[str, dict[int, float]] = {}
        self._seen: dict[str, dict[int, float]] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, dict[int, float]]:
        def cpu(pids: Sequence[int]) -> dict[int, float]:
            return {p: c for p in pids if (c := cpu_seconds(p)) is not None}

        return {
            "supervisor": cpu([self.daemon.pid] if self.daemon.pid else []),
            "workers": cpu(self.daemon.worker_pids()),
            "postgres": cpu(self.queue.backend_pids(autovacuum=False)),
            "autovacuum": cpu(self.queue.backend_pids(autovacuum=True)),
            "sink": cpu([s.pid for s in self.sinks if s.pid]),
        }

    def _note(self) -> None:
        """Keep the last CPU figure of every process seen, so short-lived ones count too."""
        for role, pids in self._read().items():
            self._seen.setdefault(role, {}).update(pids)

    def _sample(self) -> None:
        while not self._stopping.wait(MEMORY_SAMPLE_SECONDS):
            self._note()

    def start(self) -> None:
        self._start = self._read()
        self._seen = {}
        self._stopping.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Seconds per role since `start` (processes that started since count from zero)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._note()
        return {
            role: sum(c - self._start.get(role, {}).get(p, 0.0) for p, c in pids.items())
            for role, pids in self._seen.items()
        }


@dataclass
class Throughput:
    label: str
    messages: int
    seconds: float  # wall clock, from the start of the timed window to all finished
    enqueue_seconds: float | None = None
    first_to_last: float | None = None  # by sent_at, the database's clock
    statuses: dict[str, int] = field(default_factory=dict)
    sink_received: int | None = None
    per_sink: dict[str, int] = field(default_factory=dict)  # with several relays
    cpu: dict[str, float] = field(default_factory=dict)
    profile: Split | None = None  # --profile
    profile_dir: Path | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def wait_drained(queue: Queue, daemon: Daemon) -> float:
    """Poll every 50 ms until nothing is pending or sending; returns perf_counter then."""
    deadline = time.perf_counter() + DRAIN_TIMEOUT
    while queue.unfinished():
        daemon.check_alive()
        if time.perf_counter() > deadline:
            raise SystemExit(f"not drained after {DRAIN_TIMEOUT} s: {queue.by_status()}")
        time.sleep(POLL_SECONDS)
    return time.perf_counter()


def enqueue(client: Client, total: int, tag: str) -> None:
    for start in range(0, total, ENQUEUE_BATCH):
        client.enqueue_many(
            [message(i, tag) for i in range(start, min(total, start + ENQUEUE_BATCH))]
        )


class Received:
    """What each sink has received since this was made (None for aiosmtpd, which keeps no count)."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = sinks
        self.start = [s.received() for s in sinks]

    def since(self) -> tuple[int | None, dict[str, int]]:
        now = [s.received() for s in self.sinks]
        per: dict[str, int] = {}
        for sink, before, after in zip(self.sinks, self.start, now, strict=True):
            if before is None or after is None:
                return None, {}
            per[sink.name] = after - before
        return sum(per.values()), (per if len(per) > 1 else {})


def measure_live(
    queue: Queue,
    client: Client,
    daemon: Daemon,
    sinks: Sequence[Sink],
    n: int,
    profiler: Profiler | None = None,
) -> Throughput:
    """The daemon idles; N messages are enqueued in batches; timed until all are delivered."""
    received = Received(sinks)
    meter = CpuMeter(queue, daemon, sinks)
    meter.start()
    if profiler is not None:
        profiler.start(daemon.worker_pids)
    started = time.perf_counter()
    enqueue(client, n, "live")
    enqueued = time.perf_counter()
    done = wait_drained(queue, daemon)
    split = profiler.stop() if profiler is not None else None
    cpu = meter.stop()
    first, last = queue.sent_span()
    total, per_sink = received.since()
    return Throughput(
        label="live (enqueue while running)",
        messages=n,
        seconds=done - started,
        enqueue_seconds=enqueued - started,
        first_to_last=last - first,
        statuses=queue.by_status(),
        sink_received=total,
        per_sink=per_sink,
        cpu=cpu,
        profile=split,
        profile_dir=None if profiler is None else profiler.workdir,
    )


def measure_backlog(
    queue: Queue,
    client: Client,
    daemon: Daemon,
    sinks: Sequence[Sink],
    n: int,
    profiler: Profiler | None = None,
) -> tuple[Throughput, float]:
    """N messages queued with the daemon stopped; timed from `mailqd`'s start."""
    enqueue(client, n, "backlog")
    received = Received(sinks)
    meter = CpuMeter(queue, daemon, sinks)
    meter.start()  # before the daemon: its processes count from zero
    started = daemon.start()
    if profiler is not None:
        profiler.start(daemon.worker_pids)
    done = wait_drained(queue, daemon)
    split = profiler.stop() if profiler is not None else None
    cpu = meter.stop()
    first, last = queue.sent_span()
    total, per_sink = received.since()
    startup = first - (time.time() - (time.perf_counter() - started))
    result = Throughput(
        label="backlog (queued, then start)",
        messages=n,
        seconds=done - started,
        first_to_last=last - first,
        statuses=queue.by_status(),
        sink_received=total,
        per_sink=per_sink,
        cpu=cpu,
        profile=split,
        profile_dir=None if profiler is None else profiler.workdir,
    )
    return result, startup


@dataclass
class Latency:
    db_ms: list[float]
    client_ms: list[float]
    parts_ms: dict[str, list[float]]


def measure_latency(queue: Queue, client: Client, samples: int) -> Latency:
    """One message at a time on an idle daemon, each waited for before the next."""
    rng = random.Random(7)
    ids: list[str] = []
    client_ms: list[float] = []
    for i in range(samples):
        time.sleep(rng.uniform(0.01, 0.03))  # let the daemon go idle again
        started = time.perf_counter()
        job_id = client.enqueue(**message(i, "latency"))
        while queue.status_of(job_id) != "sent":
            if time.perf_counter() - started > 30:
                raise SystemExit(f"job {job_id} not sent after 30 s: {queue.status_of(job_id)}")
            time.sleep(0.001)
        client_ms.append((time.perf_counter() - started) * 1000)
        ids.append(job_id)
    return Latency(
        db_ms=queue.latencies_ms(ids), client_ms=client_ms, parts_ms=queue.latency_parts_ms(ids)
    )


# -- the report ------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def print_throughput(result: Throughput) -> None:
    print(f"  {result.label}")
    print(f"    delivered                {result.messages:>10,} msg in {result.seconds:.2f} s")
    print(
        f"    rate                     {result.rate:>10,.0f} msg/s   "
        f"(target >= {TARGET_RATE:,.0f}: {verdict(result.rate >= TARGET_RATE)})"
    )
    if result.enqueue_seconds is not None:
        print(
            f"    of which enqueueing      {result.enqueue_seconds:>10.2f} s (client, in batches)"
        )
    if result.first_to_last:
        rate = result.messages / result.first_to_last
        print(f"    first to last sent_at    {result.first_to_last:>10.2f} s  = {rate:,.0f} msg/s")
    if result.cpu:
        for role, seconds in result.cpu.items():
            per_msg = seconds / result.messages * 1e6
            print(f"    CPU, {role:<19} {seconds:>10.2f} s  = {per_msg:>5,.0f} us/msg")
        total = sum(result.cpu.values()) / result.messages
        cores = os.cpu_count() or 1
        print(
            f"    CPU, all of the above    {total * 1e6:>10,.0f} us/msg: at most"
            f" {cores / total:,.0f} msg/s on {cores} idle cores"
        )
    print(f"    final statuses           {result.statuses}")
    if result.sink_received is not None:
        print(f"    sink received            {result.sink_received:>10,} msg")
    for name, count in result.per_sink.items():
        print(f"      of which {name:<15} {count:>10,} msg")


def print_profile(result: Throughput, top: int = 25) -> None:
    """The buckets of bench/coldprofile.py, then the mailqd functions on most samples."""
    if result.profile is None or result.profile_dir is None:
        return
    workers = result.cpu.get("workers", 0.0)
    print("    profile (py-spy), worker CPU by bucket:")
    result.profile.print(workers, result.messages, top=5)
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in sorted(result.profile_dir.glob("py-spy-*.txt")):
        for line in raw.read_text(errors="replace").splitlines():
            stack_text, _, count = line.rpartition(" ")
            if not stack_text or not count.isdigit():
                continue
            stack = stack_text.split(";")
            if bucket_of(stack)[0] == WAITING:
                continue
            total += int(count)
            names = {f"{m['file']}:{m['function']}" for f in stack if (m := _FRAME.match(f))}
            for name in names:
                if "mailqd/" in name and not _ROOT_FRAMES.search(name):
                    inclusive[name] += int(count)
    if not total:
        return
    per_message = workers / result.messages * 1e6
    print(f"    mailqd functions on most samples (inclusive, {total:,} samples):")
    for name, count in inclusive.most_common(top):
        share = count / total
        short = name[name.index("mailqd/") :]
        print(f"      {share * per_message:>6,.0f} us/msg  {share:6.1%}  {short[:100]}")


# Frames on nearly every worker sample, between the process's start and the event loop.
_ROOT_FRAMES = re.compile(
    r"mailqd/(cli/|__main__|daemon/(supervisor|processes)\.py)"
    r"|mailqd/daemon/worker(_process)?\.py:(run_worker|_serve|Worker\.run)$"
)
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def print_latency(latency: Latency) -> None:
    for label, values in (
        ("sent_at - created_at (DB)", latency.db_ms),
        ("client enqueue -> sent", latency.client_ms),
        *(("  " + part, ms) for part, ms in latency.parts_ms.items()),
    ):
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(
            f"    {label:<26} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {max(values):6.2f} ms"
            f"  mean {statistics.fmean(values):6.2f} ms  (n={len(values)})"
        )
    p50, p99 = percentile(latency.db_ms, 0.5), percentile(latency.db_ms, 0.99)
    print(
        f"    target p50 < {TARGET_P50_MS:.0f} ms: {verdict(p50 < TARGET_P50_MS)};"
        f" p99 < {TARGET_P99_MS:.0f} ms: {verdict(p99 < TARGET_P99_MS)}"
    )


def print_memory(memory: MemoryReport) -> None:
    for pid, entry in sorted(memory.processes.items(), key=lambda kv: (kv[1].role, kv[0])):
        print(
            f"    {entry.role:<10} pid {pid:<8} peak VmRSS {entry.peak_rss_kb / 1024:6.1f} MB"
            f"   VmHWM {entry.hwm_kb / 1024:6.1f} MB"
        )
    worst = memory.worst("worker") / 1024
    print(
        f"    largest worker           {worst:6.1f} MB   "
        f"(target < {TARGET_RSS_MB:.0f} MB: {verdict(worst < TARGET_RSS_MB)})"
    )


def uses_uvloop() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"uvloop {version('uvloop')} (the workers use it)"
    except PackageNotFoundError:
        return "no uvloop (the workers use asyncio's own loop)"


SENDER = "Shop <noreply@example.com>"


def sink_url(port: int) -> str:
    return f"smtp://127.0.0.1:{port}?starttls=off"


def relay_config(sinks: Sequence[Sink], path: Path) -> Path:
    """A TOML file with a relay per sink, named after it, and a route per `RELAY_DOMAINS` entry.

    The last route is the default one (no `recipient_domains`).
    """
    lines: list[str] = []
    for sink in sinks:
        lines += [f"[relays.{sink.name}]", f'url = "{sink_url(sink.port)}"', ""]
    for domain, sink in zip(RELAY_DOMAINS, sinks, strict=True):
        lines.append("[[routes]]")
        if sink is not sinks[-1]:
            lines.append(f'recipient_domains = ["{domain}"]')
        lines += [f'relays = ["{sink.name}"]', ""]
    path.write_text("\n".join(lines))
    return path


def daemon_env(
    url: str, sink_port: int, workers: int, concurrency: int | None, config: Path | None = None
) -> dict[str, str]:
    """The environment `mailqd` runs with in the benches: this one's, less any MAILQD_ setting.

    `config`, a TOML file (`relay_config`), whose relays replace `sink_port`'s `smtp_url`.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQD_")}
    env.update(
        MAILQD_DATABASE_URL=url,
        MAILQD_SMTP_URL=sink_url(sink_port),
        MAILQD_WORKERS=str(workers),
        MAILQD_LOG_LEVEL="warning",
        MAILQD_LOG_FORMAT="json",
        MAILQD_FROM=SENDER,
        MAILQD_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
    )
    if concurrency:
        env["MAILQD_CONCURRENCY"] = str(concurrency)
    if config is not None:
        env["MAILQD_CONFIG"] = str(config)
    return env


def run(args: argparse.Namespace, url: str, workdir: Path) -> None:
    sizes = QUICK if args.quick else FULL
    n = args.messages or sizes.messages
    samples = args.latency_samples or sizes.latency_samples
    print(
        f"machine: {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, {uses_uvloop()}; load average at start {load_average()}"
    )
    global _domains
    profile_rate = 100
    pyspy = None
    if args.profile:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.access(pyspy, os.X_OK):
            raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")

    def profiler(phase: str) -> Profiler | None:
        if pyspy is None:
            return None
        folder = workdir / f"profile-{phase}"
        folder.mkdir()
        return Profiler(pyspy, folder, profile_rate)

    if args.relays == 1:
        sinks = [Sink(workdir, force_python=args.python_sink)]
        config = None
    else:
        sinks = [
            Sink(workdir, force_python=args.python_sink, name=name)
            for name in ("a", "b")[: args.relays]
        ]
        config = relay_config(sinks, workdir / "relays.toml")
        _domains = RELAY_DOMAINS
    sink = sinks[0]
    for each in sinks:
        each.start()
    queue = Queue(url)
    client = Client(url)
    env = daemon_env(url, sink.port, args.workers, args.concurrency, config)
    daemon = Daemon(env, workdir / "mailqd.log", args.workers)
    memory = MemoryReport()
    try:
        queue.prepare()
        for each in sinks:
            print(f"sink {each.name}: {each.kind} on 127.0.0.1:{each.port}")
        if config is None:
            print("relays: 1 (smtp_url), recipients @example.com")
        else:
            print(
                f"relays: {len(sinks)} ({config.name}: a route per domain), recipients"
                f" alternately @{' and @'.join(RELAY_DOMAINS)}"
            )
        print(
            f"daemon: mailqd, {args.workers} workers, concurrency "
            f"{args.concurrency or 'default'}, log level warning (json); log in {daemon.log_path}"
        )
        print()
        print("1. the sink alone")
        label, sink_rate = sink_alone(sink, max(n, 20_000))
        print(f"    {label:<40} {sink_rate:>10,.0f} msg/s")

        print(f"\n2. throughput, {n:,} messages of ~2 KB")
        daemon.start()
        ready = daemon.wait_ready(queue)
        print(f"    (daemon ready: all {args.workers} workers listening after {ready:.2f} s)")
        client.enqueue_many([message(i, "warmup") for i in range(200)])  # connections, caches
        wait_drained(queue, daemon)
        queue.empty()
        live = measure_live(queue, client, daemon, sinks, n, profiler("live"))
        print_throughput(live)
        print_profile(live)

        print(f"\n3. idle latency, {samples} messages one at a time")
        time.sleep(1.0)
        latency = measure_latency(queue, client, samples)
        print_latency(latency)
        daemon.stop()
        memory.merge(daemon.memory)

        if not args.no_backlog:
            queue.empty()
            backlog, startup = measure_backlog(queue, client, daemon, sinks, n, profiler("backlog"))
            print()
            print_throughput(backlog)
            print_profile(backlog)
            print(f"    first delivery after     {startup:>10.2f} s (process start, imports, fork)")
            daemon.stop()
            memory.merge(daemon.memory)

        print("\n4. memory (peak of each process over the runs above)")
        print_memory(memory)
        print(f"\nload average at end {load_average()}")
    finally:
        daemon.kill()
        client.close()
        queue.close()
        for each in sinks:
            each.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_database_url_option(parser)
    parser.add_argument("--messages", type=int, help="messages per throughput run (20,000)")
    parser.add_argument("--latency-samples", type=int, help="latency samples (500)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, help="MAILQD_CONCURRENCY (mailqd's default)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (~20 s)")
    parser.add_argument("--no-backlog", action="store_true", help="skip the backlog variant")
    parser.add_argument(
        "--relays",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: smtp_url to one sink (default); 2: two sinks, two relays, a route each",
    )
    parser.add_argument(
        "--python-sink", action="store_true", help="use aiosmtpd even if smtp-sink is installed"
    )
    parser.add_argument("--keep-log", action="store_true", help="keep the daemon's log file")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on the workers (live and backlog)"
    )
    args = parser.parse_args(argv)
    run_bench(run, args, "mailqd-bench-", args.keep_log)


if __name__ == "__main__":
    main()
