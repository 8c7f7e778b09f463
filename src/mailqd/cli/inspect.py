"""Commands that look without touching: `stats`, `failed`, `show`.

Addresses in lists (`failed`: the recipients, the refused ones of
`--partial`, and any address quoted in an error) are masked, because
lists get pasted into tickets and chat rooms. `show` prints one job
whole, body included: the person running it can read the row with the
same database credentials anyway, and troubleshooting a message needs
the message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Group, RenderableType

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import (
    Output,
    format_age,
    format_duration,
    format_rate,
    format_time,
    key_value_table,
    table,
    truncate,
)
from mailqd.config import Settings
from mailqd.models import (
    JOB_COLUMNS,
    Attempt,
    Job,
    QueueStats,
    RecipientResult,
    Status,
    WindowStats,
)
from mailqd.store import Store
from mailqd.store.attachments import AttachmentInfo
from mailqd.store.ratelimit import RateLimits

SUBJECT_WIDTH = 40
ERROR_WIDTH = 120


# -- stats ------------------------------------------------------------------------


@click.command()
@json_option
@click.pass_obj
@reports_errors
def stats(state: Context, out: Output) -> None:
    """Queue counts, what is due, and what was sent and failed recently.

    "Sent" and "failed" in a window count jobs that reached that state in
    it; the failure rate is failed / (sent + failed); attempts include
    retries. With `dedup_window` or `recipient_hourly_cap` set (or when
    they acted in the last hour), it also says how many jobs they held back.
    With rate limits set, it lists them; a domain whose limit holds jobs
    back shows how far ahead its sending slots are taken, and about how
    many jobs wait for them.

    \b
    Example:
      $ mailqctl stats
      $ mailqctl stats --json | jq .last_1h.failure_rate
    """
    snapshot = state.store.queue_stats()
    settings = state.settings
    screening = settings.dedup_window > 0 or settings.recipient_hourly_cap > 0
    limits = RateLimitView.read(settings, state.store)
    out.emit(
        stats_document(snapshot, limits),
        lambda: render_stats(snapshot, screening=screening, limits=limits),
    )


@dataclass(frozen=True, slots=True)
class RateLimitView:
    """The configured rate limits, and how far ahead each domain's slots are taken."""

    per_second: float | None
    domain_rates: dict[str, float]
    booked_ahead: dict[str, float]

    @classmethod
    def read(cls, settings: Settings, store: Store) -> RateLimitView:
        return cls(
            per_second=settings.rate_limit or None,
            domain_rates=settings.domain_rates,
            booked_ahead=RateLimits(store).domains_booked_ahead(),
        )

    def waiting(self) -> list[tuple[str, int | None]]:
        """(domain, jobs waiting about) for the domains whose limit holds jobs back now."""
        return [(domain, n) for domain, _rate, ahead, n in self.domains() if ahead > 0]

    def domains(self) -> list[tuple[str, float | None, float, int | None]]:
        """(domain, per second, seconds booked ahead, jobs waiting about) for each one known.

        A domain with slots booked but no limit here is limited by another
        daemon's configuration (or was, before a reload).
        """
        rows = []
        for domain in sorted(self.domain_rates.keys() | self.booked_ahead.keys()):
            rate = self.domain_rates.get(domain)
            ahead = self.booked_ahead.get(domain, 0.0)
            rows.append((domain, rate, ahead, None if rate is None else int(ahead * rate)))
        return rows

    def document(self) -> dict[str, Any]:
        return {
            "per_second": self.per_second,
            "domains": {
                domain: {
                    "per_second": rate,
                    "booked_ahead_seconds": round(ahead, 3),
                    "waiting_about": waiting,
                }
                for domain, rate, ahead, waiting in self.domains()
            },
        }

    def render(self) -> RenderableType | None:
        if self.per_second is None and not self.domain_rates and not self.booked_ahead:
            return None
        limits = table("rate limit", "per second", "slots taken ahead", "jobs waiting")
        if self.per_second is not None:
            limits.add_row("all mail", f"{self.per_second:g}", "-", "-")
        for domain, rate, ahead, waiting in self.domains():
            limits.add_row(
                domain,
                "?" if rate is None else f"{rate:g}",
                f"{ahead:.1f}s" if ahead else "-",
                "-" if not ahead else "?" if waiting is None else f"~{waiting}",
            )
        for column in limits.columns[1:]:
            column.justify = "right"
        return limits


