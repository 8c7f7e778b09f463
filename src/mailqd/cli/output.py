"""How `mailqctl` prints: aligned tables for people, JSON for scripts, from one place.

A command builds its result once as a JSON-ready document (the keys are
the documented, stable interface; see docs/cli.md) and, separately, says
how a person should see it. `Output.emit` prints one or the other.
Text from the database (subjects, errors) is never read as rich markup,
so a subject like "[urgent]" prints as it is, and never reaches the
terminal with a control character in it: every string rich renders goes
through `printable` (`mailqd.cli.safe`), one line per table cell, and
the JSON keeps values exact with those characters as `\\u` escapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from mailqd.cli.safe import json_safe, printable

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "Output",
    "ProgressBar",
    "format_age",
    "format_duration",
    "format_rate",
    "format_time",
    "jsonable",
    "key_value_table",
    "make_console",
    "plural",
    "printable",
    "table",
    "truncate",
]

PIPE_WIDTH = 240
"""Columns used when stdout is not a terminal: wide enough that table rows stay one line."""


class SafeConsole(Console):
    """A console that shows control characters in the strings it prints instead of obeying them.

    Every string rich renders (a printed line, a table cell, a group item)
    passes `render_str`, so this is the one place it can be done for all.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(printable(text, multiline=True), **kwargs)


def make_console() -> Console:
    """A stdout console that prints database text literally (no markup, emoji or highlighting)."""
    options: dict[str, Any] = {"markup": False, "emoji": False, "highlight": False}
    console = SafeConsole(**options)
    if not console.is_terminal:
        console = SafeConsole(width=PIPE_WIDTH, **options)
    return console


class Output:
    """Where a command's result goes: `--json` prints the document, otherwise a rendering."""

    def __init__(self, as_json: bool, console: Console | None = None) -> None:
        self.as_json = as_json
        self._console = console

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = make_console()
        return self._console

    def emit(
        self, document: Mapping[str, Any], human: Callable[[], RenderableType | str | None]
    ) -> None:
        """Print `document` as JSON, or what `human()` returns (None prints nothing)."""
        if self.as_json:
            click.echo(json_safe(json.dumps(jsonable(document), indent=2, ensure_ascii=False)))
            return
        rendered = human()
        if rendered is not None:
            self.print(rendered)

    def print(self, rendered: RenderableType | str) -> None:
        """Print for a person: styled on a terminal; in a pipe, plain and without padding."""
        if self.console.is_terminal:
            self.console.print(rendered)
            return
        # No spaces after the last column: friendlier to grep, diff and docs.
        with self.console.capture() as captured:
            self.console.print(rendered)
        click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))

    def emit_line(self, document: Mapping[str, Any]) -> None:
        """One compact JSON line (for a stream of documents, such as `top --json`)."""
        line = json.dumps(jsonable(document), ensure_ascii=False, separators=(",", ":"))
        click.echo(json_safe(line))


def jsonable(value: Any) -> Any:
    """Datetimes as ISO 8601 (UTC, with offset), enums as their values, containers recursively."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# -- tables ----------------------------------------------------------------------


class OneLineCells(Table):
    """A table whose text cells stay on one line: a LF or TAB in a value shows as `\\n`, `\\t`.

    A subject with a line break could otherwise print a second, made-up
    row; a TAB would shift the columns after it.
    """

    def add_row(self, *renderables: RenderableType | None, **kwargs: Any) -> None:
        cells = (printable(cell) if isinstance(cell, str) else cell for cell in renderables)
        super().add_row(*cells, **kwargs)


def table(*columns: str, right: Iterable[str] = ()) -> Table:
    """An aligned table with a header rule and no frame: easy to read and to paste."""
    aligned_right = set(right)
    result = OneLineCells(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        result.add_column(name, justify="right" if name in aligned_right else "left")
    return result


def key_value_table(rows: Iterable[tuple[str, str]]) -> Table:
    """Two columns, name and value, without a header (`show`, `stats`)."""
    result = OneLineCells(box=None, show_header=False, pad_edge=False)
    result.add_column(style="bold", no_wrap=True)
    result.add_column(overflow="fold")
    for name, value in rows:
        result.add_row(name, value)
    return result


# -- values ----------------------------------------------------------------------


def format_time(when: datetime | None) -> str:
    """`2030-01-01 12:00:00 UTC`: servers and logs are in UTC, so the CLI is too."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(seconds: float | None) -> str:
    """`45s`, `3m 07s`, `2h 05m`, `3d 04h`; `-` for no value."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_age(when: datetime | None, now: datetime) -> str:
    """`2030-01-01 12:00:00 UTC (3m 07s ago)`, or `(in 30s)` for a time still ahead."""
    if when is None:
        return "-"
    delta = (now - when).total_seconds()
    relative = f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(-delta)}"
    return f"{format_time(when)} ({relative})"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 job`, `3 jobs`; `nouns` for an irregular plural (`batches`)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def format_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def truncate(text: str | None, length: int) -> str:
    """One line of at most `length` characters, with `…` where it was cut."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= length else line[: length - 1] + "…"


class ProgressBar:
    """A rich progress bar on a terminal (not with --json); elsewhere nothing.

    Used as `with ProgressBar(out, total, "deleting") as advance: advance(n)`.
    While it shows, whatever is written to stderr prints above the bar.
    """

    def __init__(self, out: Output, total: int | None, description: str) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if not out.as_json and out.console.is_terminal and total:
            from rich.progress import Progress  # only on a terminal: it is slow to import

            self._bar = Progress(console=out.console, transient=True)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        bar, task = self._bar, self._task
        if bar is None or task is None:
            return lambda _n: None
        bar.start()
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
