"""Sanitize HTML bodies before they are sent: the one rule for every HTML part.

The HTML of a job may come from anyone who can write to the queue (an
application, a template, a row inserted with plain SQL), and mail clients
differ in what they run. So every HTML part goes through `sanitize_html`
when the message is composed: scripts and styles are removed with their
content, as are event-handler attributes (`onclick`, ...) and URLs with
schemes other than http, https, mailto, tel and cid (`javascript:`,
`vbscript:`, `data:`). Formatting, tables, images and links are kept; links
get `rel="noopener noreferrer"`.

It uses nh3 (the Rust ammonia sanitizer): an allow-list parser, not
pattern matching, so markup tricks cannot smuggle a script past it. Its cost
per body is in docs/performance.md; bodies up to 32 KB are cached, so mail
sent to many recipients with the same HTML is sanitized once per worker.
"""

from __future__ import annotations

from functools import lru_cache

import nh3

__all__ = ["sanitize_html"]

CACHED_UP_TO = 32 * 1024  # characters; 256 entries of this size are at most ~24 MB

URL_SCHEMES = frozenset({"http", "https", "mailto", "tel", "cid"})

_TAGS = frozenset(nh3.ALLOWED_TAGS | {"font", "tfoot"})
# Removed together with what they contain; a <title> would otherwise become body text.
_DROPPED_WITH_CONTENT = frozenset({"script", "style", "title"})
_TABLE_LAYOUT = frozenset(
    {"align", "valign", "width", "height", "bgcolor", "border", "cellpadding", "cellspacing"}
)
_ATTRIBUTES: dict[str, set[str]] = {
    tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()
}
for _tag in ("table", "thead", "tbody", "tfoot", "tr", "td", "th"):
    _ATTRIBUTES.setdefault(_tag, set()).update(_TABLE_LAYOUT)
_ATTRIBUTES.setdefault("img", set()).update({"border", "title"})
_ATTRIBUTES.setdefault("font", set()).update({"color", "face", "size"})
_ATTRIBUTES["*"] = {"class", "dir", "lang", "title", "style"}
# Inline styles are how mail is formatted; only properties that cannot load
# anything or cover the page are kept (no url(), no position, no behaviour).
_STYLE_PROPERTIES = frozenset(
    {
        "background-color", "border", "border-bottom", "border-collapse", "border-color",
        "border-left", "border-radius", "border-right", "border-spacing", "border-style",
        "border-top", "border-width", "color", "display", "font", "font-family", "font-size",
        "font-style", "font-weight", "height", "letter-spacing", "line-height", "list-style-type",
        "margin", "margin-bottom", "margin-left", "margin-right", "margin-top", "max-width",
        "min-width", "padding", "padding-bottom", "padding-left", "padding-right", "padding-top",
        "text-align", "text-decoration", "text-transform", "vertical-align", "white-space",
        "width", "word-break",
    }
)  # fmt: skip

_CLEANER = nh3.Cleaner(
    tags=set(_TAGS),
    clean_content_tags=set(_DROPPED_WITH_CONTENT),
    attributes=_ATTRIBUTES,
    url_schemes=set(URL_SCHEMES),
    filter_style_properties=set(_STYLE_PROPERTIES),
    strip_comments=True,
)


def sanitize_html(html: str) -> str:
    """The HTML with everything that could run, load a script or phone home by scheme removed.

    Whole documents are accepted; what comes back is the body's markup (the
    head, with its title and styles, is dropped).
    """
    if len(html) <= CACHED_UP_TO:
        return _clean_cached(html)
    return _CLEANER.clean(html)


@lru_cache(maxsize=256)
def _clean_cached(html: str) -> str:
    return _CLEANER.clean(html)
