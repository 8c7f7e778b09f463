"""Store throughput and claim latency on PostgreSQL: prints figures, asserts nothing.

    .venv/bin/python bench/bench_store.py [--database-url URL] [--quick]

Without a URL it creates a throwaway database on the server the test suite
would use (see tests/pg.py: MAILQD_TEST_PG_URL, else 127.0.0.1:5432, else a
cluster of its own) and drops it at the end. With a URL, that database is
migrated and its mailqd tables are emptied between measurements, so it must
be one the bench may fill and empty; the bench refuses one that holds jobs.

What it measures, single process, through the same public API callers use:

1. `Client.enqueue`, one message per transaction;
2. `Client.enqueue_many` in batches, split into validation (`build_job`),
   the store alone (`Store.enqueue_many` of pre-built `NewJob`s) and the
   database alone (the same rows made by an INSERT ... SELECT);
3. `Store.claim` then `Store.complete` (all SENT) for claim batches 1 and 50;
4. claim latency with the same pending backlog beside few versus a million
   finished rows, with the claim's EXPLAIN ANALYZE for each: as sent, where
   the partial index `ix_email_queue_claim` serves it, and as the generic
   plan of the prepared statement psycopg makes of it.
"""

from __future__ import annotations

import argparse
import enum
import os
import platform
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import sqlalchemy as sa

from benchdb import add_database_url_option, bench_database
from mailqd import Client
from mailqd.models import Job, Outcome
from mailqd.store import Completion, Store, upgrade
from mailqd.validation import build_job

LEASE_SECONDS = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BULK_BATCH = 1000
CLAIM_STATEMENT_PREFIX = "WITH due AS"
BULK_TARGET_PER_SECOND = 20_000
LATENCY_TARGET_RATIO = 2.0

BODY_CHARS = 2_000
_VOCABULARY = (
    "the order your we will you for and to of a in is it that on with as be this "
    "account delivery shipping invoice return policy package tracking number thank "
    "please contact support team address payment confirmed item items total price "
    "discount week day today tomorrow ready soon arrive estimated carrier reference "
    "details customer service questions reply email message update status warehouse "
    "prepared dispatched refund exchange size colour quantity subtotal tax receipt "
    "store online visit page link help center hours monday friday weekend holiday"
)


def _corpus(chars: int = 256_000, seed: int = 2026) -> str:
    """Prose-like text from a small vocabulary: compresses about as well as real mail.

    Each message body is a different window of it, so rows are not copies of
    each other and TOAST compression does realistic work.
    """
    rng = random.Random(seed)
    words_of = _VOCABULARY.split()
    words: list[str] = []
    length = 0
    while length < chars:
        sentence = rng.choices(words_of, k=rng.randint(6, 18))
        text = " ".join(sentence).capitalize() + ". "
        words.append(text)
        length += len(text)
    return "".join(words)


CORPUS = _corpus()


def body_text(i: int) -> str:
    """About 2 KB of body for message `i` (a window of the corpus)."""
    start = (i * 7919) % (len(CORPUS) - BODY_CHARS)
    return CORPUS[start : start + BODY_CHARS]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does; `--quick` shrinks every one."""

    single: int
    bulk: int
    bulk_parts: int  # messages for the validation / store / database split
    claim_jobs: dict[int, int]  # claim batch size -> jobs to claim and complete
    finished: tuple[int, int]
    backlog: int
    latency_cycles: int
    warmup_cycles: int


FULL = Sizes(
    single=2_000,
    bulk=100_000,
    bulk_parts=50_000,
    claim_jobs={1: 1_000, 50: 20_000},
    finished=(10_000, 1_000_000),
    backlog=20_000,
    latency_cycles=300,
    warmup_cycles=10,
)
QUICK = Sizes(
    single=300,
    bulk=10_000,
    bulk_parts=5_000,
    claim_jobs={1: 300, 50: 3_000},
    finished=(10_000, 100_000),
    backlog=3_000,
    latency_cycles=40,
    warmup_cycles=5,
)


@dataclass(frozen=True, slots=True)
class Rate:
    """One throughput figure: `count` items in `wall` seconds, and the CPU they took.

    CPU times are less swayed than wall time by other work on a shared machine
    (not immune: a crowded machine slows them too). The client's is this
    process's; the server's is that of the database's backends, read from
    /proc, so only when the server runs on this host.
    """

    label: str
    count: int
    wall: float
    client_cpu: float | None = None
    server_cpu: float | None = None
    unit: str = "msg"

    @property
    def per_second(self) -> float:
        return self.count / self.wall if self.wall > 0 else float("inf")

    def micros_each(self, seconds: float | None) -> str:
        return "n/a" if seconds is None or not self.count else f"{seconds / self.count * 1e6:,.0f}"


class Meter:
    """Adds up the wall and client CPU time of the `with meter:` blocks only."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._started = (0.0, 0.0)

    def __enter__(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc: object) -> None:
        wall, cpu = self._started
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