def stats_document(snapshot: QueueStats, limits: RateLimitView) -> dict[str, Any]:
    """The `stats --json` document (also one line of `top --json`)."""
    counts = snapshot.counts
    return {
        "at": snapshot.at,
        "counts": {status.value: counts.by_status.get(status, 0) for status in Status},
        "queue_depth": counts.depth,
        "due": snapshot.due,
        "oldest_pending_age_seconds": _rounded(counts.oldest_due_age_seconds),
        "retries_waiting": snapshot.retries_waiting,
        "retries_due_soon": snapshot.retries_due_soon,
        "retries_due_soon_seconds": snapshot.soon_seconds,
        "sending_without_lease": snapshot.unleased,
        "last_5m": _window_document(snapshot.last_5m),
        "last_1h": _window_document(snapshot.last_1h),
        "rate_limits": limits.document(),
    }


def _window_document(window: WindowStats) -> dict[str, Any]:
    rate = window.failure_rate
    return {
        "seconds": window.seconds,
        "sent": window.sent,
        "failed": window.failed,
        "failure_rate": None if rate is None else round(rate, 4),
        "attempts": window.attempts,
        "deduplicated": window.deduplicated,
        "deferred_by_recipient_cap": window.cap_deferred,
        "deferred_by_relay": window.relay_deferred,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def render_stats(
    snapshot: QueueStats, *, screening: bool = False, limits: RateLimitView | None = None
) -> RenderableType:
    """The `stats` text; the duplicate and cap lines when `screening` is on or they acted."""
    counts = snapshot.counts
    by_status = table("status", "jobs", right=["jobs"])
    for status in Status:
        by_status.add_row(status.value, str(counts.by_status.get(status, 0)))
    queue = key_value_table(
        [
            ("queue depth", f"{counts.depth} (pending + sending)"),
            ("due now", str(snapshot.due)),
            ("oldest due job waiting", format_duration(counts.oldest_due_age_seconds)),
            (
                "retries waiting",
                f"{snapshot.retries_waiting} "
                f"({snapshot.retries_due_soon} due in the next {snapshot.soon_seconds:g}s)",
            ),
            ("sending, no lease", f"{snapshot.unleased} (held by no worker; rescued soon)"),
        ]
    )
    recent = table("", "sent", "failed", "failure rate", "attempts", right=["sent", "failed"])
    for label, window in (("last 5 minutes", snapshot.last_5m), ("last hour", snapshot.last_1h)):
        recent.add_row(
            label,
            str(window.sent),
            str(window.failed),
            format_rate(window.failure_rate),
            str(window.attempts),
        )
    for column in recent.columns[3:]:
        column.justify = "right"
    parts: list[RenderableType] = [by_status, "", queue, "", recent]
    hour = snapshot.last_1h
    if screening or hour.deduplicated or hour.cap_deferred:
        held_back = key_value_table(
            [
                ("deduplicated (last hour)", str(hour.deduplicated)),
                ("deferred by recipient cap (last hour)", str(hour.cap_deferred)),
            ]
        )
        parts += ["", held_back]
    if hour.relay_deferred:
        parts += [
            "",
            key_value_table([("deferred, relay down (last hour)", str(hour.relay_deferred))]),
        ]
    shown_limits = None if limits is None else limits.render()
    if shown_limits is not None:
        parts += ["", shown_limits]
    return Group(*parts)


# -- failed -----------------------------------------------------------------------


@click.command()
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    metavar="N",
    help="Show the N most recently failed jobs.",
)
@click.option(
    "--partial",
    is_flag=True,
    help="Instead: jobs sent, but refused (5xx) by some of their recipients.",
)
@json_option
@click.pass_obj
@reports_errors
def failed(state: Context, limit: int, partial: bool, out: Output) -> None:
    """The most recent permanently failed jobs, newest first, with their last error.

    With --partial, the jobs sent to some recipients and refused by others
    instead, most recently sent first, with each refusal. Addresses are
    masked; `mailqctl show ID` prints a job in full.

    \b
    Example:
      $ mailqctl failed --limit 5
      $ mailqctl failed --json | jq -r '.jobs[].id' | xargs mailqctl retry
      $ mailqctl failed --partial
    """
    if partial:
        found = state.store.list_partially_refused(limit)
        partial_document = {"jobs": [_partial_document(job, refused) for job, refused in found]}
        out.emit(partial_document, lambda: _render_partial(found))
        return
    jobs = state.store.list_failed(limit)
    default_max = state.settings.max_attempts
    document = {"jobs": [_failed_document(job, default_max) for job in jobs]}
    out.emit(document, lambda: _render_failed(jobs, default_max))


