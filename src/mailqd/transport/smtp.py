"""SMTP delivery over one kept-open aiosmtplib connection, with every failure classified.

The daemon only needs to know what to do next, so every aiosmtplib or
network error is translated here into one of:

- `TransientDeliveryError`: retry later. 4xx replies, timeouts, refused or
  dropped connections, and any failure while setting the connection up
  (greeting, EHLO, STARTTLS, AUTH), even with a 5xx code: those are about the
  server or our configuration, not about this message.
- `PermanentDeliveryError`: a 5xx reply to MAIL, RCPT (every recipient) or
  DATA, or a message that needs SMTPUTF8 (an address with a non-ASCII local
  part) when the server does not offer it. The job fails at once.
- `AmbiguousDeliveryError`: the message content, up to the final `.`, was
  handed to the socket, but the reply to it never came (timeout, disconnect,
  garbage). The server may have queued the message; it will be sent again
  with the same Message-ID so the receiver can de-duplicate.

To know which step failed, the transaction is driven step by step (MAIL,
RCPT per recipient, DATA) rather than through `SMTP.sendmail`, and the
message content is written by this module, right after the server's 354, so
the point after which a failure is ambiguous is known exactly. When the
server offers PIPELINING (RFC 2920; `pipelining=false` in the URL turns it
off), MAIL, the RCPTs and DATA go out in one write and their replies are
read in order: two round trips a message instead of three or more, and
half the system calls. aiosmtplib has no pipelining of its own, and its
reply reader drops replies that arrive together; `_RepliesInOrder` is its
reader with that fixed.

One `SmtpTransport` holds one `aiosmtplib.SMTP` client and is meant for one
delivery slot: it does not lock, so concurrent `send` calls on the same
instance are not supported. The connection is opened on first use, reused
for the next messages, and dropped after any error, so the next send
reconnects. A send that fails at its first command on a reused connection
(the server closed it while idle, or answered 421) is retried once on a
fresh connection, since nothing was handed over yet.
"""

from __future__ import annotations

import contextlib
import enum
import re
import ssl
from collections.abc import AsyncIterator

