"""The sidecar's HTTP server: one thread, one selector, and no client that can hold it.

`http.server` served one connection at a time and waited on it for up to its
socket timeout, restarted by every byte, so one idle or slow client held
`/healthz` shut. This server never waits on a client:

- every socket is non-blocking and watched by one selector in one thread,
  so the thread count is the same whatever arrives;
- a client has `read_timeout` seconds from its connection to send the whole
  request head, however it trickles it in, and `write_timeout` seconds to
  take the answer;
- at most `max_connections` are open; a connection over the cap evicts the
  oldest one that is still sending its request (or waiting for the
  database, which then gets the latest answer at once), so a flood cannot
  lock out the next health check, and costs no more than the cap in fds;
- the head is bounded (request line, header bytes, header count); GET and
  HEAD are served, other methods refused; every answer is `Connection: close`.

The endpoints come from `respond(path)`, which returns a `Response` or, for
an answer that waits on the sidecar's database thread, a `Deferred`; that
thread calls `wake()` when it has news. The server thread takes no lock that
a forked worker could need, so it needs no part in the supervisor's fork lock.
"""

from __future__ import annotations

import contextlib
import enum
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TypeVar

from mailqd.daemon.sidecar_protocol import (
    Deferred,
    Response,
    parse_head,
    refusal,
    serialize,
)

__all__ = ["HttpServer"]

MAX_CONNECTIONS = 32
READ_TIMEOUT = 3.0
"""Seconds from a connection to the end of its request head, however slowly it arrives."""
WRITE_TIMEOUT = 5.0
BACKLOG = 64
ACCEPTS_PER_TURN = 256
"""A flood of connections is taken in slices, so the ones already open keep being served."""
LISTEN_PAUSE = 0.1
"""After an accept error (out of fds): seconds before the listening socket is watched again."""


_R = TypeVar("_R")


class _Phase(enum.Enum):
    READING = "reading"
    WAITING = "waiting"
    WRITING = "writing"
    CLOSED = "closed"
    """Closed earlier in the same turn of the loop: its pending events are stale."""


@dataclass(eq=False, slots=True)
class _Connection:
    sock: socket.socket
    deadline: float
    phase: _Phase = _Phase.READING
    head: bytearray = field(default_factory=bytearray)
    head_only: bool = False
    deferred: Deferred | None = None
    out: memoryview = field(default_factory=lambda: memoryview(b""))
    watched: int = 0
    """The selector events watched now; 0 while waiting for the database."""


