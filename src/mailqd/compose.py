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
limits (`mailqd.validation.Limits`) are checked here too, with the same
functions the client uses, and every HTML part is sanitized
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
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, getaddresses, quote
from functools import lru_cache
from html.parser import HTMLParser

import idna

from mailqd.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    MissingContentError,
    ValidationError,
)
from mailqd.models import Job
from mailqd.sanitize import CACHED_UP_TO, sanitize_html
from mailqd.validation import (
    DEFAULT_LIMITS,
    Limits,
    check_body_size,
    check_header_count,
    check_recipient_count,
    check_subject_length,
)

__all__ = ["OutgoingMessage", "compose", "html_to_text", "make_message_id"]

CRLF = "\r\n"
MAX_LINE_LENGTH = 998  # RFC 5322 2.1.1: hard limit, excluding the CRLF
FOLD_WIDTH = 78  # RFC 5322 2.1.1: the "SHOULD" limit we fold headers to
QP_SHARE_LIMIT = 0.2  # above this share of 8-bit bytes, base64 beats quoted-printable

# Headers mailqd writes itself; a job's extra headers may not replace them,
# or a caller could forge the envelope/structure of the message.
STRUCTURAL_HEADERS = frozenset(
    {
        "bcc",
        "cc",
        "content-disposition",
        "content-id",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "reply-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)

_FORBIDDEN_IN_HEADER = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be encoded as UTF-8
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 ftext
_PLAIN_HEADER_TEXT = re.compile(r"[\x20-\x7e\t]*\Z")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_DOMAIN_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_MESSAGE_ID = re.compile(r"<[!-;=?A-~]+@[!-;=?A-~]+>\Z")  # printable, no < > @ inside
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NEEDS_FULL_PARSER = frozenset('"(\\')
# `Name <addr>` or a bare addr, with no quoting or comments: parsed without getaddresses.
_SIMPLE_ADDRESS = re.compile(
    r"\s*(?:([^<>@,;:\"()\\\[\]]*?)\s*<([^<>\s]+)>|([^<>\s,\"()\\]+))\s*\Z"
)
# A name with these (or with runs of spaces, which a phrase would collapse) is quoted.
_NAME_NEEDS_QUOTES = re.compile(r'[][\\()<>@,:;".\t]|  ')
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
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


@dataclass(frozen=True, slots=True)
class _Address:
    """One parsed mailbox: its display name and its addr-spec (ASCII domain; the local
    part is ASCII unless the address needs SMTPUTF8)."""

    name: str
    addr_spec: str

    @property
    def domain(self) -> str:
        return self.addr_spec.rpartition("@")[2]

    @property
    def envelope_key(self) -> tuple[str, str]:
        """Identity for de-duplication: local parts are case-sensitive, domains are not."""
        local, _, domain = self.addr_spec.rpartition("@")
        return local, domain.lower()

    def header_form(self) -> str:
        if not self.name:
            return self.addr_spec
        return f"{_encode_display_name(self.name)} <{self.addr_spec}>"


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
    sender = _parse_single_address(job.from_address or default_from, "from_address")
    to = _parse_address_list(job.recipient_to, "recipient_to")
    cc = _parse_address_list(job.cc, "cc")
    bcc = _parse_address_list(job.bcc, "bcc")
    reply_to = _parse_address_list(job.reply_to, "reply_to")
    check_recipient_count("recipient_to", len(to) + len(cc) + len(bcc), limits)
    recipients = _envelope_recipients((*to, *cc, *bcc))
    if not recipients:
        raise InvalidAddressError("recipient_to", "the message has no recipients")

    msg_id = _normalize_message_id(
        job.message_id or message_id or make_message_id(job.id, sender.domain)
    )
    subject = _text_field(job.subject, "subject") or ""
    check_subject_length(subject, limits)
    text, html = _text_field(job.body, "body"), _text_field(job.html, "html")
    check_body_size("body", text, limits)
    check_body_size("html", html, limits)
    if isinstance(job.headers, Mapping):
        check_header_count(len(job.headers), limits)
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
    lines.append(_unstructured_header("Subject", subject, "subject"))
    lines.append(f"Message-ID: {msg_id}")
    lines.append("MIME-Version: 1.0")
    lines.extend(_extra_headers(job.headers))
    lines.extend(content_headers)
    smtputf8 = not all(a.addr_spec.isascii() for a in (sender, *to, *cc, *bcc, *reply_to))
    head = (CRLF.join(lines) + CRLF + CRLF).encode("utf-8" if smtputf8 else "ascii")
    return OutgoingMessage(
        sender=sender.addr_spec,
        recipients=recipients,
        data=head + body,
        message_id=msg_id,
        smtputf8=smtputf8,
    )


# --- addresses ---------------------------------------------------------------


def _parse_single_address(value: object, field: str) -> _Address:
    if not value:
        raise InvalidAddressError(
            field, "no From address: set it on the job or configure a default"
        )
    addresses = _parse_address_list(value, field)
    if len(addresses) != 1:
        raise InvalidAddressError(field, "must hold exactly one address")
    return addresses[0]


def _parse_address_list(value: object, field: str) -> list[_Address]:
    """Parse a comma-separated address list into checked, ASCII-only addresses."""
    if value is None:
        return []
    if not isinstance(value, str):
        raise InvalidAddressError(field, f"must be text, not {type(value).__name__}")
    _reject_forbidden_characters(value, field)
    text = value.strip().strip(",").strip()
    if not text:
        return []
    pairs = _split_address_list(text, field)
    return [_make_address(name, addr_spec, field) for name, addr_spec in pairs]


def _split_address_list(text: str, field: str) -> list[tuple[str, str]]:
    """Split into (display name, addr-spec) pairs, refusing what a lenient parser would guess.

    A regex handles the usual shapes fast. Anything else goes through
    `email.utils.getaddresses`, which accepts nearly anything, so its result
    is checked: there must be as many items as comma-separated entries
    (catching unquoted names that look like addresses, such as
    `alice@example.org <bob@example.com>`), and each addr-spec must appear
    verbatim (the parser silently joins `a@exa mple.com` into another address).
    """
    if not any(char in text for char in _NEEDS_FULL_PARSER):
        pairs = []
        for item in text.split(","):
            match = _SIMPLE_ADDRESS.match(item)
            if match is None:
                break
            name, bracketed, bare = match.groups()
            pairs.append((name or "", bracketed) if bracketed else ("", bare))
        else:
            return pairs
    pairs = getaddresses([text])
    if len(pairs) != _QUOTED_STRING.sub("", text).count(",") + 1:
        raise InvalidAddressError(field, "does not parse as a comma-separated list of addresses")
    if any(addr_spec not in text for _, addr_spec in pairs):
        raise InvalidAddressError(field, "an address contains spaces or comments")
    return pairs


def _make_address(name: str, addr_spec: str, field: str) -> _Address:
    if not addr_spec:
        raise InvalidAddressError(field, "holds an empty or malformed address")
    return _Address(name=name.strip(), addr_spec=_checked_addr_spec(addr_spec, field))


def _checked_addr_spec(addr_spec: str, field: str) -> str:
    """Return the addr-spec with an ASCII domain (IDNA), or raise why it is unusable.

    A non-ASCII local part is kept (it is sent with SMTPUTF8, RFC 6531),
    provided it is a dot-atom whose non-ASCII characters are letters, marks,
    digits, punctuation or symbols: no spaces, controls or invisible ones.
    """
    local, at, domain = addr_spec.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddressError(field, "an address has no local part, @ or domain")
    if not _valid_local_part(local):
        raise InvalidAddressError(field, "an address has a malformed local part")
    domain = _ascii_domain(domain, field)
    checked = f"{local}@{domain}"
    if len(checked) > 254:
        raise InvalidAddressError(field, "an address is longer than 254 characters")
    return checked


def _valid_local_part(local: str) -> bool:
    """A dot-atom of at most 64 octets, where a visible non-ASCII character (a letter,
    mark, digit, punctuation or symbol) counts as atext (RFC 6531)."""
    if local.isascii():
        return len(local) <= 64 and _LOCAL_PART.match(local) is not None
    if len(local.encode("utf-8", "surrogatepass")) > 64:
        return False
    if not all(char.isascii() or unicodedata.category(char)[0] in "LMNPS" for char in local):
        return False
    return _LOCAL_PART.match(_NON_ASCII.sub("a", local)) is not None


def _ascii_domain(domain: str, field: str) -> str:
    if _DOMAIN_LITERAL.match(domain):
        return domain
    if not domain.isascii():
        # IDNA 2008 with UTS #46 mapping, as email-validator checks it at
        # enqueue; Python's own "idna" codec is IDNA 2003, which turns ß
        # into ss and so would send faß.de's mail to fass.de.
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise InvalidAddressError(field, "an address has an invalid domain") from None
    if len(domain) > 253 or not _DOMAIN.match(domain):
        raise InvalidAddressError(field, "an address has an invalid domain")
    return domain


def _envelope_recipients(addresses: Iterable[_Address]) -> tuple[str, ...]:
    seen: dict[tuple[str, str], str] = {}
    for address in addresses:
        seen.setdefault(address.envelope_key, address.addr_spec)
    return tuple(seen.values())


def _encode_display_name(name: str) -> str:
    if _PLAIN_HEADER_TEXT.match(name) and "=?" not in name:
        return f'"{quote(name)}"' if _NAME_NEEDS_QUOTES.search(name) else name
    return Header(name, "utf-8").encode(linesep=CRLF)


def _address_header(header: str, addresses: Iterable[_Address], field: str) -> str:
    """Write an address header, folding between addresses so lines stay near 78."""
    items = [address.header_form() for address in addresses]
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


def _unstructured_header(name: str, value: str, field: str) -> str:
    """Write `Name: value`, folded at spaces if ASCII, RFC 2047-encoded otherwise.

    Printable ASCII is kept readable and folded at whitespace. Anything else
    (non-ASCII, other controls, text that looks like an encoded-word, or a
    word too long to fold) is encoded, so that it reads back exactly.
    """
    _reject_forbidden_characters(value, field)
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


def _extra_headers(headers: object) -> list[str]:
    """Render a job's extra headers, refusing anything that is not a dict of str to str."""
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise ValidationError(
            "headers", f"must be a mapping of header name to text, not {type(headers).__name__}"
        )
    lines = []
    for name, value in headers.items():
        _check_extra_header(name, value)
        line = _unstructured_header(name, value, f"headers[{name}]")
        _check_line_lengths(line, f"headers[{name}]")
        lines.append(line)
    return lines


def _check_extra_header(name: object, value: object) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise ValidationError("headers", f"invalid header name {name!r}")
    if name.lower() in STRUCTURAL_HEADERS:
        raise ValidationError(
            "headers", f"{name} is set by mailqd and cannot be given as an extra header"
        )
    if not isinstance(value, str):
        raise ValidationError(f"headers[{name}]", f"value must be text, not {type(value).__name__}")


def _normalize_message_id(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("message_id", f"must be text, not {type(value).__name__}")
    msg_id = value.strip()
    if not msg_id.startswith("<"):
        msg_id = f"<{msg_id}>"
    if not _MESSAGE_ID.match(msg_id):
        raise ValidationError("message_id", "must look like <local@domain> in printable ASCII")
    return msg_id


def _reject_forbidden_characters(value: str, field: str) -> None:
    if _FORBIDDEN_IN_HEADER.search(value):
        raise HeaderInjectionError(field, "must not contain CR, LF or NUL characters")
    if _SURROGATE.search(value):
        raise ValidationError(field, "is not valid Unicode text (lone surrogate)")


def _check_line_lengths(header: str, field: str) -> None:
    if any(len(line) > MAX_LINE_LENGTH for line in header.split(CRLF)):
        raise ValidationError(field, f"header line longer than {MAX_LINE_LENGTH} characters")


def _text_field(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValidationError(field, f"must be text, not {type(value).__name__}")


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
    if _SURROGATE.search(html):
        raise ValidationError("html", "is not valid Unicode text")
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
            "body" if subtype == "plain" else "html", "is not valid Unicode text"
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
    if not raw.isascii() or b"\x00" in raw:
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