def _failed_document(job: Job, default_max: int) -> dict[str, Any]:
    return {
        "id": job.id,
        "to": _masked_list(job.recipient_to),
        "subject": job.subject,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts or default_max,
        "last_error": _masked_text(job.last_error),
        "failed_at": job.updated_at,
    }


def _render_failed(jobs: list[Job], default_max: int) -> RenderableType:
    if not jobs:
        return "no failed jobs"
    rows = table("id", "failed at", "attempts", "to", "subject", "last error", right=["attempts"])
    for job in jobs:
        rows.add_row(
            job.id,
            format_time(job.updated_at),
            f"{job.attempts}/{job.max_attempts or default_max}",
            truncate(", ".join(_masked_list(job.recipient_to)), 30),
            truncate(job.subject, SUBJECT_WIDTH),
            truncate(_masked_text(job.last_error), ERROR_WIDTH),
        )
    return rows


def _partial_document(job: Job, refused: list[RecipientResult]) -> dict[str, Any]:
    return {
        "id": job.id,
        "to": _masked_list(job.recipient_to),
        "subject": job.subject,
        "sent_at": job.sent_at,
        "refused": [
            {
                "address": _masked_address(result.address),
                "smtp_code": result.smtp_code,
                "smtp_text": _masked_text(result.smtp_text),
                "relay": result.relay,
            }
            for result in refused
        ],
    }


def _render_partial(found: list[tuple[Job, list[RecipientResult]]]) -> RenderableType:
    if not found:
        return "no partially refused jobs"
    rows = table("id", "sent at", "subject", "refused", "first refusal", right=["refused"])
    for job, refused in found:
        first = refused[0]
        reply = f"{first.smtp_code or '-'} {_masked_text(first.smtp_text) or ''}".rstrip()
        rows.add_row(
            job.id,
            format_time(job.sent_at or job.updated_at),
            truncate(job.subject, SUBJECT_WIDTH),
            str(len(refused)),
            truncate(f"{_masked_address(first.address)}: {reply}", ERROR_WIDTH),
        )
    return rows


def _masked_address(address: str) -> str:
    masked = _masked_list(address)
    return masked[0] if masked else address


def _masked_list(recipients: str | None) -> list[str]:
    from mailqd.logging import mask_address_list  # here: mailqd.logging loads structlog, slow

    return mask_address_list(recipients)


def _masked_text(text: str | None) -> str | None:
    from mailqd.logging import mask_addresses_in

    return None if text is None else mask_addresses_in(text)


# -- show -------------------------------------------------------------------------


@click.command()
@click.argument("job_id")
@json_option
@click.pass_obj
@reports_errors
def show(state: Context, job_id: str, out: Output) -> None:
    """Every field of one job, its body, and its attempt history (oldest first).

    Attachments are listed by name, type, size and whether they are inline
    (with their Content-ID); their content is not printed.

    Exits 1 when there is no job with that id.

    \b
    Example:
      $ mailqctl show 3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
    """
    store = state.store
    job = store.get(job_id)
    history = store.attempts(job_id)
    recipients = store.recipients(job_id)
    attachments = store.attachments.describe(job.id)
    document = {
        "job": job_document(job),
        "attachments": [_attachment_document(info) for info in attachments],
        "recipients": [_recipient_document(result) for result in recipients],
        "attempts": [_attempt_document(attempt) for attempt in history],
    }
    out.emit(
        document,
        lambda: _render_job(job, history, state.settings.max_attempts, recipients, attachments),
    )


