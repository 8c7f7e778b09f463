"""Clients that try to hold the sidecar shut, and a database that hangs behind it.

The hostile-client tests run against the sidecar of a real `mailqd` (one
daemon for the module, on SQLite): idle connections, senders that trickle
a byte at a time, a flood of connections over the cap, malformed and
oversized requests. Each asserts what a health check would notice: an
answer within 100 ms (the worst of several requests), the right status,
the server closing what it should, a bounded thread and fd count.

The hung-database tests run the `Sidecar` in process against a real
PostgreSQL whose tables the test locks, with short staleness bounds so
they are quick. No test sleeps: each waits on a condition with a deadline.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon_process import DaemonPool, DaemonProcess
from mailqd.daemon.sidecar import ForkLock, Sidecar
from mailqd.daemon.sidecar_http import MAX_CONNECTIONS, READ_TIMEOUT
from mailqd.daemon.supervisor import open_store
from mailqd.metrics import PoolStatus
from mailqd.store import upgrade
from mailqd.store.engine import make_engine
from sidecar_client import (
    Address,
    RawAnswer,
    address_of,
    let_go,
    proc_count,
    raw_request,
    read_until_closed,
    request_bytes,
    wait_until,
    worst_latencies,
)

pytestmark = pytest.mark.timeout(120)


FAST = 0.1
"""The issue's bound: `/healthz` answers within 100 ms whatever other clients do."""
PATHS = ("/healthz", "/metrics", "/stats")
SAMPLES = 5


# -- the daemon ----------------------------------------------------------------------


class Target:
    def __init__(self, daemon: DaemonProcess, url: str) -> None:
        self.daemon = daemon
        self.url = url
        self.address = address_of(url)

    def healthy(self) -> RawAnswer | None:
        answer = raw_request(self.address, request_bytes("/healthz"))
        return answer if answer.status == 200 else None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("hostile-sidecar")
    db_url = f"sqlite:///{directory / 'mailqd.db'}"
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    pool = DaemonPool(directory)
    try:
        env = {"MAILQD_DATABASE_URL": db_url, "MAILQD_SMTP_URL": "null://", "MAILQD_WORKERS": "1"}
        daemon = pool.mailqd(env)
        found = Target(daemon, daemon.sidecar_url())
        daemon.wait_for(found.healthy, "a healthy sidecar")
        yield found
    finally:
        pool.close()


# -- idle and slow clients -----------------------------------------------------------


def test_every_endpoint_answers_within_100ms_while_20_connections_idle_and_5_trickle(
    target: Target,
) -> None:
    worst = worst_latencies(target.address, PATHS, SAMPLES)
    assert all(seconds < FAST for seconds in worst.values()), worst


def test_a_slow_sender_is_cut_off_at_the_read_deadline_with_a_408(target: Target) -> None:
    """A byte every 0.2 s, a byte every second, nothing at all: each ends at its deadline.

    Each connection's time is counted from just before its connect, so the
    server's deadline (from its accept) cannot start earlier.
    """
    opened: dict[str, float] = {}
    socks: dict[str, socket.socket] = {}
    for name in ("fast", "slow", "silent"):
        opened[name] = time.monotonic()
        socks[name] = socket.create_connection(target.address, timeout=5)
    stop = threading.Event()

    def trickle(sock: socket.socket, every: float) -> None:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        while not stop.wait(every):
            try:
                sock.send(b"a")
            except OSError:
                return

    threads = [
        threading.Thread(target=trickle, args=(socks["fast"], 0.2), daemon=True),
        threading.Thread(target=trickle, args=(socks["slow"], 1.0), daemon=True),
    ]
    for thread in threads:
        thread.start()
    answers: dict[str, bytes] = {}
    lasted: dict[str, float] = {}
    try:
        for name, sock in socks.items():
            answers[name] = read_until_closed(sock, opened[name] + READ_TIMEOUT + 2.0)
            lasted[name] = time.monotonic() - opened[name]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in socks.values():
            sock.close()
    for name, seconds in lasted.items():
        assert READ_TIMEOUT <= seconds <= READ_TIMEOUT + 1.5, (name, lasted)
    assert answers["fast"].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answers
    assert answers["slow"].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answers
    assert answers["silent"] == b""  # nothing asked, nothing answered


