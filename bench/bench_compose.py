"""Micro-benchmarks for the delivery hot path: composing messages and sending them over SMTP.

Run: .venv/bin/python bench/bench_compose.py [--seconds 2] [--messages 3000]

Prints messages per second for:
- compose(): a ~2 KB plain-text message, text + html, html only (text
  generated), and, for scale, the stdlib EmailMessage + generator path;
- SMTP: prebuilt messages through SmtpTransport to a local aiosmtpd sink
  (running in its own process, so it does not share our GIL), over one
  connection and over several concurrent transports (one per "slot");
- the sink alone, driven by a bare-bones client, as the ceiling the
  transport figures should be read against.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from mailqd.compose import OutgoingMessage, compose
from mailqd.models import Job, Status
from mailqd.transport import SmtpTransport, transport_from_url
from rawsmtp import raw_smtp_rate

PARAGRAPH = (
    "Thank you for your order. We are preparing your parcel and will let you "
    "know as soon as it ships. If you have any question, reply to this message.\n"
)
PLAIN_BODY = PARAGRAPH * 14  # ~2 KB
HTML_BODY = "<html><body>" + "<p>" + PARAGRAPH.replace(". ", ".<br>") * 12 + "</p></body></html>"


def make_job(**fields: Any) -> Job:
    now = datetime.now(UTC)
    values: dict[str, Any] = dict.fromkeys(
        ["html", "template_id", "variables", "cc", "bcc", "reply_to", "from_address",
         "headers", "max_attempts", "last_error", "expires_at", "idempotency_key",
         "lease_owner", "lease_expires_at", "message_id", "sent_at"]
    )  # fmt: skip
    values.update(
        id="2f1d7c9a-0000-4000-8000-000000000001",
        recipient_to="Alice Example <alice@example.com>",
        subject="Your order #12345 has been received",
        body=PLAIN_BODY,
        headers={"X-Campaign": "orders"},
        status=Status.SENDING,
        priority=0,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    values.update(fields)
    return Job(**values)


def rate(work: Callable[[], object], seconds: float) -> float:
    """Calls per second of `work`, measured for about `seconds` after a warm-up."""
    for _ in range(100):
        work()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(200):
            work()
        calls += 200
    return calls / elapsed


def email_message_baseline(job: Job) -> bytes:
    message = EmailMessage()
    message["From"] = "Mailer <noreply@example.com>"
    message["To"] = job.recipient_to
    message["Subject"] = job.subject
    message["Message-ID"] = f"<{job.id}@example.com>"
    message.set_content(job.body or "")
    return message.as_bytes()


def bench_compose(seconds: float) -> None:
    cases = {
        "compose plain ~2 KB": make_job(),
        "compose text + html": make_job(html=HTML_BODY),
        "compose html only (text generated)": make_job(body=None, html=HTML_BODY),
    }
    for label, job in cases.items():
        size = len(compose(job, default_from="noreply@example.com").data)
        per_second = rate(partial(compose, job, default_from="noreply@example.com"), seconds)
        print(f"{label:<40} {per_second:>10,.0f} msg/s   ({size:,} bytes)")
    baseline = make_job()
    per_second = rate(lambda: email_message_baseline(baseline), seconds)
    print(f"{'stdlib EmailMessage, for comparison':<40} {per_second:>10,.0f} msg/s")


# --- the SMTP sink, in its own process ------------------------------------------------------


def run_sink(report: Connection) -> None:
    from aiosmtpd.smtp import SMTP

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Sink(), hostname="sink.test"), "127.0.0.1", 0
        )
        report.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


async def send_over_transports(
    port: int, message: OutgoingMessage, total: int, slots: int
) -> float:
    transports = [
        transport_from_url(f"smtp://127.0.0.1:{port}?starttls=off", local_hostname="bench.test")
        for _ in range(slots)
    ]
    for transport in transports:  # connect outside the timed part
        await transport.send(message)

    async def slot(transport: SmtpTransport | Any, count: int) -> None:
        for _ in range(count):
            await transport.send(message)

    started = time.perf_counter()
    await asyncio.gather(*(slot(t, total // slots) for t in transports))
    elapsed = time.perf_counter() - started
    for transport in transports:
        await transport.close()
    return (total // slots) * slots / elapsed


async def sink_capacity(port: int, message: OutgoingMessage, total: int, slots: int) -> float:
    """The sink driven by a minimal client: raw lines, no parsing beyond reading a reply."""
    payload = message.data + b".\r\n"
    envelope = (
        f"MAIL FROM:<{message.sender}>\r\n".encode(),
        f"RCPT TO:<{message.recipients[0]}>\r\n".encode(),
        b"DATA\r\n",
        payload,
    )
    return await raw_smtp_rate(port, envelope, total, slots)


def bench_smtp(total: int) -> None:
    message = compose(make_job(), default_from="noreply@example.com")
    receiver, sender = multiprocessing.Pipe(duplex=False)
    sink = multiprocessing.Process(target=run_sink, args=(sender,), daemon=True)
    sink.start()
    try:
        if not receiver.poll(10):
            raise SystemExit("the SMTP sink did not start")
        port = receiver.recv()
        for slots in (1, 4):
            per_second = asyncio.run(sink_capacity(port, message, total, slots))
            print(f"{f'sink alone, bare client, {slots} conn':<40} {per_second:>10,.0f} msg/s")
        for slots in (1, 4):
            per_second = asyncio.run(send_over_transports(port, message, total, slots))
            label = f"SmtpTransport, {slots} transport(s)"
            print(f"{label:<40} {per_second:>10,.0f} msg/s")
    finally:
        sink.terminate()
        sink.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per compose case")
    parser.add_argument("--messages", type=int, default=3000, help="messages per SMTP case")
    args = parser.parse_args()
    bench_compose(args.seconds)
    bench_smtp(args.messages)


if __name__ == "__main__":
    main()
