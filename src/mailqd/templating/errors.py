"""What a template error may say: which variable and which key, never what a variable held.

A render's error becomes the job's `last_error`, an attempt row and a log
line, read by people who must not see a one-time code or an address that
was sealed in `variables`. Jinja2 and Python quote values freely (`'dict
object' has no attribute 'OTP-5501'` when the key came from a variable,
`invalid literal for int(): 's3cr3t'`), so:

- undefined lookups are described by `SafeUndefined` in our own words:
  the variable that lacked something is named by its path (`variable
  'order.customer'`), the missing name is quoted only if it is a word of
  the template's source (the template wrote it), otherwise by the variable
  it came from, if any;
- any other error text is scrubbed (`scrub`): a quoted piece stays only if
  it is a word of the source or a Python type name, and any text equal to a
  variable's value is replaced with `***`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.utils import missing

from mailqd.templating.sandbox import Meter, current_meter

__all__ = ["SafeUndefined", "UnsafeAccess", "clean", "scrub"]

_WORD = re.compile(r"\w{1,64}")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_TYPE_NAME = re.compile(r"'\w{1,64}'(?= object)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TYPE_WORDS = frozenset(
    {"str", "int", "float", "bool", "list", "dict", "tuple", "set", "frozenset", "bytes"}
    | {"NoneType", "None", "object", "Markup", "Undefined", "SafeUndefined", "StrictUndefined"}
    | {"Namespace", "LoopContext", "Macro"}
)
_MAX_TEXT = 300
_SEARCHED = 2000


class UnsafeAccess(SecurityError):
    """The sandbox refused an attribute; the message is `SafeUndefined`'s, safe as it is."""


class SafeUndefined(jinja2.StrictUndefined):
    """`StrictUndefined` whose error says which variable lacked which name, but no value."""

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = missing,
        name: str | None = None,
        exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError,
    ) -> None:
        super().__init__(hint, obj, name, UnsafeAccess if issubclass(exc, SecurityError) else exc)

    @property
    def _undefined_message(self) -> str:
        return describe_undefined(
            self._undefined_hint,
            self._undefined_obj,
            self._undefined_name,
            self._undefined_exception,
            current_meter(),
        )


def describe_undefined(hint: str | None, obj: Any, name: Any, exc: type, meter: Meter) -> str:
    """`variable 'user' has no attribute 'email'`, `variable 'name' is undefined`, ..."""
    if obj is missing:
        return scrub(hint, meter) if hint else f"variable {_name(name, meter)} is undefined"
    holder = _holder(obj, meter)
    if isinstance(exc, type) and issubclass(exc, SecurityError):
        return f"access to attribute {_name(name, meter)} of {holder} is unsafe"
    if hint:
        return scrub(hint, meter)
    kind = "attribute" if isinstance(name, str) else "element"
    return f"{holder} has no {kind} {_name(name, meter)}"


def _name(name: Any, meter: Meter) -> str:
    """`'email'` if the template wrote it; else which variable held it; never the name itself."""
    text = str(name)
    if _WORD.fullmatch(text) and text in meter.words:
        return repr(name)
    source = _path(meter, lambda value: type(value) is type(name) and value == name)
    if source is not None:
        return f"named by {source}"
    return "(a name taken from the data, not shown)"


def _holder(obj: Any, meter: Meter) -> str:
    path = _path(meter, lambda value: value is obj)
    return path if path is not None else f"a {type(obj).__name__!r} value"


def _path(meter: Meter, wanted: Callable[[Any], bool]) -> str | None:
    """`variable 'order.customer'` for the first variable (or part of one) that is `wanted`."""
    queue: deque[tuple[str, Any]] = deque(
        (_segment(key, meter), value) for key, value in meter.values.items()
    )
    for _ in range(_SEARCHED):
        if not queue:
            return None
        path, value = queue.popleft()
        if wanted(value):
            return f"variable {path!r}"
        if isinstance(value, Mapping):
            queue.extend((f"{path}.{_segment(k, meter)}", v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            queue.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def _segment(key: Any, meter: Meter) -> str:
    text = str(key)
    return text if _WORD.fullmatch(text) and text in meter.words else "…"


def scrub(text: str, meter: Meter) -> str:
    """Another library's error text, without anything that may be a variable's value."""

    def shown(match: re.Match[str]) -> str:
        quoted = match.group()
        if _known(quoted[1:-1], meter) or _TYPE_NAME.match(text, match.start()):
            return quoted
        return "'…'"

    text = _QUOTED.sub(shown, text)
    for value in _values(meter.values):
        if value in text:
            text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", "***", text)
    return clean(text)


def clean(text: str) -> str:
    """One line of at most 300 characters, control characters shown as `\\xNN`."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _known(word: str, meter: Meter) -> bool:
    return bool(_WORD.fullmatch(word)) and (word in meter.words or word in _TYPE_WORDS)


def _values(values: Mapping[str, Any]) -> list[str]:
    """The variables' strings (4 characters or more) and long numbers, longest first."""
    found: set[str] = set()
    stack: list[Any] = list(values.values())
    for _ in range(_SEARCHED):
        if not stack:
            break
        value = stack.pop()
        if isinstance(value, str) and len(value) >= 4:
            found.add(value)
        elif isinstance(value, int | float) and not isinstance(value, bool) and abs(value) >= 1000:
            found.add(str(value))
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return sorted(found, key=len, reverse=True)
