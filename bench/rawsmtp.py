"""A minimal SMTP client for measuring a sink alone: raw lines, one reply read per line.

Shared by the bench scripts (run as `python bench/NAME.py`, so this folder
is on sys.path). It does no parsing beyond reading a reply line, so what it
measures is the sink, not the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence


async def raw_smtp_rate(
    port: int, transaction: Sequence[bytes], total: int, sessions: int
) -> float:
    """Send `transaction` (MAIL, RCPT, DATA, payload lines) over `sessions` reused
    connections to 127.0.0.1:`port`, `total` times in all; returns messages/s."""

    async def session(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"HELO bench.test\r\n")
        await reader.readline()
        for _ in range(count):
            for line in transaction:
                writer.write(line)
                await reader.readline()
        writer.write(b"QUIT\r\n")
        await reader.readline()
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(session(total // sessions) for _ in range(sessions)))
    return (total // sessions) * sessions / (time.perf_counter() - started)
