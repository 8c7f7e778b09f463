"""The plain data that crosses layers: jobs, attempts and queue counts.

These are what the store returns and what the client, daemon and CLI pass
around; none of them knows about SQL or SMTP.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailqd.attachments import Attachment


class Status(enum.StrEnum):
    """Where a job is in its life. The values are what the `status` column holds."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATUSES = (Status.SENT, Status.FAILED, Status.CANCELLED)


class Outcome(enum.StrEnum):
    """The result of one delivery attempt, as kept in the attempts table."""

    SENT = "sent"
    RETRY = "retry"  # transient failure; rescheduled
    FAILED = "failed"  # permanent failure, or the last allowed attempt failed
    AMBIGUOUS = "ambiguous"  # no reply to the end of DATA; retried (at-least-once)
    EXPIRED = "expired"  # past expires_at; not sent
    LOST = "lost"  # the worker holding the job died, or its lease expired; counted
    RELEASED = "released"  # given back at a graceful stop before DATA; pending, not counted
    DUPLICATE = "duplicate"  # same content claimed within dedup_window; cancelled, not sent
    DEFERRED = "deferred"  # the recipient cap, or the relay failed: pending, not counted
    THROTTLED = "throttled"  # a recipient domain at its domain_rate_limits; pending, no attempt row


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated message, ready to be written. Built by `mailqd.validation`."""

    id: str
    recipient_to: str
    subject: str
    body: str | None = None
    html: str | None = None
    template_id: str | None = None
    variables: dict[str, Any] | None = None
    cc: str | None = None
    bcc: str | None = None
    reply_to: str | None = None
    from_address: str | None = None
    headers: dict[str, str] | None = None
    priority: int = 0
    send_after: datetime | None = None
    expires_at: datetime | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    attachments: tuple[Attachment, ...] = ()
    """Written to `email_attachments` and `mailqd_blobs` with the job, never into its row."""


@dataclass(frozen=True, slots=True)
class Job:
    """One row of `email_queue`, as read back from the store.

    `variables` and `headers` are what the column held: normally a dict, but a
    row written by plain SQL may hold anything, which the daemon checks.
    """

    id: str
    recipient_to: str
    subject: str
    body: str | None
    html: str | None
    template_id: str | None
    variables: Any
    cc: str | None
    bcc: str | None
    reply_to: str | None
    from_address: str | None
    headers: Any
    status: Status
    priority: int
    attempts: int
    max_attempts: int | None
    last_error: str | None
    next_attempt_at: datetime
    expires_at: datetime | None
    idempotency_key: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    message_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    has_attachments: bool | None = None
    """Not a column: whether the claim found attachments for it (None when not asked)."""


JOB_COLUMNS = tuple(name for name in Job.__slots__ if name != "has_attachments")
"""The `email_queue` columns a `Job` carries."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt of a job, for troubleshooting."""

    job_id: str
    attempt: int
    started_at: datetime
    duration_seconds: float
    outcome: Outcome
    smtp_code: int | None = None
    smtp_text: str | None = None
    worker: str | None = None


class RecipientStatus(enum.StrEnum):
    """What became of one recipient (`email_recipients.status`)."""

    ACCEPTED = "accepted"  # a relay accepted the message for it
    REFUSED = "refused"  # refused permanently (5xx to RCPT): not retried
    PENDING = "pending"  # refused temporarily, or its route's relays were down: retried


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's result, kept when a job's recipients did not all fare alike."""

    address: str
    status: RecipientStatus
    smtp_code: int | None = None
    smtp_text: str | None = None
    relay: str | None = None
    attempt: int = 0
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """How many jobs are in each status, and how late the oldest due job is."""

    by_status: dict[Status, int] = field(default_factory=dict)
    oldest_due_age_seconds: float | None = None

    @property
    def pending(self) -> int:
        return self.by_status.get(Status.PENDING, 0)

    @property
    def sending(self) -> int:
        return self.by_status.get(Status.SENDING, 0)

    @property
    def depth(self) -> int:
        """Jobs not yet finished: what is waiting plus what is being sent."""
        return self.pending + self.sending


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What the queue did in the last `seconds`: jobs that ended sent or failed, attempts made."""

    seconds: float
    sent: int = 0
    failed: int = 0
    attempts: int = 0
    """Delivery attempts; duplicates and deferrals, which try nothing, are counted apart."""
    deduplicated: int = 0
    """Jobs cancelled as duplicates (`dedup_window`)."""
    cap_deferred: int = 0
    """Claims put off to the next hour (`recipient_hourly_cap`)."""
    relay_deferred: int = 0
    """Deliveries put off because their relay failed or was down (no attempt used)."""

    @property
    def failure_rate(self) -> float | None:
        """Failed jobs as a fraction of the jobs that ended in the window; None if none did."""
        finished = self.sent + self.failed
        return self.failed / finished if finished else None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot for operators (`mailqctl stats`, `mailqctl top`), as of the database's `at`.

    `due` counts pending jobs whose time has come; `retries_waiting` counts
    pending jobs that already had an attempt and wait for their backoff, and
    `retries_due_soon` those of them due within `soon_seconds`.
    """

    at: datetime
    counts: QueueCounts
    due: int
    retries_waiting: int
    retries_due_soon: int
    soon_seconds: float
    last_5m: WindowStats
    last_1h: WindowStats
    unleased: int = 0
    """`sending` rows that no worker holds (no lease; written by plain SQL): the rescuer
    returns them to the queue. Not in `counts`, which counts held jobs as `sending`."""


@dataclass(frozen=True, slots=True)
class Template:
    """A message template (`email_templates`), rendered with a job's variables when it is sent.

    `subject`, `text_body` and `html_body` are Jinja2 sources; an empty
    subject or a missing body leaves that part to the job's own fields.
    """

    id: str
    subject: str
    text_body: str | None
    html_body: str | None
    created_at: datetime
    updated_at: datetime
