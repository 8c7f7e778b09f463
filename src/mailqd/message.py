"""The message a transport sends: what composition produces and every transport accepts.

It lives apart from `mailqd.compose` so that the transports depend on the
type only, not on how a message is built (headers, bodies, sanitizing).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OutgoingMessage"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready for a transport: the SMTP envelope plus the exact bytes.

    `sender` and `recipients` are bare addresses for MAIL FROM / RCPT TO;
    Bcc recipients are in `recipients` and nowhere in `data`. `smtputf8`:
    an address (envelope or header) has a non-ASCII local part, so the
    message can only go to a server that offers SMTPUTF8.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str
    smtputf8: bool = False
