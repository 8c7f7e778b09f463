"""The header lines of a message: addresses, unstructured text, and the job's extra headers.

Addresses come already parsed by `mailqd.rules` (the parser the client uses
at enqueue); this module only writes them: display names quoted or RFC 2047
encoded, lists folded between addresses, every other header folded at spaces
when it is printable ASCII and encoded otherwise, so it reads back exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.header import Header
from email.utils import quote

from mailqd.errors import InvalidAddressError, ValidationError
from mailqd.rules import MAX_LINE_LENGTH, Address, parse_address_list, parse_single_address

__all__ = [
    "CRLF",
    "address_header",
    "aware",
    "envelope_recipients",
    "extra_header_lines",
    "optional_list",
    "sender_address",
    "text_field",
    "unstructured_header",
]

CRLF = "\r\n"
FOLD_WIDTH = 78  # RFC 5322 2.1.1: the "SHOULD" limit we fold headers to

_PLAIN_HEADER_TEXT = re.compile(r"[\x20-\x7e\t]*\Z")
# A name with these (or with runs of spaces, which a phrase would collapse) is quoted.
_NAME_NEEDS_QUOTES = re.compile(r'[][\\()<>@,:;".\t]|  ')


def sender_address(value: object) -> Address:
    """The From address: the job's, else the configured default; one is required."""
    if not value:
        raise InvalidAddressError(
            "from_address", "no From address: set it on the job or configure a default"
        )
    return parse_single_address("from_address", value)


def optional_list(field: str, value: object) -> tuple[Address, ...]:
    """Cc, Bcc or Reply-To: absent is no addresses, present is parsed like To."""
    return () if value is None else parse_address_list(field, value)


def envelope_recipients(addresses: Iterable[Address]) -> tuple[str, ...]:
    """RCPT TO addresses, each once (an address in To and Cc gets one copy)."""
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


def address_header(header: str, addresses: Iterable[Address], field: str) -> str:
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


def unstructured_header(name: str, value: str) -> str:
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


def extra_header_lines(headers: dict[str, str] | None) -> list[str]:
    """Render a job's extra headers, checked by `check_extra_headers` (one line each)."""
    if headers is None:
        return []
    return [unstructured_header(name, value) for name, value in headers.items()]


def _check_line_lengths(header: str, field: str) -> None:
    if len(header) > MAX_LINE_LENGTH and any(
        len(line) > MAX_LINE_LENGTH for line in header.split(CRLF)
    ):
        raise ValidationError(field, f"header line longer than {MAX_LINE_LENGTH} characters")


def text_field(value: object, field: str) -> str | None:
    """A text column as given, or `ValidationError`: a plain-SQL row may hold anything."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    return value


def aware(now: datetime | None) -> datetime:
    """The Date header's time: `now` (naive read as UTC), or the current time."""
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)
