"""Checks a message before anything is written, and turns it into a `NewJob`.

Every entry point (the client library, `mailqctl enqueue`) goes through
`build_job`, and the rules it applies are those of `mailqd.rules`, the same
the daemon applies to each row it sends. A bad message raises a
`mailqd.errors.ValidationError` subclass naming the field and the problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from mailqd.attachments import Attachment
from mailqd.errors import InvalidAddressError, MissingContentError, ValidationError
from mailqd.ids import new_job_id
from mailqd.models import NewJob
from mailqd.rules import (
    DEFAULT_LIMITS,
    MAX_ADDRESS_LENGTH,
    RESERVED_HEADERS,
    Address,
    Limits,
    check_attachments,
    check_body_size,
    check_extra_headers,
    check_header_text,
    check_idempotency_key,
    check_json_text,
    check_max_attempts,
    check_priority,
    check_recipient_count,
    check_subject_length,
    check_text,
    check_timestamp,
    parse_recipients,
)

__all__ = [
    "DEFAULT_LIMITS",
    "RESERVED_HEADERS",
    "Limits",
    "Recipients",
    "build_job",
    "coerce_attachments",
    "parse_addresses",
]

Recipients = str | Iterable[str] | None


def parse_addresses(field: str, value: Recipients, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Split and check a comma-separated string or a list of addresses.

    Returns each address as the queue stores it: `addr` or `Display Name <addr>`.
    """
    return [address.written() for address in _addresses(field, value, limits)]


def _addresses(field: str, value: Recipients, limits: Limits) -> list[Address]:
    found = parse_recipients(field, value)
    if limits.max_address_length >= MAX_ADDRESS_LENGTH:  # the parser's own limit
        return found
    for address in found:
        if len(address.envelope) > limits.max_address_length:
            raise InvalidAddressError(
                field, f"an address is longer than {limits.max_address_length} characters"
            )
    return found


def _check_text(field: str, value: object, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    check_text(field, value)
    check_body_size(field, value, limits)
    return value


def coerce_attachments(value: object, limits: Limits = DEFAULT_LIMITS) -> tuple[Attachment, ...]:
    """`Attachment`s and `(filename, content, mimetype)` tuples, checked, as `Attachment`s."""
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValidationError(
            "attachments", "must be a list of Attachment or (filename, content, mimetype)"
        )
    found: list[Attachment] = []
    for index, item in enumerate(value):
        try:
            found.append(Attachment.coerce(item))
        except TypeError as exc:
            raise ValidationError(f"attachments[{index}]", str(exc)) from None
    check_attachments(found, limits)
    return tuple(found)


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
    attachments: Iterable[Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> NewJob:
    """Check one message and return it as a `NewJob` with a fresh id.

    `attachments`: `Attachment`s or Django-style `(filename, content,
    mimetype)` tuples (`coerce_attachments`).
    """
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
    check_header_text("subject", subject)
    check_subject_length(subject, limits)
    body = _check_text("body", body, limits)
    html = _check_text("html", html, limits)
    if template_id is not None:
        if not isinstance(template_id, str):
            raise ValidationError("template_id", "must be a string")
        check_header_text("template_id", template_id)
    if not (body or html or template_id):
        raise MissingContentError("body", "one of body, html or template_id is required")
    if variables is not None:
        if not isinstance(variables, Mapping):
            raise ValidationError("variables", "must be a mapping of names to values")
        check_json_text("variables", variables)

    priority = check_priority(priority)
    max_attempts = check_max_attempts(max_attempts)
    idempotency_key = check_idempotency_key(idempotency_key)
    send_after = check_timestamp("send_after", send_after)
    expires_at = check_timestamp("expires_at", expires_at)
    if send_after and expires_at and expires_at <= send_after:
        raise ValidationError("expires_at", "must be later than send_after")
    files = coerce_attachments(attachments, limits)

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
        headers=check_extra_headers(headers, limits),
        priority=priority,
        send_after=send_after,
        expires_at=expires_at,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        attachments=files,
    )
