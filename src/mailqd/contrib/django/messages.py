"""From a Django `EmailMessage` to the keyword arguments of `Client.enqueue`.

Everything a Django message carries has a place in a mailqd job:

- `to`, `cc`, `bcc`, `reply_to`, `from_email`, `subject`, `body`;
- the `From` and `Reply-To` of `extra_headers` (Django shows them instead of
  `from_email` and `reply_to`; so does mailqd); the other extra headers
  are the job's `headers`, checked by the client like any job's (so a
  `Message-ID`, `Date`, `To` or `Cc` among them is refused: mailqd writes
  those itself);
- the body is the text part, or the HTML part when `content_subtype` is
  `"html"`; an `EmailMultiAlternatives`' `text/html` alternative is the
  HTML part (a `text/plain` one the text part, when the body is HTML);
- attachments, `(filename, content, mimetype)` tuples and `MIMEBase`
  parts (their decoded payload, file name, content type, `Content-ID`
  and inline disposition), become `mailqd.Attachment`s;
- mailqd's own options come from the `message.mailqd` dict and from
  `X-Mailqd-*` extra headers, which are removed from the message.

What mailqd cannot send (an alternative other than text and HTML, a
multipart attachment, an unknown option) raises a `ValidationError` naming
it, rather than sending something else than the application built.
"""

from __future__ import annotations

import email.message
import json
import mimetypes
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.core.mail import EmailMessage
from django.utils.encoding import force_str

from mailqd.attachments import Attachment
from mailqd.errors import ValidationError

__all__ = ["HEADER_PREFIX", "OPTIONS", "OPTIONS_ATTRIBUTE", "enqueue_arguments", "option_header"]

OPTIONS_ATTRIBUTE = "mailqd"
"""`message.mailqd = {"priority": 10, ...}`: mailqd's options for one message."""

OPTIONS = (
    "priority",
    "send_after",
    "expires_at",
    "idempotency_key",
    "max_attempts",
    "template_id",
    "variables",
)
"""The `Client.enqueue` options a message may set; the names are `enqueue`'s."""

HEADER_PREFIX = "X-Mailqd-"


def option_header(option: str) -> str:
    """The extra header that sets `option`: `send_after` is `X-Mailqd-Send-After`."""
    return HEADER_PREFIX + "-".join(part.capitalize() for part in option.split("_"))


_HEADER_OPTIONS = {option_header(option).lower(): option for option in OPTIONS}
_INTEGERS = frozenset({"priority", "max_attempts"})
_TIMES = frozenset({"send_after", "expires_at"})
_TEXT_CHARSETS = frozenset({None, "utf-8", "utf8", "us-ascii", "ascii"})


def enqueue_arguments(message: EmailMessage) -> dict[str, Any]:
    """The `Client.enqueue` keyword arguments for `message`; `ValidationError` if it cannot be."""
    headers = {str(name): force_str(value) for name, value in message.extra_headers.items()}
    options = _options(message, headers)
    from_header = _pop_header(headers, "From")
    reply_to_header = _pop_header(headers, "Reply-To")
    body, html = _content(message)
    arguments: dict[str, Any] = {
        "to": [force_str(a) for a in message.to],
        "subject": force_str(message.subject),
        "body": body,
        "html": html,
        "cc": [force_str(a) for a in message.cc] or None,
        "bcc": [force_str(a) for a in message.bcc] or None,
        "reply_to": reply_to_header or [force_str(a) for a in message.reply_to] or None,
        "from_address": from_header or force_str(message.from_email),
        "headers": headers or None,
        **options,
    }
    attachments = [_attachment(i, item) for i, item in enumerate(message.attachments)]
    if attachments:  # the key only when needed: a client without attachments takes the rest
        arguments["attachments"] = attachments
    return arguments


def _pop_header(headers: dict[str, str], name: str) -> str | None:
    for key in list(headers):
        if key.lower() == name.lower():
            return headers.pop(key)
    return None


# -- the text and HTML parts ---------------------------------------------------


def _content(message: EmailMessage) -> tuple[str | None, str | None]:
    body: str | None = force_str(message.body) or None
    html: str | None = None
    if message.content_subtype == "html":
        body, html = None, body
    elif message.content_subtype != "plain":
        raise ValidationError(
            "content_subtype",
            f"mailqd sends a text/plain or text/html body, not text/{message.content_subtype}",
        )
    for content, mimetype in getattr(message, "alternatives", None) or ():
        if mimetype == "text/html" and html is None:
            html = force_str(content)
        elif mimetype == "text/plain" and body is None:
            body = force_str(content)
        else:
            raise ValidationError(
                "alternatives",
                f"mailqd sends one text and one HTML part; it cannot add a {mimetype} alternative",
            )
    return body, html


# -- attachments -----------------------------------------------------------------