# -- HEAD, refused requests, no keep-alive -------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/", "/nowhere", "/metrics", "/stats"])
def test_head_has_the_headers_of_get_and_no_body(target: Target, path: str) -> None:
    got = raw_request(target.address, request_bytes(path))
    head = raw_request(target.address, request_bytes(path, "HEAD"))
    assert head.status == got.status
    assert head.body == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert int(got.headers["content-length"]) == len(got.body) > 0
    if path in ("/metrics", "/stats"):  # numbers (uptime, gauges) may change between the two
        assert int(head.headers["content-length"]) > 0
    else:
        assert head.headers["content-length"] == got.headers["content-length"]


@pytest.mark.parametrize(
    ("request_data", "status"),
    [
        (request_bytes("/healthz", "POST", "Content-Length: 0"), 405),
        (request_bytes("/healthz", "DELETE"), 405),
        (request_bytes("/healthz", "BREW"), 501),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 400),
        (request_bytes("/" + "a" * 3000), 414),
        (b"GET /" + b"a" * 5000, 414),
        (request_bytes("/healthz", "GET", *[f"X-{i}: {i}" for i in range(100)]), 431),
        (request_bytes("/healthz", "GET", "X-Big: " + "b" * 9000), 431),
        (request_bytes("/healthz", "GET", " folded: continuation"), 400),
        (request_bytes("/healthz", "GET", "no colon here"), 400),
        (b"GET /heal\x00thz HTTP/1.1\r\n\r\n", 400),
        (request_bytes("/healthz", "get"), 501),
    ],
    ids=[
        "POST",
        "DELETE",
        "unknown-method",
        "HTTP/2.0",
        "HTTP/0.9",
        "TLS-hello",
        "long-target",
        "long-line-unterminated",
        "100-headers",
        "9KB-header",
        "folded-header",
        "header-without-colon",
        "NUL-in-target",
        "lowercase-method",
    ],
)
def test_malformed_and_oversized_requests_are_refused_at_once(
    target: Target, request_data: bytes, status: int
) -> None:
    answer = raw_request(target.address, request_data, timeout=READ_TIMEOUT / 2)
    assert answer.status == status, answer
    assert answer.headers["connection"] == "close"
    if status == 405:
        assert answer.headers["allow"] == "GET, HEAD"
    assert target.healthy() is not None


def test_an_absolute_target_and_a_query_string_are_served_by_path(target: Target) -> None:
    for target_form in (f"http://{target.url.split('//')[1]}/healthz", "/healthz?verbose=1"):
        answer = raw_request(target.address, request_bytes(target_form))
        assert (answer.status, answer.body) == (200, b"ok: 1/1 workers, database ok\n")


def test_keep_alive_is_refused_and_a_pipelined_request_is_not_answered(target: Target) -> None:
    twice = request_bytes("/healthz", "GET", "Connection: keep-alive") * 2
    answer = raw_request(target.address, twice)
    assert answer.status == 200
    assert answer.headers["connection"] == "close"
    assert answer.body == b"ok: 1/1 workers, database ok\n"  # one answer, nothing after it


# -- a flood of connections ----------------------------------------------------------


@dataclass(frozen=True)
class FloodRound:
    threads: int
    fds: int
    answers: list[RawAnswer]
    held: int
    """Flood connections still open after the health checks."""


def flood_round(target: Target, size: int) -> FloodRound | None:
    """`size` connections at once, then health checks; None if it outlasted the read deadline.

    Within the deadline, the places the server freed were freed by its cap,
    not by the deadline.
    """
    flood: list[socket.socket] = []
    started = time.monotonic()
    try:
        flood.extend(socket.create_connection(target.address, 5) for _ in range(size))
        target.daemon.wait_for(
            lambda: sum(let_go(s) for s in flood) >= size - MAX_CONNECTIONS,
            "the server to close the connections over its cap",
        )
        pid = target.daemon.pid
        threads, fds = proc_count(pid, "task"), proc_count(pid, "fd")
        answers = [raw_request(target.address, request_bytes("/healthz"), 2.0) for _ in range(5)]
        held = sum(not let_go(s) for s in flood)
        in_time = time.monotonic() - started < READ_TIMEOUT
    finally:
        for sock in flood:
            sock.close()
    return FloodRound(threads, fds, answers, held) if in_time else None