def _attachment_document(info: AttachmentInfo) -> dict[str, Any]:
    return {
        "filename": info.filename,
        "content_type": info.resolved_content_type,
        "size": info.size,
        "inline": info.inline,
        "content_id": info.content_id,
    }


def job_document(job: Job) -> dict[str, Any]:
    """Every column of the job, under its column name."""
    return {name: getattr(job, name) for name in JOB_COLUMNS}


def _recipient_document(result: RecipientResult) -> dict[str, Any]:
    return {
        "address": result.address,
        "status": result.status,
        "smtp_code": result.smtp_code,
        "smtp_text": result.smtp_text,
        "relay": result.relay,
        "attempt": result.attempt,
        "updated_at": result.updated_at,
    }


def _attempt_document(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": attempt.started_at,
        "duration_seconds": round(attempt.duration_seconds, 3),
        "outcome": attempt.outcome,
        "smtp_code": attempt.smtp_code,
        "smtp_text": attempt.smtp_text,
        "worker": attempt.worker,
    }


_LONG_FIELDS = ("body", "html")


def _render_job(
    job: Job,
    history: list[Attempt],
    default_max: int,
    recipients: list[RecipientResult],
    attachments: Sequence[AttachmentInfo] = (),
) -> RenderableType:
    now = datetime.now(UTC)
    fields = [
        (name, _field_text(getattr(job, name), now))
        for name in JOB_COLUMNS
        if name not in _LONG_FIELDS
    ]
    if job.max_attempts is None:
        fields = [
            (name, f"- (the setting: {default_max})" if name == "max_attempts" else text)
            for name, text in fields
        ]
    parts: list[RenderableType] = [key_value_table(fields)]
    for name in _LONG_FIELDS:
        value = getattr(job, name)
        parts += ["", f"--- {name} ---" if value is not None else f"--- no {name} ---"]
        if value is not None:
            parts.append(value)
    if attachments:
        parts += ["", _render_attachments(attachments)]
    if recipients:
        parts += ["", _render_recipients(recipients)]
    parts += ["", _render_attempts(history)]
    return Group(*parts)


def _render_attachments(attachments: Sequence[AttachmentInfo]) -> RenderableType:
    rows = table("attachment", "type", "size", "inline", right=["size"])
    for info in attachments:
        inline = (
            f"yes, cid:{info.content_id}"
            if info.inline and info.content_id
            else ("yes" if info.inline else "no")
        )
        rows.add_row(info.filename, info.resolved_content_type, _size(info.size), inline)
    return rows


def _size(size: int) -> str:
    """Bytes as an operator reads them: 512 B, 12.3 KB, 4.5 MB (1 KB = 1024 bytes)."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / 1024 / 1024:.1f} MB"


def _render_recipients(recipients: list[RecipientResult]) -> RenderableType:
    rows = table("recipient", "status", "smtp", "reply", "relay")
    for result in recipients:
        rows.add_row(
            result.address,
            result.status.value,
            str(result.smtp_code or "-"),
            result.smtp_text or "",
            result.relay or "-",
        )
    return rows


def _field_text(value: Any, now: datetime) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return format_age(value, now)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render_attempts(history: list[Attempt]) -> RenderableType:
    if not history:
        return "no attempts yet"
    rows = table("#", "started", "took", "outcome", "smtp", "reply / error", "worker", right=["#"])
    for attempt in history:
        rows.add_row(
            str(attempt.attempt),
            format_time(attempt.started_at),
            format_duration(attempt.duration_seconds),
            attempt.outcome.value,
            str(attempt.smtp_code or "-"),
            attempt.smtp_text or "",
            attempt.worker or "",
        )
    return rows
