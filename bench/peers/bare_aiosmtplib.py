"""The cold-start bench's floor: prebuilt messages sent with aiosmtplib, no queue at all.

    python bench/peers/bare_aiosmtplib.py PORT MESSAGES_FILE CONNECTIONS

MESSAGES_FILE is a pickled list of (MAIL FROM, [RCPT TO], bytes), built by
the bench before the clock starts (peers/mail.py's `build`, so the bytes are
what the PgQueuer consumer sends). The process sends them all over
CONNECTIONS kept-open connections at once (`SMTP.sendmail`), on uvloop when
it is installed (as mailqd's workers run), prints `sent N` and then waits
for its standard input to close, so the bench reads its CPU time while it
is still alive.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib

Message = tuple[str, list[str], bytes]


async def send_all(port: int, messages: list[Message], connections: int) -> int:
    todo: Iterator[Message] = iter(messages)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
        await smtp.connect()
        for mail_from, rcpt_to, data in todo:
            await smtp.sendmail(mail_from, rcpt_to, data)
            sent += 1
        await smtp.quit()

    await asyncio.gather(*(sender() for _ in range(min(connections, len(messages)) or 1)))
    return sent


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    port, path, connections = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    messages: list[Message] = pickle.loads(path.read_bytes())
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        sent = runner.run(send_all(port, messages, connections))
    print(f"sent {sent}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
