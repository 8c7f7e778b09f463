"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, an ephemeral port, scripted replies.

It records every accepted message with its envelope and the connection it
came on, counts connections, and answers as a test tells it to:

    server.mail_replies.append("421 4.3.2 closing")   # next MAIL FROM only
    server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    server.data_replies.append(HANG)                   # never answer the next end of DATA
    server.data_replies.append(DROP)                   # close the connection instead

Queued replies are used once, in order; with none queued the server says
250. The server runs in its own thread (aiosmtpd's `Controller`), so the
client under test may run `asyncio.run` in the test's thread. Waits use
conditions with deadlines, never sleeps.

Use the `smtp_server` fixture (import `smtp_server_fixture` into a test
module, or register this module as a pytest plugin), or `SmtpServer` as a
context manager for variants (STARTTLS, implicit TLS, AUTH, SMTPUTF8,
no PIPELINING).
"""

from __future__ import annotations

import asyncio
import email.policy
import shutil
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Self, cast
from urllib.parse import quote, urlencode

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

DROP = "<drop the connection>"
HANG = "<never answer>"
ACCEPT = "250 2.0.0 OK"

Reply = str  # an SMTP reply line such as "451 4.3.0 try later", or DROP, or HANG


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted, with its envelope."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    connection: int  # 1 for the first connection the server accepted, and so on
    tls: bool
    mail_options: tuple[str, ...] = ()  # e.g. ("SIZE=123", "SMTPUTF8")

    def parsed(self) -> EmailMessage:
        return BytesParser(policy=email.policy.default).parsebytes(self.data)


class SmtpServer:
    """A scripted aiosmtpd server (see module doc). Start with `with SmtpServer() as s:`."""

    def __init__(
        self,
        *,
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        port: int = 0,
        smtputf8: bool = True,
        pipelining: bool = True,
        data_size_limit: int | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port  # 0: an ephemeral port; a fixed one lets a test "restart" a server
        self.mail_replies: deque[Reply] = deque()
        self.rcpt_replies: dict[str, Reply] = {}
        self.data_replies: deque[Reply] = deque()
        self.messages: list[ReceivedMessage] = []
        self.logins: list[str] = []
        self.connections = 0
        self.data_received = 0  # message contents received, whatever the reply to them
        self.contents: list[bytes] = []  # every message content received, whatever the reply
        # While set and cleared, the reply to the end of DATA waits until it is set
        # (a slow server); `held` counts the replies waiting.
        self.data_gate: threading.Event | None = None
        self.held = 0
        self._auth = auth
        self.pipelining = pipelining  # whether EHLO offers PIPELINING (RFC 2920)
        self._servers: dict[SMTP, int] = {}  # each connection's aiosmtpd instance: its number
        self._changed = threading.Condition()
        smtp_options: dict[str, Any] = {"server_hostname": "mx.test", "ready_timeout": 10.0}
        if starttls_context is not None:
            smtp_options["tls_context"] = starttls_context
        if auth is not None:
            smtp_options.update(authenticator=self._authenticate, auth_require_tls=False)
        # Whether EHLO offers SMTPUTF8 (RFC 6531); aiosmtpd's Controller offers it by default.
        smtp_options["enable_SMTPUTF8"] = smtputf8
        if data_size_limit is not None:  # what EHLO advertises as SIZE (aiosmtpd: 32 MiB)
            smtp_options["data_size_limit"] = data_size_limit
        self._controller = _Controller(
            self, _Handler(self), ssl_context=implicit_tls_context, **smtp_options
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._controller.start()
        self.port = self._controller.port
        with self._changed:  # forget the probe connection the controller makes at start
            self.connections = 0
            self._servers.clear()

    def stop(self) -> None:
        """Stop listening (and drop connections); a stopped server may be stopped again."""
        if self._controller._thread is not None:
            self._controller.stop()

    def url(self, scheme: str = "smtp", *, user: str | None = None, **options: str) -> str:
        """A URL for this server; `user` may be `name:password` (percent-encoded here)."""
        userinfo = ""
        if user is not None:
            name, _, password = user.partition(":")
            userinfo = f"{quote(name, safe='')}:{quote(password, safe='')}@"
        query = f"?{urlencode(options)}" if options else ""
        return f"{scheme}://{userinfo}{self.host}:{self.port}{query}"

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until `predicate()` holds (checked whenever the server records something)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("condition not met before the deadline")
                self._changed.wait(remaining)

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        self.wait_for(lambda: len(self.messages) >= count, timeout)
        return list(self.messages)

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection from the server side, as an idle timeout would."""
        future = asyncio.run_coroutine_threadsafe(self._close_all(), self._controller.loop)
        future.result(timeout)

    async def _close_all(self) -> None:
        for server in list(self._servers):
            if server.transport is not None:
                server.transport.close()

    def _record(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()

    def _connection_made(self, server: SMTP) -> None:
        def add() -> None:
            self.connections += 1
            self._servers[server] = self.connections

        self._record(add)

    def _count_data(self) -> None:
        self.data_received += 1

    def _connection_number(self, server: SMTP) -> int:
        """The connection's number; one that came in while `start` forgot the controller's
        own probe connection (a client already waiting for the server) is counted now."""
        with self._changed:
            if server not in self._servers:
                self.connections += 1
                self._servers[server] = self.connections
            return self._servers[server]

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        refused = AuthResult(success=False, handled=False)  # aiosmtpd then answers 535
        if not isinstance(data, LoginPassword) or self._auth is None:
            return refused
        login, password = data.login.decode(), data.password.decode()
        if (login, password) != self._auth:
            return refused
        self._record(lambda: self.logins.append(login))
        return AuthResult(success=True)


class _Controller(Controller):
    """aiosmtpd's Controller, on an ephemeral port, telling its owner about each connection."""

    def __init__(self, owner: SmtpServer, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, hostname=owner.host, port=owner.port, **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        server = cast(SMTP, super().factory())  # type: ignore[no-untyped-call]
        self._owner._connection_made(server)
        return server

    def _trigger_server(self) -> None:
        assert self.server is not None  # the listener is up before the probe connection
        self.port = cast(asyncio.Server, self.server).sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _Handler:
    """The aiosmtpd hooks: answer from the owner's scripts, record what was accepted."""

    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
    ) -> list[str]:
        """Offer PIPELINING, as Postfix and most servers do; aiosmtpd does not by itself.

        It reads commands one after another from its stream, so pipelined
        commands work; it writes each reply as it goes.
        """
        session.host_name = hostname
        if self._owner.pipelining:
            return [*lines[:-1], "250-PIPELINING", lines[-1]]
        return lines

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = _next(self._owner.mail_replies)
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return await _answer(server, reply)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._owner.rcpt_replies.get(address, ACCEPT)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return await _answer(server, reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = bytes(envelope.original_content or b"")
        self._owner._record(lambda: self._owner.contents.append(content))
        self._owner._record(self._owner._count_data)
        await self._wait_at_gate()
        reply = _next(self._owner.data_replies)
        if reply.startswith("2"):
            message = ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                connection=self._owner._connection_number(server),
                tls=_is_tls(server),
                mail_options=tuple(envelope.mail_options),
            )
            self._owner._record(lambda: self._owner.messages.append(message))
        return await _answer(server, reply)

    async def _wait_at_gate(self) -> None:
        gate = self._owner.data_gate
        if gate is None or gate.is_set():
            return

        def change(step: int) -> None:
            self._owner.held += step

        self._owner._record(lambda: change(1))
        try:
            await asyncio.get_running_loop().run_in_executor(None, gate.wait)
        finally:
            self._owner._record(lambda: change(-1))


def _is_tls(server: SMTP) -> bool:
    """Implicit TLS or after STARTTLS (aiosmtpd's `session.ssl` only covers the latter)."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


def _next(replies: deque[Reply]) -> Reply:
    try:
        return replies.popleft()
    except IndexError:
        return ACCEPT


async def _answer(server: SMTP, reply: Reply) -> str:
    """Return the reply, or act it out: closing the connection, or never answering.

    Both DROP and HANG wait forever; aiosmtpd cancels the wait when the
    connection is lost (closed by us, or by the client giving up).
    """
    if reply == DROP and server.transport is not None:
        server.transport.close()
    if reply in (DROP, HANG):
        await asyncio.Event().wait()
    return reply


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway certificate for 127.0.0.1/localhost; skip the test without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(name="smtp_server")
def smtp_server_fixture() -> Iterator[SmtpServer]:
    """A started plain SMTP server, stopped after the test."""
    with SmtpServer() as server:
        yield server
