"""SMTP delivery over one kept-open connection, with every failure classified.

The daemon only needs to know what to do next, so every network, TLS or
protocol error is translated here into one of:

- `TransientDeliveryError`: retry later. 4xx replies, timeouts, refused or
  dropped connections, and any failure while setting the connection up
  (greeting, EHLO, STARTTLS, AUTH), even with a 5xx code: those are about the
  server or our configuration, not about this message.
- `PermanentDeliveryError`: a 5xx reply to MAIL, RCPT (every recipient) or
  DATA, or a message that needs SMTPUTF8 (an address with a non-ASCII local
  part) when the server does not offer it. The job fails at once.
- `AmbiguousDeliveryError`: the message content, up to the final `.`, was
  handed to the socket, but the reply to it never came (timeout, disconnect,
  garbage); or the server replied out of turn during the transaction, so its
  replies can no longer be matched to the commands. The server may have
  queued the message; it will be sent again with the same Message-ID so the
  receiver can de-duplicate.

aiosmtplib (the SMTP library) sets the connection up: connect, greeting,
EHLO, STARTTLS, AUTH, through its public API only. Then mailqd's own
`ReplyReader` takes the connection over (public `set_protocol`) and the
transaction is driven step by step (MAIL, RCPT per recipient, DATA, the
content), so the point after which a failure is ambiguous is known exactly,
every reply is matched to the command it answers, and the buffers are
bounded whatever the server sends (see `mailqd.transport.replies`). When the
server offers PIPELINING (RFC 2920; `pipelining=false` in the URL turns it
off), MAIL, the RCPTs and DATA go out in one write and their replies are
read in order: two round trips a message instead of three or more.

One `SmtpTransport` holds one connection and is meant for one delivery
slot: it does not lock, so concurrent `send` calls on the same instance are
not supported. The connection is opened on first use, reused for the next
messages, closed after `idle_timeout` seconds unused, and dropped after any
error or any bytes the server sends out of turn, so the next send
reconnects. A send that fails at its first command on a reused connection
(the server closed it while idle, or answered 421) is retried once on a
fresh connection, since nothing was handed over yet. Every reply text and
error message leaves through `ReplyCleaner` (secrets redacted, control
characters escaped).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl

import aiosmtplib
from aiosmtplib import SMTPAuthenticationError, SMTPConnectError, SMTPHeloError, SMTPTimeoutError

from mailqd.errors import (
    AmbiguousDeliveryError,
    DeliveryError,
    PermanentDeliveryError,
    RelayUnavailableError,
    TransientDeliveryError,
)
from mailqd.message import OutgoingMessage
from mailqd.transport.base import SendResult
from mailqd.transport.commands import data_parts, mail_line, rcpt_line
from mailqd.transport.failures import Refused, describe, server_reply
from mailqd.transport.redaction import ReplyCleaner
from mailqd.transport.replies import (
    ConnectionClosed,
    OutOfTurnReply,
    Reply,
    ReplyError,
    ReplyReader,
    ReplyTimeout,
)
from mailqd.transport.settings import SmtpSettings, StartTLS

__all__ = ["SmtpTransport"]

SERVICE_CLOSING = 421  # RFC 5321: the server is shutting this connection down


class _Phase(enum.Enum):
    """The step of the SMTP dialogue in progress, which decides how a failure is read."""

    CONNECT = "connect"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DATA_SENT = "end of DATA"

    @property
    def is_setup(self) -> bool:
        return self in (_Phase.CONNECT, _Phase.STARTTLS, _Phase.AUTH)


class SmtpTransport:
    """Sends messages to one SMTP server over one reused connection (see module doc)."""

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._server = f"{settings.host}:{settings.port}"
        self._phase = _Phase.CONNECT
        self._clean = ReplyCleaner(settings.username, settings.password)
        self._client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            use_tls=settings.implicit_tls,
            start_tls=False,  # negotiated in _open, where the policy is applied
            validate_certs=settings.tls_verify,
            timeout=settings.timeouts.command,
            local_hostname=settings.local_hostname,
        )
        self._reader: ReplyReader | None = None
        self._pipelined = False
        self._offers: frozenset[str] = frozenset()
        self._size_limit: int | None = None  # the server's SIZE (RFC 1870), if it gave one
        self._stale = False  # the last failure says the reused connection was dead already
        self._sending = False
        self._content_sent = False  # this send wrote its content (after DATA's 354)
        self._last_used = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"SmtpTransport({self._settings.redacted_url()!r})"

    @property
    def settings(self) -> SmtpSettings:
        return self._settings

    @property
    def client(self) -> aiosmtplib.SMTP:
        """aiosmtplib's client, for `set_up`'s caller (`mailqd.transport.probe`)."""
        return self._client

    @property
    def is_connected(self) -> bool:
        return self._reader is not None and self._reader.usable

    @property
    def content_sent(self) -> bool:
        """Whether the last (or current) send handed its content to the socket.

        What a send cut off at shutdown asks: after this, the server may have
        the message, so the cut-off attempt counts (docs/reliability.md).
        """
        return self._content_sent

    @property
    def buffered_bytes(self) -> int:
        """Bytes of server replies held for this connection (bounded; see `ReplyReader`)."""
        return self._reader.buffered_bytes if self._reader is not None else 0

    async def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver one message; raise a `DeliveryError` subclass saying what to do if not."""
        if not message.recipients:
            raise PermanentDeliveryError("the message has no envelope recipients")
        loop = asyncio.get_running_loop()
        if self.is_connected and loop.time() - self._last_used >= self._settings.idle_timeout:
            self._drop()  # the idle timer is due and has not run yet
        reused = self.is_connected
        self._sending = True
        self._content_sent = False
        try:
            try:
                return await self._deliver(message)
            except TransientDeliveryError:
                if not (reused and self._phase is _Phase.MAIL and self._stale):
                    raise
            return await self._deliver(message)
        finally:
            self._sending = False
            self._last_used = loop.time()
            if self._idle_timer is None and self.is_connected:
                self._idle_timer = loop.call_later(self._settings.idle_timeout, self._idle_check)

    async def close(self) -> None:
        """Say QUIT if connected (best effort), then drop the connection."""
        reader = self._reader
        if reader is not None and reader.usable:
            with contextlib.suppress(ReplyError):
                reader.send(b"QUIT\r\n", 1)
                await reader.reply(self._settings.timeouts.command)
        self._drop()

    async def _deliver(self, message: OutgoingMessage) -> SendResult:
        self._phase = _Phase.CONNECT
        self._stale = False
        try:
            reader = self._reader
            if reader is None or not reader.usable:
                reader = await self._open()
            payload = data_parts(message.data)
            self._phase = _Phase.MAIL
            options = self._mail_options(payload, message.smtputf8)
            refused = await self._envelope(reader, message, options)
            reply = await self._send_content(reader, payload)
        except BaseException as exc:
            stray = self._reader.out_of_turn if self._reader is not None else None
            self._drop()
            if isinstance(exc, Exception) and stray is not None:  # replies cannot be trusted
                raise self._translate(stray) from None
            if isinstance(exc, Exception) and not isinstance(exc, DeliveryError):
                raise self._translate(exc) from None  # the cause may hold raw server text
            raise
        clean = self._clean
        if refused:
            refused = {address: (code, clean(text)) for address, (code, text) in refused.items()}
        return SendResult(smtp_code=reply.code, smtp_text=clean(reply.text), refused=refused)

    async def set_up(self) -> None:
        """A new session, set up as `send` sets it up, and no further: no MAIL is sent.

        For `mailqd.transport.probe`: afterwards `client` holds what the
        server offered in its last EHLO (also after a failure, as far as
        the session got), and the session is the caller's to QUIT and close.
        A failure raises the `DeliveryError` that `send` would raise for it
        (a `RelayUnavailableError` with its reason).
        """
        self._phase = _Phase.CONNECT
        try:
            await self._set_up()
        except DeliveryError:
            raise
        except Exception as exc:
            raise self._translate(exc) from None

    async def _set_up(self) -> None:
        """Connect, greet, apply the STARTTLS policy, log in if configured."""
        settings = self._settings
        self._client.close()  # forget the last connection's state (and aiosmtplib's lock)
        await self._client.connect(timeout=settings.timeouts.connect)
        await self._greet()
        if not settings.implicit_tls and settings.starttls is not StartTLS.OFF:
            await self._start_tls()
        if settings.username is not None:
            self._phase = _Phase.AUTH
            if not self._tls_active() and settings.starttls is not StartTLS.OFF:
                raise RelayUnavailableError(
                    f"SMTP {self._server}: refusing to send the SMTP password over an "
                    "unencrypted connection (the server offered no STARTTLS); use smtps://, "
                    "enable STARTTLS on the server, or set starttls=off to allow it",
                    "tls",
                )
            await self._log_in(settings.username, settings.password or "")

    async def _open(self) -> ReplyReader:
        """Set the session up (`_set_up`), then read the replies ourselves."""
        await self._set_up()
        settings = self._settings
        transport = self._client.transport
        if transport is None or transport.is_closing():
            raise ConnectionClosed("connection lost after set-up")
        offers = self._client.supports_extension
        self._offers = frozenset(e for e in ("size", "8bitmime", "smtputf8") if offers(e))
        self._size_limit = _advertised_size(self._client.esmtp_extensions.get("size"))
        self._pipelined = settings.pipelining and offers("pipelining")
        self._reader = ReplyReader(transport)
        return self._reader

    async def _log_in(self, username: str, password: str) -> None:
        """One AUTH exchange, with the first mechanism both sides support.

        Not aiosmtplib's `login`, which tries every mechanism in turn: with
        a wrong password that is two or three failed logins per connection,
        the way to get a provider account locked.
        """
        mechanisms = self._client.supported_auth_methods
        if not mechanisms:
            raise RelayUnavailableError(
                f"SMTP {self._server}: AUTH failed: the server offers no AUTH mechanism "
                "mailqd supports (PLAIN, LOGIN, CRAM-MD5)",
                "auth",
            )
        preferred = "plain" if "plain" in mechanisms else mechanisms[0]
        log_in = getattr(self._client, f"auth_{preferred.replace('-', '')}")
        await log_in(username, password, timeout=self._settings.timeouts.command)

    async def _greet(self) -> None:
        try:
            await self._client.ehlo()
        except SMTPHeloError:
            await self._client.helo()

    async def _start_tls(self) -> None:
        self._phase = _Phase.STARTTLS
        if self._client.supports_extension("starttls"):
            await self._client.starttls(timeout=self._settings.timeouts.connect)
            await self._greet()  # RFC 3207: forget what was learnt before TLS
        elif self._settings.starttls is StartTLS.REQUIRED:
            raise RelayUnavailableError(
                f"SMTP {self._server}: the server does not offer STARTTLS, and the SMTP URL "
                "requires it (starttls=required)",
                "tls",
            )

    def _tls_active(self) -> bool:
        return self._client.get_transport_info("sslcontext") is not None

    def _mail_options(self, payload: tuple[bytes, bytes], smtputf8: bool) -> list[str]:
        offers = self._offers
        content, terminator = payload
        size = len(content) + len(terminator)
        if self._size_limit is not None and size > self._size_limit:
            raise PermanentDeliveryError(
                f"SMTP {self._server}: the message is {size} bytes, larger than the "
                f"{self._size_limit} bytes the server accepts (its SIZE)"
            )
        options = [f"SIZE={size}"] if "size" in offers else []
        if "8bitmime" in offers and not content.isascii():
            options.append("BODY=8BITMIME")
        if smtputf8:
            if "smtputf8" not in offers:
                raise PermanentDeliveryError(
                    f"SMTP {self._server}: an address needs SMTPUTF8, which the server does "
                    "not offer (its local part is not ASCII)"
                )
            options.append("SMTPUTF8")
        return options

    async def _envelope(
        self, reader: ReplyReader, message: OutgoingMessage, options: list[str]
    ) -> dict[str, tuple[int, str]]:
        """MAIL, RCPT for each recipient, DATA; returns the refused recipients.

        Raises if MAIL or DATA is refused, or every recipient is. Each reply
        is checked before the next is read; pipelined, the commands after a
        refusal were sent but their replies are never read (the connection
        is dropped after any failure). Refusals of some recipients only are
        returned, not raised: the message goes to the others.
        """
        recipients = message.recipients
        mail = mail_line(message.sender, options)
        rcpts = [rcpt_line(recipient, message.smtputf8) for recipient in recipients]
        if self._pipelined:
            reader.send(b"".join([mail, *rcpts, b"DATA\r\n"]), len(rcpts) + 2)
        reply = await self._reply_to(reader, mail)
        if reply.code != 250:
            raise Refused(reply)
        self._phase = _Phase.RCPT
        refused: dict[str, tuple[int, str]] = {}
        for recipient, rcpt in zip(recipients, rcpts, strict=True):
            reply = await self._reply_to(reader, rcpt)
            if reply.code == SERVICE_CLOSING:  # the whole session is over, not one recipient
                raise Refused(reply)
            if reply.code not in (250, 251):
                refused[recipient] = reply
        if len(refused) == len(recipients):
            raise self._all_refused(refused)
        self._phase = _Phase.DATA
        reply = await self._reply_to(reader, b"DATA\r\n")
        if reply.code != 354:
            raise Refused(reply)
        return refused

    async def _reply_to(self, reader: ReplyReader, command: bytes) -> Reply:
        """The reply to `command`, written now unless pipelined (then it went out already)."""
        if not self._pipelined:
            reader.send(command, 1)
        return await reader.reply(self._settings.timeouts.command)

    async def _send_content(self, reader: ReplyReader, payload: tuple[bytes, bytes]) -> Reply:
        """Write the content after DATA's 354; from then on, a failure is ambiguous."""
        content, terminator = payload
        reader.send(content, 0)
        reader.send(terminator, 1)
        self._phase = _Phase.DATA_SENT
        self._content_sent = True
        reply = await reader.reply(self._settings.timeouts.data)
        if not 200 <= reply.code < 300:
            raise Refused(reply)
        reader.check()  # a second reply came with this one: which one is the verdict?
        return reply

    def _all_refused(self, refused: dict[str, tuple[int, str]]) -> DeliveryError:
        """Every RCPT refused: permanent only if every refusal was permanent (5xx)."""
        replies = list(refused.values())
        temporary = [reply for reply in replies if not 500 <= reply[0] < 600]
        code, text = (temporary or replies)[0]
        error = TransientDeliveryError if temporary else PermanentDeliveryError
        kind = "some temporarily" if temporary else "permanently"
        message = f"SMTP {self._server}: all {len(replies)} recipient(s) refused, {kind}: "
        return error(self._clean(f"{message}{code} {text}"), code, self._clean(text))

    def _translate(self, exc: Exception) -> DeliveryError:
        """Map a reply, aiosmtplib, TLS or socket error to what the daemon should do next."""
        phase = self._phase
        code, text = server_reply(exc)
        self._stale = code == SERVICE_CLOSING or isinstance(exc, ConnectionError)
        detail = self._clean(describe(exc))
        text = self._clean(text) if text is not None else None
        if isinstance(exc, OutOfTurnReply) and not phase.is_setup:
            return AmbiguousDeliveryError(
                f"SMTP {self._server}: the server replied out of turn during {phase.value} "
                f"({detail}); its replies no longer match the commands, so it may have "
                "accepted the message; retry it with the same Message-ID"
            )
        if phase is _Phase.DATA_SENT and code is None:
            return AmbiguousDeliveryError(
                f"SMTP {self._server}: no reply to the end of DATA ({detail}); the server "
                "may have accepted the message; retry it with the same Message-ID so the "
                "receiver can de-duplicate"
            )
        where = f"SMTP {self._server}: {phase.value} failed: {detail}"
        reason = _relay_reason(exc, phase, code)
        if reason is not None:
            return RelayUnavailableError(where, reason, code, text)
        if code is not None and code >= 500 and not phase.is_setup:
            return PermanentDeliveryError(where, code, text)
        if isinstance(exc, ValueError) and not phase.is_setup:
            return PermanentDeliveryError(f"SMTP {self._server}: message refused locally: {exc}")
        return TransientDeliveryError(where, code, text)

    def _drop(self) -> None:
        """Forget the connection (closing it): after any error, and when idle too long."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._client.close()

    def _idle_check(self) -> None:
        """Close the connection once unused for `idle_timeout` (QUIT, without waiting)."""
        self._idle_timer = None
        if not self.is_connected:
            return
        loop = asyncio.get_running_loop()
        idle_timeout = self._settings.idle_timeout
        remaining = self._last_used + idle_timeout - loop.time()
        if self._sending or remaining > 0:
            delay = idle_timeout if self._sending else remaining
            self._idle_timer = loop.call_later(delay, self._idle_check)
            return
        if self._reader is not None:
            with contextlib.suppress(ReplyError):
                self._reader.send(b"QUIT\r\n", 1)
        self._drop()


def _advertised_size(value: str | None) -> int | None:
    """The SIZE limit an EHLO advertised; None for none, no number, or 0 (no limit)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value) or None


