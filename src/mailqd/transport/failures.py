"""What a failed SMTP step carried: the server's reply, if any, and words for the error."""

from __future__ import annotations

import ssl

from aiosmtplib import (
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mailqd.transport.replies import BadReply, ConnectionClosed, Reply, ReplyError, ReplyTimeout

__all__ = ["Refused", "describe", "server_reply"]


class Refused(Exception):
    """A reply other than the one the step needs, raised to be translated."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.code)
        self.reply = reply


def server_reply(exc: Exception) -> tuple[int | None, str | None]:
    """The server's reply carried by an exception, if it was a real SMTP reply."""
    if isinstance(exc, Refused):
        code, text = exc.reply
    elif isinstance(exc, SMTPResponseException):
        code, text = exc.code, exc.message
    else:
        return None, None
    return (code, text) if 200 <= code < 600 else (None, None)


def describe(exc: Exception) -> str:
    if isinstance(exc, Refused):
        return f"{exc.reply.code} {exc.reply.text}"
    if isinstance(exc, ReplyTimeout):
        return f"timed out ({exc})"
    if isinstance(exc, ConnectionClosed):
        return f"connection closed ({exc})"
    if isinstance(exc, BadReply):
        return f"malformed reply ({exc})"
    if isinstance(exc, ReplyError):
        return str(exc)
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
