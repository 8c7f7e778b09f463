"""HTML to plain text, for the text/plain alternative of a message that only has HTML."""

from __future__ import annotations

import re
from functools import lru_cache
from html.parser import HTMLParser

from mailqd.compose.sanitize import CACHED_UP_TO

__all__ = ["html_to_text", "text_of_html"]

_WHITESPACE_RUN = re.compile(r"\s+")


def text_of_html(html: str) -> str:
    """`html_to_text`, cached for the bodies `sanitize_html` caches (mail to many, same html)."""
    if len(html) <= CACHED_UP_TO:
        return _cached_html_to_text(html)
    return html_to_text(html)


def html_to_text(html: str) -> str:
    """A readable plain-text rendering of an HTML body, for the text/plain alternative.

    Not a full renderer: it drops scripts, styles and the head, turns block
    elements into line breaks, list items into dashes, and keeps link targets
    after their text, which is what a text-only reader needs.
    """
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text()


@lru_cache(maxsize=256)
def _cached_html_to_text(html: str) -> str:
    return html_to_text(html)


class _TextExtractor(HTMLParser):
    """Collects text, asking for line breaks around blocks; the largest pending break wins."""

    _BLOCK = frozenset(
        {
            "address", "article", "aside", "br", "dd", "div", "dl", "dt", "fieldset",
            "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav",
            "ol", "pre", "section", "tr", "ul",
        }
    )  # fmt: skip
    _PARAGRAPH = frozenset({"blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "p", "table"})
    _SKIP = frozenset({"head", "script", "style", "template", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        self._pending_breaks = 0
        self._skip_depth = 0
        self._pre_depth = 0
        self._links: list[tuple[str | None, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_for(tag)
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag == "pre":
            self._pre_depth += 1
        elif tag == "li":
            self._write("- ")
        elif tag == "a":
            self._links.append((dict(attrs).get("href"), len(self._chunks)))
        elif tag == "img":
            self._write(dict(attrs).get("alt") or "")
        elif tag in ("td", "th"):
            self._write(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self._BLOCK:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        elif tag == "a" and self._links:
            self._close_link()
        self._break_for(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = _WHITESPACE_RUN.sub(" ", data)
            if data == " " and (self._pending_breaks or not self._chunks):
                return
        self._write(data)

    def _break_for(self, tag: str) -> None:
        if tag in self._PARAGRAPH:
            self._pending_breaks = max(self._pending_breaks, 2)
        elif tag in self._BLOCK:
            self._pending_breaks = max(self._pending_breaks, 1)

    def _write(self, text: str) -> None:
        if not text:
            return
        if self._pending_breaks and self._chunks:
            self._chunks.append("\n" * self._pending_breaks)
        self._pending_breaks = 0
        self._chunks.append(text)

    def _close_link(self) -> None:
        href, start = self._links.pop()
        if not href or href.startswith("#"):
            return
        target = href.removeprefix("mailto:")
        label = "".join(self._chunks[start:]).strip()
        if target != label:
            self._write(f" ({target})" if label else target)

    def text(self) -> str:
        lines = (line.strip() for line in "".join(self._chunks).split("\n"))
        return "\n".join(lines).strip() + "\n"