class ServerCpu:
    """CPU seconds used by the database's backends between `start()` and `stop()`.

    Counts the backends connected to the bench database at `start()`; the
    engines are warmed first, so their pooled connections are among them.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._pids: list[int] = []
        self._start: float | None = None

    def start(self) -> None:
        with self.engine.connect() as conn:
            self._pids = list(
                conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                ).scalars()
            )
        self._start = _cpu_of(self._pids)

    def stop(self) -> float | None:
        end = _cpu_of(self._pids)
        return None if end is None or self._start is None else end - self._start


def _cpu_of(pids: Sequence[int]) -> float | None:
    """utime + stime of local `postgres` processes; None if any is not one of ours."""
    total = 0.0
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                return None
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


@dataclass(frozen=True, slots=True)
class Explained:
    """The claim statement as sent, and its plans with parameters known and not."""

    statement: str
    params: dict[str, Any]
    custom_plan: list[str]
    generic_plan: list[str]


@dataclass(frozen=True, slots=True)
class Latency:
    """Claim latency of one table shape, with the plan the claim ran under."""

    finished_rows: int
    pending_rows: int
    claim_ms: list[float]
    statement_ms: list[float]
    complete_ms: list[float]
    load_average: float
    plans_used: str
    explained: Explained


# -- the database ---------------------------------------------------------------


def prepare(store: Store) -> None:
    """Migrate; refuse a database that already holds jobs, since the bench empties it."""
    if store.dialect != "postgresql":
        raise SystemExit("the bench needs PostgreSQL (it uses generate_series and EXPLAIN)")
    upgrade(store.engine)
    with store.engine.connect() as conn:
        if conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM email_queue)").scalar():
            raise SystemExit("email_queue holds jobs; give the bench an empty database")


def empty_tables(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE email_queue, email_attempts")


def settle(store: Store) -> None:
    """VACUUM ANALYZE, then CHECKPOINT: what autovacuum would have done by now, and
    the seed's writes flushed, so that neither lands inside a timed loop.

    CHECKPOINT needs a superuser (or pg_checkpoint); without one it is skipped.
    """
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE email_queue")
        conn.exec_driver_sql("VACUUM ANALYZE email_attempts")
        try:
            conn.exec_driver_sql("CHECKPOINT")
        except sa.exc.DBAPIError as exc:
            print(f"  (no CHECKPOINT: {str(exc.orig).strip().splitlines()[0]})")


def machine_context(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        server = conn.exec_driver_sql("SHOW server_version").scalar_one()
        settings = {
            name: conn.exec_driver_sql(f"SHOW {name}").scalar_one()
            for name in ("shared_buffers", "fsync", "synchronous_commit", "max_wal_size")
        }
    return [
        ("CPUs", f"{os.cpu_count()} ({_cpu_model()})"),
        ("memory", _memory_total()),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        (
            "SQLAlchemy / psycopg",
            f"{sa.__version__} / {psycopg.__version__} ({psycopg.pq.__impl__})",
        ),
        ("PostgreSQL", str(server)),
        ("PostgreSQL settings", ", ".join(f"{k}={v}" for k, v in settings.items())),
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return "unknown"


# -- workload -------------------------------------------------------------------


def message(i: int) -> dict[str, Any]:
    """The keyword arguments of one `Client.enqueue` call, ~2 KB of body."""
    return {
        "to": f"customer{i}@example.com",
        "subject": f"Your order #{i} is confirmed",
        "body": body_text(i),
        "from_address": "shop@example.com",
    }


def batches(total: int, size: int) -> Iterator[range]:
    for start in range(0, total, size):
        yield range(start, min(start + size, total))


SEED_BODIES = 512
_SEED_ROWS = """
WITH bodies AS MATERIALIZED (
    SELECT (n - 1)::int AS k, body FROM unnest(%(bodies)s::text[]) WITH ORDINALITY AS t(body, n)
)
INSERT INTO email_queue (
    id, recipient_to, subject, body, from_address, status, attempts,
    created_at, updated_at, next_attempt_at, sent_at, message_id
)
SELECT
    gen_random_uuid()::text,
    'customer' || i || '@example.com',
    'Your order #' || i || ' is confirmed',
    bodies.body,
    'shop@example.com',
    %(status)s,
    CASE WHEN %(finished)s THEN 1 ELSE 0 END,
    t.at,
    CASE WHEN %(finished)s THEN t.at + interval '2 s' ELSE t.at END,
    t.at,
    CASE WHEN %(finished)s THEN t.at + interval '2 s' END,
    CASE WHEN %(finished)s THEN '<bench-' || i || '@example.com>' END
