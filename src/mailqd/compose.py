"""Build the RFC 5322 bytes of one job's message: the only place that makes MIME.

Composition is on the delivery hot path, so the common shapes (text/plain, or
text + html as multipart/alternative) are written out directly as bytes, and
the stdlib `email` package is only used for the pieces that need its care:
RFC 2047 encoded-words for non-ASCII subjects and display names, date
formatting, and address-list splitting. That keeps composing well above ten
thousand messages per second in one process, where `EmailMessage` plus a
generator manages under a thousand.

Everything that comes from a job is untrusted: a row inserted with plain SQL
may hold anything. Whatever cannot be turned into a safe message raises
`ValidationError` (or one of its subclasses), which the daemon records as a
permanent failure of that job; nothing here may crash the worker. The size
limits, the address parser and the header rules are those of `mailqd.rules`,
the functions the client uses, so a row refused here would have been
refused at enqueue with the same words; every HTML part is sanitized
(`mailqd.sanitize.sanitize_html`).

Addresses with a non-ASCII local part are written as UTF-8 in the headers
(RFC 6532) and the message is marked `smtputf8`, for the transport to send
it with SMTPUTF8 or refuse it. Subjects and display names stay RFC 2047
encoded, so every other message is plain ASCII.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, quote
from functools import lru_cache
from html.parser import HTMLParser

from mailqd.errors import InvalidAddressError, MissingContentError, ValidationError
from mailqd.models import Job
from mailqd.rules import (
    DEFAULT_LIMITS,
    MAX_LINE_LENGTH,
    Address,
    Limits,
    check_body_size,
    check_extra_headers,
    check_header_text,
    check_message_id,
    check_recipient_count,
    check_subject_length,
    check_text,
    parse_address_list,
    parse_single_address,
)
from mailqd.sanitize import CACHED_UP_TO, sanitize_html

__all__ = ["OutgoingMessage", "compose", "html_to_text", "make_message_id"]

CRLF = "\r\n"
FOLD_WIDTH = 78  # RFC 5322 2.1.1: the "SHOULD" limit we fold headers to
QP_SHARE_LIMIT = 0.2  # above this share of 8-bit bytes, base64 beats quoted-printable

_PLAIN_HEADER_TEXT = re.compile(r"[\x20-\x7e\t]*\Z")
# A name with these (or with runs of spaces, which a phrase would collapse) is quoted.
_NAME_NEEDS_QUOTES = re.compile(r'[][\\()<>@,:;".\t]|  ')
_HIGH_BYTES = bytes(range(128, 256))
_WHITESPACE_RUN = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready for a transport: the SMTP envelope plus the exact bytes.

    `sender` and `recipients` are bare addresses for MAIL FROM / RCPT TO;
    Bcc recipients are in `recipients` and nowhere in `data`. `smtputf8`:
    an address (envelope or header) has a non-ASCII local part, so the
    message can only go to a server that offers SMTPUTF8.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str
    smtputf8: bool = False


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
) -> OutgoingMessage:
    """Turn a job into an `OutgoingMessage`, or raise `ValidationError` saying why not.

    `job.subject`, `job.body` and `job.html` are used as given (templates are
    rendered before this), except that the html is sanitized. The
    Message-ID is, in order: the job's own, the one passed in, or one
    derived from the job id and the From domain.
    """
    sender = _sender(job.from_address or default_from)
    to = parse_address_list("recipient_to", job.recipient_to)
    cc = _optional_list("cc", job.cc)
    bcc = _optional_list("bcc", job.bcc)
    reply_to = _optional_list("reply_to", job.reply_to)
    check_recipient_count("recipient_to", len(to) + len(cc) + len(bcc), limits)
    recipients = _envelope_recipients((*to, *cc, *bcc))
    if not recipients:
        raise InvalidAddressError("recipient_to", "the message has no recipients")

    msg_id = check_message_id(
        job.message_id or message_id or make_message_id(job.id, sender.domain)
    )
    subject = _text_field(job.subject, "subject") or ""
    check_header_text("subject", subject)
    check_subject_length(subject, limits)
    text, html = _text_field(job.body, "body"), _text_field(job.html, "html")
    if text is not None and "\x00" in text:
        check_text("body", text)  # a lone surrogate is found as the body is encoded
    if html is not None:
        check_text("html", html)  # before sanitizing
    check_body_size("body", text, limits)
    check_body_size("html", html, limits)
    extra_headers = check_extra_headers(job.headers, limits)
    content_headers, body = _body(text, html)
    lines = [
        f"Date: {format_datetime(_aware(now))}",
        _address_header("From", [sender], "from_address"),
        _address_header("To", to, "recipient_to") if to else "To: undisclosed-recipients:;",
    ]
    if cc:
        lines.append(_address_header("Cc", cc, "cc"))
    if reply_to:
        lines.append(_address_header("Reply-To", reply_to, "reply_to"))
    lines.append(_unstructured_header("Subject", subject))
    lines.append(f"Message-ID: {msg_id}")
    lines.append("MIME-Version: 1.0")
    lines.extend(_extra_headers(extra_headers))
    lines.extend(content_headers)
    smtputf8 = not all(a.envelope.isascii() for a in (sender, *to, *cc, *bcc, *reply_to))
    head = (CRLF.join(lines) + CRLF + CRLF).encode("utf-8" if smtputf8 else "ascii")
    return OutgoingMessage(
        sender=sender.envelope,
        recipients=recipients,
        data=head + body,
        message_id=msg_id,
        smtputf8=smtputf8,
    )


# --- addresses ---------------------------------------------------------------


def _sender(value: object) -> Address:
    if not value:
        raise InvalidAddressError(
            "from_address", "no From address: set it on the job or configure a default"
        )
    return parse_single_address("from_address", value)


def _optional_list(field: str, value: object) -> tuple[Address, ...]:
    return () if value is None else parse_address_list(field, value)


def _envelope_recipients(addresses: Iterable[Address]) -> tuple[str, ...]:
    seen: dict[tuple[str, str], str] = {}
    for address in addresses:
        seen.setdefault(address.envelope_key, address.envelope)
    return tuple(seen.values())


def _header_form(address: Address) -> str:
    if not address.name:
        return address.envelope
    return f"{_encode_display_name(address.name)} <{address.envelope}>"


def _encode_display_name(name: str) -> str:
    if _PLAIN_HEADER_TEXT.match(name) and "=?" not in name:
        return f'"{quote(name)}"' if _NAME_NEEDS_QUOTES.search(name) else name
    return Header(name, "utf-8").encode(linesep=CRLF)


def _address_header(header: str, addresses: Iterable[Address], field: str) -> str:
    """Write an address header, folding between addresses so lines stay near 78."""
    items = [_header_form(address) for address in addresses]
    parts = [f"{header}:"]
    width = len(parts[0])
    last = len(items) - 1
    for index, item in enumerate(items):
        text = item if index == last else item + ","
        first_line = text.split(CRLF, 1)[0]
        if index and width + 1 + len(first_line) > FOLD_WIDTH:
            parts.append(CRLF)
            width = 0
        parts.append(" " + text)
        width = len(text.rsplit(CRLF, 1)[-1]) + 1 if CRLF in text else width + 1 + len(text)
    result = "".join(parts)
    _check_line_lengths(result, field)
    return result


# --- other headers -----------------------------------------------------------


def _unstructured_header(name: str, value: str) -> str:
    """Write `Name: value`, folded at spaces if ASCII, RFC 2047-encoded otherwise.

    Printable ASCII is kept readable and folded at whitespace. Anything else
    (non-ASCII, other controls, text that looks like an encoded-word, or a
    word too long to fold) is encoded, so that it reads back exactly.
    """
    if _PLAIN_HEADER_TEXT.match(value) and "=?" not in value:
        folded = _fold_at_spaces(f"{name}: {value}")
        if max(map(len, folded.split(CRLF))) <= MAX_LINE_LENGTH:
            return folded
    encoded = Header(value, "utf-8", header_name=name).encode(linesep=CRLF)
    return f"{name}: {encoded}"


def _fold_at_spaces(line: str) -> str:
    """Fold a header line before spaces; unfolding (dropping CRLF) restores it exactly."""
    if len(line) <= FOLD_WIDTH:
        return line
    words = line.split(" ")
    lines: list[str] = []
    current = words[0]
    for word in words[1:]:
        if word and current.strip() and len(current) + 1 + len(word) > FOLD_WIDTH:
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return CRLF.join(lines)


def _extra_headers(headers: dict[str, str] | None) -> list[str]:
    """Render a job's extra headers, checked by `check_extra_headers` (one line each)."""
    if headers is None:
        return []
    return [_unstructured_header(name, value) for name, value in headers.items()]


