"""What every transport offers the daemon: one `send` per message, and `close`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mailqd.errors import DeliveryError
from mailqd.message import OutgoingMessage
from mailqd.models import RecipientResult


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server accepted the message (for at least one recipient).

    `refused` maps each recipient the server refused at RCPT time to its
    (code, text): the message still counts as sent, and the daemon reports
    those recipients. When every recipient is refused, `send` raises instead.
    """

    smtp_code: int | None
    smtp_text: str | None
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    relay: str | None = None
    """The relay that accepted it (the routed transport says)."""
    recipients: tuple[RecipientResult, ...] = ()
    """Each recipient's result, when the message was split across routes."""
    pending_error: DeliveryError | None = None
    """Why the recipients still `pending` were not accepted (a split message's failed part)."""


@runtime_checkable
class Transport(Protocol):
    """Hands finished messages to a mail server (or a stand-in for one).

    `send` raises `TransientDeliveryError` (retry later),
    `AmbiguousDeliveryError` (the server may have taken it; retry with the
    same Message-ID) or `PermanentDeliveryError` (do not retry), and nothing
    else for delivery problems. An instance is not safe for concurrent sends:
    the daemon uses one transport per delivery slot.
    """

    async def send(self, message: OutgoingMessage) -> SendResult: ...

    async def close(self) -> None: ...