FROM generate_series(%(first)s::int, %(first)s::int + %(count)s::int - 1) AS i
CROSS JOIN LATERAL (SELECT now() - interval '1 day' + i * interval '10 ms' AS at) AS t
JOIN bodies ON bodies.k = i %% %(distinct)s::int
"""
_SEED_BODY_LIST = [body_text(-1 - k) for k in range(SEED_BODIES)]


def insert_rows(conn: sa.Connection, count: int, status: str, first: int = 1) -> None:
    """Insert `count` rows with plain SQL, as large and compressible as enqueued ones.

    Pending rows are due now; sent rows look delivered. The bodies are a few
    hundred of the bench's own, joined in.
    """
    conn.exec_driver_sql(
        _SEED_ROWS,
        {
            "bodies": _SEED_BODY_LIST,
            "distinct": SEED_BODIES,
            "status": status,
            "finished": status != "pending",
            "first": first,
            "count": count,
        },
    )


def seed(store: Store, count: int, status: str) -> float:
    """`insert_rows` in one transaction; returns the seconds it took."""
    start = time.perf_counter()
    with store.engine.begin() as conn:
        insert_rows(conn, count, status)
    return time.perf_counter() - start


# -- 1 and 2: enqueue -----------------------------------------------------------


def bench_single_enqueue(client: Client, server: ServerCpu, count: int) -> tuple[Rate, list[float]]:
    messages = [message(i) for i in range(count)]
    meter = Meter()
    each_ms: list[float] = []
    server.start()
    for m in messages:
        start = time.perf_counter()
        with meter:
            client.enqueue(**m)
        each_ms.append((time.perf_counter() - start) * 1000)
    return Rate(
        "Client.enqueue (1 msg / transaction)", count, meter.wall, meter.cpu, server.stop()
    ), each_ms


def bench_client_bulk(client: Client, server: ServerCpu, total: int) -> Rate:
    meter = Meter()
    server.start()
    for chunk in batches(total, BULK_BATCH):
        messages = [message(i) for i in chunk]
        with meter:
            client.enqueue_many(messages)
    return Rate(
        f"Client.enqueue_many ({BULK_BATCH:,} / call)", total, meter.wall, meter.cpu, server.stop()
    )


def bench_store_bulk(store: Store, server: ServerCpu, total: int) -> tuple[Rate, Rate]:
    """The same work split in two: building (validating) the jobs, then the store alone."""
    validating, storing = Meter(), Meter()
    server.start()
    for chunk in batches(total, BULK_BATCH):
        messages = [message(i) for i in chunk]
        with validating:
            jobs = [build_job(**m) for m in messages]
        with storing:
            store.enqueue_many(jobs)
    server_cpu = server.stop()
    return (
        Rate("  validation only (build_job)", total, validating.wall, validating.cpu, 0.0),
        Rate(
            f"  store only (Store.enqueue_many of {BULK_BATCH:,} NewJob)",
            total,
            storing.wall,
            storing.cpu,
            server_cpu,
        ),
    )


def bench_database_bulk(store: Store, server: ServerCpu, total: int) -> Rate:
    """The database's share: the same rows made by the server itself, no client data."""
    meter = Meter()
    server.start()
    for chunk in batches(total, BULK_BATCH):
        with meter, store.engine.begin() as conn:
            insert_rows(conn, len(chunk), "pending", first=chunk.start)
    return Rate(
        f"  database only (INSERT .. SELECT, {BULK_BATCH:,} rows)",
        total,
        meter.wall,
        meter.cpu,
        server.stop(),
    )


