"""Reading the sidecar under test: plain GETs, parsed `/metrics`, raw requests, hostile crowds."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from mailqd.daemon.sidecar_http import READ_TIMEOUT

T = TypeVar("T")
Address = tuple[str, int]


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(sidecar: str) -> dict[str, float]:
    """`/metrics` as {sample: value}; a labelled sample reads `name{label="value"}`."""
    status, text = get(sidecar + "/metrics")
    assert status == 200, text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def families(sidecar: str) -> dict[str, set[str]]:
    """`/metrics` as {family name: the sample names it has} (`_total`, `_bucket`, ...)."""
    status, text = get(sidecar + "/metrics")
    assert status == 200, text
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


# -- raw HTTP, for clients that misbehave ----------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    """What came back on one connection before the server closed it."""

    status: int | None
    """None when the server closed the connection without answering."""
    headers: dict[str, str]
    body: bytes
    elapsed: float
    """Seconds from before the connect to the server's close."""


def address_of(sidecar: str) -> tuple[str, int]:
    """`(host, port)` of a sidecar URL such as `http://127.0.0.1:9478`."""
    parts = urlsplit(sidecar)
    assert parts.hostname is not None and parts.port is not None, sidecar
    return parts.hostname, parts.port


def request_bytes(path: str, method: str = "GET", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sidecar", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> RawAnswer:
    """Send `data` on a new connection and read until the server closes it; fail at `timeout`."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        received = read_until_closed(sock, start + timeout)
    return parse_answer(received, time.monotonic() - start)


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection; fails at `deadline`."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server kept the connection open past the deadline: {chunks}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(received: bytes, elapsed: float) -> RawAnswer:
    if not received:
        return RawAnswer(None, {}, b"", elapsed)
    head, separator, body = received.partition(b"\r\n\r\n")
    assert separator, f"no end of headers in {received!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status), headers, body, elapsed)


# -- clients that hold on ------------------------------------------------------------

POLL_INTERVAL = 0.02


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll `condition` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def let_go(sock: socket.socket) -> bool:
    """True once the server has answered or closed `sock`: it no longer holds a place."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class Crowd:
    """Connections that would hold a one-at-a-time server: idle ones and slow senders.

    The slow senders send the start of a request, then one byte of a header
    every `interval` seconds from a thread, never the end of the headers.
    """

    def __init__(self, address: Address, idle: int, slow: int, interval: float = 0.1) -> None:
        self.address = address
        self.interval = interval
        self.idle = [socket.create_connection(address, timeout=5) for _ in range(idle)]
        self.slow = [socket.create_connection(address, timeout=5) for _ in range(slow)]
        self.opened_at = time.monotonic()
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> Self:
        for sock in self.slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        self._thread.start()
        wait_until(lambda: self.bytes_sent >= 2 * len(self.slow), "the slow senders trickling")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.idle + self.slow:
            sock.close()

    def age(self) -> float:
        return time.monotonic() - self.opened_at

    def held(self) -> bool:
        """Every connection of the crowd is still open (none dropped by the server yet)."""
        return not any(let_go(sock) for sock in self.idle + self.slow)

    def _trickle(self) -> None:
        while not self._stop.wait(self.interval):
            for sock in self.slow:
                try:
                    sock.send(b"a")
                    self.bytes_sent += 1
                except OSError:
                    pass


def worst_latencies(address: Address, paths: tuple[str, ...], samples: int) -> dict[str, float]:
    """The slowest of `samples` answers per path, each measured while a fresh crowd holds on.

    A round counts only if the whole crowd was still connected after it: the
    numbers are taken while the connections are idle or slow, not after the
    server dropped them. Each path is asked once before, so what is measured
    is the crowd's effect, not the first database query of `/stats`.
    """
    for path in paths:
        assert raw_request(address, request_bytes(path)).status == 200, path
    worst = dict.fromkeys(paths, 0.0)
    taken = 0
    deadline = time.monotonic() + 60
    while taken < samples:
        assert time.monotonic() < deadline, f"only {taken} rounds with the crowd held"
        with Crowd(address, idle=20, slow=5) as crowd:
            while taken < samples and crowd.age() < READ_TIMEOUT / 2:
                answers = {path: raw_request(address, request_bytes(path), 2.0) for path in paths}
                if not crowd.held():
                    break
                for path, answer in answers.items():
                    assert answer.status == 200, (path, answer)
                    worst[path] = max(worst[path], answer.elapsed)
                taken += 1
    return worst


def proc_count(pid: int, what: str) -> int:
    """Threads (`task`) or open fds (`fd`) of a process, from /proc."""
    return len(os.listdir(f"/proc/{pid}/{what}"))
