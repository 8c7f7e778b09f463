"""Commands that fix things: `retry`, `requeue`, `cancel`, and `drain`.

`drain` is the recovery tool for when no daemon runs: it delivers from this
process with the daemon's own `Worker.run_once` (claim, compose, send,
record the outcome under the same retry rules) and the same transport
settings, so a message drained is handled exactly as the daemon would.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from mailqd.cli.context import EXIT_FAILURE, Context, json_option, reports_errors
from mailqd.cli.output import Output, ProgressBar, plural
from mailqd.config import Settings
from mailqd.errors import JobStateError
from mailqd.models import Status
from mailqd.store import Store

if TYPE_CHECKING:
    from mailqd.daemon.worker import BatchResult

# -- retry, requeue, cancel -------------------------------------------------------


@click.command()
@click.argument("job_ids", nargs=-1, metavar="[ID]...")
@click.option(
    "--max", "max_jobs", type=click.IntRange(min=1), metavar="N", help="The N newest failures."
)
@click.option("--all", "all_jobs", is_flag=True, help="Every failed job.")
@json_option
@click.pass_obj
@reports_errors
def retry(
    state: Context, job_ids: tuple[str, ...], max_jobs: int | None, all_jobs: bool, out: Output
) -> None:
    """Put failed jobs back in the queue: pending, due now, with a fresh attempt budget.

    Say which: job ids, the N most recently failed (--max N), or --all.
    With ids, every one must be a failed job, or nothing is changed.

    \b
    Example:
      $ mailqctl retry --max 100
      requeued 100 failed jobs
      $ mailqctl retry 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
    """
    chosen = [bool(job_ids), max_jobs is not None, all_jobs]
    if sum(chosen) != 1:
        raise click.UsageError("say which failed jobs to retry: job ids, --max N, or --all")
    store = state.store
    if job_ids:
        _check_all_failed(store, job_ids)
        count = store.requeue_failed(job_ids=list(job_ids))
    else:
        count = store.requeue_failed(limit=max_jobs)
    out.emit(
        {"requeued": count},
        lambda: f"requeued {plural(count, 'failed job')}",
    )


def _check_all_failed(store: Store, job_ids: tuple[str, ...]) -> None:
    for job_id in job_ids:
        job = store.get(job_id)  # raises JobNotFoundError
        if job.status is not Status.FAILED:
            raise JobStateError(job_id, job.status, "retry")


@click.command()
@click.argument("job_id")
@json_option
@click.pass_obj
@reports_errors
def requeue(state: Context, job_id: str, out: Output) -> None:
    """Send a failed or cancelled job again: pending, due now, fresh attempt budget.

    \b
    Example:
      $ mailqctl requeue 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
      requeued job 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91: pending, due now
    """
    job = state.store.requeue(job_id)
    out.emit(
        {"id": job.id, "status": job.status},
        lambda: f"requeued job {job.id}: pending, due now",
    )


@click.command()
@click.argument("job_id")
@json_option
@click.pass_obj
@reports_errors
def cancel(state: Context, job_id: str, out: Output) -> None:
    """Stop a pending job from being sent (a job being sent right now cannot be stopped).

    `mailqctl requeue ID` undoes it.

    \b
    Example:
      $ mailqctl cancel 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
      cancelled job 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
    """
    job = state.store.cancel(job_id)
    out.emit({"id": job.id, "status": job.status}, lambda: f"cancelled job {job.id}")


# -- drain ------------------------------------------------------------------------


@click.command()
@click.option(
    "--max",
    "max_messages",
    type=click.IntRange(min=1),
    metavar="N",
    help="Make at most N delivery attempts (default: everything due).",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log every attempt on stderr, not only problems."
)
@json_option
@click.pass_obj
@reports_errors
def drain(state: Context, max_messages: int | None, verbose: bool, out: Output) -> None:
    """Deliver due jobs from this process, without a running daemon (for recovery).

    Uses the daemon's delivery code and settings (smtp_url, from,
    max_attempts, backoff, concurrency, rate_limit): a 4xx reply is retried
    later with backoff, a 5xx reply fails the job. Jobs whose lease expired
    (their daemon died) are returned to the queue first. Safe to run next
    to daemons: jobs are claimed, never taken twice.

    Exits 0 when every job claimed was delivered (or was a duplicate not
    sent, `dedup_window`), 1 when any was not (failed, to be retried later,
    deferred to the next hour by `recipient_hourly_cap`, or put off for a
    moment by `domain_rate_limits`; drain does not wait for those).

    \b
    Example:
      $ MAILQD_SMTP_URL=smtp://relay.internal:25 mailqctl drain --max 500
      drained 500 jobs: 498 sent, 1 retried later, 1 failed
    """
    settings = state.settings
    store = state.store
    rescued = len(store.rescue())
    due = store.queue_stats().due
    target = due if max_messages is None else min(max_messages, due)
    with ProgressBar(out, target, "delivering") as advance:
        _configure_drain_logging(settings, verbose)
        totals = asyncio.run(_drain(settings, store, max_messages, advance))
    document = {
        "rescued": rescued,
        "claimed": totals.claimed,
        "sent": totals.sent,
        "retried": totals.retried,
        "ambiguous": totals.ambiguous,
        "failed": totals.failed,
        "expired": totals.expired,
        "deduplicated": totals.deduplicated,
        "deferred_by_recipient_cap": totals.deferred,
        "deferred_by_relay": totals.relay_deferred,
        "throttled_by_domain_limit": totals.throttled,
    }
    out.emit(document, lambda: _drain_summary(document))
    if totals.sent + totals.deduplicated + totals.relay_deferred < totals.claimed:
        sys.exit(EXIT_FAILURE)


async def _drain(
    settings: Settings, store: Store, limit: int | None, advance: Callable[[int], None]
) -> BatchResult:
    # Imported here: the daemon's code (asyncio, SMTP) is only needed by this command.
    from mailqd.daemon.worker import Worker
    from mailqd.runtime import Runtime

    runtime = Runtime.build(settings)  # a bad smtp_url fails here, before anything is claimed
    owner = f"mailqctl-drain@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    async with Worker(settings, store, owner, listen=False, runtime=runtime) as worker:
        while limit is None or worker.totals.claimed < limit:
            want = None if limit is None else limit - worker.totals.claimed
            batch = await worker.run_once(want)
            if batch.claimed == 0:
                break
            advance(batch.claimed)
        return worker.totals


def _drain_summary(document: dict[str, int]) -> str:
    retried = document["retried"] + document["ambiguous"]
    failed = document["failed"] + document["expired"]
    lines = []
    if document["rescued"]:
        rescued = plural(document["rescued"], "job")
        lines.append(f"returned {rescued} whose lease had expired to the queue")
    if not document["claimed"]:
        lines.append("nothing to deliver: no job is due")
    else:
        held_back = ""
        if document["deduplicated"] or document["deferred_by_recipient_cap"]:
            held_back = (
                f", {document['deduplicated']} duplicates not sent, "
                f"{document['deferred_by_recipient_cap']} deferred by recipient cap"
            )
        if document["throttled_by_domain_limit"]:
            held_back += f", {document['throttled_by_domain_limit']} put off by domain rate limits"
        if document["deferred_by_relay"]:
            held_back += f", {document['deferred_by_relay']} deferred: the relay failed or is down"
        lines.append(
            f"drained {plural(document['claimed'], 'job')}: "
            f"{document['sent']} sent, {retried} retried later, {failed} failed{held_back}"
        )
    return "\n".join(lines)


def _configure_drain_logging(settings: Settings, verbose: bool) -> None:
    """Attempt logs go to stderr (masked, as the daemon's); by default only problems."""
    from mailqd.logging import configure_logging

    level = "info" if verbose else "warning"
    configure_logging(settings.replace(log_level=level), stream=sys.stderr)