# -- 3: claim + complete --------------------------------------------------------


def completions_for(jobs: Sequence[Job], owner: str) -> list[Completion]:
    started = datetime.now(UTC)
    return [
        Completion(
            job_id=j.id,
            owner=owner,
            attempt=j.attempts + 1,
            outcome=Outcome.SENT,
            started_at=started,
            duration_seconds=0.0,
            smtp_code=250,
            smtp_text="2.0.0 Ok: queued",
            message_id=f"<{j.id}@bench.example.com>",
        )
        for j in jobs
    ]


def claim_and_complete(store: Store, owner: str, batch: int) -> tuple[int, float, float]:
    """One worker cycle; returns (jobs, claim ms, complete ms)."""
    start = time.perf_counter()
    jobs = store.claim(owner, batch, LEASE_SECONDS)
    claimed = time.perf_counter()
    if jobs:
        changed = store.complete(completions_for(jobs, owner))
        if changed != len(jobs):
            raise RuntimeError(f"complete changed {changed} of {len(jobs)} claimed jobs")
    done = time.perf_counter()
    return len(jobs), (claimed - start) * 1000, (done - claimed) * 1000


def bench_claim_complete(store: Store, server: ServerCpu, batch: int, jobs: int) -> Rate:
    empty_tables(store)
    seed(store, jobs, "pending")
    settle(store)
    owner = f"bench-worker-{batch}"
    total = 0
    meter = Meter()
    server.start()
    with meter:
        while n := claim_and_complete(store, owner, batch)[0]:
            total += n
    if total != jobs:
        raise RuntimeError(f"claimed {total} jobs of {jobs}")
    return Rate(
        f"claim {batch} + complete as SENT", total, meter.wall, meter.cpu, server.stop(), "job"
    )


# -- 4: claim latency against many finished rows --------------------------------


