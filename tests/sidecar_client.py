"""Reading the sidecar of a daemon under test: plain GETs, parsed `/metrics`, raw requests."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families


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
