"""Messages with attachments: multipart/mixed, multipart/related, base64 parts, one buffer.

The shape, the one mail clients expect:

    multipart/mixed                       (only when there are attachments proper)
      multipart/related                   (only when the HTML has inline parts)
        text/plain, or multipart/alternative (text/plain, text/html)
        inline parts (Content-ID, Content-Disposition: inline)
      attachment parts (Content-Disposition: attachment)

Inline parts go beside the HTML that refers to them as `cid:<content_id>`;
without HTML they are plain parts of the multipart/mixed (disposition
inline, Content-ID kept).

Memory: a message with a 20 MB attachment is about 27 MB of base64. The
whole message is written into one `BytesIO` (its `getvalue()` hands the
buffer over without a copy), each attachment encoded a few dozen lines at a
time, so composing holds the attachments plus the encoded message and no
further whole-message copy (figures in docs/performance.md, "Attachments").

File names: plain ASCII names up to `SIMPLE_NAME_LENGTH` characters are
written as `filename="..."`; any other name is written RFC 2231-encoded
(`filename*=utf-8''...`, split into `filename*0*`, `filename*1*`, ...
continuations so no line is long), followed by an ASCII `filename="..."`
fallback for the few clients that ignore RFC 2231. The same goes for the
`name` parameter of Content-Type, which older clients read instead.

The attachments come from the store, and a row inserted with plain SQL may
hold anything: what cannot be written safely (a content type or
Content-ID with characters that would break the header, a file name with
control characters) raises `ValidationError` naming the field. The
policy on attachments (sizes, counts, what a name may be) is
`mailqd.rules`'s, checked before this.
"""

from __future__ import annotations

import base64
import io
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from mailqd.attachments import Attachment
from mailqd.compose.body import encode_body, new_boundary
from mailqd.compose.headers import CRLF
from mailqd.errors import ValidationError

__all__ = ["BASE64_LINE_BYTES", "AttachmentBody", "write_base64"]

BASE64_LINE_BYTES = 57  # encodes to one 76-character line, RFC 2045's limit
_LINES_PER_CHUNK = 2048  # ~117 KB of content encoded at a time
SIMPLE_NAME_LENGTH = 60
_SEGMENT_LENGTH = 60  # characters of an RFC 2231 continuation value

_FIELD = "attachments"
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE = re.compile(
    rf"({_TOKEN})/({_TOKEN})((?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\\x00-\x1f\x7f]*\"))*)\s*\Z"
)
_CONTENT_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+\Z")  # printable ASCII but < and >
_SIMPLE_NAME = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+\Z")  # printable ASCII but " and \
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ATTR_SAFE = "!#$&+-.^_`|~"  # RFC 2231 attribute-char, besides letters and digits
_PERCENT_TOKEN = re.compile(r"%[0-9A-F]{2}|.")


@dataclass(frozen=True, slots=True)
class _Part:
    headers: str  # the part's header lines, each ending in CRLF, then the blank line
    content: bytes | bytearray | memoryview


class AttachmentBody:
    """The content headers and body of a message with attachments (see module doc).

    `headers` are the top-level lines (Content-Type with the boundary);
    `write(out)` writes the body after them.
    """

    def __init__(self, text: str | None, html: str | None, attachments: Sequence[Attachment]):
        parts = [_attachment_part(index, a) for index, a in enumerate(attachments)]
        inline = [p for p, a in zip(parts, attachments, strict=True) if a.inline]
        attached = [p for p, a in zip(parts, attachments, strict=True) if not a.inline]
        if html is None:  # nothing to be inline in: every part goes in the mixed
            inline, attached = [], parts
        headers, body = encode_body(text, html)
        self._text = (headers, body)
        self._related = new_boundary(body) if inline else None
        self._mixed = new_boundary(body) if attached else None
        self._inline = inline
        self._attached = attached
        if self._mixed is not None:
            self.headers = [_multipart("mixed", self._mixed)]
        elif self._related is not None:
            self.headers = [_related_header(self._related, headers)]
        else:
            self.headers = headers

    def write(self, out: io.BytesIO) -> None:
        text_headers, text_body = self._text
        if self._mixed is None and self._related is None:
            out.write(text_body)
            return
        if self._mixed is not None:
            out.write(b"--" + self._mixed.encode("ascii") + b"\r\n")
            if self._related is not None:
                out.write((_related_header(self._related, text_headers) + CRLF + CRLF).encode())
        if self._related is not None:
            out.write(b"--" + self._related.encode("ascii") + b"\r\n")
            out.write(_lines(text_headers).encode("ascii") + text_body)
            for part in self._inline:
                _write_part(out, self._related, part)
            out.write(b"\r\n--" + self._related.encode("ascii") + b"--\r\n")
        else:
            out.write(_lines(text_headers).encode("ascii") + text_body)
        if self._mixed is not None:
            for part in self._attached:
                _write_part(out, self._mixed, part)
            out.write(b"\r\n--" + self._mixed.encode("ascii") + b"--\r\n")


def write_base64(out: io.BytesIO, content: bytes | bytearray | memoryview) -> None:
    """Write `content` as base64 in CRLF-ended lines of 76 characters (RFC 2045 6.8).

    Encoded a chunk at a time, so only one chunk's encoding is held beside
    the output.
    """
    view = memoryview(content).cast("B")
    step = BASE64_LINE_BYTES * _LINES_PER_CHUNK
    for start in range(0, len(view), step):
        encoded = base64.encodebytes(view[start : start + step])
        out.write(encoded.replace(b"\n", b"\r\n"))


