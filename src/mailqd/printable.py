"""Text from outside shown, never obeyed: the one rule for control characters in output.

Job data (subjects, recipients, errors, server replies, template sources)
comes from applications, from plain SQL and from remote mail servers. On a
terminal a raw ESC starts a sequence that can clear the screen, set the
window title, draw a fake hyperlink or rewrite the line above; U+202E
turns the rest of a line around. So every output for people goes through
`printable`, which writes each such character as a visible escape
(`\\x1b`, `\\x9b`, `\\u202e`). JSON output keeps every value exact:
`json_safe` writes the same characters as JSON `\\u` escapes, which decode
to the original. Backslashes are not doubled: this is for reading, and
the JSON is there for the exact value.
"""

from __future__ import annotations

import re

__all__ = ["json_safe", "printable"]

# C0 but TAB and LF, DEL, C1; the bidirectional controls (U+061C, U+200E/F,
# U+202A-E, U+2066-9); invisible characters that hide text or split a word
# (U+200B, U+2060-4, U+206A-F, U+FEFF); line and paragraph separators; lone
# surrogates, which cannot even be written as UTF-8. ZWJ/ZWNJ (U+200C/D) are
# kept: scripts and emoji need them, and they move nothing on the screen.
_UNSAFE_CLASS = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ud800-\udfff"
)
_UNSAFE_MULTILINE = re.compile(f"[{_UNSAFE_CLASS}]")
_UNSAFE_ONE_LINE = re.compile(f"[\t\n{_UNSAFE_CLASS}]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, multiline: bool = False) -> str:
    """`text` with every character that could steer a terminal written as a visible escape.

    One line by default (TAB, LF and CR escaped too, so a value stays in its
    table cell); `multiline` keeps line breaks and tabs, for bodies and
    template sources, and takes CRLF as a line break.
    """
    if multiline:
        return _UNSAFE_MULTILINE.sub(_visible, text.replace("\r\n", "\n"))
    return _UNSAFE_ONE_LINE.sub(_visible, text)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_safe(dumped: str) -> str:
    """JSON text (from `json.dumps(..., ensure_ascii=False)`) with the unsafe characters as `\\u`.

    Outside strings JSON is plain ASCII, so every such character is inside
    a string, where `\\uXXXX` decodes to exactly that character.
    """
    return _UNSAFE_MULTILINE.sub(_json_escape, dumped)
