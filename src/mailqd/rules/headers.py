"""Rules on the headers of a message: which a caller may set, and how long they may be.

The client refuses exactly what the composer refuses, with the same words,
because both call `check_extra_headers`. A job's extra headers may not
replace a header mailqd writes itself (or one that would contradict the
envelope: Sender, Return-Path, Resent-*), and every header must fit on one
RFC 5322 line of 998 characters, its name included, so that no folding or
encoding can be needed to make it legal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mailqd.errors import LimitExceededError, ValidationError
from mailqd.rules.limits import Limits
from mailqd.rules.text import check_header_text

__all__ = [
    "MAX_LINE_LENGTH",
    "MAX_MESSAGE_ID_LENGTH",
    "RESERVED_HEADERS",
    "check_extra_headers",
    "check_message_id",
]

MAX_LINE_LENGTH = 998  # RFC 5322 2.1.1, excluding the CRLF
MAX_MESSAGE_ID_LENGTH = 250  # brackets included; one short line with room for the name

RESERVED_HEADERS = frozenset(
    {
        "bcc",
        "cc",
        "content-disposition",
        "content-id",
        "content-transfer-encoding",
        "content-type",
        "date",
        "dkim-signature",
        "from",
        "message-id",
        "mime-version",
        "reply-to",
        "resent-bcc",
        "resent-cc",
        "resent-date",
        "resent-from",
        "resent-message-id",
        "resent-sender",
        "resent-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
"""Lower-cased: headers mailqd writes from the job's fields, or that would contradict them."""

_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 ftext
_MESSAGE_ID = re.compile(r"<[!-;=?A-~]+@[!-;=?A-~]+>\Z")  # printable, no < > @ inside


def check_extra_headers(headers: object, limits: Limits) -> dict[str, str] | None:
    """The job's extra headers as a dict, or the `ValidationError` that refuses them."""
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise ValidationError(
            "headers", f"must be a mapping of header name to text, not {type(headers).__name__}"
        )
    if len(headers) > limits.max_header_count:
        raise LimitExceededError("headers", f"more than {limits.max_header_count} extra headers")
    total = 0
    checked: dict[str, str] = {}
    for name, value in headers.items():
        _check_name(name)
        field = _field(name)
        if not isinstance(value, str):
            raise ValidationError(field, f"value must be text, not {type(value).__name__}")
        if len(name) + 2 + len(value) > MAX_LINE_LENGTH:
            raise LimitExceededError(
                field, f"'{name}: value' is longer than {MAX_LINE_LENGTH} characters"
            )
        check_header_text(field, value)
        total += len(name) + len(value) + 4
        checked[name] = value
    if total > limits.max_header_bytes:
        raise LimitExceededError("headers", f"larger than {limits.max_header_bytes} bytes in all")
    return checked or None


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise ValidationError("headers", f"header names must be text, not {type(name).__name__}")
    if len(name) > MAX_LINE_LENGTH - 2:
        raise LimitExceededError(
            "headers", f"a header name is longer than {MAX_LINE_LENGTH - 2} characters"
        )
    check_header_text(f"header name {name!r}", name)
    if not _HEADER_NAME.match(name):
        raise ValidationError(
            "headers", f"{name!r} is not a valid header name (printable ASCII, no space or ':')"
        )
    if name.lower() in RESERVED_HEADERS:
        raise ValidationError(
            "headers",
            f"{name} is set by mailqd from the job's fields and cannot be an extra header",
        )


def _field(name: str) -> str:
    return f"headers[{name}]" if len(name) <= 78 else f"headers[{name[:60]}...]"


def check_message_id(value: object) -> str:
    """A Message-ID as the header gets it: `<local@domain>`, printable ASCII, short."""
    if not isinstance(value, str):
        raise ValidationError("message_id", f"must be text, not {type(value).__name__}")
    if len(value) > MAX_MESSAGE_ID_LENGTH:
        raise ValidationError("message_id", f"longer than {MAX_MESSAGE_ID_LENGTH} characters")
    msg_id = value.strip()
    if not msg_id.startswith("<"):
        msg_id = f"<{msg_id}>"
    if len(msg_id) > MAX_MESSAGE_ID_LENGTH or not _MESSAGE_ID.match(msg_id):
        raise ValidationError("message_id", "must look like <local@domain> in printable ASCII")
    return msg_id
