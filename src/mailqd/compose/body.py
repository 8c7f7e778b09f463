"""The body of a message: text/plain, or multipart/alternative when there is HTML.

The common shapes are written out directly as bytes (the stdlib `email`
generator is an order of magnitude slower, and composing is on the delivery
hot path). Each text part is sent 7bit when it can be, else quoted-printable,
or base64 when more than a fifth of it is 8-bit.
"""

from __future__ import annotations

import base64
import binascii
import os

from mailqd.compose.headers import CRLF
from mailqd.compose.html_text import text_of_html
from mailqd.compose.sanitize import sanitize_html
from mailqd.errors import MissingContentError, ValidationError
from mailqd.rules import MAX_LINE_LENGTH

__all__ = ["encode_body", "new_boundary"]

QP_SHARE_LIMIT = 0.2  # above this share of 8-bit bytes, base64 beats quoted-printable

_HIGH_BYTES = bytes(range(128, 256))


def encode_body(text: str | None, html: str | None) -> tuple[list[str], bytes]:
    """Return the top-level content headers and the encoded body.

    text only: text/plain. Any html: multipart/alternative with a plain-text
    part first (generated from the html when the job has none), as clients
    show the last alternative they understand. The html is sanitized first,
    and the generated text comes from what is left of it.
    """
    if html is None:
        if text is None:
            raise MissingContentError("body", "the message has neither a body nor html")
        headers, body = _encode_text_part(text, "plain")
        return headers, body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    html = sanitize_html(html)
    if text is None:
        text = text_of_html(html)
    text_headers, text_body = _encode_text_part(text, "plain")
    html_headers, html_body = _encode_text_part(html, "html")
    boundary = new_boundary(text_body, html_body)
    delimiter = f"--{boundary}".encode("ascii")
    body = b"".join(
        (
            delimiter + b"\r\n",
            _part(text_headers, text_body),
            b"\r\n" + delimiter + b"\r\n",
            _part(html_headers, html_body),
            b"\r\n" + delimiter + b"--\r\n",
        )
    )
    return [f'Content-Type: multipart/alternative; boundary="{boundary}"'], body


def _part(headers: list[str], body: bytes) -> bytes:
    """A body part; the CRLF after it belongs to the next boundary (RFC 2046 5.1.1)."""
    return (CRLF.join(headers) + CRLF + CRLF).encode("ascii") + body


def new_boundary(*parts: bytes) -> str:
    """A random boundary; `=_` never occurs in quoted-printable or base64 output."""
    while True:
        boundary = f"=_mailqd_{os.urandom(12).hex()}"
        encoded = boundary.encode("ascii")
        if not any(encoded in part for part in parts):
            return boundary


def _encode_text_part(text: str, subtype: str) -> tuple[list[str], bytes]:
    """Encode a text body: 7bit when it can be sent as is, else QP or base64.

    Whether the text ends with a line break is kept: the caller adds the CRLF
    that a following boundary (or the end of the message) needs.
    """
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        raw = normalized.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            "body" if subtype == "plain" else "html", "is not valid Unicode text (lone surrogate)"
        ) from None
    if _is_7bit(raw):
        cte, body = "7bit", raw.replace(b"\n", b"\r\n")
    elif _share_of_8bit(raw) > QP_SHARE_LIMIT:
        canonical = raw.replace(b"\n", b"\r\n")  # RFC 2045: CRLF before base64
        cte, body = "base64", base64.encodebytes(canonical).replace(b"\n", b"\r\n")
    else:
        qp = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
        cte, body = "quoted-printable", qp.replace(b"\n", b"\r\n")
    headers = [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        f"Content-Transfer-Encoding: {cte}",
    ]
    return headers, body


def _is_7bit(raw: bytes) -> bool:
    if not raw.isascii():
        return False
    if len(raw) <= MAX_LINE_LENGTH:
        return True
    return max(map(len, raw.split(b"\n"))) <= MAX_LINE_LENGTH


def _share_of_8bit(raw: bytes) -> float:
    if not raw:
        return 0.0
    return (len(raw) - len(raw.translate(None, _HIGH_BYTES))) / len(raw)
