"""How far a send had got when the worker cut it off: what a shutdown give-back records.

A send cancelled at a graceful stop uses one of the message's attempts only
if its content may be with the server (docs/reliability.md). The worker
hands each attempt a `WatchedTransport`, which notes whether the send
began, and asks the transport under it whether the content went out: a
transport says so with a boolean `content_sent` attribute (true while a
send is in progress and its content after DATA's 354 has been written).
One that has no such attribute cannot say, and its cut-off sends count.
"""

from __future__ import annotations

from mailqd.message import OutgoingMessage
from mailqd.transport import SendResult, Transport

__all__ = ["WatchedTransport", "content_sent"]


class WatchedTransport:
    """One attempt's transport: the slot's own, noting whether `send` was called."""

    __slots__ = ("began", "inner")

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.began = False

    async def send(self, message: OutgoingMessage) -> SendResult:
        self.began = True
        return await self.inner.send(message)

    async def close(self) -> None:
        await self.inner.close()

    def reached_data(self) -> bool | None:
        """Whether the send had handed its content over: False before it began, None if unknown."""
        return content_sent(self.inner) if self.began else False


def content_sent(transport: Transport) -> bool | None:
    """The transport's `content_sent`, or None when it has none (it cannot say)."""
    said = getattr(transport, "content_sent", None)
    return said if isinstance(said, bool) else None