def _check_line_lengths(header: str, field: str) -> None:
    if len(header) > MAX_LINE_LENGTH and any(
        len(line) > MAX_LINE_LENGTH for line in header.split(CRLF)
    ):
        raise ValidationError(field, f"header line longer than {MAX_LINE_LENGTH} characters")


def _text_field(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    return value


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


# --- body --------------------------------------------------------------------


def _body(text: str | None, html: str | None) -> tuple[list[str], bytes]:
    """Return the top-level content headers and the encoded body.

    text only: text/plain. Any html: multipart/alternative with a plain-text
    part first (generated from the html when the job has none), as clients
    show the last alternative they understand. The html is sanitized first,
    and the generated text comes from what is left of it.
    """
    if html is None:
        if text is None:
            raise MissingContentError("body", "the message has neither a body nor html")
        headers, body = _encode_text_part(text, "plain")
        return headers, body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    html = sanitize_html(html)
    if text is None:
        text = _text_of_html(html)
    text_headers, text_body = _encode_text_part(text, "plain")
    html_headers, html_body = _encode_text_part(html, "html")
    boundary = _boundary(text_body, html_body)
    delimiter = f"--{boundary}".encode("ascii")
    body = b"".join(
        (
            delimiter + b"\r\n",
            _part(text_headers, text_body),
            b"\r\n" + delimiter + b"\r\n",
            _part(html_headers, html_body),
            b"\r\n" + delimiter + b"--\r\n",
        )
    )
    return [f'Content-Type: multipart/alternative; boundary="{boundary}"'], body


def _part(headers: list[str], body: bytes) -> bytes:
    """A body part; the CRLF after it belongs to the next boundary (RFC 2046 5.1.1)."""
    return (CRLF.join(headers) + CRLF + CRLF).encode("ascii") + body


def _boundary(*parts: bytes) -> str:
    """A random boundary; `=_` never occurs in quoted-printable or base64 output."""
    while True:
        boundary = f"=_mailqd_{os.urandom(12).hex()}"
        encoded = boundary.encode("ascii")
        if not any(encoded in part for part in parts):
            return boundary


def _encode_text_part(text: str, subtype: str) -> tuple[list[str], bytes]:
    """Encode a text body: 7bit when it can be sent as is, else QP or base64.

    Whether the text ends with a line break is kept: the caller adds the CRLF
    that a following boundary (or the end of the message) needs.
    """
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        raw = normalized.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            "body" if subtype == "plain" else "html", "is not valid Unicode text (lone surrogate)"
        ) from None
    if _is_7bit(raw):
        cte, body = "7bit", raw.replace(b"\n", b"\r\n")
    elif _share_of_8bit(raw) > QP_SHARE_LIMIT:
        canonical = raw.replace(b"\n", b"\r\n")  # RFC 2045: CRLF before base64
        cte, body = "base64", base64.encodebytes(canonical).replace(b"\n", b"\r\n")
    else:
        qp = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
        cte, body = "quoted-printable", qp.replace(b"\n", b"\r\n")
    headers = [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        f"Content-Transfer-Encoding: {cte}",
    ]
    return headers, body


