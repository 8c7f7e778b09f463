"""How large a template operation's result would be, computed before the operation runs.

Each estimate is cheap (it reads lengths and arguments, it builds
nothing) and never smaller than the result, so `mailqd.templating.sandbox` can refuse
an operation over the limit before it allocates. Sizes are characters for
strings and items for lists; integers are measured in bits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from jinja2.utils import Namespace

__all__ = [
    "FILTERS",
    "MATERIALIZING_FILTERS",
    "MAX_INT_BITS",
    "STRUCTURAL_FILTERS",
    "STR_METHODS",
    "binop_size",
    "largest_number",
    "materialized",
    "percent_size",
    "text_size",
]

MAX_INT_BITS = 100_000
"""Largest integer a template may compute with `*` or `**` (about 30,000 digits)."""

_HUGE = 1 << 62

Args = tuple[Any, ...]
Kwargs = Mapping[str, Any]
Size = tuple[int, str]
"""A size and its unit: "characters", "items" or "bits" ("" when nothing is built)."""


def text_size(value: Any, limit: int) -> int:
    """At least the length of `str(value)`, counted only up to just over `limit`.

    Containers count as `str()` would write them: a list that holds the
    same list twice counts it twice. Each distinct container is measured
    once (its size is remembered by identity), so a structure that doubles
    with each level costs one step per level, not 2**depth; a cycle (a
    `namespace()` that holds itself) counts as over the limit.
    """
    if isinstance(value, str):
        return len(value)
    if _children(value) is None:
        return _leaf_size(value)
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack = [value]
    while stack:
        item = stack[-1]
        if id(item) in sizes:
            stack.pop()
            continue
        children = _children(item) or ()
        pending = [
            c
            for c in children
            if type(c) not in _LEAVES and _children(c) is not None and id(c) not in sizes
        ]
        if pending and id(item) not in open_:
            open_.add(id(item))
            if any(id(c) in open_ for c in pending):
                return limit + 1
            stack.extend(pending)
            continue
        if pending:  # a child is still open: it is one of this item's ancestors
            return limit + 1
        total = 2 + 2 * len(children)
        for child in children:
            kind = type(child)
            if kind is str:
                total += len(child) + 4
            elif kind is int:
                total += child.bit_length() * 3 // 10 + 3
            else:
                total += sizes[id(child)] if id(child) in sizes else _leaf_size(child)
            if total > limit:
                return total
        sizes[id(item)] = total
        open_.discard(id(item))
        stack.pop()
    return sizes[id(value)]


def _children(item: Any) -> Any:
    """What a container holds (a list, a tuple, a mapping's keys and values); None for a leaf."""
    kind = type(item)
    if kind in _LEAVES:
        return None
    if kind is list or kind is tuple:
        return item
    if kind is dict:
        return [*item.keys(), *item.values()]
    if isinstance(item, str):
        return None
    if isinstance(item, list | tuple | set | frozenset):
        return list(item)
    if isinstance(item, Mapping):
        return [*item.keys(), *item.values()]
    if isinstance(item, Namespace):
        return [object.__getattribute__(item, "_Namespace__attrs")]
    return None


_LEAVES = frozenset({str, int, float, bool, type(None)})


def _leaf_size(item: Any) -> int:
    if isinstance(item, str):
        return len(item) + 4
    if isinstance(item, int) and not isinstance(item, bool):
        return item.bit_length() * 3 // 10 + 3
    if isinstance(item, bool | float) or item is None:
        return 26
    return 80  # a macro, a loop, a cycler: Python's short default repr


def largest_number(spec: str) -> int:
    """The largest number written in a format spec (`'>20'`, `'0>10.3f'`): a width or precision."""
    numbers = re.findall(r"\d+", spec)
    return max((_HUGE if len(n) > 12 else int(n) for n in numbers), default=0)


_PERCENT = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?"
    r"(?:\.(?P<precision>\*|\d+))?[hlL]?(?P<kind>.)",
    re.DOTALL,
)


_LONG_NUMBER = re.compile(r"\d{5}|\*")


