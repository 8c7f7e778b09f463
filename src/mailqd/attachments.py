"""Attachments: what an application hands `enqueue(..., attachments=[...])`.

`Attachment` is plain data shared by the client (which checks and stores
it out of the `email_queue` row, `mailqd.store`), the worker (which reads
a job's attachments back) and the composer (which builds the MIME parts).
The checks (sizes, counts, file names) are `mailqd.rules`'s, like every
other message rule.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CONTENT_TYPE", "Attachment", "content_type_of"]

DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file attached to a message.

    `content_type` is guessed from `filename` when not given (else
    `application/octet-stream`). `inline=True` with a `content_id` makes a
    part of a `multipart/related` the HTML refers to as `cid:<content_id>`.
    """

    filename: str
    content: bytes = field(repr=False)
    content_type: str | None = None
    inline: bool = False
    content_id: str | None = None

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        content_type: str | None = None,
        *,
        inline: bool = False,
        content_id: str | None = None,
        filename: str | None = None,
    ) -> Attachment:
        """The file's bytes, named by its base name unless `filename` says otherwise."""
        source = Path(path)
        return cls(
            filename=filename if filename is not None else source.name,
            content=source.read_bytes(),
            content_type=content_type,
            inline=inline,
            content_id=content_id,
        )

    @classmethod
    def coerce(cls, value: Any) -> Attachment:
        """An `Attachment`, or a Django-style `(filename, content, mimetype)` tuple.

        `content` may be `str` (encoded as UTF-8). Anything else raises
        `TypeError`; the values themselves are checked by `mailqd.rules`.
        """
        if isinstance(value, Attachment):
            return value
        if isinstance(value, tuple | list) and len(value) in (2, 3):
            filename, content, *rest = value
            if isinstance(content, str):
                content = content.encode("utf-8")
            return cls(filename=filename, content=content, content_type=rest[0] if rest else None)
        raise TypeError(
            "an attachment is an Attachment or a (filename, content, mimetype) tuple, "
            f"not {type(value).__name__}"
        )

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def resolved_content_type(self) -> str:
        return content_type_of(self.filename, self.content_type)


def content_type_of(filename: str, content_type: str | None) -> str:
    """The given content type, else the one the file name suggests, else octet-stream."""
    if content_type:
        return content_type
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or DEFAULT_CONTENT_TYPE
