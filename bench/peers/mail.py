"""What the peers of the cold-start bench send: a job's fields as a message, and a kept-open
aiosmtplib connection per concurrent sender.

Used by the PgQueuer consumer (peers/pgqueuer_mail.py) and the bare loop
(peers/bare_aiosmtplib.py, which gets its bytes prebuilt by the bench with
`build`), so both send what mailqd sends for the same job: From, To,
Subject, Date, Message-ID and a UTF-8 text body, with Python's email
library, CRLF line ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any

import aiosmtplib


def build(fields: dict[str, Any], sender: str) -> EmailMessage:
    """The message for a job's `to`/`subject`/`body` (bench_daemon.message's fields)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = fields["to"]
    msg["Subject"] = fields["subject"]
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(fields["body"])
    return msg


def envelope(fields: dict[str, Any], sender: str) -> tuple[str, list[str]]:
    """MAIL FROM and RCPT TO addresses: the bare addresses of `sender` and `to`."""
    return parseaddr(sender)[1], [parseaddr(fields["to"])[1]]


class Connections:
    """`size` kept-open SMTP connections to 127.0.0.1:`port`, each used by one send at a time.

    A connection is opened on its first use and kept for the next sends;
    one that fails is dropped and opened again on its next use.
    """

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self._idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(size):
            self._idle.put_nowait(None)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        """An open connection, for this caller alone until the block ends."""
        smtp = await self._idle.get()
        try:
            if smtp is None:
                smtp = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=self.port, start_tls=False, timeout=30
                )
                await smtp.connect()
            yield smtp
        except BaseException:
            if smtp is not None:
                smtp.close()
            smtp = None
            raise
        finally:
            self._idle.put_nowait(smtp)

    async def close(self) -> None:
        while not self._idle.empty():
            smtp = self._idle.get_nowait()
            if smtp is not None and smtp.is_connected:
                try:
                    await smtp.quit()
                except aiosmtplib.SMTPException:
                    smtp.close()