class HttpServer:
    """Binds at construction (`OSError` if it cannot); `serve_forever` in one thread.

    `on_error` receives what a bug raised while serving (the connection gets
    a 500 or is closed); the caller logs it where logging is safe.
    """

    def __init__(
        self,
        address: tuple[str, int],
        respond: Callable[[str], Response | Deferred],
        *,
        server_version: str,
        on_error: Callable[[BaseException], None],
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._respond = respond
        self._server_version = server_version
        self._on_error = on_error
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._listener = _listen(address)
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_in, selectors.EVENT_READ)
        self._listen_paused_until: float | None = None
        self._connections: dict[int, _Connection] = {}
        """By fd, in the order they were accepted: the first is the oldest."""
        self._stopping = False

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # -- the thread's loop -------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until `stop()`; `close()` afterwards."""
        while not self._stopping:
            events = self._selector.select(self._next_timeout())
            for key, mask in events:
                if key.fileobj is self._listener:
                    self._accept_all()
                elif key.fileobj is self._wake_in:
                    self._drain_wakes()
                else:
                    self._guarded(key.data, mask)
            self._expire(time.monotonic())

    def wake(self) -> None:
        """From any thread: look at the waiting answers again."""
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._wake_out.send(b"\0")

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    def close(self) -> None:
        """Close every connection and the listening socket (after `serve_forever` returned)."""
        for conn in list(self._connections.values()):
            self._close(conn, graceful=False)
        self._selector.close()
        for sock in (self._listener, self._wake_in, self._wake_out):
            sock.close()

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited fds, never shutting a socket the parent uses."""
        for conn in self._connections.values():
            conn.sock.close()
        self._connections.clear()
        self._selector.close()
        for sock in (self._listener, self._wake_in, self._wake_out):
            sock.close()

    def _next_timeout(self) -> float | None:
        deadlines = [conn.deadline for conn in self._connections.values()]
        if self._listen_paused_until is not None:
            deadlines.append(self._listen_paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _guarded(self, conn: _Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and conn.phase is _Phase.READING:
                self._read(conn)
            elif mask & selectors.EVENT_WRITE and conn.phase is _Phase.WRITING:
                self._write(conn)
        except Exception as exc:
            self._on_error(exc)
            self._close(conn, graceful=False)

    # -- connections coming and going -------------------------------------------

    def _accept_all(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Out of fds: stop watching the listener for a moment instead of spinning.
                self._on_error(exc)
                self._selector.unregister(self._listener)
                self._listen_paused_until = time.monotonic() + LISTEN_PAUSE
                return
            sock.setblocking(False)
            if len(self._connections) >= self._max_connections and not self._evict_one():
                self._refuse(sock)
                continue
            conn = _Connection(sock, time.monotonic() + self._read_timeout)
            self._connections[sock.fileno()] = conn
            self._watch(conn, selectors.EVENT_READ)
            self._guarded(conn, selectors.EVENT_READ)  # the request is often there already

    def _evict_one(self) -> bool:
        """Make room: the oldest connection still reading is closed, or one waiting answered."""
        for conn in list(self._connections.values()):
            if conn.phase is _Phase.READING:
                self._close(conn, graceful=False)
                return True
            if conn.phase is _Phase.WAITING and conn.deferred is not None:
                self._answer(conn, self._call(conn.deferred.give_up))
                if not conn.out:
                    return True
        return False

    def _refuse(self, sock: socket.socket) -> None:
        """Over the cap with every connection busy writing: a 503 at once, best effort."""
        busy = refusal(HTTPStatus.SERVICE_UNAVAILABLE)
        with contextlib.suppress(OSError):
            sock.send(serialize(busy, head_only=False, server=self._server_version))
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _close(self, conn: _Connection, *, graceful: bool) -> None:
        """End a connection; `shutdown` tells the peer even if a forked child holds the fd."""
        if conn.phase is _Phase.CLOSED:
            return
        self._connections.pop(conn.sock.fileno(), None)
        self._watch(conn, 0)
        conn.phase = _Phase.CLOSED
        if graceful:
            # Unread bytes at close would make the kernel reset the connection,
            # which can destroy the answer before the client has read it.
            with contextlib.suppress(OSError):
                conn.sock.recv(65536)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()
        conn.out = memoryview(b"")

    def _watch(self, conn: _Connection, events: int) -> None:
        """Watch `conn` for `events` from now on (0: not at all)."""
        if events == conn.watched:
            return
        if not events:
            self._selector.unregister(conn.sock)
        elif not conn.watched:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.watched = events

    def _call(self, answer: Callable[[], _R]) -> _R | Response:
        """An endpoint's answer; a 500 (and the error reported) if it raised."""
        try:
            return answer()
        except Exception as exc:
            self._on_error(exc)
            return refusal(HTTPStatus.INTERNAL_SERVER_ERROR)

    # -- one request -------------------------------------------------------------

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, graceful=False)
            return
        if not chunk:
            self._close(conn, graceful=False)
            return
        conn.head += chunk
        parsed = parse_head(bytes(conn.head))
        if parsed is None:
            return
        if isinstance(parsed, Response):
            self._answer(conn, parsed)
            return
        conn.head_only = parsed.method == "HEAD"
        path = parsed.path
        answer = self._call(lambda: self._respond(path))
        if isinstance(answer, Deferred):
            # Not watched while waiting: more bytes from the client would wake the loop for nothing.
            conn.phase, conn.deferred = _Phase.WAITING, answer
            conn.deadline = time.monotonic() + answer.wait
            self._watch(conn, 0)
        else:
            self._answer(conn, answer)

    def _answer(self, conn: _Connection, response: Response) -> None:
        conn.phase, conn.deferred = _Phase.WRITING, None
        conn.deadline = time.monotonic() + self._write_timeout
        data = serialize(response, head_only=conn.head_only, server=self._server_version)
        conn.out = memoryview(data)
        self._write(conn)
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, graceful=False)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._close(conn, graceful=True)

    def _drain_wakes(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_in.recv(4096):
                pass
        for conn in list(self._connections.values()):
            if conn.phase is _Phase.WAITING and conn.deferred is not None:
                ready = self._call(conn.deferred.ready)
                if ready is not None:
                    self._answer(conn, ready)

    def _expire(self, now: float) -> None:
        if self._listen_paused_until is not None and now >= self._listen_paused_until:
            self._listen_paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ)
        for conn in list(self._connections.values()):
            if now < conn.deadline:
                continue
            if conn.phase is _Phase.WAITING and conn.deferred is not None:
                self._answer(conn, self._call(conn.deferred.give_up))
            elif conn.phase is _Phase.READING and conn.head:
                self._answer(conn, refusal(HTTPStatus.REQUEST_TIMEOUT))
            else:
                self._close(conn, graceful=False)


def _listen(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
