"""Checks a message before anything is written, and turns it into a `NewJob`.

Every entry point (the client library, `mailqctl enqueue`) goes through
`build_job`, so a message is judged by one set of rules. A bad message raises
a `mailqd.errors.ValidationError` subclass naming the field and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import getaddresses
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from email_validator import EmailNotValidError, validate_email

from mailqd.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    LimitExceededError,
    MissingContentError,
    ValidationError,
)
from mailqd.ids import new_job_id
from mailqd.models import NewJob

if TYPE_CHECKING:
    from mailqd.config import Settings

Recipients = str | Iterable[str] | None

# Headers that mailqd writes itself from the job's fields; a caller may not
# set them through `headers=`, or the message would contradict its envelope.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)

_FORBIDDEN_CHARS = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII except ':' (RFC 5322 ftext)
# A plain ASCII dot-atom address, the overwhelmingly common case, checked
# without the cost of the full validator.
_SIMPLE_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_NEEDS_FULL_PARSE = re.compile(r"[<>\"()\\]")


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on what may be queued, and on what the daemon will send.

    The defaults are those of the `max_*` config keys. The daemon and
    `mailqctl enqueue` build theirs with `Limits.from_settings`; an
    application passes its own to `Client(..., limits=...)`, and should use
    the daemon's values (or lower ones): a job over the daemon's limits is
    queued, then fails at its first attempt naming the limit.
    """

    max_recipients: int = 100
    max_address_length: int = 254  # RFC 5321 path limit
    max_subject_length: int = 998  # one RFC 5322 line
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_count: int = 50

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_recipients=settings.max_recipients,
            max_subject_length=settings.max_subject_length,
            max_body_bytes=settings.max_body_bytes,
        )


DEFAULT_LIMITS = Limits()


def check_recipient_count(field: str, count: int, limits: Limits) -> None:
    if count > limits.max_recipients:
        raise LimitExceededError(
            field, f"more than {limits.max_recipients} recipients in all (max_recipients)"
        )


def check_subject_length(subject: str, limits: Limits) -> None:
    if len(subject) > limits.max_subject_length:
        raise LimitExceededError(
            "subject",
            f"longer than {limits.max_subject_length} characters (max_subject_length)",
        )


def check_body_size(field: str, text: str | None, limits: Limits) -> None:
    """Refuse a body over `max_body_bytes` in UTF-8; encodes only when the length is unclear."""
    if text is None or len(text) * 4 <= limits.max_body_bytes:
        return
    size = len(text) if len(text) > limits.max_body_bytes else _utf8_size(text)
    if size > limits.max_body_bytes:
        raise LimitExceededError(
            field, f"larger than {limits.max_body_bytes} bytes (max_body_bytes)"
        )


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_header_count(count: int, limits: Limits) -> None:
    if count > limits.max_header_count:
        raise LimitExceededError("headers", f"more than {limits.max_header_count} extra headers")


def check_no_injection(field: str, value: str) -> None:
    """Refuse CR, LF and NUL, which would let a value start a new header."""
    if _FORBIDDEN_CHARS.search(value):
        raise HeaderInjectionError(field, "must not contain CR, LF or NUL characters")


@lru_cache(maxsize=65536)
def _check_addr_spec(addr: str) -> str:
    """The address normalised, or `InvalidAddressError`.

    Internationalised addresses are accepted: a non-ASCII local part is sent
    with SMTPUTF8 (the job fails at delivery if the server does not offer
    it), an internationalised domain as punycode.
    """
    if _SIMPLE_ADDRESS.match(addr):
        return addr
    try:
        return validate_email(addr, check_deliverability=False, allow_smtputf8=True).normalized
    except EmailNotValidError as exc:
        raise InvalidAddressError(
            "address", f"{addr!r} is not a valid e-mail address: {exc}"
        ) from None


