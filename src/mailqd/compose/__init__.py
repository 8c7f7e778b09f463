"""Build the RFC 5322 bytes of one job's message: the only place that makes MIME.

The package by part: `headers` (addresses and header lines), `body`
(text/plain or multipart/alternative, transfer encodings), `parts`
(attachments: multipart/mixed and multipart/related, base64 parts, written
into one buffer), `html_text` (the text alternative of an HTML-only
message), `sanitize` (the one HTML rule).
The message type itself is `mailqd.message.OutgoingMessage`, which the
transports import without importing composition.

Composition is on the delivery hot path, so the common shapes (text/plain, or
text + html as multipart/alternative) are written out directly as bytes, and
the stdlib `email` package is only used for the pieces that need its care:
RFC 2047 encoded-words for non-ASCII subjects and display names, date
formatting, and address-list splitting. That keeps composing an order of
magnitude faster than `EmailMessage` plus a generator (figures in
docs/performance.md).

Everything that comes from a job is untrusted: a row inserted with plain SQL
may hold anything. Whatever cannot be turned into a safe message raises
`ValidationError` (or one of its subclasses), which the daemon records as a
permanent failure of that job; nothing here may crash the worker. The size
limits, the address parser and the header rules are those of `mailqd.rules`,
the functions the client uses, so a row refused here would have been
refused at enqueue with the same words; every HTML part is sanitized
(`mailqd.compose.sanitize.sanitize_html`).

Addresses with a non-ASCII local part are written as UTF-8 in the headers
(RFC 6532) and the message is marked `smtputf8`, for the transport to send
it with SMTPUTF8 or refuse it. Subjects and display names stay RFC 2047
encoded, so every other message is plain ASCII.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

from mailqd.attachments import Attachment
from mailqd.compose.body import encode_body
from mailqd.compose.headers import (
    CRLF,
    address_header,
    aware,
    envelope_recipients,
    extra_header_lines,
    optional_list,
    sender_address,
    text_field,
    unstructured_header,
)
from mailqd.compose.html_text import html_to_text
from mailqd.compose.parts import AttachmentBody
from mailqd.errors import InvalidAddressError
from mailqd.message import OutgoingMessage
from mailqd.models import Job
from mailqd.rules import (
    DEFAULT_LIMITS,
    Limits,
    check_body_size,
    check_extra_headers,
    check_header_text,
    check_message_id,
    check_recipient_count,
    check_subject_length,
    check_text,
    parse_address_list,
)

__all__ = ["OutgoingMessage", "compose", "html_to_text", "make_message_id"]


def make_message_id(job_id: str, domain: str) -> str:
    """The Message-ID of a job: derived from its id so every attempt sends the same one.

    Receivers de-duplicate on Message-ID, which is what makes at-least-once
    delivery (a resend after a lost reply) harmless.
    """
    return f"<{job_id}@{domain}>"


def compose(
    job: Job,
    *,
    default_from: str,
    message_id: str | None = None,
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
    attachments: Sequence[Attachment] = (),
) -> OutgoingMessage:
    """Turn a job into an `OutgoingMessage`, or raise `ValidationError` saying why not.

    `job.subject`, `job.body` and `job.html` are used as given (templates are
    rendered before this), except that the html is sanitized. The
    Message-ID is, in order: the job's own, the one passed in, or one
    derived from the job id and the From domain.

    `attachments` (checked by `mailqd.rules` before this) make a
    multipart/mixed, with the inline ones beside the HTML in a
    multipart/related (`mailqd.compose.parts`).
    """
    sender = sender_address(job.from_address or default_from)
    to = parse_address_list("recipient_to", job.recipient_to)
    cc = optional_list("cc", job.cc)
    bcc = optional_list("bcc", job.bcc)
    reply_to = optional_list("reply_to", job.reply_to)
    check_recipient_count("recipient_to", len(to) + len(cc) + len(bcc), limits)
    recipients = envelope_recipients((*to, *cc, *bcc))
    if not recipients:
        raise InvalidAddressError("recipient_to", "the message has no recipients")

    msg_id = check_message_id(
        job.message_id or message_id or make_message_id(job.id, sender.domain)
    )
    subject = text_field(job.subject, "subject") or ""
    check_header_text("subject", subject)
    check_subject_length(subject, limits)
    text, html = text_field(job.body, "body"), text_field(job.html, "html")
    if text is not None and "\x00" in text:
        check_text("body", text)  # a lone surrogate is found as the body is encoded
    if html is not None:
        check_text("html", html)  # before sanitizing
    check_body_size("body", text, limits)
    check_body_size("html", html, limits)
    extra_headers = check_extra_headers(job.headers, limits)
    if attachments:
        with_attachments = AttachmentBody(text, html, attachments)
        content_headers = with_attachments.headers
    else:
        content_headers, body = encode_body(text, html)
    lines = [
        f"Date: {format_datetime(aware(now))}",
        address_header("From", [sender], "from_address"),
        address_header("To", to, "recipient_to") if to else "To: undisclosed-recipients:;",
    ]
    if cc:
        lines.append(address_header("Cc", cc, "cc"))
    if reply_to:
        lines.append(address_header("Reply-To", reply_to, "reply_to"))
    lines.append(unstructured_header("Subject", subject))
    lines.append(f"Message-ID: {msg_id}")
    lines.append("MIME-Version: 1.0")
    lines.extend(extra_header_lines(extra_headers))
    lines.extend(content_headers)
    smtputf8 = not all(a.envelope.isascii() for a in (sender, *to, *cc, *bcc, *reply_to))
    head = (CRLF.join(lines) + CRLF + CRLF).encode("utf-8" if smtputf8 else "ascii")
    if attachments:  # one buffer, no copy of the whole message (`mailqd.compose.parts`)
        out = io.BytesIO()
        out.write(head)
        with_attachments.write(out)
        data = out.getvalue()
    else:
        data = head + body
    return OutgoingMessage(
        sender=sender.envelope,
        recipients=recipients,
        data=data,
        message_id=msg_id,
        smtputf8=smtputf8,
    )
