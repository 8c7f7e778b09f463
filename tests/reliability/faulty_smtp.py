"""A real SMTP server whose faults the test controls, and that keeps the books of what it received.

`FaultySmtp` is aiosmtpd on 127.0.0.1 on a port that stays the same across
`stop()`/`start()`, so a test can take the mail server down and bring it
back while the daemon keeps the same `smtp_url`. What it does to each
command is decided by a `FaultPlan`, which the test may change at any time:

- `drop_data`: close the connection after the message content arrived,
  instead of answering the end of DATA (the reply is lost);
- `hang_data`: never answer the end of DATA (the client times out);
- `temp_mail` / `temp_data`: answer 421/451 to MAIL FROM, 451 to the end of
  DATA;
- `permanent`: recipients whose local part starts with it get 550;
- `data_delay`: wait that many seconds before answering the end of DATA
  (a server slower than the client's timeout).

`tarpit()` replaces the server, for a while, with a socket that accepts
connections and never says a word (not even the greeting).

Every message content that reaches the server is kept as a `Copy` with what
happened to it: `accepted` (a 2xx was about to be sent: the server took
responsibility), `rejected` (a 4xx/5xx was sent: it did not), or
`unanswered` (dropped, hung, or the client left while the server was slow:
the sender cannot know; a real server may have kept it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from pg import free_port
from smtp_server import ACCEPT

__all__ = ["Copy", "FaultPlan", "FaultySmtp", "parse_identity"]

ACCEPTED, REJECTED, UNANSWERED = "accepted", "rejected", "unanswered"
TOKEN_HEADER = "X-Rel-Token"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
_TOKEN = re.compile(rb"^X-Rel-Token:[ \t]*([^\s]+)", re.IGNORECASE | re.MULTILINE)


def parse_identity(content: bytes) -> tuple[str | None, str | None]:
    """The (token, Message-ID) in a message's header block; None for a header that is absent."""
    end = _HEADER_END.search(content)
    head = content[: end.start()] if end else content[:65536]
    token = _TOKEN.search(head)
    message_id = _MESSAGE_ID.search(head)
    return (
        token.group(1).decode("ascii", "replace") if token else None,
        message_id.group(1).decode("ascii", "replace") if message_id else None,
    )


@dataclass
class Copy:
    """One message content as the server received it, and what the server did with it."""

    token: str | None
    message_id: str | None
    size: int
    recipients: tuple[str, ...] = ()
    fate: str = UNANSWERED
    content: bytes | None = None
    """The bytes themselves, when the server was asked to keep them (`keep_content`)."""


@dataclass
class FaultPlan:
    """What the server does wrong, by probability per command; change it while the test runs."""

    seed: int = 0
    drop_data: float = 0.0
    hang_data: float = 0.0
    temp_mail: float = 0.0
    temp_data: float = 0.0
    data_delay: float = 0.0
    permanent: str = "bounce"
    injected: Counter[str] = field(default_factory=Counter)
    """How many times each fault was acted out."""

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def mail_reply(self) -> str:
        if self._random.random() < self.temp_mail:
            reply = self._random.choice(
                ["421 4.3.2 service shutting down", "451 4.3.0 temporary failure"]
            )
            self.injected[f"MAIL {reply[:3]}"] += 1
            return reply
        return ACCEPT

    def rcpt_reply(self, address: str) -> str:
        if address.split("@", 1)[0].startswith(self.permanent):
            self.injected["RCPT 550"] += 1
            return "550 5.1.1 no such user"
        return ACCEPT

    def data_reply(self) -> str:
        """A reply line, or "drop" / "hang"."""
        draw = self._random.random()
        for kind, share in (
            ("drop", self.drop_data),
            ("hang", self.hang_data),
            ("451 4.3.0 try again later", self.temp_data),
        ):
            if draw < share:
                self.injected[f"DATA {kind[:4].strip()}"] += 1
                return kind
            draw -= share
        return ACCEPT


class FaultySmtp:
    """See the module docstring. `start()` before use; `stop()`/`start()` keep the port."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.plan = plan or FaultPlan()
        self.copies: list[Copy] = []
        self.connections = 0
        self.size_limit = 40 * 2**20
        """Largest message accepted (SIZE); read at `start()`."""
        self.keep_content = False
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}?starttls=off"

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname="mx.reliability.test",
            ready_timeout=30.0,
            data_size_limit=self.size_limit,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop listening and drop every connection (the server is down)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @contextlib.contextmanager
    def tarpit(self) -> Iterator[None]:
        """Down, and in its place a listener that accepts connections and never answers."""
        was_running = self.running
        self.stop()
        pit = _Tarpit(self.host, self.port)
        try:
            yield
        finally:
            self.plan.injected["tarpit connections"] += pit.close()
            if was_running:
                self.start()

    def accepted(self) -> int:
        with self._lock:
            return sum(1 for c in self.copies if c.fate == ACCEPTED)

    def _received(self, content: bytes, recipients: list[str]) -> Copy:
        token, message_id = parse_identity(content)
        copy = Copy(
            token,
            message_id,
            len(content),
            tuple(recipients),
            content=content if self.keep_content else None,
        )
        with self._lock:
            self.copies.append(copy)
        return copy

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1


class _Handler:
    """The aiosmtpd hooks: answer by the plan, keep a `Copy` of every content received."""

    def __init__(self, owner: FaultySmtp) -> None:
        self._owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        self._owner._connected()
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._owner.plan.mail_reply()
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._owner.plan.rcpt_reply(address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        copy = self._owner._received(bytes(envelope.original_content or b""), envelope.rcpt_tos)
        plan = self._owner.plan
        if plan.data_delay > 0:
            plan.injected["DATA slow"] += 1
            await asyncio.sleep(plan.data_delay)  # cancelled if the client gives up first
        reply = plan.data_reply()
        if reply == "drop":
            if server.transport is not None:
                server.transport.close()
            await asyncio.Event().wait()  # cancelled by aiosmtpd when the connection is lost
        if reply == "hang":
            await asyncio.Event().wait()
        copy.fate = ACCEPTED if reply.startswith("2") else REJECTED
        return reply


class _Tarpit:
    """A listening socket on `port` that accepts connections and holds them silently."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self._held: list[socket.socket] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="tarpit", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> int:
        """Stop; returns how many connections it held."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(10)
        for conn in self._held:
            conn.close()
        return len(self._held)
