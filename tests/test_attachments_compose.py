"""Attachments composed, signed and sent (#12, items 3 and 4), against a real SMTP server.

The worker's `Deliverer` reads a job's attachments through its
`attachments` port; here that port is `StandInAttachments`, a dict that
answers `for_job` as `Store.attachments` does (the storage is tested by
its own suite). Everything after it is real: composition, DKIM, the SMTP
transport and aiosmtpd on the other end, whose received bytes are parsed
with the stdlib `email` package as a mail client would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import re
import threading
from collections.abc import Awaitable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from ctl_process import invoke, ok_json
from daemon_process import DaemonPool
from mailqd import Client, signing
from mailqd.attachments import Attachment
from mailqd.cli.enqueue import _parse_message
from mailqd.compose import compose
from mailqd.config import Settings
from mailqd.daemon.delivery import Deliverer
from mailqd.models import Job, Outcome, Status
from mailqd.signing import dns_record_value
from mailqd.store import Completion, Store
from mailqd.store.attachments import AttachmentInfo
from mailqd.transport import SmtpTransport, transport_from_url
from smtp_server import SmtpServer, smtp_server_fixture
from test_compose import make_job
from test_daemon_e2e import daemon_env, stop, wait_all
from test_dkim import DOMAIN, SELECTOR, dns_answering, write_key

__all__ = ["smtp_server_fixture"]

T = TypeVar("T")
DEADLINE = 60.0

HTML = '<p>Your invoice is attached.</p><p><img src="cid:logo@shop.example" alt="Shop"></p>'
NON_ASCII_NAME = "Übersicht der Rechnungen für März 2026 請求書 (größer als sechzig Zeichen).pdf"


class StandInAttachments:
    """`Store.attachments` as the Deliverer sees it: `for_job`, answered from a dict."""

    def __init__(self, by_job: dict[str, list[Attachment]]) -> None:
        self.by_job = by_job
        self.asked: list[str] = []
        self.described: list[list[str]] = []
        self.threads: list[str] = []

    def describe_jobs(self, job_ids: Sequence[str]) -> dict[str, list[AttachmentInfo]]:
        self.described.append(list(job_ids))
        return {job_id: [describe(a) for a in self.by_job.get(job_id, [])] for job_id in job_ids}

    def for_job(self, job_id: str) -> list[Attachment]:
        self.asked.append(job_id)
        self.threads.append(threading.current_thread().name)
        return list(self.by_job.get(job_id, []))


def describe(attachment: Attachment) -> AttachmentInfo:
    return AttachmentInfo(
        attachment.filename,
        attachment.content_type,
        attachment.size,
        attachment.inline,
        attachment.content_id,
        hashlib.sha256(attachment.content).hexdigest(),
    )


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, DEADLINE)

    return asyncio.run(bounded())


def deliver(
    server: SmtpServer,
    job: Job,
    attachments: list[Attachment],
    claimed: bool = False,
    **settings: Any,
) -> tuple[Completion, StandInAttachments]:
    """One attempt; `claimed`: as the worker does, the claim batch is described first."""
    port = StandInAttachments({job.id: attachments})
    deliverer = Deliverer(
        Settings().replace(from_address="shop@shop.example", **settings),
        "worker-test",
        attachments=port,
    )
    transport = transport_from_url(server.url(), timeout=10)
    assert isinstance(transport, SmtpTransport)

    async def once() -> Completion:
        if claimed:
            deliverer.describe_claimed([job.id])
        try:
            return await deliverer.deliver(job, transport)
        finally:
            await transport.close()

    return run(once()), port


def invoice_set() -> list[Attachment]:
    return [
        Attachment("invoice-2026-03.pdf", b"%PDF-1.7\n" + os.urandom(300_000), "application/pdf"),
        Attachment(NON_ASCII_NAME, os.urandom(1_000) + "é".encode()),
        Attachment("notes.txt", b"line one\r\n.\r\nline three\n"),
        Attachment("logo.png", os.urandom(5_000), inline=True, content_id="logo@shop.example"),
    ]


def parts_with_names(message: EmailMessage) -> dict[str, EmailMessage]:
    return {
        part.get_filename(): part  # type: ignore[misc]
        for part in message.walk()
        if part.get_filename() is not None
    }


def test_every_attachment_arrives_byte_for_byte_with_its_name(smtp_server: SmtpServer) -> None:
    attachments = invoice_set()
    job = make_job(html=HTML, recipient_to="alice@example.com")
    completion, port = deliver(smtp_server, job, attachments)

    assert completion.outcome is Outcome.SENT, completion.error
    assert port.asked == [job.id]
    assert port.threads != [threading.main_thread().name]  # read off the event loop
    [received] = smtp_server.wait_for_messages(1)
    message = received.parsed()
    assert message.get_content_type() == "multipart/mixed"
    by_name = parts_with_names(message)
    assert set(by_name) == {a.filename for a in attachments}
    for attachment in attachments:
        part = by_name[attachment.filename]
        assert part.get_payload(decode=True) == attachment.content, attachment.filename
        assert part.get_content_type() == attachment.resolved_content_type
        expected = "inline" if attachment.inline else "attachment"
        assert part.get_content_disposition() == expected
    assert by_name["notes.txt"].get_content_type() == "text/plain"


def test_the_inline_image_sits_beside_the_html_that_names_its_content_id(
    smtp_server: SmtpServer,
) -> None:
    job = make_job(html=HTML)
    completion, _ = deliver(smtp_server, job, invoice_set())
    assert completion.outcome is Outcome.SENT, completion.error
    message = smtp_server.wait_for_messages(1)[0].parsed()

    [related] = [p for p in message.walk() if p.get_content_type() == "multipart/related"]
    inside = list(related.iter_parts())
    assert [p.get_content_type() for p in inside] == ["multipart/alternative", "image/png"]
    html = next(p for p in related.walk() if p.get_content_type() == "text/html")
    sources = re.findall(r'src="cid:([^"]+)"', html.get_content())
    assert sources == ["logo@shop.example"]  # the sanitizer kept the cid: source
    assert inside[1]["Content-ID"] == f"<{sources[0]}>"
    outside = [p.get_filename() for p in message.iter_parts()][1:]
    assert sorted(outside) == sorted(["invoice-2026-03.pdf", NON_ASCII_NAME, "notes.txt"])


def test_base64_lines_are_at_most_76_characters_and_names_are_rfc2231_encoded(
    smtp_server: SmtpServer,
) -> None:
    completion, _ = deliver(smtp_server, make_job(html=HTML), invoice_set())
    assert completion.outcome is Outcome.SENT, completion.error
    data = smtp_server.wait_for_messages(1)[0].data
    raw_parts = [p.partition(b"\r\n\r\n") for p in data.split(b"\r\n--=_mailqd_")]
    base64_bodies = [body for head, _, body in raw_parts if b"base64" in head]
    assert len(base64_bodies) == 4
    for body in base64_bodies:
        encoded_lines = body.split(b"\r\n")
        assert max(len(line) for line in encoded_lines) <= 76
        assert all(re.fullmatch(rb"[A-Za-z0-9+/=]*", line) for line in encoded_lines)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"filename*0*=utf-8''%C3%9Cbersicht" in data
    assert b'filename="Ubersicht der Rechnungen fur Marz' in data  # the ASCII fallback


def test_a_large_attachment_is_composed_and_signed_whole(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """Above a megabyte the message is built in a thread: the same bytes arrive, signed."""
    key = write_key(tmp_path / "dkim.pem")
    big = [Attachment("export.csv", os.urandom(3 * 1024 * 1024), "text/csv")]
    completion, _ = deliver(
        smtp_server,
        make_job(from_address="shop@example.com"),
        big,
        dkim_domain=DOMAIN,
        dkim_selector=SELECTOR,
        dkim_key_file=str(key),
    )
    assert completion.outcome is Outcome.SENT, completion.error
    received = smtp_server.wait_for_messages(1)[0]
    assert parts_with_names(received.parsed())["export.csv"].get_payload(decode=True) == (
        big[0].content
    )
    assert dkim.verify(received.data, dnsfunc=dns_answering(dns_record_value(key.read_bytes())))


def test_inline_parts_without_html_and_a_plain_text_body(smtp_server: SmtpServer) -> None:
    attachments = [Attachment("chart.png", os.urandom(2_000), inline=True, content_id="c1")]
    completion, _ = deliver(smtp_server, make_job(body="See the chart.\n"), attachments)
    assert completion.outcome is Outcome.SENT, completion.error
    message = smtp_server.wait_for_messages(1)[0].parsed()
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "image/png"]
    chart = list(message.iter_parts())[1]
    assert chart.get_content_disposition() == "inline" and chart["Content-ID"] == "<c1>"
    assert chart.get_payload(decode=True) == attachments[0].content


@pytest.mark.parametrize(
    ("attachment", "field"),
    [
        (Attachment("a.pdf", b"x", "application/pdf\r\nBcc: victim@example.com"), "content_type"),
        (Attachment("a\r\nBcc: x@example.com.pdf", b"x"), "filename"),
        (Attachment("a.png", b"x", inline=True, content_id="x>\r\nBcc: y"), "content_id"),
        (Attachment("a.bin", "text, not bytes"), "content"),  # type: ignore[arg-type]
        (Attachment("../../reports/2026.pdf", b"x"), "filename"),  # the rules' check only
    ],
)
def test_an_attachment_that_cannot_be_written_safely_fails_the_job_naming_the_field(
    smtp_server: SmtpServer, attachment: Attachment, field: str
) -> None:
    """What a plain-SQL row may hold: the job fails at once, nothing is sent."""
    completion, _ = deliver(smtp_server, make_job(), [attachment])
    assert completion.outcome is Outcome.FAILED
    assert f"attachments[0].{field}" in (completion.error or "")
    assert smtp_server.connections == 0


def test_a_job_without_attachments_is_sent_as_before(smtp_server: SmtpServer) -> None:
    job = make_job(html=HTML)
    completion, port = deliver(smtp_server, job, [])
    assert completion.outcome is Outcome.SENT, completion.error
    assert port.asked == [job.id]  # not described by the claim: looked up
    assert smtp_server.wait_for_messages(1)[0].parsed().get_content_type() == (
        "multipart/alternative"
    )


def test_a_job_its_claim_batch_described_as_without_attachments_is_not_looked_up(
    smtp_server: SmtpServer,
) -> None:
    job = make_job()
    completion, port = deliver(smtp_server, job, [], claimed=True)
    assert completion.outcome is Outcome.SENT, completion.error
    assert (port.described, port.asked) == ([[job.id]], [])


def test_a_job_described_over_the_attachment_limit_fails_before_its_content_is_read(
    smtp_server: SmtpServer,
) -> None:
    job = make_job()
    big = [Attachment("big.bin", bytes(2_000_000))]
    completion, port = deliver(smtp_server, job, big, claimed=True, max_attachment_bytes=1_000_000)
    assert completion.outcome is Outcome.FAILED
    assert "max_attachment_bytes" in (completion.error or "")
    assert port.asked == [] and smtp_server.connections == 0


def test_described_attachments_are_read_and_sent(smtp_server: SmtpServer) -> None:
    job = make_job(html=HTML)
    completion, port = deliver(smtp_server, job, invoice_set(), claimed=True)
    assert completion.outcome is Outcome.SENT, completion.error
    assert (port.described, port.asked) == ([[job.id]], [job.id])
    assert len(parts_with_names(smtp_server.wait_for_messages(1)[0].parsed())) == 4


def test_a_message_over_the_servers_size_fails_at_once_without_mail_from() -> None:
    with SmtpServer(data_size_limit=50_000) as server:
        big = [Attachment("big.bin", os.urandom(60_000))]
        completion, _ = deliver(server, make_job(), big)
        assert completion.outcome is Outcome.FAILED  # permanent: on its first attempt
        assert completion.attempt == 1
        error = completion.error or ""
        size = re.search(r"the message is (\d+) bytes, larger than the 50000 bytes", error)
        assert size is not None, error
        assert int(size.group(1)) > 80_000  # 60 KB in base64, and the headers
        assert completion.smtp_code is None  # refused by mailqd, not by a reply to MAIL
        assert server.messages == [] and server.data_received == 0

        small = [Attachment("small.bin", os.urandom(1_000))]
        completion, _ = deliver(server, make_job(), small)
        assert completion.outcome is Outcome.SENT, completion.error
        assert any(o.startswith("SIZE=") for o in server.wait_for_messages(1)[0].mail_options)


def test_a_dkim_signed_message_with_attachments_verifies(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    key = write_key(tmp_path / "dkim.pem")
    completion, _ = deliver(
        smtp_server,
        make_job(html=HTML, from_address="shop@example.com"),
        invoice_set(),
        dkim_domain=DOMAIN,
        dkim_selector=SELECTOR,
        dkim_key_file=str(key),
    )
    assert completion.outcome is Outcome.SENT, completion.error
    data = smtp_server.wait_for_messages(1)[0].data
    assert data.startswith(b"DKIM-Signature: ")
    dnsfunc = dns_answering(dns_record_value(key.read_bytes()))
    assert dkim.verify(data, dnsfunc=dnsfunc)
    tampered = data.replace(b"\r\n\r\nJVBERi0xLjcK", b"\r\n\r\nJVBERi0xLjgK", 1)
    assert tampered != data and not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_compose_holds_no_whole_message_copy_for_a_large_attachment() -> None:
    """The encoded message is built in one buffer: its size is the base64 size plus a little."""
    content = os.urandom(3 * 1024 * 1024)
    message = compose(
        make_job(), default_from="shop@example.com", attachments=[Attachment("x.bin", content)]
    )
    encoded = len(base64.encodebytes(content).replace(b"\n", b"\r\n"))
    assert encoded < len(message.data) < encoded + 2_000
    part = message.data.split(b"base64\r\n\r\n")[1].split(b"\r\n--")[0]
    assert base64.b64decode(part) == content


# -- mailqctl ------------------------------------------------------------------------


def eml_with_attachments(pdf: bytes, logo: bytes) -> bytes:
    """A message as a mail client writes it: text + html with an inline logo, and a PDF."""
    message = EmailMessage()
    message["To"] = "alice@example.com"
    message["From"] = "shop@example.com"
    message["Subject"] = "Your invoice"
    message.set_content("Your invoice is attached.\n")
    message.add_alternative(HTML, subtype="html")
    html_part = message.get_payload()[1]  # type: ignore[index]
    html_part.add_related(
        logo, "image", "png", cid="<logo@shop.example>", filename="logo.png", disposition="inline"
    )
    message.add_attachment(pdf, "application", "pdf", filename=NON_ASCII_NAME)
    return message.as_bytes()


def test_an_eml_file_keeps_its_attachments_names_types_and_content_ids() -> None:
    pdf, logo = b"%PDF-1.7\n" + os.urandom(20_000), os.urandom(3_000)
    content = _parse_message(eml_with_attachments(pdf, logo))
    assert content.body == "Your invoice is attached.\n"
    assert content.html is not None and "cid:logo@shop.example" in content.html
    by_name = {a.filename: a for a in content.attachments}
    assert set(by_name) == {"logo.png", NON_ASCII_NAME}
    assert (by_name["logo.png"].content, by_name["logo.png"].content_type) == (logo, "image/png")
    assert by_name["logo.png"].inline and by_name["logo.png"].content_id == "logo@shop.example"
    assert by_name[NON_ASCII_NAME].content == pdf
    assert not by_name[NON_ASCII_NAME].inline


def test_enqueue_attach_and_an_eml_round_trip_and_show_lists_them(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    pdf, logo = b"%PDF-1.7\n" + os.urandom(20_000), os.urandom(3_000)
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(eml_with_attachments(pdf, logo))
    extra = tmp_path / "terms.txt"
    extra.write_bytes(b"Terms.\n")
    result = invoke("enqueue", str(eml), "--attach", str(extra), "--json", db=db_url)
    job_id = ok_json(result)["id"]

    stored = {a.filename: a for a in store.attachments.for_job(job_id)}
    assert stored[NON_ASCII_NAME].content == pdf
    assert stored["logo.png"].content == logo and stored["logo.png"].inline
    assert stored["terms.txt"].content == b"Terms.\n"
    shown = ok_json(invoke("show", job_id, "--json", db=db_url))["attachments"]
    assert {(a["filename"], a["size"], a["inline"]) for a in shown} == {
        (NON_ASCII_NAME, len(pdf), False),
        ("logo.png", len(logo), True),
        ("terms.txt", 7, False),
    }
    text = invoke("show", job_id, db=db_url).stdout
    assert "terms.txt" in text and "cid:logo@shop.example" in text


def test_the_streamed_body_hash_is_dkimpys_relaxed_body_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random bodies of spaces, tabs and line ends, read in 7-byte pieces to cross lines."""
    monkeypatch.setattr(signing, "_BODY_CHUNK", 7)
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    pieces = [b"a", b" ", b"\t", b"\r\n", b"x", b"  \r\n", b"\r\n\r\n", b"\t \r\n"]
    chooser = random.Random(12)
    for _ in range(2000):
        body = b"".join(chooser.choice(pieces) for _ in range(chooser.randint(0, 40)))
        body = body if body.endswith(b"\r\n") else body + b"\r\n"  # as the transport sends it
        message = b"From: a@example.com\r\nSubject: s\r\n\r\n" + body
        expected = hashlib.sha256(relaxed.canonicalize_body(body)).digest()
        assert signing.relaxed_body_hash(message, message.index(b"\r\n\r\n") + 2) == expected


# -- the daemon ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_daemon_sends_enqueued_attachments_whole_beside_mail_without(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    """Client to daemon to SMTP: the stored attachments arrive byte for byte, and the
    jobs of the same batches without attachments arrive as before."""
    attachments = invoice_set()
    with Client(db_url) as client:
        with_files = client.enqueue(
            "alice@example.com", "Invoice", "Attached.", HTML, attachments=attachments
        )
        client.enqueue_many(
            [{"to": f"u{n}@example.com", "subject": "Plain", "body": "Hi"} for n in range(20)]
        )
    daemon = daemons.mailqd(daemon_env(db_url, smtp_server))
    wait_all(daemon, store, Status.SENT, 21, "21 messages sent")
    stop(daemon)

    received = [m.parsed() for m in smtp_server.wait_for_messages(21)]
    [invoice] = [m for m in received if m["Subject"] == "Invoice"]
    assert str(invoice["Message-ID"]).startswith(f"<{with_files}@")
    by_name = parts_with_names(invoice)
    for attachment in attachments:
        assert by_name[attachment.filename].get_payload(decode=True) == attachment.content
    plain = [m for m in received if m["Subject"] == "Plain"]
    assert {m.get_content_type() for m in plain} == {"text/plain"}
