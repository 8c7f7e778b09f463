"""mailqd's own SMTP reply reader: replies matched to commands, with bounded buffers.

Once a connection is set up (greeting, EHLO, STARTTLS, AUTH, done by
aiosmtplib), `ReplyReader` takes the connection over with the public
`asyncio.BaseTransport.set_protocol` and reads every reply of the mail
transactions itself. It knows how many commands are outstanding, since
mailqd writes them (`send`), so it can hold the server to the protocol:

- A reply, or any byte, that arrives when no command is outstanding is out
  of turn: an early `250` right after `354`, a second reply after the one to
  the final dot, a reply to a command not yet sent, or anything sent while
  the connection is idle. The reader then stops reading, drops what it
  buffered beyond the replies awaited and closes the connection. The
  replies that came in turn are still handed out, so `OutOfTurnReply` is
  raised at the step it concerns: the next write, the read past them, or
  `check`, called after the last reply of a transaction. A stray reply is
  never held over for the next command or the next job.
- One reply may hold at most `MAX_REPLY_BYTES` (continuation lines
  included), and nothing is buffered beyond the replies awaited: memory per
  connection is bounded by (commands outstanding) x `MAX_REPLY_BYTES`,
  whatever the server sends.

Reply text is decoded with invalid UTF-8 shown as `\\xNN` (never lone
surrogates, which PostgreSQL cannot store); it is raw otherwise, and the
transport cleans it (`ReplyCleaner`) before it leaves as a result or error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

__all__ = [
    "MAX_REPLY_BYTES",
    "BadReply",
    "ConnectionClosed",
    "OutOfTurnReply",
    "Reply",
    "ReplyError",
    "ReplyReader",
    "ReplyTimeout",
]

MAX_REPLY_BYTES = 8192  # RFC 5321 allows 512 a line; a few lines of explanation fit many times


class Reply(NamedTuple):
    """One SMTP reply: its code and its text (lines joined with LF)."""

    code: int
    text: str


class ReplyError(Exception):
    """No usable reply: the connection cannot be used any more."""


class ReplyTimeout(ReplyError):
    """The reply did not come within the timeout."""


class ConnectionClosed(ReplyError, ConnectionError):
    """The connection was closed or lost (by the server, or by mailqd)."""


class BadReply(ReplyError):
    """What arrived is not an SMTP reply, or one too long to be one."""


class OutOfTurnReply(ReplyError):
    """A reply or bytes arrived when no command awaited one (see the module docstring)."""


class ReplyReader(asyncio.Protocol):
    """The protocol of one SMTP connection after set-up (see the module docstring)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._ready: deque[Reply] = deque()
        self._awaited = 0  # commands written whose replies have not arrived yet
        self._waiter: asyncio.Future[None] | None = None
        self._error: ReplyError | None = None
        transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        """Whether commands can still be sent: not closed, nothing out of turn seen."""
        return self._error is None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for replies not yet complete (bounded by `MAX_REPLY_BYTES`)."""
        return len(self._buffer)

    def send(self, data: bytes, commands: int) -> None:
        """Write `data`, which holds `commands` commands that each get one reply."""
        if self._error is not None:
            raise self._error
        self._awaited += commands
        self._transport.write(data)  # type: ignore[attr-defined]

    async def reply(self, timeout: float) -> Reply:
        """The next reply, in order; raises a `ReplyError` if none can be read.

        Replies that arrived in turn are still handed out after a failure, so
        the error surfaces at the step it concerns (an early `250` after `354`
        fails the content's write, not MAIL's reply).
        """
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if not self._ready:
            raise self._error or ConnectionClosed("woken with no reply")
        return self._ready.popleft()

    @property
    def out_of_turn(self) -> OutOfTurnReply | None:
        """What the server sent out of turn on this connection, if it did."""
        return self._error if isinstance(self._error, OutOfTurnReply) else None

    def check(self) -> None:
        """Raise `OutOfTurnReply` if the server has sent anything out of turn so far."""
        if isinstance(self._error, OutOfTurnReply):
            raise self._error

    def close(self, reason: str = "closed by mailqd") -> None:
        """Stop using the connection and close it (pending writes are flushed first)."""
        self._fail(ConnectionClosed(reason))

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        if not self._awaited:
            self._fail(OutOfTurnReply(f"the server sent {_sample(data)} with no command pending"))
            return
        self._buffer += data
        while self._awaited:
            try:
                reply = self._parse()
            except BadReply as exc:
                self._fail(exc)
                return
            if reply is None:
                break
            self._awaited -= 1
            self._ready.append(reply)
        if not self._awaited and self._buffer:
            extra = _sample(bytes(self._buffer))
            self._fail(OutOfTurnReply(f"the server sent {extra} after the replies awaited"))
            return
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(BadReply(f"a reply longer than {MAX_REPLY_BYTES} bytes"))
            return
        if self._ready:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionClosed("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc else ""
        self._fail(ConnectionClosed(f"connection lost{detail}"))

    # -- internals ----------------------------------------------------------------------

    def _parse(self) -> Reply | None:
        """Take one complete reply off the front of the buffer, or None if none is whole."""
        buffer = self._buffer
        offset = 0
        code = b""
        lines: list[str] = []
        while (end := buffer.find(b"\n", offset, offset + MAX_REPLY_BYTES + 1)) != -1:
            line = bytes(buffer[offset:end]).rstrip(b"\r")
            offset = end + 1
            if offset > MAX_REPLY_BYTES:
                raise BadReply(f"a reply longer than {MAX_REPLY_BYTES} bytes")
            if not (line[:3].isdigit() and line[3:4] in (b"", b" ", b"-")):
                raise BadReply(f"not an SMTP reply line: {_sample(line)}")
            if code and line[:3] != code:
                raise BadReply(f"reply lines with different codes: {_sample(line)}")
            code = line[:3]
            lines.append(line[4:].decode("utf-8", "backslashreplace"))
            if line[3:4] != b"-":
                del buffer[:offset]
                return Reply(int(code), "\n".join(lines))
        return None

    def _fail(self, error: ReplyError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._buffer.clear()
        self._transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(ReplyTimeout("timed out waiting for the reply"))


def _sample(data: bytes) -> str:
    """What the server sent, for an error message: its size and reply code, never its text.

    The text may echo the credentials, cut anywhere, or hold escape sequences.
    """
    code = f" (reply code {data[:3].decode()})" if data[:3].isdigit() else ""
    return f"{len(data)} byte(s){code}"
