"""Transports that do not speak SMTP: a Maildir for development, and a sink for benchmarks."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from mailqd.errors import TransientDeliveryError
from mailqd.message import OutgoingMessage
from mailqd.transport.base import SendResult

__all__ = ["MaildirTransport", "NullTransport"]

_MAILDIR_SUBDIRS = ("tmp", "new", "cur")


class MaildirTransport:
    """Delivers each message as a file in a Maildir, so a developer can read it with a mail client.

    Follows the Maildir rules: write under tmp/, fsync, then rename into new/,
    so a reader never sees a half-written message. The directories are
    created on first use. File I/O runs in a thread so the event loop is not
    blocked. The envelope is not kept; the message's headers are.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ready = False
        self._counter = itertools.count(1)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def __repr__(self) -> str:
        return f"MaildirTransport({str(self._path)!r})"

    @property
    def path(self) -> Path:
        return self._path

    async def send(self, message: OutgoingMessage) -> SendResult:
        name = self._unique_name()
        try:
            await asyncio.to_thread(self._write, name, message.data)
        except OSError as exc:
            raise TransientDeliveryError(f"maildir {self._path}: cannot write: {exc}") from exc
        return SendResult(smtp_code=250, smtp_text=f"stored as new/{name}")

    async def close(self) -> None:
        """Nothing is held open between messages."""

    def _unique_name(self) -> str:
        now = time.time_ns()
        seconds, nanos = divmod(now, 1_000_000_000)
        return f"{seconds}.M{nanos // 1000}P{os.getpid()}Q{next(self._counter)}.{self._host}"

    def _write(self, name: str, data: bytes) -> None:
        if not self._ready:
            for sub in _MAILDIR_SUBDIRS:
                (self._path / sub).mkdir(parents=True, exist_ok=True)
            self._ready = True
        tmp = self._path / "tmp" / name
        with open(tmp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, self._path / "new" / name)


class NullTransport:
    """Accepts and discards every message: for benchmarking everything but the network."""

    def __repr__(self) -> str:
        return "NullTransport()"

    async def send(self, message: OutgoingMessage) -> SendResult:
        return SendResult(smtp_code=250, smtp_text="discarded")

    async def close(self) -> None:
        """Nothing to release."""