def _attachment(index: int, item: Any) -> Attachment:
    field = f"attachments[{index}]"
    if isinstance(item, email.message.Message):
        return _from_mime(index, field, item)
    try:
        filename, content, *rest = item
    except (TypeError, ValueError):
        raise ValidationError(
            field, "must be a (filename, content, mimetype) tuple or a MIMEBase part"
        ) from None
    mimetype = rest[0] if rest else None
    return Attachment(
        filename=force_str(filename) if filename else _fallback_name(index, mimetype),
        content=_bytes(field, content),
        content_type=mimetype,
    )


def _bytes(field: str, content: Any) -> bytes:
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content)
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, EmailMessage):  # a message/rfc822 attachment, as Django allows
        return content.message().as_bytes()
    if isinstance(content, email.message.Message):
        return content.as_bytes()
    raise ValidationError(field, f"content must be bytes or text, not {type(content).__name__}")


def _from_mime(index: int, field: str, part: email.message.Message) -> Attachment:
    content_type = part.get_content_type()
    content = _part_bytes(field, part, content_type)
    content_id = str(part.get("Content-ID") or "").strip().strip("<>") or None
    disposition = part.get_content_disposition()
    return Attachment(
        filename=part.get_filename() or _fallback_name(index, content_type),
        content=content,
        content_type=content_type,
        inline=disposition == "inline" or (disposition is None and content_id is not None),
        content_id=content_id,
    )


def _part_bytes(field: str, part: email.message.Message, content_type: str) -> bytes:
    """The part's content, decoded from its transfer encoding."""
    if content_type == "message/rfc822":
        inner = part.get_payload(0)
        return inner.as_bytes() if isinstance(inner, email.message.Message) else b""
    if part.is_multipart():
        raise ValidationError(
            field, f"a multipart part ({content_type}) cannot be attached; attach its parts"
        )
    if part.get_content_maintype() == "text":
        utf8 = _text_as_utf8(part)
        if utf8 is not None:
            return utf8
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text_as_utf8(part: email.message.Message) -> bytes | None:
    """A text part's bytes re-encoded in UTF-8 (what mailqd declares), or None to keep them."""
    charset = part.get_content_charset()
    raw = part.get_payload(decode=True)
    if charset is None or charset in _TEXT_CHARSETS or not isinstance(raw, bytes):
        return None
    try:
        return raw.decode(charset).encode("utf-8")
    except (LookupError, UnicodeDecodeError):
        return None


def _fallback_name(index: int, content_type: str | None) -> str:
    """A name for an attachment that has none (mailqd needs one): `attachment-1.png`."""
    extension = mimetypes.guess_extension(content_type or "", strict=False) or ""
    return f"attachment-{index + 1}{extension}"


# -- mailqd's options ------------------------------------------------------------


def _options(message: EmailMessage, headers: dict[str, str]) -> dict[str, Any]:
    """The options of the `X-Mailqd-*` headers (removed from `headers`) and of `message.mailqd`."""
    found: dict[str, Any] = {}
    for name in [n for n in headers if n.lower().startswith(HEADER_PREFIX.lower())]:
        value = headers.pop(name)
        option = _HEADER_OPTIONS.get(name.lower())
        if option is None:
            known = ", ".join(option_header(o) for o in OPTIONS)
            raise ValidationError(f"headers[{name!r}]", f"not a mailqd option; those are {known}")
        found[option] = _parse_header(name, option, value)
    attribute = getattr(message, OPTIONS_ATTRIBUTE, None)
    if attribute is None:
        return found
    if not isinstance(attribute, Mapping):
        raise ValidationError(
            f"message.{OPTIONS_ATTRIBUTE}",
            f"must be a dict of mailqd options, not {type(attribute).__name__}",
        )
    unknown = sorted(set(attribute) - set(OPTIONS))
    if unknown:
        raise ValidationError(
            f"message.{OPTIONS_ATTRIBUTE}",
            f"unknown option(s) {', '.join(map(str, unknown))}; those are {', '.join(OPTIONS)}",
        )
    twice = sorted(set(attribute) & set(found))
    if twice:
        raise ValidationError(
            f"message.{OPTIONS_ATTRIBUTE}",
            f"{', '.join(twice)} given both here and as {option_header(twice[0])}; give it once",
        )
    return {**found, **attribute}


def _parse_header(name: str, option: str, value: str) -> Any:
    field = f"headers[{name!r}]"
    text = value.strip()
    if option in _INTEGERS:
        try:
            return int(text)
        except ValueError:
            raise ValidationError(field, "must be an integer") from None
    if option in _TIMES:
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(
                field, "must be an ISO 8601 time with its offset, e.g. 2026-12-24T08:00:00+00:00"
            ) from None
    if option == "variables":
        try:
            return json.loads(text)
        except ValueError:
            raise ValidationError(field, "must be a JSON object") from None
    return text
