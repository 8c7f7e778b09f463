"""Jinja2's immutable sandbox with a budget: a template cannot outgrow its time or its memory.

Jinja2's sandbox keeps templates away from Python internals, but not from
`{{ 'x'.ljust(800000000) }}` or from loops that never end. Here every
render runs under a `RenderBudget` (wall-clock seconds and output bytes),
kept by a meter that the sandbox's own hooks consult, in the worker's
thread, without threads, processes or signals:

- every call, attribute access, binary operator, filter and loop iteration
  checks the deadline (`call`, `getattr`, `call_binop`, wrapped filters, a
  guard around each `{% for %}` iterable);
- whatever can build a large value in one step (`*`, `**`, `+`, `%`, `~`,
  `str.format`, the str methods and filters of `bounds.py`) has the size
  of its result estimated BEFORE it is built and refused over
  `template_max_output_bytes`; what was built is added up, and a render may
  build at most `BUILT_FACTOR` times that in all (so it cannot keep many
  values just under the limit);
- converting a value to text (`{{ }}`, `~`, `%s`, `{}`) measures it first,
  counting shared parts as often as `str()` would write them;
- the output is counted as it is generated.

Each single step is then bounded by the size limit, so no step can hold
the event loop or the memory for long. Exceeding the budget raises
`BudgetExceeded` (time, output) or `TooLarge` (a sandbox refusal).
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.exceptions import SecurityError
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from markupsafe import EscapeFormatter, Markup

from mailqd.templating import bounds

if TYPE_CHECKING:
    from mailqd.config import Settings

__all__ = ["BUILT_FACTOR", "BoundedSandbox", "BudgetExceeded", "Meter", "RenderBudget"]

_T = TypeVar("_T")

BUILT_FACTOR = 32
"""A render may build at most this many times `template_max_output_bytes` in all."""


class BudgetExceeded(Exception):
    """A render ran out of time or wrote too much; the message names the config key."""


class TooLarge(SecurityError):
    """An operation would build a value over the size limit; refused before it is built."""


@dataclass(frozen=True, slots=True)
class RenderBudget:
    """How long one message's render may take, and how large a part or a value may grow."""

    seconds: float = 1.0
    max_output_bytes: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderBudget:
        return cls(settings.template_render_seconds, settings.template_max_output_bytes)


@dataclass(slots=True, eq=False)
class Meter:
    """One render's account: its deadline and what it built; also what error texts may say.

    `words` are the words of the template's source and `values` its
    variables: error messages may quote the first, never the second.
    """

    budget: RenderBudget
    words: frozenset[str] = frozenset()
    values: Mapping[str, Any] = field(default_factory=dict)
    deadline: float = 0.0
    built: int = 0
    limit: int = 0

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget.seconds
        self.limit = self.budget.max_output_bytes

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(
                f"rendering took longer than {self.budget.seconds:g} s (template_render_seconds)"
            )

    def refuse_over(self, what: str, size: int, unit: str = "characters") -> None:
        """Refuse building `what` if its estimated `size` is over the limit; then tick."""
        if size > self.limit:
            kind = "a list of" if unit == "items" else "a string of"
            raise TooLarge(
                f"{what} would build {kind} {size} {unit} "
                f"(template_max_output_bytes is {self.limit})"
            )
        self.tick()

    def measure(self, value: Any, doing: str) -> None:
        """Refuse `doing` something with a value whose text would be over the limit."""
        if not isinstance(value, _SMALL) and bounds.text_size(value, self.limit) > self.limit:
            raise TooLarge(
                f"{doing} a value larger than {self.limit} characters (template_max_output_bytes)"
            )
        self.tick()

    def charge(self, value: _T) -> _T:
        """Count the memory a step built; the render fails once it built too much in all.

        Strings count their real size (1 to 4 bytes a character), lists,
        tuples and dicts 8 bytes an item (the items were counted when built).
        """
        if isinstance(value, str):
            self.built += sys.getsizeof(value)
        elif isinstance(value, list | tuple | dict):
            self.built += 8 * len(value)
        else:
            return value
        if self.built > BUILT_FACTOR * self.limit:
            raise BudgetExceeded(
                f"the template built more than {BUILT_FACTOR * self.limit} bytes "
                f"in all ({BUILT_FACTOR} times template_max_output_bytes)"
            )
        return value

    def count_output(self, written: int) -> None:
        if written > self.limit:
            raise BudgetExceeded(
                f"output larger than {self.limit} bytes (template_max_output_bytes)"
            )
        self.tick()