import aiosmtplib
import aiosmtplib.smtp
from aiosmtplib import (
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

from mailqd.compose import OutgoingMessage
from mailqd.errors import (
    AmbiguousDeliveryError,
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from mailqd.transport.base import SendResult
from mailqd.transport.settings import SmtpSettings, StartTLS

__all__ = ["SmtpTransport"]

SERVICE_CLOSING = 421  # RFC 5321: the server is shutting this connection down

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_UNSAFE_IN_MAILBOX = re.compile(r'[\s<>"\x00-\x1f\x7f]')


class _RepliesInOrder(SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply until it is read (for pipelining).

    The stock protocol parses one reply per chunk received and drops data
    that arrives while no reply is awaited, so of several replies arriving
    together (pipelined commands) all but the first are lost. This one
    buffers everything and hands replies out in order: the waiter holds
    the oldest parsed reply, the buffer the ones after it. A reply the
    server sent unasked (a 421 before closing an idle connection) is thus
    read by the next command, which is what it answers in effect.
    """

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is None:
            return
        self._buffer.extend(data)
        if waiter.done():
            return
        try:
            reply = self._read_response_from_buffer()
        except Exception as exc:
            self._set_response_exception(waiter, exc)
            return
        if reply is not None:
            waiter.set_result(reply)
        elif len(self._buffer) > MAX_RESPONSE_LENGTH:  # one reply that never ends
            del self._buffer[:]
            error = SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
            self._set_response_exception(waiter, error)

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        waiter = self._response_waiter
        if waiter is None or not waiter.done():
            buffered = self._read_response_from_buffer()
            if buffered is not None:
                return buffered
        return await super().read_response(timeout)


def _use_replies_in_order() -> None:
    """Make aiosmtplib's clients build `_RepliesInOrder` protocols (process-wide).

    `aiosmtplib.SMTP` names its protocol class as a module global and has no
    option for another; the worker process has no other aiosmtplib user.
    Checked, so that an aiosmtplib that renames it fails at import.
    """
    current = aiosmtplib.smtp.SMTPProtocol  # type: ignore[attr-defined]
    if not issubclass(_RepliesInOrder, current):
        raise RuntimeError(f"aiosmtplib's SMTP protocol class is no longer {SMTPProtocol!r}")
    aiosmtplib.smtp.SMTPProtocol = _RepliesInOrder  # type: ignore[attr-defined]


_use_replies_in_order()


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
        self._client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            use_tls=settings.implicit_tls,
            start_tls=False,  # negotiated in _open, where the policy is applied
            validate_certs=settings.tls_verify,
            timeout=settings.timeouts.command,
            local_hostname=settings.local_hostname,
        )

    def __repr__(self) -> str:
        return f"SmtpTransport({self._settings.redacted_url()!r})"

    @property
    def settings(self) -> SmtpSettings:
        return self._settings

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    async def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver one message; raise a `DeliveryError` subclass saying what to do if not."""
        if not message.recipients:
            raise PermanentDeliveryError("the message has no envelope recipients")
        reused = self._client.is_connected
        try:
            return await self._deliver(message)
        except TransientDeliveryError as exc:
            if not (reused and self._phase is _Phase.MAIL and _is_stale(exc.__cause__)):
                raise
        return await self._deliver(message)

    async def close(self) -> None:
        """Say QUIT if connected (best effort), then drop the connection."""
        if self._client.is_connected:
            with contextlib.suppress(SMTPException, OSError):
                await self._client.quit(timeout=self._settings.timeouts.command)
        self._client.close()

    async def _deliver(self, message: OutgoingMessage) -> SendResult:
        self._phase = _Phase.CONNECT
        try:
            if not self._client.is_connected:
                await self._open()
            payload = _data_payload(message.data)
            self._phase = _Phase.MAIL
            options = self._mail_options(payload, message.smtputf8)
            refused = await self._envelope(message, options)
            reply = await self._send_content(payload)
        except BaseException as exc:
            self._client.close()
            if isinstance(exc, Exception) and not isinstance(exc, DeliveryError):
                raise self._translate(exc) from exc
            raise
        return SendResult(smtp_code=reply.code, smtp_text=reply.message, refused=refused)

    async def _open(self) -> None:
        """Connect, greet, apply the STARTTLS policy, and log in if configured."""
        settings = self._settings
        await self._client.connect(timeout=settings.timeouts.connect)
        await self._greet()
        if not settings.implicit_tls and settings.starttls is not StartTLS.OFF:
            await self._start_tls()
        if settings.username is not None:
            self._phase = _Phase.AUTH
            if not self._tls_active() and settings.starttls is not StartTLS.OFF:
                raise TransientDeliveryError(
                    f"SMTP {self._server}: refusing to send the SMTP password over an "
                    "unencrypted connection (the server offered no STARTTLS); use smtps://, "
                    "enable STARTTLS on the server, or set starttls=off to allow it"
                )
            await self._client.login(
                settings.username, settings.password or "", timeout=settings.timeouts.command
            )

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
            raise TransientDeliveryError(
                f"SMTP {self._server}: the server does not offer STARTTLS, and the SMTP URL "
                "requires it (starttls=required)"
            )

    def _tls_active(self) -> bool:
        return self._client.get_transport_info("sslcontext") is not None

    def _mail_options(self, payload: bytes, smtputf8: bool) -> list[str]:
        options = []
        if self._client.supports_extension("size"):
            options.append(f"SIZE={len(payload)}")
        if not payload.isascii() and self._client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtputf8:
            if not self._client.supports_extension("smtputf8"):
                raise PermanentDeliveryError(
                    f"SMTP {self._server}: an address needs SMTPUTF8, which the server does "
                    "not offer (its local part is not ASCII)"
                )
            options.append("SMTPUTF8")
        return options

    async def _envelope(
        self, message: OutgoingMessage, options: list[str]
    ) -> dict[str, tuple[int, str]]:
        """MAIL, RCPT for each recipient, DATA; returns the refused recipients.

        Raises if MAIL or DATA is refused, or every recipient is. Each reply
        is checked before the next is read; pipelined, the commands after a
        refusal were sent but their replies are never read (the connection
        is dropped after any failure). Refusals of some recipients only are
        returned, not raised: the message goes to the others.
        """
        recipients = message.recipients
        replies = self._replies(
            [
                _mail_line(message.sender, options),
                *(_rcpt_line(recipient, message.smtputf8) for recipient in recipients),
                b"DATA\r\n",
            ]
        )
        reply = await anext(replies)
        if reply.code != 250:
            raise SMTPSenderRefused(reply.code, reply.message, message.sender)
        self._phase = _Phase.RCPT
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            reply = await anext(replies)
            if reply.code == SERVICE_CLOSING:  # the whole session is over, not one recipient
                raise SMTPRecipientRefused(reply.code, reply.message, recipient)
            if reply.code not in (250, 251):
                refused[recipient] = (reply.code, reply.message)
        if len(refused) == len(recipients):
            raise self._all_refused(refused)
        self._phase = _Phase.DATA
        reply = await anext(replies)
        if reply.code != 354:
            raise SMTPResponseException(reply.code, reply.message)
        return refused

    async def _replies(self, commands: list[bytes]) -> AsyncIterator[SMTPResponse]:
        """Send `commands` (each a CRLF-ended line) and yield their replies in order.

        Pipelined when the server offers it and the URL does not turn it
        off: all commands in one write, up front. Otherwise each command is
        written when its reply is asked for, so nothing follows a refusal.
        """
        protocol = self._protocol()
        pipelined = self._settings.pipelining and self._client.supports_extension("pipelining")
        if pipelined:
            protocol.write(b"".join(commands))
        for command in commands:
            if not pipelined:
                protocol.write(command)
            yield await protocol.read_response(timeout=self._settings.timeouts.command)

    async def _send_content(self, payload: bytes) -> SMTPResponse:
        """Write the content after DATA's 354; from then on, a failure is ambiguous.

        The content is written here rather than by `SMTP.data`, which sends
        DATA and the content in one call and so cannot tell a refused DATA
        command from a lost reply to the content.
        """
        protocol = self._protocol()
        protocol.write(payload)
        self._phase = _Phase.DATA_SENT
        reply = await protocol.read_response(timeout=self._settings.timeouts.data)
        if not 200 <= reply.code < 300:
            raise SMTPResponseException(reply.code, reply.message)
        return reply

    def _protocol(self) -> SMTPProtocol:
        protocol = self._client.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost")
        return protocol

    def _all_refused(self, refused: dict[str, tuple[int, str]]) -> DeliveryError:
        """Every RCPT refused: permanent only if every refusal was permanent (5xx)."""
        replies = list(refused.values())
        temporary = [reply for reply in replies if not 500 <= reply[0] < 600]
        code, text = (temporary or replies)[0]
        error = TransientDeliveryError if temporary else PermanentDeliveryError
        kind = "some temporarily" if temporary else "permanently"
        return error(
            f"SMTP {self._server}: all {len(replies)} recipient(s) refused, {kind}: {code} {text}",
            code,
            text,
        )

    def _translate(self, exc: Exception) -> DeliveryError:
        """Map an aiosmtplib, TLS or socket error to what the daemon should do next."""
        phase = self._phase
        code, text = _reply(exc)
        detail = _describe(exc)
        if phase is _Phase.DATA_SENT and code is None:
            return AmbiguousDeliveryError(
                f"SMTP {self._server}: no reply to the end of DATA ({detail}); the server "
                "may have accepted the message; retry it with the same Message-ID so the "
                "receiver can de-duplicate"
            )
        where = f"SMTP {self._server}: {phase.value} failed: {detail}"
        if code is not None and code >= 500 and not phase.is_setup:
            return PermanentDeliveryError(where, code, text)
        if isinstance(exc, ValueError) and not phase.is_setup:
            return PermanentDeliveryError(f"SMTP {self._server}: message refused locally: {exc}")
        return TransientDeliveryError(where, code, text)


def _reply(exc: Exception) -> tuple[int | None, str | None]:
    """The server's reply carried by an exception, if it was a real SMTP reply."""
    if isinstance(exc, SMTPResponseException) and 200 <= exc.code < 600:
        return exc.code, exc.message
    return None, None


def _describe(exc: Exception) -> str:
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, SMTPTimeoutError):
        return f"timed out ({exc.message})"
    if isinstance(exc, SMTPServerDisconnected):
        return f"connection closed ({exc.message})"
    if isinstance(exc, SMTPException):
        return exc.message
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); tls_verify=false skips this"
    return f"{type(exc).__name__}: {exc}"


def _is_stale(cause: BaseException | None) -> bool:
    """Whether a first-command failure means the reused connection was already dead."""
    if isinstance(cause, SMTPResponseException):
        return cause.code == SERVICE_CLOSING
    return isinstance(cause, ConnectionError)


def _mail_line(sender: str, options: list[str]) -> bytes:
    """`MAIL FROM:<sender> OPTIONS` CRLF, built here rather than by `SMTP.mail`.

    The envelope addresses are bare addr-specs already checked by the
    composer; `SMTP.mail` and `SMTP.rcpt` run each through
    `email.utils.parseaddr`, which cost more CPU than the rest of the
    command (measured ~30 us a message). `_mailbox` still refuses one that
    could break the command line.
    """
    mailbox = _mailbox(sender, "SMTPUTF8" in options)
    words = [b"MAIL FROM:<" + mailbox + b">", *(o.encode("ascii") for o in options)]
    return b" ".join(words) + b"\r\n"


def _rcpt_line(recipient: str, smtputf8: bool) -> bytes:
    """`RCPT TO:<recipient>` CRLF (see `_mail_line`)."""
    return b"RCPT TO:<" + _mailbox(recipient, smtputf8) + b">\r\n"


def _mailbox(address: str, smtputf8: bool = False) -> bytes:
    """An envelope address as it goes between < and >; ValueError if it is not one.

    Non-ASCII is allowed (as UTF-8) only in a transaction opened with SMTPUTF8.
    """
    if _UNSAFE_IN_MAILBOX.search(address) or not (smtputf8 or address.isascii()):
        raise ValueError(f"address {address!r} cannot be put on an SMTP command line")
    return address.encode("utf-8") if smtputf8 else address.encode("ascii")


def _data_payload(data: bytes) -> bytes:
    """The DATA content as sent: CRLF line endings, dot-stuffed, ending in `.` CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_ENDING.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"
