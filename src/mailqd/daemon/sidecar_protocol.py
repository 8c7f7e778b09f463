"""What the sidecar's HTTP server reads and writes: a bounded request head, and an answer.

Only what the sidecar needs of HTTP/1.1: GET and HEAD of a path, the request
line and headers within fixed bounds (a refusal names which was exceeded:
414, 431), other methods refused (405 for the well-known ones, 501 for the
rest), and answers that always close the connection. A request body is
never read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

__all__ = ["Deferred", "Request", "Response", "parse_head", "refusal", "serialize"]

MAX_REQUEST_LINE = 2048
MAX_HEAD_BYTES = 8192
"""Bytes of headers after the request line."""
MAX_HEADERS = 64
SERVED_METHODS = frozenset({"GET", "HEAD"})
KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})

_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Deferred:
    """An answer that depends on a database query in flight."""

    ready: Callable[[], Response | None]
    """The answer once it can be given, else None; asked again after each `wake()`."""
    give_up: Callable[[], Response]
    """The answer when `wait` seconds have passed, or when the connection is evicted."""
    wait: float


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str


def parse_head(data: bytes) -> Request | Response | None:
    """The request in `data` once its head is complete; a refusal; None while more is needed.

    The method is judged as soon as the request line is in, so a refused
    method is answered without waiting for headers.
    """
    line_end = data.find(b"\n")
    if line_end < 0 or line_end > MAX_REQUEST_LINE:
        too_long = line_end > MAX_REQUEST_LINE or len(data) > MAX_REQUEST_LINE
        return refusal(HTTPStatus.REQUEST_URI_TOO_LONG) if too_long else None
    match = _REQUEST_LINE.fullmatch(data[:line_end].rstrip(b"\r"))
    if match is None:
        return refusal(HTTPStatus.BAD_REQUEST)
    method, target, version = (part.decode("ascii") for part in match.groups())
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return refusal(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    if method in KNOWN_METHODS:
        return refusal(HTTPStatus.METHOD_NOT_ALLOWED, (("Allow", "GET, HEAD"),))
    if method not in SERVED_METHODS:
        return refusal(HTTPStatus.NOT_IMPLEMENTED)
    if not target.startswith(("/", "http://", "https://")):
        return refusal(HTTPStatus.BAD_REQUEST)
    complete = _headers_complete(data[line_end + 1 :])
    if isinstance(complete, Response) or not complete:
        return complete or None
    return Request(method, urlsplit(target).path or "/")


def _headers_complete(data: bytes) -> bool | Response:
    """True at the empty line that ends the headers; a refusal for a bad or oversized block."""
    too_large = refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    size = 0
    for count, line in enumerate(data.split(b"\n")[:-1]):
        size += len(line) + 1
        if size > MAX_HEAD_BYTES:
            return too_large
        line = line.rstrip(b"\r")
        if not line:
            return True
        if count >= MAX_HEADERS:
            return too_large
        name, colon, _ = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            return refusal(HTTPStatus.BAD_REQUEST)
    return too_large if len(data) > MAX_HEAD_BYTES else False


def refusal(status: HTTPStatus, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, "text/plain; charset=utf-8", f"{status.phrase}\n".encode(), headers)


def serialize(response: Response, *, head_only: bool, server: str) -> bytes:
    """Status line, headers and (unless HEAD) body; the connection closes after it."""
    status = response.status
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Server: {server}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body