def _is_7bit(raw: bytes) -> bool:
    if not raw.isascii():
        return False
    if len(raw) <= MAX_LINE_LENGTH:
        return True
    return max(map(len, raw.split(b"\n"))) <= MAX_LINE_LENGTH


def _share_of_8bit(raw: bytes) -> float:
    if not raw:
        return 0.0
    return (len(raw) - len(raw.translate(None, _HIGH_BYTES))) / len(raw)


# --- html to text ------------------------------------------------------------


def _text_of_html(html: str) -> str:
    """`html_to_text`, cached for the bodies `sanitize_html` caches (mail to many, same html)."""
    if len(html) <= CACHED_UP_TO:
        return _cached_html_to_text(html)
    return html_to_text(html)


def html_to_text(html: str) -> str:
    """A readable plain-text rendering of an HTML body, for the text/plain alternative.

    Not a full renderer: it drops scripts, styles and the head, turns block
    elements into line breaks, list items into dashes, and keeps link targets
    after their text, which is what a text-only reader needs.
    """
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text()


@lru_cache(maxsize=256)
def _cached_html_to_text(html: str) -> str:
    return html_to_text(html)


class _TextExtractor(HTMLParser):
    """Collects text, asking for line breaks around blocks; the largest pending break wins."""

    _BLOCK = frozenset(
        {
            "address", "article", "aside", "br", "dd", "div", "dl", "dt", "fieldset",
            "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav",
            "ol", "pre", "section", "tr", "ul",
        }
    )  # fmt: skip
    _PARAGRAPH = frozenset({"blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "p", "table"})
    _SKIP = frozenset({"head", "script", "style", "template", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        self._pending_breaks = 0
        self._skip_depth = 0
        self._pre_depth = 0
        self._links: list[tuple[str | None, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_for(tag)
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag == "pre":
            self._pre_depth += 1
        elif tag == "li":
            self._write("- ")
        elif tag == "a":
            self._links.append((dict(attrs).get("href"), len(self._chunks)))
        elif tag == "img":
            self._write(dict(attrs).get("alt") or "")
        elif tag in ("td", "th"):
            self._write(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self._BLOCK:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        elif tag == "a" and self._links:
            self._close_link()
        self._break_for(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = _WHITESPACE_RUN.sub(" ", data)
            if data == " " and (self._pending_breaks or not self._chunks):
                return
        self._write(data)

    def _break_for(self, tag: str) -> None:
        if tag in self._PARAGRAPH:
            self._pending_breaks = max(self._pending_breaks, 2)
        elif tag in self._BLOCK:
            self._pending_breaks = max(self._pending_breaks, 1)

    def _write(self, text: str) -> None:
        if not text:
            return
        if self._pending_breaks and self._chunks:
            self._chunks.append("\n" * self._pending_breaks)
        self._pending_breaks = 0
        self._chunks.append(text)

    def _close_link(self) -> None:
        href, start = self._links.pop()
        if not href or href.startswith("#"):
            return
        target = href.removeprefix("mailto:")
        label = "".join(self._chunks[start:]).strip()
        if target != label:
            self._write(f" ({target})" if label else target)

    def text(self) -> str:
        lines = (line.strip() for line in "".join(self._chunks).split("\n"))
        return "\n".join(lines).strip() + "\n"
