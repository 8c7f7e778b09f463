"""Size and range limits on a message, the same at enqueue and when the daemon sends.

The configurable ones live in `Limits` (the `max_*` config keys); the
others are bounds of the formats and the databases: integer columns are
SQL int4 and kept to a sane range, timestamps to years that both databases
and Python can hold whatever the session TimeZone (a time in year 9999
east of UTC is year 10000 in UTC, which no claim can read back).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mailqd.errors import LimitExceededError, ValidationError
from mailqd.rules.text import check_text

if TYPE_CHECKING:
    from mailqd.config import Settings

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_ATTEMPTS_RANGE",
    "PRIORITY_RANGE",
    "Limits",
    "check_body_size",
    "check_idempotency_key",
    "check_max_attempts",
    "check_priority",
    "check_recipient_count",
    "check_subject_length",
    "check_timestamp",
]

PRIORITY_RANGE = (-1000, 1000)
MAX_ATTEMPTS_RANGE = (1, 1000)
YEAR_RANGE = (1, 9998)
MAX_IDEMPOTENCY_KEY_LENGTH = 255  # the column is VARCHAR(255)


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
    max_header_bytes: int = 32 * 1024
    """Extra headers in all: names, values and their `: ` and CRLF."""
    max_attachments: int = 100
    max_attachment_bytes: int = 25 * 1024 * 1024
    """The content of all of one message's attachments together (the big providers' limit)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_recipients=settings.max_recipients,
            max_subject_length=settings.max_subject_length,
            max_body_bytes=settings.max_body_bytes,
            max_attachments=settings.max_attachments,
            max_attachment_bytes=settings.max_attachment_bytes,
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


def _integer(field: str, value: object, low: int, high: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer{meaning}, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low} and {high}{meaning}, got {value}")
    return value


def check_priority(value: object) -> int:
    low, high = PRIORITY_RANGE
    return _integer("priority", value, low, high, " (higher is sent first)")


def check_max_attempts(value: object) -> int | None:
    """None means the daemon's `max_attempts` setting."""
    if value is None:
        return None
    low, high = MAX_ATTEMPTS_RANGE
    return _integer("max_attempts", value, low, high, "")


def check_timestamp(field: str, value: object) -> datetime | None:
    """A timezone-aware datetime whose UTC year both databases and Python can hold."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(field, f"must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(field, "must be timezone-aware (e.g. datetime.now(UTC))")
    low, high = YEAR_RANGE
    try:
        year = value.astimezone(UTC).year
    except OverflowError:
        year = 0
    if not low <= year <= high:
        raise ValidationError(field, f"must be between the years {low} and {high} in UTC")
    return value


def check_idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ValidationError(
            "idempotency_key",
            f"must be a string of 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
        )
    check_text("idempotency_key", value)
    return value
