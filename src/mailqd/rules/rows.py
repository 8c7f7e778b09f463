"""The rules applied to a claimed row before anything is done with it.

A row written by plain SQL never met the client's checks. Each column the
daemon reads is judged here by the same functions the client uses, so a row
the client would have refused fails at its first attempt with an error
naming the column, instead of being sent half-checked or crashing a step
further on. The address, header and body columns are judged by the
composer (`mailqd.compose`), which calls the same rules again.
"""

from __future__ import annotations

from mailqd.errors import ValidationError
from mailqd.models import Job
from mailqd.rules.headers import check_message_id
from mailqd.rules.limits import (
    check_idempotency_key,
    check_max_attempts,
    check_priority,
    check_timestamp,
)
from mailqd.rules.text import check_json_text, check_text

__all__ = ["check_claimed_row"]


def check_claimed_row(job: Job) -> None:
    """Raise `ValidationError` naming the first column of `job` that is out of the rules.

    Cheap on a row the client wrote: integer compares, and a walk over the
    variables that `str.isascii` makes constant time per ASCII string.
    """
    check_priority(job.priority)
    check_max_attempts(job.max_attempts)
    check_timestamp("expires_at", job.expires_at)
    check_idempotency_key(job.idempotency_key)
    if job.message_id is not None:
        check_message_id(job.message_id)
    if job.template_id is not None:
        _text("template_id", job.template_id)
    if job.variables is not None:
        check_json_text("variables", job.variables)


def _text(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    check_text(field, value)