def parse_addresses(field: str, value: Recipients, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Split and check a comma-separated string or a list of addresses.

    Returns each address normalised as `addr` or `Display Name <addr>`.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    result: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidAddressError(field, f"expected strings, got {type(item).__name__}")
        check_no_injection(field, item)
        result.extend(_parse_one_field(field, item, limits))
    return result


def _parse_one_field(field: str, text: str, limits: Limits) -> list[str]:
    if not _NEEDS_FULL_PARSE.search(text):
        pairs = [("", part.strip()) for part in text.split(",") if part.strip()]
    else:
        pairs = getaddresses([text])
        if any(not addr for _, addr in pairs):
            raise InvalidAddressError(field, f"cannot parse addresses from {text!r}")
    out = []
    for name, addr in pairs:
        if len(addr) > limits.max_address_length:
            raise InvalidAddressError(
                field, f"address longer than {limits.max_address_length} characters"
            )
        try:
            normal = _check_addr_spec(addr)
        except InvalidAddressError as exc:
            raise InvalidAddressError(field, exc.problem) from None
        out.append(_format_address(name, normal) if name else normal)
    return out


_NEEDS_QUOTES = re.compile(r'[][\\()<>@,:;".]')


def _format_address(name: str, addr: str) -> str:
    """`Name <addr>`, quoting the name when needed but keeping it readable.

    Unlike `email.utils.formataddr`, a non-ASCII name is not RFC 2047-encoded
    here: the queue keeps what the caller wrote, and the composer encodes it.
    """
    if _NEEDS_QUOTES.search(name):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{addr}>'
    return f"{name} <{addr}>"


def _check_headers(headers: Mapping[str, str] | None, limits: Limits) -> dict[str, str] | None:
    if not headers:
        return None
    if not isinstance(headers, Mapping):
        raise ValidationError("headers", "must be a mapping of header name to value")
    check_header_count(len(headers), limits)
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValidationError("headers", "names and values must be strings")
        check_no_injection(f"header name {name!r}", name)
        check_no_injection(f"header {name}", value)
        if not _HEADER_NAME.match(name):
            raise ValidationError("headers", f"{name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(
                "headers", f"{name} is set by mailqd from the job's fields; use the argument"
            )
        checked[name] = value
    return checked


def _check_datetime(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(field, "must be a datetime")
    if value.tzinfo is None:
        raise ValidationError(field, "must be timezone-aware (e.g. datetime.now(UTC))")
    return value


def _check_text(field: str, value: str | None, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    check_body_size(field, value, limits)
    return value


def build_job(
    to: Recipients,
    subject: str,
    body: str | None = None,
    html: str | None = None,
    *,
    template_id: str | None = None,
    variables: Mapping[str, Any] | None = None,
    cc: Recipients = None,
    bcc: Recipients = None,
    reply_to: str | None = None,
    from_address: str | None = None,
    headers: Mapping[str, str] | None = None,
    priority: int = 0,
    send_after: datetime | None = None,
    expires_at: datetime | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> NewJob:
    """Check one message and return it as a `NewJob` with a fresh id."""
    to_list = parse_addresses("to", to, limits)
    cc_list = parse_addresses("cc", cc, limits)
    bcc_list = parse_addresses("bcc", bcc, limits)
    if not to_list:
        raise InvalidAddressError("to", "at least one recipient is required")
    check_recipient_count("to", len(to_list) + len(cc_list) + len(bcc_list), limits)
    reply_list = parse_addresses("reply_to", reply_to, limits)
    from_list = parse_addresses("from_address", from_address, limits)
    if len(from_list) > 1:
        raise InvalidAddressError("from_address", "exactly one sender address is allowed")

    if not isinstance(subject, str):
        raise ValidationError("subject", f"must be a string, got {type(subject).__name__}")
    check_no_injection("subject", subject)
    check_subject_length(subject, limits)
    body = _check_text("body", body, limits)
    html = _check_text("html", html, limits)
    if template_id is not None:
        check_no_injection("template_id", template_id)
    if not (body or html or template_id):
        raise MissingContentError("body", "one of body, html or template_id is required")
    if variables is not None and not isinstance(variables, Mapping):
        raise ValidationError("variables", "must be a mapping of names to values")

    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValidationError("priority", "must be an integer (higher is sent first)")
    if not -1000 <= priority <= 1000:
        raise ValidationError("priority", "must be between -1000 and 1000")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise ValidationError("max_attempts", "must be a positive integer")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255
    ):
        raise ValidationError("idempotency_key", "must be a string of 1 to 255 characters")
    send_after = _check_datetime("send_after", send_after)
    expires_at = _check_datetime("expires_at", expires_at)
    if send_after and expires_at and expires_at <= send_after:
        raise ValidationError("expires_at", "must be later than send_after")

    return NewJob(
        id=new_job_id(),
        recipient_to=", ".join(to_list),
        subject=subject,
        body=body,
        html=html,
        template_id=template_id,
        variables=dict(variables) if variables is not None else None,
        cc=", ".join(cc_list) or None,
        bcc=", ".join(bcc_list) or None,
        reply_to=", ".join(reply_list) or None,
        from_address=from_list[0] if from_list else None,
        headers=_check_headers(headers, limits),
        priority=priority,
        send_after=send_after,
        expires_at=expires_at,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
    )
