"""`mailqctl top`: a live view of the queue, refreshed like `top`.

Each frame is one `Store.queue_stats` call. The current send rate is the
change in the number of sent jobs between two frames; the averages come
from the store's 5-minute and 1-hour windows. If the database stops
answering after the first frame, the view says so and keeps trying.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import click
from rich.console import Group, RenderableType

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.inspect import RateLimitView, stats_document
from mailqd.cli.output import (
    Output,
    format_duration,
    format_rate,
    format_time,
    key_value_table,
    table,
)
from mailqd.config import Settings
from mailqd.errors import StoreError
from mailqd.models import QueueStats, Status
from mailqd.store import Store


@dataclass(frozen=True, slots=True)
class _Sample:
    stats: QueueStats
    limits: RateLimitView
    taken: float  # time.monotonic()

    @classmethod
    def take(cls, store: Store, settings: Settings) -> _Sample:
        stats = store.queue_stats()
        return cls(stats, RateLimitView.read(settings, store), time.monotonic())


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--iterations", type=click.IntRange(min=1), metavar="N", help="Exit after N frames.")
@json_option
@click.pass_obj
@reports_errors
def top(state: Context, interval: float, once: bool, iterations: int | None, out: Output) -> None:
    """A live view: send and failure rates, queue depth, oldest due job, retries due soon.

    Refreshes every --interval seconds until Ctrl-C. With --json, prints
    one `stats --json` document per refresh, one per line.

    \b
    Example:
      $ mailqctl top
      $ mailqctl top --once
    """
    store, settings = state.store, state.settings
    first = _Sample.take(store, settings)  # a dead database fails here
    frames = _frames(store, settings, first, interval, 1 if once else iterations)
    try:
        if out.as_json:
            for current, _previous, error in frames:
                if error is None:
                    out.emit_line(stats_document(current.stats, current.limits))
        elif out.console.is_terminal and not once:
            from rich.live import Live

            with Live(render_frame(*next(frames)), console=out.console, auto_refresh=False) as live:
                for frame in frames:
                    live.update(render_frame(*frame), refresh=True)
        else:
            for shown, frame in enumerate(frames):
                if shown:
                    out.print("")
                out.print(render_frame(*frame))
    except KeyboardInterrupt:
        pass


_Frame = tuple[_Sample, _Sample | None, str | None]


def _frames(
    store: Store, settings: Settings, first: _Sample, interval: float, limit: int | None
) -> Iterator[_Frame]:
    """(current, previous, error) every `interval`; on a database error, the last good sample."""
    previous, current, error = None, first, None
    yield current, previous, error
    shown = 1
    while limit is None or shown < limit:
        time.sleep(interval)
        try:
            sample = _Sample.take(store, settings)
        except StoreError as exc:
            error = str(exc)
        else:
            previous, current, error = current, sample, None
        yield current, previous, error
        shown += 1


def render_frame(
    current: _Sample, previous: _Sample | None, error: str | None = None
) -> RenderableType:
    stats = current.stats
    counts = stats.counts
    header = f"mailqd queue at {format_time(stats.at)}"
    if error is not None:
        header += f"  [showing the last good frame: {error}]"
    rates = key_value_table(
        [
            ("sent now", _current_rate(current, previous)),
            (
                "sent",
                f"{stats.last_5m.sent / 5:.1f}/min over 5 min, "
                f"{stats.last_1h.sent / 60:.1f}/min over 1 h",
            ),
            (
                "failure rate",
                f"{format_rate(stats.last_5m.failure_rate)} over 5 min, "
                f"{format_rate(stats.last_1h.failure_rate)} over 1 h",
            ),
            ("attempts", f"{stats.last_5m.attempts} in 5 min, {stats.last_1h.attempts} in 1 h"),
            ("queue depth", f"{counts.depth} ({stats.due} due now)"),
            ("oldest due job", format_duration(counts.oldest_due_age_seconds)),
            (
                "retries due soon",
                f"{stats.retries_due_soon} in the next {stats.soon_seconds:g}s "
                f"({stats.retries_waiting} waiting)",
            ),
        ]
    )
    hour = stats.last_1h
    if hour.deduplicated or hour.cap_deferred:
        rates.add_row(
            "held back",
            f"{hour.deduplicated} duplicates, {hour.cap_deferred} deferred by recipient cap in 1 h",
        )
    throttled = current.limits.waiting()
    if throttled:
        rates.add_row(
            "domains throttled",
            ", ".join(f"{d} (~{n} waiting)" if n is not None else d for d, n in throttled),
        )
    by_status = table(*(status.value for status in Status), right=[s.value for s in Status])
    by_status.add_row(*(str(counts.by_status.get(status, 0)) for status in Status))
    return Group(header, "", rates, "", by_status)


def _current_rate(current: _Sample, previous: _Sample | None) -> str:
    if previous is None:
        return "- (needs two frames)"
    seconds = current.taken - previous.taken
    sent = current.stats.counts.by_status.get(Status.SENT, 0)
    before = previous.stats.counts.by_status.get(Status.SENT, 0)
    return f"{max(sent - before, 0) / seconds:.1f}/s" if seconds > 0 else "-"
