"""The bytes mailqd writes in a mail transaction: MAIL and RCPT lines, and the DATA content."""

from __future__ import annotations

import re

__all__ = ["data_parts", "data_payload", "mail_line", "rcpt_line"]

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_UNSAFE_IN_MAILBOX = re.compile(r'[\s<>"\x00-\x1f\x7f]')


def mail_line(sender: str, options: list[str]) -> bytes:
    """`MAIL FROM:<sender> OPTIONS` CRLF, built here rather than by `SMTP.mail`.

    The envelope addresses are bare addr-specs already checked by the
    composer; `SMTP.mail` and `SMTP.rcpt` run each through
    `email.utils.parseaddr`, which cost more CPU than the rest of the
    command. `_mailbox` still refuses one that could break the command line.
    """
    mailbox = _mailbox(sender, "SMTPUTF8" in options)
    words = [b"MAIL FROM:<" + mailbox + b">", *(o.encode("ascii") for o in options)]
    return b" ".join(words) + b"\r\n"


def rcpt_line(recipient: str, smtputf8: bool) -> bytes:
    """`RCPT TO:<recipient>` CRLF (see `mail_line`)."""
    return b"RCPT TO:<" + _mailbox(recipient, smtputf8) + b">\r\n"


def _mailbox(address: str, smtputf8: bool = False) -> bytes:
    """An envelope address as it goes between < and >; ValueError if it is not one.

    Non-ASCII is allowed (as UTF-8) only in a transaction opened with SMTPUTF8.
    """
    if _UNSAFE_IN_MAILBOX.search(address) or not (smtputf8 or address.isascii()):
        raise ValueError(f"address {address!r} cannot be put on an SMTP command line")
    return address.encode("utf-8") if smtputf8 else address.encode("ascii")


def data_payload(data: bytes) -> bytes:
    """The DATA content as sent: CRLF line endings, dot-stuffed, ending in `.` CRLF."""
    return b"".join(data_parts(data))


def data_parts(data: bytes) -> tuple[bytes, bytes]:
    """The DATA content as sent, in two writes: the content and the terminator.

    The content is `data` itself, not a copy, when it needs nothing changed
    (CRLF line endings, no line starting with `.`), which is what mailqd's
    composer writes: a 20 MB attachment's message is not copied once more
    to append the final `.`.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_ENDING.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data, b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