@contextmanager
def captured_statements(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) the engine sends while the block runs."""
    seen: list[tuple[str, Any]] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        seen.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def explain_claim(store: Store, owner: str, batch: int) -> Explained:
    """EXPLAIN ANALYZE of the exact statement `Store.claim` sends, rolled back after.

    Twice: as sent (PostgreSQL plans it knowing the parameters), and as the
    generic plan of the same statement prepared, which is what a prepared
    claim runs once PostgreSQL's plan cache decides parameters do not matter.
    """
    with captured_statements(store.engine) as seen:
        jobs = store.claim(owner, batch, LEASE_SECONDS)
    store.release([j.id for j in jobs], owner)
    statement, params = next(
        (s, p) for s, p in seen if s.lstrip().startswith(CLAIM_STATEMENT_PREFIX)
    )
    explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
    with store.engine.connect() as conn:
        custom = list(conn.exec_driver_sql(explain + statement, params).scalars())
        conn.rollback()
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
        numbered = statement
        for number, name in enumerate(names, start=1):
            numbered = numbered.replace(f"%({name})s", f"${number}")
        raw = conn.connection.driver_connection
        values = ", ".join(
            psycopg.sql.Literal(_plain(params[name])).as_string(raw) for name in names
        )
        conn.exec_driver_sql("PREPARE bench_claim AS " + numbered.replace("%", "%%"))
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        generic = list(conn.exec_driver_sql(explain + f"EXECUTE bench_claim({values})").scalars())
        conn.exec_driver_sql("DEALLOCATE bench_claim")
        conn.rollback()
    return Explained(statement.strip(), dict(params), custom, generic)


def _plain(value: Any) -> Any:
    """A parameter as psycopg renders it literally (str enums as their value)."""
    return value.value if isinstance(value, enum.Enum) else value


def bench_claim_latency(store: Store, finished: int, sizes: Sizes) -> Latency:
    empty_tables(store)
    seconds = seed(store, finished, "sent")
    print(f"  {finished:,} finished rows inserted in {seconds:.1f} s", flush=True)
    seed(store, sizes.backlog, "pending")
    settle(store)
    owner = f"bench-latency-{finished}"
    batch = 50
    for _ in range(sizes.warmup_cycles):
        claim_and_complete(store, owner, batch)
    claim_ms: list[float] = []
    complete_ms: list[float] = []
    with timed_statements(store.engine, CLAIM_STATEMENT_PREFIX) as statement_ms:
        for _ in range(sizes.latency_cycles):
            n, claim, complete = claim_and_complete(store, owner, batch)
            if n != batch:
                raise RuntimeError(f"claim returned {n} jobs, expected {batch}: backlog too small")
            claim_ms.append(claim)
            complete_ms.append(complete)
    load = os.getloadavg()[0]
    plans_used = claim_plans_used(store)  # first: a rollback makes psycopg forget them
    with store.engine.connect() as conn:
        pending = conn.exec_driver_sql(
            "SELECT count(*) FROM email_queue WHERE status = 'pending'"
        ).scalar_one()
    return Latency(
        finished_rows=finished,
        pending_rows=pending,
        claim_ms=claim_ms,
        statement_ms=statement_ms,
        complete_ms=complete_ms,
        load_average=load,
        plans_used=plans_used,
        explained=explain_claim(store, owner, batch),
    )


@contextmanager
def timed_statements(engine: sa.Engine, prefix: str) -> Iterator[list[float]]:
    """Milliseconds from sending to the result of each statement starting with `prefix`.

    The claim's statement alone, without its transaction's BEGIN, COMMIT and
    connection checkout, nor mailqd's turning rows into Jobs.
    """
    times: list[float] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_started"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith(prefix):
            times.append((time.perf_counter() - conn.info["bench_started"]) * 1000)

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        yield times
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
        sa.event.remove(engine, "after_cursor_execute", after)


def claim_plans_used(store: Store) -> str:
    """How PostgreSQL planned the timed claims, which psycopg runs as a prepared statement.

    A generic plan (parameters unknown) could not prove `status = 'pending'`
    and so could not use the partial index; custom plans can.
    """
    with store.engine.connect() as conn:
        if (conn.dialect.server_version_info or (0,)) < (14,):
            return "(plan counts need PostgreSQL 14 or later)"
        row = conn.exec_driver_sql(
            "SELECT custom_plans, generic_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %(prefix)s",
            {"prefix": CLAIM_STATEMENT_PREFIX + "%"},
        ).first()
    if row is None:
        return "the claim was not a prepared statement on this connection"
    return (
        f"psycopg's prepared claim statement has run {row.custom_plans} custom plans "
        f"and {row.generic_plans} generic ones on this connection"
    )


# -- report ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, p in 0..100."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def print_section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


def print_rates(rates: Sequence[Rate]) -> None:
    width = max(len(r.label) for r in rates)
    print(
        f"{'':{width}}  {'count':>9}  {'wall s':>7}  {'per second':>12}  {'wall µs':>8}  "
        f"{'client CPU':>10}  {'server CPU':>10}"
    )
    print(f"{'':{width}}  {'':>9}  {'':>7}  {'':>12}  {'(µs per item)':>30}")
    for r in rates:
        rate = f"{r.per_second:,.0f} {r.unit}/s"
        print(
            f"{r.label:{width}}  {r.count:>9,}  {r.wall:>7.2f}  {rate:>12}  "
            f"{r.micros_each(r.wall):>8}  {r.micros_each(r.client_cpu):>10}  "
            f"{r.micros_each(r.server_cpu):>10}",
            flush=True,
        )


def print_latencies(results: Sequence[Latency]) -> None:
    print("milliseconds, claim of 50; 'statement' is the claim's SQL alone (send to result)")
    print(
        f"{'finished rows':>13}  {'pending':>7}  {'claim p50':>9}  {'claim p99':>9}  "
        f"{'stmt p50':>8}  {'stmt p99':>8}  {'complete p50':>12}  {'complete p99':>12}  "
        f"{'load':>5}"
    )
    for r in results:
        print(
            f"{r.finished_rows:>13,}  {r.pending_rows:>7,}  {percentile(r.claim_ms, 50):>9.2f}  "
            f"{percentile(r.claim_ms, 99):>9.2f}  {percentile(r.statement_ms, 50):>8.2f}  "
            f"{percentile(r.statement_ms, 99):>8.2f}  {percentile(r.complete_ms, 50):>12.2f}  "
            f"{percentile(r.complete_ms, 99):>12.2f}  {r.load_average:>5.2f}"
        )
    few, many = results[0], results[-1]
    for what, of in (("claim", "claim_ms"), ("statement", "statement_ms")):
        for p in (50, 99):
            ratio = percentile(getattr(many, of), p) / percentile(getattr(few, of), p)
            verdict = "ok" if ratio <= LATENCY_TARGET_RATIO else "ABOVE TARGET"
            print(
                f"{what} p{p}, {many.finished_rows:,} / {few.finished_rows:,} finished rows: "
                f"{ratio:.2f}x (target <= {LATENCY_TARGET_RATIO:.0f}x: {verdict})"
            )
    print("('load': the 1-minute load average after the timed claims. Other work on the")
    print(" machine moves whole runs up or down; the plans below, with their buffer counts,")
    print(" show what the number of finished rows changes in the claim itself.)")


def run(store: Store, client: Client, sizes: Sizes) -> None:
    print_section("machine")
    for name, value in machine_context(store):
        print(f"{name:<22} {value}")
    server = ServerCpu(store.engine)

    print_section("enqueue (~2 KB body, 1 recipient, single process)")
    client.enqueue(**message(-1))  # opens the client's pooled connection
    empty_tables(store)
    single, each_ms = bench_single_enqueue(client, server, sizes.single)
    empty_tables(store)
    rates = [single, bench_client_bulk(client, server, sizes.bulk)]
    empty_tables(store)
    rates.extend(bench_store_bulk(store, server, sizes.bulk_parts))
    empty_tables(store)
    rates.append(bench_database_bulk(store, server, sizes.bulk_parts))
    empty_tables(store)
    print_rates(rates)
    print(
        f"single enqueue latency: p50 {percentile(each_ms, 50):.2f} ms, "
        f"p99 {percentile(each_ms, 99):.2f} ms"
    )
    bulk = rates[1].per_second
    verdict = "ok" if bulk >= BULK_TARGET_PER_SECOND else "BELOW TARGET"
    print(f"bulk target >= {BULK_TARGET_PER_SECOND:,} msg/s: {bulk:,.0f} ({verdict})")

    print_section("claim + complete (single process, all SENT)")
    print_rates([bench_claim_complete(store, server, b, n) for b, n in sizes.claim_jobs.items()])

    print_section(f"claim latency: claim 50 + complete, {sizes.backlog:,} pending at start")
    results = [bench_claim_latency(store, n, sizes) for n in sizes.finished]
    print()
    print_latencies(results)
    for r in results:
        print(f"after the {r.finished_rows:,}-row run: {r.plans_used}")
    print_section("the claim statement, exactly as Store.claim sends it")
    print(results[0].explained.statement)
    print(f"-- parameters: {results[0].explained.params}")
    for r in results:
        print_section(f"EXPLAIN ANALYZE of the claim, {r.finished_rows:,} finished rows")
        print("\n".join(r.explained.custom_plan))
        print(
            f"\n-- the same statement prepared, generic plan ({r.finished_rows:,} finished rows):"
        )
        print("\n".join(r.explained.generic_plan))
    empty_tables(store)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_database_url_option(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, a ~30 s smoke run")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    with bench_database(args.database_url) as url:
        store = Store.from_url(url)
        client = Client(url)
        try:
            prepare(store)
            run(store, client, sizes)
        finally:
            client.close()
            store.close()
    print(f"total bench time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