_SMALL = (str, int, float, type(None))
_CURRENT: ContextVar[Meter | None] = ContextVar("mailqd_template_meter", default=None)


def current_meter() -> Meter:
    """The running render's meter; outside a render, a fresh default one."""
    meter = _CURRENT.get()
    return meter if meter is not None else Meter(RenderBudget())


def metered(meter: Meter) -> Callable[[], None]:
    """Make `meter` the current one; returns the function that restores the previous."""
    token = _CURRENT.set(meter)
    return lambda: _CURRENT.reset(token)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with `~`, comparisons and dict keys measured, loops guarded.

    `Environment.code_generator_class` is Jinja2's extension point for this;
    the methods follow Jinja2 3.1's own (pinned in pyproject.toml), and
    tests/test_hostile_templates.py is their contract (bombs refused,
    ordinary templates rendered exactly as before).
    """

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        guard = nodes.EnvironmentAttribute("loop_guard", lineno=node.lineno)
        node.iter = nodes.Call(guard, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        """`a == b`, `a in b`: each operand measured first, so no comparison can be endless."""
        self.write("(environment.compared(")
        self.visit(node.expr, frame)
        self.write(")")
        for operand in node.ops:
            self.write(f" {operators[operand.op]} environment.compared(")
            self.visit(operand.expr, frame)
            self.write(")")
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        """`{key: value}`: each key measured before it is hashed."""
        self.write("{")
        for item in node.items:
            self.write("environment.compared(")
            self.visit(item.key, frame)
            self.write("): ")
            self.visit(item.value, frame)
            self.write(", ")
        self.write("}")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write(f"environment.bounded_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedFormatter(SandboxedFormatter):
    """`str.format` that measures each field before it is converted and padded."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        current_meter().refuse_over("'format'", bounds.text_size(value, current_meter().limit))
        return current_meter().charge(super().convert_field(value, conversion))

    def format_field(self, value: Any, format_spec: str) -> Any:
        meter = current_meter()
        if isinstance(value, int):  # `{:b}` writes a digit a bit, `{:,}` adds separators
            size = value.bit_length() * 4 // 3 + 2 + bounds.largest_number(format_spec)
        else:
            size = bounds.text_size(value, meter.limit) + bounds.largest_number(format_spec)
        meter.refuse_over("'format'", size)
        return meter.charge(super().format_field(value, format_spec))


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox whose every hook keeps the current render's budget."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _measured_test(f) for name, f in self.tests.items()}  # type: ignore[arg-type]
        self.globals["lipsum"] = _bounded_lipsum

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """Joins the buffers of macros, blocks and `{% set %}`: measured before joining."""
        meter = current_meter()
        pieces = list(parts)
        meter.refuse_over("the template's text", sum(map(len, pieces)))
        return meter.charge("".join(pieces))

    def bounded_concat(self, markup: bool, parts: tuple[Any, ...]) -> str:
        """`a ~ b`: each operand measured as text before the strings are joined."""
        meter = current_meter()
        meter.refuse_over("'~'", sum(bounds.text_size(p, meter.limit) for p in parts))
        return meter.charge((markup_join if markup else str_join)(parts))

    def compared(self, value: _T) -> _T:
        current_meter().measure(value, "comparing or hashing")
        return value

    def loop_guard(self, iterable: Iterable[Any]) -> Iterator[Any]:
        meter = current_meter()
        for item in iterable:
            meter.tick()
            yield item

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        meter = current_meter()
        meter.tick()
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in bounds.STR_METHODS:
            args = bounds.materialized(name, args)
            estimate = bounds.STR_METHODS[name]
            meter.refuse_over(repr(name), estimate(owner, args, kwargs, meter.limit))
        if _compares_arguments(__obj):
            for value in (*args, *kwargs.values()):
                meter.measure(value, f"calling {name!r} with")
        return meter.charge(super().call(__context, __obj, *args, **kwargs))

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        meter = current_meter()
        meter.tick()
        size, unit = bounds.binop_size(operator, left, right, meter.limit)
        if unit == "bits":
            if size > bounds.MAX_INT_BITS:
                raise TooLarge(
                    f"{operator!r} would build a number of about {size * 3 // 10} digits"
                )
        elif unit:
            meter.refuse_over(repr(operator), size, unit)
        elif operator == "-":  # a set difference (`d.keys() - other`) hashes every item
            meter.measure(left, "subtracting")
            meter.measure(right, "subtracting")
        result = self.binop_table[operator](left, right)
        return meter.charge(result) if unit and unit != "bits" else result

    def getattr(self, obj: Any, attribute: str) -> Any:
        current_meter().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current_meter().measure(argument, "looking up")
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's `str.format` sandboxing, with the formatter that measures each field."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType):
            return None
        if value.__name__ not in ("format", "format_map"):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type: type[str] = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: SandboxedFormatter
        if isinstance(f_self, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _BoundedFormatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                kwargs, args = args[0], ()
            current_meter().refuse_over("'format'", len(f_self))
            return str_type(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)


def _compares_arguments(function: Any) -> bool:
    """Python's own callables (`dict.get`, `list.index`, `dict`, ...) may hash or compare
    their arguments, as does `loop.changed`; a macro or a filter does not."""
    if isinstance(function, types.BuiltinFunctionType | types.BuiltinMethodType | type):
        return True
    return getattr(function, "__name__", "") == "changed" and isinstance(
        getattr(function, "__self__", None), LoopContext
    )


def _finalize(value: Any) -> Any:
    """Every `{{ value }}`: measured before it becomes text."""
    if type(value) is not str:
        current_meter().measure(value, "printing")
    return value


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that ticks, refuses a result over the limit before it is built, and charges it.

    It takes the context, so Jinja never runs it at compile time (constant
    folding), where no render's budget applies.
    """
    passes = getattr(getattr(function, "jinja_pass_arg", None), "name", None)
    estimate = bounds.FILTERS.get(name)
    measures = name not in bounds.STRUCTURAL_FILTERS
    materializes = name in bounds.MATERIALIZING_FILTERS

    def bounded(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        meter = current_meter()
        meter.tick()
        if materializes and not isinstance(value, list | tuple | str):
            value = list(value)
        if measures and type(value) is not str:
            meter.measure(value, f"filter {name!r} on")
        if estimate is not None:
            size, unit = estimate(value, args, kwargs, meter.limit)
            meter.refuse_over(f"filter {name!r}", size, unit)
        if passes == "context":
            result = function(context, value, *args, **kwargs)
        elif passes == "eval_context":
            result = function(context.eval_ctx, value, *args, **kwargs)
        elif passes == "environment":
            result = function(context.environment, value, *args, **kwargs)
        else:
            result = function(value, *args, **kwargs)
        return meter.charge(result)

    # After update_wrapper, which would copy the wrapped filter's own pass_* mark.
    return jinja2.pass_context(update_wrapper(bounded, function))


def _measured_test(function: Callable[..., Any]) -> Callable[..., Any]:
    """A test (`is in`, `is eq`, ...) whose operands are measured before it compares them."""

    def measured(*args: Any, **kwargs: Any) -> Any:
        meter = current_meter()
        for value in (*args, *kwargs.values()):
            meter.measure(value, "testing")
        return function(*args, **kwargs)

    return update_wrapper(measured, function)


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    meter = current_meter()
    if isinstance(n, int) and isinstance(max, int):
        meter.refuse_over("'lipsum'", n * max * 12)
    return meter.charge(generate_lorem_ipsum(n, html, min, max))