def percent_size(template: str, args: Any, limit: int) -> int:
    """At least the length of `template % args`: widths, precisions and converted values."""
    if not _LONG_NUMBER.search(template):  # every width and precision is under 10,000
        values = args if isinstance(args, tuple) else (args,)
        quick = len(template) + template.count("%") * 20_000
        quick += sum(text_size(v, limit) for v in values)
        if quick <= limit:
            return quick
    positional = list(args) if isinstance(args, tuple) else [args]
    mapping = args if isinstance(args, Mapping) else None
    total = len(template)
    for match in _PERCENT.finditer(template):
        if match["kind"] == "%":
            continue
        for part in (match["width"], match["precision"]):
            if part == "*":
                total += _count(positional.pop(0) if positional else 0)
            elif part:
                total += largest_number(part)
        if match["key"] is not None and mapping is not None:
            value = mapping.get(match["key"])
        else:
            value = positional.pop(0) if positional else None
        total += text_size(value, limit)
        if total > limit:
            break
    return total


def _count(value: Any) -> int:
    """A width or count argument; a non-integer is 0 (Python refuses it itself)."""
    return max(value, 0) if isinstance(value, int) else 0


def _arg(args: Args, kwargs: Kwargs, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def binop_size(operator: str, left: Any, right: Any, limit: int) -> Size:
    """The size of `left <operator> right` and its unit (characters, items or bits)."""
    if operator == "%":
        if isinstance(left, str):
            return percent_size(left, right, limit), "characters"
        return 0, ""
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            return int(math.log2(abs(left)) * right) + 1, "bits"
        return 0, ""
    if operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            return len(left) + len(right), "characters"
        if isinstance(left, list | tuple) and isinstance(right, list | tuple):
            return len(left) + len(right), "items"
        return 0, ""
    for sized, count in ((left, right), (right, left)):
        if isinstance(sized, str | list | tuple) and isinstance(count, int):
            return len(sized) * _count(count), "characters" if isinstance(sized, str) else "items"
    if isinstance(left, int) and isinstance(right, int):
        return left.bit_length() + right.bit_length(), "bits"
    return 0, ""


# -- str methods ---------------------------------------------------------------------

_Estimate = Callable[[str, Args, Kwargs, int], int]


def _padded(s: str, args: Args, kwargs: Kwargs, limit: int) -> int:
    return max(len(s), _count(_arg(args, kwargs, 0, "width", 0)))


def _expandtabs(s: str, args: Args, kwargs: Kwargs, limit: int) -> int:
    return len(s) + s.count("\t") * _count(_arg(args, kwargs, 0, "tabsize", 8))


def _join(s: str, args: Args, kwargs: Kwargs, limit: int) -> int:
    items = args[0] if args else ()
    if not isinstance(items, list | tuple):
        return 0
    return sum(len(i) for i in items if isinstance(i, str)) + max(len(items) - 1, 0) * len(s)


def _replace(s: str, args: Args, kwargs: Kwargs, limit: int) -> int:
    old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
    count = _arg(args, kwargs, 2, "count", -1)
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    found = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(s) + found * max(len(new) - len(old), 0)


def _translate(s: str, args: Args, kwargs: Kwargs, limit: int) -> int:
    table = args[0] if args else None
    if not isinstance(table, Mapping):
        return len(s)
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(s) * max(longest, 1)


STR_METHODS: dict[str, _Estimate] = {
    "ljust": _padded,
    "rjust": _padded,
    "center": _padded,
    "zfill": _padded,
    "expandtabs": _expandtabs,
    "join": _join,
    "replace": _replace,
    "translate": _translate,
}
"""The str methods that can build a string much longer than their inputs."""


def materialized(name: str, args: Args) -> Args:
    """`join`'s iterable as a list, so it can be measured and then joined."""
    if name == "join" and args and not isinstance(args[0], list | tuple | str):
        return (list(args[0]), *args[1:])
    return args


# -- filters -------------------------------------------------------------------------

_FilterEstimate = Callable[[Any, Args, Kwargs, int], Size]


def _f_center(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    return max(text_size(value, limit), _count(_arg(args, kwargs, 0, "width", 80))), "characters"


def _f_indent(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    width = _arg(args, kwargs, 0, "width", 4)
    step = width if isinstance(width, int) else text_size(width, limit)
    lines = value.count("\n") + 1 if isinstance(value, str) else text_size(value, limit)
    return text_size(value, limit) + lines * max(step, 0), "characters"


def _f_wordwrap(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    """One `wrapstring` per line at most; a line ends at a space, a newline or `width`."""
    text = value if isinstance(value, str) else "x" * min(text_size(value, limit), limit + 1)
    width = _count(_arg(args, kwargs, 0, "width", 79)) or 1
    wrapstring = _arg(args, kwargs, 2, "wrapstring", None)
    step = 1 if wrapstring is None else text_size(wrapstring, limit)
    lines = text.count(" ") + text.count("\n") + len(text) // width + 1
    return len(text) + lines * step, "characters"


def _f_truncate(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    end = _arg(args, kwargs, 2, "end", "...")
    return text_size(value, limit) + text_size(end, limit), "characters"


def _f_replace(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    text = value if isinstance(value, str) else ""
    base = 0 if isinstance(value, str) else text_size(value, limit)
    return base + _replace(text, args, kwargs, limit), "characters"


def _f_join(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    items = value if isinstance(value, list | tuple) else list(value)
    separator = text_size(_arg(args, kwargs, 0, "d", ""), limit)
    return sum(text_size(i, limit) for i in items) + len(items) * separator, "characters"


def _f_format(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    template = value if isinstance(value, str) else "%s" * text_size(value, limit)
    return percent_size(template, kwargs if kwargs else tuple(args), limit), "characters"


def _f_batch(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    fill = _arg(args, kwargs, 1, "fill_with", None)
    extra = _count(_arg(args, kwargs, 0, "linecount", 0)) if fill is not None else 0
    return len(value) + extra, "items"


def _f_slice(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    return len(value) + 2 * _count(_arg(args, kwargs, 0, "slices", 0)), "items"


def _f_sum(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, list | tuple):
        return 0, "items"
    total = len(start) + sum(len(i) for i in value if isinstance(i, list | tuple))
    return (total if total * len(value) <= 16 * limit else total * len(value)), "items"


def _f_tojson(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    indent = _arg(args, kwargs, 0, "indent", None)
    step = indent if isinstance(indent, int) else 0 if indent is None else text_size(indent, limit)
    return text_size(value, limit) * (1 + max(step, 0)), "characters"


def _f_urlize(value: Any, args: Args, kwargs: Kwargs, limit: int) -> Size:
    """The text escaped, each link written twice, plus its attributes for each link."""
    if not isinstance(value, str):
        return 6 * text_size(value, limit), "characters"
    escaped = len(value) + 4 * (value.count("&") + value.count('"') + value.count("'"))
    escaped += 3 * (value.count("<") + value.count(">"))
    links = value.count(".") + value.count("@") + value.count(":") + 1
    extra = text_size(_arg(args, kwargs, 2, "target", ""), limit)
    extra += text_size(_arg(args, kwargs, 3, "rel", ""), limit)
    return 2 * escaped + links * (extra + 60), "characters"


FILTERS: dict[str, _FilterEstimate] = {
    "center": _f_center,
    "indent": _f_indent,
    "wordwrap": _f_wordwrap,
    "truncate": _f_truncate,
    "replace": _f_replace,
    "join": _f_join,
    "format": _f_format,
    "batch": _f_batch,
    "slice": _f_slice,
    "sum": _f_sum,
    "tojson": _f_tojson,
    "urlize": _f_urlize,
}
"""The filters whose result can be much larger than their input, with its estimate."""

MATERIALIZING_FILTERS = frozenset({"join", "batch", "slice", "sum"})
"""Filters given their input as a list, so it can be counted before they run."""

STRUCTURAL_FILTERS = frozenset(
    {
        "abs", "attr", "batch", "count", "d", "default", "first", "float", "int", "items",
        "last", "length", "list", "map", "random", "reject", "rejectattr", "reverse",
        "round", "select", "selectattr", "slice", "sum",
    }
)  # fmt: skip
"""Filters that neither turn their input into text nor compare its items: not measured."""