def _relay_reason(exc: Exception, phase: _Phase, code: int | None) -> str | None:
    """Why the relay (not the message) failed, or None when the failure is the message's.

    Everything while setting the session up is the relay's: connecting, the
    greeting, EHLO, STARTTLS and AUTH. After that, a 421 (the server is
    closing the session) or a reset or closed connection before the content
    was sent is too; a timeout or a 4xx/5xx reply to MAIL, RCPT or DATA is
    about this message, as is anything once the content was sent.
    """
    if phase is _Phase.DATA_SENT:
        return None
    if phase.is_setup:
        if phase is _Phase.AUTH and (code is not None or isinstance(exc, SMTPAuthenticationError)):
            return "auth"
        if phase is _Phase.STARTTLS or _caused_by_tls(exc):
            return "tls"
        if isinstance(exc, ReplyTimeout | SMTPTimeoutError | TimeoutError):
            return "timeout"
        if code is not None:
            return "unavailable"
        if isinstance(exc, ConnectionRefusedError | SMTPConnectError):
            return "refused"
        return "closed" if isinstance(exc, ConnectionError | ConnectionClosed) else "refused"
    if code == SERVICE_CLOSING:
        return "unavailable"
    if code is None and isinstance(exc, ConnectionError | ConnectionClosed):
        return "closed"
    return None


def _caused_by_tls(exc: BaseException) -> bool:
    """An `ssl.SSLError`, or an error raised from one (aiosmtplib wraps them)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, ssl.SSLError):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False
