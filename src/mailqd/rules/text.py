"""Rules on text from a job: what no field may hold, whoever wrote the row.

PostgreSQL cannot store NUL in text, UTF-8 cannot encode a lone surrogate,
and CR or LF in a header value would start a new header. Each check is
cheap on the common case: `str.isascii` is constant time in CPython, so
ASCII text never meets the surrogate regex.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mailqd.errors import HeaderInjectionError, ValidationError

__all__ = ["check_header_text", "check_json_text", "check_text"]

_LINE_BREAK_OR_NUL = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(field: str, value: str) -> None:
    """Refuse NUL and lone surrogates (a body, a key, a template id)."""
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise ValidationError(field, "is not valid Unicode text (lone surrogate)")


def check_header_text(field: str, value: str) -> None:
    """Refuse CR, LF and NUL, which would let a value start a new header, and lone surrogates."""
    if _LINE_BREAK_OR_NUL.search(value):
        raise HeaderInjectionError(field, "must not contain CR, LF or NUL characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise ValidationError(field, "is not valid Unicode text (lone surrogate)")


def check_json_text(field: str, value: object) -> None:
    """Check every string in a JSON-like value, keys included, at any depth.

    Iterative, so a deeply nested value cannot exhaust the stack. The
    error says where the bad string is (keys escaped as ASCII), never what
    it holds: variables can be secrets.
    """
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            _check_at(field, path or "the value", item)
        elif isinstance(item, Mapping):
            for key, child in item.items():
                where = f"{path}[{str(key)[:40]!a}]"
                if isinstance(key, str):
                    _check_at(field, f"the key of {where}", key)
                stack.append((where, child))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))


def _check_at(field: str, where: str, text: str) -> None:
    if "\x00" in text:
        raise ValidationError(field, f"{where} contains a NUL character")
    if not text.isascii() and _SURROGATE.search(text):
        raise ValidationError(field, f"{where} is not valid Unicode text (lone surrogate)")
