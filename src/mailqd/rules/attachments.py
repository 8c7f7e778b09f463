"""Rules on a message's attachments: how many, how big, and what their names may hold.

Applied by the client before anything is written and by the worker to what
it reads back at claim (a row written by plain SQL never met the client),
so both sides refuse the same attachment with the same message. The check
takes anything shaped like an attachment (`mailqd.Attachment`, or the
store's `AttachmentInfo`, which has a `size` but no content): the claim
can judge sizes and names without reading any content.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from mailqd.errors import LimitExceededError, ValidationError
from mailqd.rules.limits import Limits

__all__ = [
    "MAX_CONTENT_ID_LENGTH",
    "MAX_FILENAME_LENGTH",
    "AttachmentLike",
    "check_attachments",
    "check_content_id",
    "check_content_type",
    "check_filename",
]

MAX_FILENAME_LENGTH = 255  # what file systems hold in one name
MAX_CONTENT_ID_LENGTH = 250  # a Content-ID header line stays well under 998

# Controls (C0, DEL, C1), the path separators of both worlds, and the
# bidirectional controls that make "invoice\u202efdp.exe" read as "invoiceexe.pdf".
_NOT_IN_FILENAME = re.compile("[\x00-\x1f\x7f-\x9f/\\\\\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# RFC 2045 token characters: printable ASCII minus space and tspecials.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
# An addr-spec-like `local@domain`, or one plain token: printable ASCII,
# no whitespace, no `<>` (the header adds them), nothing that ends a header.
_ID_PART = r"[!#$%&'*+\-./0-9=?A-Z^_`a-z{|}~]+"
_CONTENT_ID = re.compile(rf"{_ID_PART}(?:@{_ID_PART})?")


class AttachmentLike(Protocol):
    """What the rules read of an attachment (`mailqd.Attachment` and `AttachmentInfo` have it)."""

    @property
    def filename(self) -> str: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def inline(self) -> bool: ...

    @property
    def content_id(self) -> str | None: ...


def check_attachments(attachments: Sequence[AttachmentLike], limits: Limits) -> None:
    """Raise a `ValidationError` subclass naming the first attachment out of the rules.

    The field reads `attachments[2].filename`; counts and the total size
    are `LimitExceededError`s naming their config key. An object with a
    `content` attribute must hold bytes there; one without (the store's
    `AttachmentInfo`) is judged by its `size`.
    """
    if len(attachments) > limits.max_attachments:
        raise LimitExceededError(
            "attachments", f"more than {limits.max_attachments} attachments (max_attachments)"
        )
    total = 0
    for index, attachment in enumerate(attachments):
        where = f"attachments[{index}]"
        total += _size(where, attachment)
        if total > limits.max_attachment_bytes:
            raise LimitExceededError(
                "attachments",
                f"larger than {limits.max_attachment_bytes} bytes in all (max_attachment_bytes)",
            )
        check_filename(f"{where}.filename", attachment.filename)
        if attachment.content_type is not None:
            check_content_type(f"{where}.content_type", attachment.content_type)
        if not isinstance(attachment.inline, bool):
            raise ValidationError(f"{where}.inline", "must be True or False")
        if attachment.content_id is not None:
            check_content_id(f"{where}.content_id", attachment.content_id)
        elif attachment.inline:
            raise ValidationError(
                f"{where}.content_id", "is required for an inline attachment (the HTML's cid:)"
            )


def _size(where: str, attachment: Any) -> int:
    if hasattr(attachment, "content"):
        content = attachment.content
        if content is None:
            raise ValidationError(
                f"{where}.content", "has no content (no mailqd_blobs row has its blob_sha256)"
            )
        if not isinstance(content, bytes | bytearray):
            kind = type(content).__name__
            raise ValidationError(f"{where}.content", f"must be bytes, not {kind}")
        return len(content)
    size = attachment.size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValidationError(f"{where}.size", "must be a whole number of bytes")
    return size


def check_filename(field: str, value: object) -> None:
    """A bare file name: no path, no control characters, not empty, `.` or `..`, ≤ 255 chars."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    if value.strip() in ("", ".", ".."):
        raise ValidationError(field, "must be a file name, not empty, '.' or '..'")
    if len(value) > MAX_FILENAME_LENGTH:
        raise ValidationError(field, f"longer than {MAX_FILENAME_LENGTH} characters")
    found = _NOT_IN_FILENAME.search(value)
    if found is not None:
        what = "a path separator" if found.group() in "/\\" else "a control character"
        raise ValidationError(field, f"must be a bare file name, without {what}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(field, "is not valid Unicode text (lone surrogate)") from None


def check_content_type(field: str, value: object) -> None:
    """A MIME `type/subtype` of RFC 2045 tokens, no parameters (`application/pdf`)."""
    if not isinstance(value, str) or not _CONTENT_TYPE.fullmatch(value) or len(value) > 255:
        raise ValidationError(field, "must be a MIME type such as application/pdf")


def check_content_id(field: str, value: object) -> None:
    """`local@domain` or one token, printable ASCII, no `<>` or whitespace, ≤ 250 characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    if len(value) > MAX_CONTENT_ID_LENGTH:
        raise ValidationError(field, f"longer than {MAX_CONTENT_ID_LENGTH} characters")
    if not _CONTENT_ID.fullmatch(value):
        raise ValidationError(
            field,
            "must be local@domain or one word of printable ASCII, without <>, spaces or "
            "control characters (the HTML refers to it as cid:...)",
        )