def test_a_flood_over_the_cap_is_evicted_and_healthz_still_answers_fast(target: Target) -> None:
    """The newest connections win: a flood cannot lock the health check out, nor add threads."""
    pid = target.daemon.pid
    threads_before, fds_before = proc_count(pid, "task"), proc_count(pid, "fd")
    rounds = (flood_round(target, MAX_CONNECTIONS * 6) for _ in range(3))
    flood = next((r for r in rounds if r is not None), None)
    assert flood is not None, "no round within the read deadline"
    assert flood.threads == threads_before
    # The cap, plus a few the database threads may open meanwhile (SQLite: 3 per connection).
    assert flood.fds <= fds_before + MAX_CONNECTIONS + 6, (flood.fds, fds_before)
    assert all(answer.status == 200 for answer in flood.answers), flood.answers
    assert max(answer.elapsed for answer in flood.answers) < FAST, flood.answers
    # The flood still held the server at its cap while the health checks came in.
    assert flood.held >= MAX_CONNECTIONS - len(flood.answers), flood.held
    assert target.daemon.wait_for(target.healthy, "healthy once the flood is gone").elapsed < FAST


# -- a database that hangs (in process, PostgreSQL) ----------------------------------


@pytest.fixture
def local_sidecar(pg_url: str, tmp_path: Path) -> Iterator[Sidecar]:
    """The sidecar in this process on its own PostgreSQL database, with short bounds."""
    status = PoolStatus(
        workers=2, desired=2, stopping=False, worker_deaths=0, jobs_given_back=0, started_at=0.0
    )
    sidecar = Sidecar(
        "127.0.0.1:0",
        status=lambda: status,
        database_url=lambda: pg_url,
        open_store=open_store,
        metrics_dir=str(tmp_path),
        fork_lock=ForkLock(),
        cache_seconds=0.2,
        stale_after=1.5,
        stats_wait=0.5,
    )
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


def get_json(address: Address, path: str) -> tuple[int | None, dict[str, object]]:
    answer = raw_request(address, request_bytes(path))
    return answer.status, json.loads(answer.body)


def test_healthz_and_metrics_do_not_wait_on_a_hung_stats_query(
    local_sidecar: Sidecar, pg_url: str
) -> None:
    address = address_of(local_sidecar.url)
    wait_until(lambda: get_json(address, "/stats")[0] == 200, "/stats answering")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("LOCK TABLE email_attempts IN ACCESS EXCLUSIVE MODE"))
            # /stats waits for a fresh answer, gives up, and soon says it has none.
            _, page = wait_until(
                lambda: (got := get_json(address, "/stats"))[0] == 503 and got,
                "/stats to report the database not answering",
            )
            assert str(page["error"]).startswith("database unavailable: no answer for"), page
            # Meanwhile the counts behind /healthz and /metrics are fresh and fast.
            for path in ("/healthz", "/metrics"):
                answers = [raw_request(address, request_bytes(path), 2.0) for _ in range(SAMPLES)]
                assert {answer.status for answer in answers} == {200}, answers
                assert max(answer.elapsed for answer in answers) < FAST, answers
            assert b"mailqd_database_up 1.0" in answers[-1].body
            conn.rollback()
        wait_until(lambda: get_json(address, "/stats")[0] == 200, "/stats back")
    finally:
        engine.dispose()


def test_a_hung_counts_query_makes_healthz_503_at_once_not_slow(
    local_sidecar: Sidecar, pg_url: str
) -> None:
    address = address_of(local_sidecar.url)

    def healthz() -> RawAnswer:
        return raw_request(address, request_bytes("/healthz"), 2.0)

    def fast_answers(path: str) -> list[RawAnswer]:
        answers = [raw_request(address, request_bytes(path), 2.0) for _ in range(SAMPLES)]
        assert max(answer.elapsed for answer in answers) < FAST, answers
        return answers

    wait_until(lambda: healthz().status == 200, "healthy")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("LOCK TABLE email_queue IN ACCESS EXCLUSIVE MODE"))
            wait_until(lambda: healthz().status == 503, "/healthz to turn 503")
            for answer in fast_answers("/healthz"):
                assert answer.status == 503, answer
                assert answer.body.startswith(b"unhealthy: database unavailable: no answer for")
            for answer in fast_answers("/metrics"):
                assert b"mailqd_database_up 0.0" in answer.body
                assert b"mailqd_email_queue_depth" not in answer.body
            conn.rollback()
        wait_until(lambda: healthz().status == 200, "healthy again")
        assert {answer.body for answer in fast_answers("/healthz")} == {
            b"ok: 2/2 workers, database ok\n"
        }
    finally:
        engine.dispose()