def _write_part(out: io.BytesIO, boundary: str, part: _Part) -> None:
    """A following part: CRLF, the delimiter, headers, base64 content (ends with CRLF)."""
    out.write(b"\r\n--" + boundary.encode("ascii") + b"\r\n")
    out.write(part.headers.encode("ascii"))
    write_base64(out, part.content)


def _lines(headers: list[str]) -> str:
    return CRLF.join(headers) + CRLF + CRLF


def _multipart(subtype: str, boundary: str) -> str:
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"'


def _related_header(boundary: str, inner_headers: list[str]) -> str:
    """multipart/related; its `type` is the root part's (RFC 2387), the first one."""
    root = inner_headers[0].split(":", 1)[1].split(";", 1)[0].strip()
    return f'Content-Type: multipart/related; type="{root}";{CRLF} boundary="{boundary}"'


def _attachment_part(index: int, attachment: Attachment) -> _Part:
    """The headers of one attachment's part, its content checked to be bytes."""
    field = f"{_FIELD}[{index}]"
    if not isinstance(attachment, Attachment):
        raise ValidationError(field, f"must be an Attachment, not {type(attachment).__name__}")
    content = attachment.content
    if not isinstance(content, bytes | bytearray | memoryview):
        raise ValidationError(f"{field}.content", f"must be bytes, not {type(content).__name__}")
    filename = _checked_filename(f"{field}.filename", attachment.filename)
    content_type = _checked_content_type(f"{field}.content_type", attachment)
    disposition = "inline" if attachment.inline else "attachment"
    lines = [
        f"Content-Type: {content_type}" + _filename_params("name", filename),
        f"Content-Disposition: {disposition}" + _filename_params("filename", filename),
        "Content-Transfer-Encoding: base64",
    ]
    if attachment.content_id is not None:
        lines.append(f"Content-ID: <{_checked_content_id(f'{field}.content_id', attachment)}>")
    return _Part(_lines(lines), content)


def _checked_filename(field: str, filename: object) -> str:
    if not isinstance(filename, str):
        raise ValidationError(field, f"must be text, not {type(filename).__name__}")
    if not filename.strip():
        raise ValidationError(field, "is empty")
    if _CONTROL.search(filename):
        raise ValidationError(field, "holds control characters")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "is not valid Unicode text (lone surrogate)") from None
    return filename


def _checked_content_type(field: str, attachment: Attachment) -> str:
    given = attachment.content_type
    if given is not None and not isinstance(given, str):
        raise ValidationError(field, f"must be text, not {type(given).__name__}")
    content_type = attachment.resolved_content_type.strip()
    match = _CONTENT_TYPE.match(content_type)
    if match is None:
        raise ValidationError(field, f"{content_type[:80]!r} is not a MIME type like image/png")
    if match.group(1).lower() == "multipart":
        raise ValidationError(field, "an attachment cannot be multipart/*")
    return content_type


def _checked_content_id(field: str, attachment: Attachment) -> str:
    content_id = attachment.content_id
    if not isinstance(content_id, str):
        raise ValidationError(field, f"must be text, not {type(content_id).__name__}")
    bare = content_id.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if not _CONTENT_ID.match(bare) or len(bare) > 250:
        raise ValidationError(
            field, "must be up to 250 printable ASCII characters, without spaces, < or >"
        )
    return bare


def _filename_params(param: str, filename: str) -> str:
    """`; name="..."`, or the RFC 2231 form with an ASCII fallback (see module doc)."""
    if len(filename) <= SIMPLE_NAME_LENGTH and _SIMPLE_NAME.match(filename):
        return f'; {param}="{filename}"'
    encoded = quote(filename, safe=_ATTR_SAFE, encoding="utf-8")
    segments = _segments(encoded)
    if len(segments) == 1:
        params = [f"{param}*=utf-8''{segments[0]}"]
    else:
        params = [f"{param}*0*=utf-8''{segments[0]}"]
        params += [f"{param}*{n}*={segment}" for n, segment in enumerate(segments[1:], 1)]
    params.append(f'{param}="{_ascii_fallback(filename)}"')
    return ";" + ";".join(f"{CRLF} {p}" for p in params)


def _segments(encoded: str) -> list[str]:
    """Split a percent-encoded value into pieces of at most ~60 characters, never in an escape."""
    segments: list[str] = []
    current = ""
    for token in _PERCENT_TOKEN.findall(encoded):
        if len(current) + len(token) > _SEGMENT_LENGTH:
            segments.append(current)
            current = ""
        current += token
    segments.append(current)
    return segments


def _ascii_fallback(filename: str) -> str:
    """An ASCII look-alike of the name (accents dropped), its extension kept, for old clients."""
    decomposed = unicodedata.normalize("NFKD", filename)
    ascii_name = "".join(c if _SIMPLE_NAME.match(c) else "_" for c in decomposed if c.isascii())
    stem, dot, extension = ascii_name.rpartition(".")
    if not dot or len(extension) > 10:
        stem, extension = ascii_name, ""
    stem = stem.strip(" _") or "attachment"
    suffix = f".{extension}" if extension else ""
    return stem[: SIMPLE_NAME_LENGTH - len(suffix)] + suffix
