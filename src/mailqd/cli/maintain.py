"""Maintenance commands: `migrate` (the schema) and `cleanup` (old finished jobs)."""

from __future__ import annotations

import time

import click

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import Output, ProgressBar, plural

DEFAULT_BATCH = 1000


@click.command()
@click.pass_obj
@reports_errors
def migrate(state: Context) -> None:
    """Create or upgrade the mailqd tables to this version's schema.

    Safe to run again: an up-to-date schema is left as it is.

    \b
    Example:
      $ mailqctl migrate
      migrated the schema from (none) to 0010
    """
    result = state.unchecked_store.upgrade()
    if result.changed:
        click.echo(f"migrated the schema from {result.before or '(none)'} to {result.after}")
    else:
        click.echo(f"the schema is already at {result.after}; nothing to do")


@click.command()
@click.option(
    "--days",
    type=click.FloatRange(min=0),
    required=True,
    metavar="N",
    help="Delete finished jobs last changed more than N days ago.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_BATCH,
    show_default=True,
    metavar="N",
    help="Jobs deleted per transaction.",
)
@json_option
@click.pass_obj
@reports_errors
def cleanup(state: Context, days: float, dry_run: bool, batch_size: int, out: Output) -> None:
    """Delete sent, failed and cancelled jobs (and their attempts) older than N days.

    Deletes in batches, each its own short transaction, so delivery never
    waits on cleanup for longer than one batch. Pending and sending jobs
    are never deleted. Also drops per-recipient counts of past hours and
    de-duplication hashes older than N days (or `dedup_window`, if longer),
    which running daemons purge themselves only while those settings are on.

    \b
    Example:
      $ mailqctl cleanup --days 30 --dry-run
      would delete 1234 finished jobs older than 30 days (dry run: nothing deleted)
      $ mailqctl cleanup --days 30
      deleted 1234 finished jobs older than 30 days in 2 batches (0.21 s; longest batch 0.120 s)
    """
    store = state.store
    if dry_run:
        count = store.count_finished(days)
        out.emit(
            {"days": days, "dry_run": True, "would_delete": count},
            lambda: (
                f"would delete {plural(count, 'finished job')} older than {days:g} days "
                "(dry run: nothing deleted)"
            ),
        )
        return
    show_progress = not out.as_json and out.console.is_terminal
    total = store.count_finished(days) if show_progress else None
    timer = _BatchTimer()
    with ProgressBar(out, total, "deleting") as advance:

        def on_batch(count: int) -> None:
            timer.lap()
            advance(count)

        deleted = store.delete_finished(days, batch_size=batch_size, on_batch=on_batch)
    store.purge_screening(max(days * 86400, state.settings.dedup_window))
    document = {
        "days": days,
        "dry_run": False,
        "deleted": deleted,
        "batches": timer.laps,
        "seconds": round(timer.elapsed, 3),
        "longest_batch_seconds": round(timer.longest, 3),
    }
    out.emit(
        document,
        lambda: (
            f"deleted {plural(deleted, 'finished job')} older than {days:g} days in "
            f"{plural(timer.laps, 'batch', 'batches')} "
            f"({timer.elapsed:.2f} s; longest batch {timer.longest:.3f} s)"
        ),
    )


class _BatchTimer:
    """How long each batch took, from the end of the previous one (or the start)."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.laps = 0
        self.longest = 0.0

    def lap(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self._last)
        self._last = now
        self.laps += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
