"""One delivery attempt of one claimed job, turned into the `Completion` that records it.

This is where the outcome rules live: what is sent, retried, failed or
expired, and why. It never raises for a job's sake: whatever is wrong with
a job (a row written by plain SQL with garbage in it, a composer that
refuses it, a server that says no) becomes that job's outcome, so one bad
message cannot stop a worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from mailqd.attachments import Attachment
from mailqd.compose import OutgoingMessage, compose
from mailqd.config import Settings
from mailqd.daemon.retry import BackoffPolicy
from mailqd.daemon.templates import TemplateCache
from mailqd.errors import (
    AmbiguousDeliveryError,
    DeliveryError,
    PermanentDeliveryError,
    RelayUnavailableError,
    SecretsError,
    StoreError,
    TransientDeliveryError,
    ValidationError,
)
from mailqd.logging import mask_address_list, mask_addresses_in
from mailqd.models import Job, Outcome, RecipientResult, RecipientStatus
from mailqd.rules import AttachmentLike, Limits, check_attachments
from mailqd.rules.rows import check_claimed_row
from mailqd.runtime import Runtime
from mailqd.secrets import SecretBox, unseal_variables
from mailqd.signing import DkimSigner
from mailqd.store import Completion
from mailqd.templating import RenderBudget, render
from mailqd.transport import SendResult, Transport
from mailqd.transport.routed import recipient_results

__all__ = ["Deliverer", "SettledRecipients"]

log = structlog.get_logger()

_LOGGED_RECIPIENTS = 5
_DESCRIBED_KEPT = 10_000
_COMPOSED_IN_THREAD = 1024 * 1024
_MEASURED = 1e-6
"""A delivery's `deferred` row always has a duration; the claim's (recipient cap) has 0."""


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The bookkeeping of one attempt while it runs."""

    job: Job
    number: int
    max_attempts: int
    started_at: datetime
    started: float  # time.monotonic()

    @property
    def is_last(self) -> bool:
        return self.number >= self.max_attempts


class SettledRecipients(Protocol):
    """Who of a job's recipients needs nothing more (`Store.recipient_ledger.settled`)."""

    def settled(self, job_id: str) -> frozenset[str]: ...


class JobAttachments(Protocol):
    """Jobs' attachments (`Store.attachments`): described without content, or read whole."""

    def describe_jobs(self, job_ids: Sequence[str]) -> Mapping[str, Sequence[AttachmentLike]]: ...

    def for_job(self, job_id: str) -> list[Attachment]: ...


class Deliverer:
    """Runs attempts for one worker (`owner`), by the settings' retry and composition rules.

    `templates` is where jobs with a `template_id` find their template
    (without it, such jobs fail); `secrets` opens encrypted variables.
    `runtime` gives the parts built once from the settings (backoff, limits,
    DKIM signer, render budget, and the secrets box unless `secrets` is
    given); without it they are built here, for a deliverer made in-process.
    `attachments` is where a job's attachments are read (without it, jobs
    are sent without them).
    """

    def __init__(
        self,
        settings: Settings,
        owner: str,
        policy: BackoffPolicy | None = None,
        *,
        templates: TemplateCache | None = None,
        secrets: SecretBox | None = None,
        runtime: Runtime | None = None,
        ledger: SettledRecipients | None = None,
        attachments: JobAttachments | None = None,
    ):
        self._settings = settings
        self._owner = owner
        self._templates = templates
        self._ledger = ledger
        self._attachments = attachments
        self._described: dict[str, asyncio.Future[Mapping[str, Sequence[AttachmentLike]]]] = {}
        self._lifetime = timedelta(seconds=settings.queue_lifetime)
        if runtime is None:
            self._policy = policy or BackoffPolicy.from_settings(settings)
            self._secrets = secrets
            self._limits = Limits.from_settings(settings)
            self._signer = DkimSigner.from_settings(settings)  # ConfigError: cannot start
            self._template_budget = RenderBudget.from_settings(settings)
        else:
            self._policy = policy or runtime.backoff
            self._secrets = runtime.secrets if secrets is None else secrets
            self._limits = runtime.limits
            self._signer = runtime.signer
            self._template_budget = runtime.render_budget

    async def deliver(self, job: Job, transport: Transport) -> Completion:
        """Decide, compose and send one job; returns the outcome to record."""
        attempt = self._begin(job)
        verdict = self._refuse_before_sending(attempt)
        if verdict is not None:
            self._described.pop(job.id, None)
            return self._finish(attempt, verdict)
        try:
            message = await self._message(job)
        except TransientDeliveryError as exc:  # the template or attachments could not be read
            return self._finish(attempt, self._after_error(attempt, exc, None))
        except ValidationError as exc:
            return self._finish(attempt, self._failed(attempt, f"cannot compose message: {exc}"))
        except Exception as exc:  # the same job would fail the same way every time
            log.exception("composer raised an unexpected error", job_id=job.id)
            error = f"cannot compose message: unexpected {type(exc).__name__}: {exc}"
            return self._finish(attempt, self._failed(attempt, error))
        full = message.recipients
        try:
            message = await self._unsettled(job, message)
        except StoreError as exc:  # retry, rather than send to anyone twice
            unread = TransientDeliveryError(f"cannot read the recipients' results: {exc}")
            return self._finish(attempt, self._after_error(attempt, unread, None))
        if not message.recipients:
            return self._finish(attempt, self._sent(attempt, SendResult(None, None), message))
        try:
            result = await transport.send(message)
        except RelayUnavailableError as exc:
            return self._finish(attempt, self._relay_failed(attempt, exc, message.message_id))
        except DeliveryError as exc:
            return self._finish(attempt, self._after_error(attempt, exc, message.message_id))
        except Exception as exc:  # a transport bug must not kill the worker; retry is safest
            log.exception("transport raised an unexpected error", job_id=job.id)
            unexpected = TransientDeliveryError(f"unexpected {type(exc).__name__}: {exc}")
            return self._finish(attempt, self._after_error(attempt, unexpected, message.message_id))
        return self._finish(
            attempt, self._sent(attempt, result, message, message.recipients != full)
        )

    def describe_claimed(self, job_ids: Sequence[str]) -> None:
        """Start learning a claim batch's attachments: one `describe_jobs` for the batch.

        Called when a batch is claimed (`Worker._start`). Each job's attempt
        then waits for that one answer: a job without attachments is sent
        with no lookup of its own (one query a batch instead of one a job:
        figures in docs/performance.md, "Attachments"), one with some is
        checked on its description (sizes, count, names) before its
        content is read. A job not described, or whose description could
        not be read, is looked up with its content. Entries are dropped as
        their jobs are delivered; those of jobs released unsent are
        forgotten past `_DESCRIBED_KEPT`.
        """
        if self._attachments is None or not job_ids:
            return
        if len(self._described) > _DESCRIBED_KEPT:
            self._described.clear()
        lookup = asyncio.ensure_future(
            asyncio.to_thread(self._attachments.describe_jobs, list(job_ids))
        )
        lookup.add_done_callback(_retrieve)
        for job_id in job_ids:
            self._described[job_id] = lookup

    async def _description(self, job_id: str) -> Sequence[AttachmentLike] | None:
        """The job's attachments as its claim batch described them; None if not known."""
        lookup = self._described.pop(job_id, None)
        if lookup is None:
            return None
        try:  # shielded: one attempt cancelled must not cancel its batch's lookup
            described = await asyncio.shield(lookup)
        except StoreError:
            return None
        return described.get(job_id)

    def crashed(self, job: Job, exc: Exception) -> Completion:
        """The outcome for an attempt that died of a bug in mailqd itself.

        Counted like a transient failure, so the job is retried and, if the
        bug is in how this job is handled, fails after its last attempt
        instead of being retried forever.
        """
        attempt = self._begin(job)
        error = TransientDeliveryError(f"internal error: {type(exc).__name__}: {exc}")
        return self._finish(attempt, self._after_error(attempt, error, None))

    # -- the rules --------------------------------------------------------------

    def _begin(self, job: Job) -> _Attempt:
        return _Attempt(
            job=job,
            number=job.attempts + 1,
            max_attempts=(
                self._settings.max_attempts if job.max_attempts is None else job.max_attempts
            ),
            started_at=datetime.now(UTC),
            started=time.monotonic(),
        )

    def _refuse_before_sending(self, attempt: _Attempt) -> Completion | None:
        """Jobs that must not be sent at all: out of the rules, out of attempts, or expired.

        A row written by plain SQL may hold what the client would have
        refused (`mailqd.rules.rows`: a `max_attempts` of 0 or 3,000,000,000,
        a priority out of range, a 2,000-character Message-ID, NUL in the
        variables): it fails at once, its `last_error` naming the column,
        rather than being sent with a budget nobody meant.
        A job can be claimed with no attempts left when its earlier attempts
        were interrupted (the worker was killed and the lease rescued): it
        fails here instead of being sent once more. Expiry is judged at the
        claim's time, by the database clock the claim stamped on the row.
        """
        job = attempt.job
        try:
            check_claimed_row(job)
        except ValidationError as exc:
            return self._completion(attempt, Outcome.FAILED, error=str(exc))
        if job.attempts >= attempt.max_attempts:
            reason = job.last_error or "no error recorded"
            return self._completion(
                attempt,
                Outcome.FAILED,
                error=f"gave up after {job.attempts} attempts: {reason}",
            )
        if job.expires_at is not None and job.expires_at <= job.updated_at:
            return self._completion(
                attempt, Outcome.EXPIRED, error=f"expired at {job.expires_at.isoformat()}"
            )
        if self._past_lifetime(job, job.updated_at):
            return self._completion(attempt, Outcome.EXPIRED, error=self._lifetime_error(job))
        return None

    def _past_lifetime(self, job: Job, at: datetime) -> bool:
        """Queued longer than `queue_lifetime` at `at` (the claim's time, or now)."""
        return job.created_at + self._lifetime <= at

    def _lifetime_error(self, job: Job) -> str:
        days = self._settings.queue_lifetime / 86400
        last = job.last_error or "no error recorded"
        return f"queued longer than queue_lifetime ({days:g} days); last error: {last}"

    async def _unsettled(self, job: Job, message: OutgoingMessage) -> OutgoingMessage:
        """The message for the recipients an earlier attempt did not settle.

        Asked only of a job tried before (a first attempt has no results);
        an earlier attempt that was accepted for some recipients recorded
        them, and they are not sent to again.
        """
        if self._ledger is None or (job.attempts == 0 and job.last_error is None):
            return message
        settled = await asyncio.to_thread(self._ledger.settled, job.id)
        if not settled:
            return message
        remaining = tuple(r for r in message.recipients if r not in settled)
        return dataclasses.replace(message, recipients=remaining)

    async def _content(self, job: Job) -> Job:
        """The job with the subject, text and html that will be sent: its template rendered.

        The one place that decides a message's final content; `compose`
        then checks and sanitizes it the same way whether it came from the
        job or from a template. The template's parts win where it defines
        them (a non-empty subject, a text or html body); the job's own
        fields fill the rest, used as they are, not rendered. A template
        that does not exist, an undefined variable, or variables that
        cannot be decrypted fail the job (`ValidationError`); a database
        that cannot be read now retries it (`TransientDeliveryError`).
        """
        if job.variables is not None and not isinstance(job.variables, dict):
            raise ValidationError(
                "variables", f"must be a JSON object, not {type(job.variables).__name__}"
            )
        if job.template_id is None:
            return job
        template = await self._templates.get(job.template_id) if self._templates else None
        if template is None:
            raise ValidationError(
                "template_id",
                f"unknown template {job.template_id!r} (add it with `mailqctl templates add`)",
            )
        try:
            variables = unseal_variables(job.variables, self._secrets)
        except SecretsError as exc:
            raise ValidationError("variables", str(exc)) from None
        if not isinstance(variables, dict):
            raise ValidationError(
                "variables", f"must be a JSON object, not {type(variables).__name__}"
            )
        rendered = render(template, variables, self._template_budget)
        return dataclasses.replace(
            job,
            subject=job.subject if rendered.subject is None else rendered.subject,
            body=job.body if rendered.text is None else rendered.text,
            html=job.html if rendered.html is None else rendered.html,
        )

    async def _message(self, job: Job) -> OutgoingMessage:
        """The composed (and signed) message; the attachments are let go once it is built.

        With more than `_COMPOSED_IN_THREAD` bytes of attachments, composing
        and signing (some 10 ms a MB) run in a thread, so the worker's other
        sends and its lease renewals are not held up while they do.
        """
        content = await self._content(job)
        attachments = await self._read_attachments(job)
        if sum(len(a.content) for a in attachments) > _COMPOSED_IN_THREAD:
            return await asyncio.to_thread(self._compose, content, attachments)
        return self._compose(content, attachments)

    async def _read_attachments(self, job: Job) -> Sequence[Attachment]:
        """The job's attachments, read in a thread and checked again by the rules.

        Checked again because a row inserted with plain SQL never went
        through the client: one that breaks the rules (too large, too many,
        a name with a path) fails the job, naming the field. A store that
        cannot be read now retries the job. A job its claim batch described
        as having none is not looked up (`describe_claimed`).
        """
        if self._attachments is None or job.has_attachments is False:
            return ()
        described = await self._description(job.id)
        if described is not None and not described:
            return ()
        if described is not None:
            check_attachments(described, self._limits)  # before reading megabytes
        try:
            found = await asyncio.to_thread(self._attachments.for_job, job.id)
        except StoreError as exc:
            raise TransientDeliveryError(f"cannot read the attachments: {exc}") from None
        if found:
            check_attachments(found, self._limits)
        return found

    def _compose(self, job: Job, attachments: Sequence[Attachment] = ()) -> OutgoingMessage:
        """Build the message; a row whose JSON columns hold the wrong types is refused here.

        The Message-ID is the job's own if it has one, else derived from the
        job id and the sender's domain, so every attempt sends the same one.
        A row over the configured limits (max_recipients, ...) is refused
        here, naming the limit. With DKIM configured, the message is signed.
        """
        if job.headers is not None and not isinstance(job.headers, dict):
            raise ValidationError(
                "headers", f"must be a JSON object, not {type(job.headers).__name__}"
            )
        message = compose(
            job,
            default_from=self._settings.from_address,
            limits=self._limits,
            attachments=attachments,
        )
        if self._signer is None:
            return message
        return dataclasses.replace(message, data=self._signer.sign(message.data))

    def _sent(
        self,
        attempt: _Attempt,
        result: SendResult,
        message: OutgoingMessage,
        partial_envelope: bool = False,
    ) -> Completion:
        """Accepted for some recipients at least: sent, unless some must still be tried.

        Recipients refused for now (4xx to RCPT), or whose route's relays
        were down, are tried again: the job is pending again (a relay
        failure uses no attempt) and the next attempt sends to them only
        (`partial_envelope`), recording what became of each.
        """
        recipients = tuple(
            result.recipients
            or (
                recipient_results(result, message.recipients)
                if result.refused or partial_envelope
                else ()
            )
        )
        pending = [r for r in recipients if r.status is RecipientStatus.PENDING]
        if not pending:
            return self._completion(
                attempt,
                Outcome.SENT,
                smtp_code=result.smtp_code,
                smtp_text=_describe_acceptance(result),
                message_id=message.message_id,
                recipients=recipients,
            )
        cause = result.pending_error
        waiting = f"{len(pending)} recipient(s) still to do: {_describe_acceptance(result)}"
        if isinstance(cause, RelayUnavailableError):
            completion = self._relay_failed(attempt, cause, message.message_id, waiting)
        else:
            error = TransientDeliveryError(waiting, result.smtp_code, _describe_acceptance(result))
            completion = self._after_error(attempt, error, message.message_id)
        return dataclasses.replace(completion, recipients=recipients)

    def _relay_failed(
        self,
        attempt: _Attempt,
        exc: RelayUnavailableError,
        message_id: str | None,
        error: str | None = None,
    ) -> Completion:
        """The relay failed, not the message: pending again, no attempt used, until the
        route's next probe (`exc.retry_after`); expired once past `queue_lifetime`."""
        job = attempt.job
        if self._past_lifetime(job, datetime.now(UTC)):
            expired = dataclasses.replace(job, last_error=str(exc))
            return self._completion(
                attempt, Outcome.EXPIRED, error=self._lifetime_error(expired), message_id=message_id
            )
        delay = exc.retry_after or self._settings.relay_probe_interval
        return self._completion(
            attempt,
            Outcome.DEFERRED,
            smtp_code=exc.smtp_code,
            smtp_text=_reply_text(exc),
            error=error or str(exc),
            retry_in_seconds=delay * random.uniform(1.0, 1.1),
            message_id=message_id,
            min_duration=_MEASURED,
        )

    def _after_error(
        self, attempt: _Attempt, exc: DeliveryError, message_id: str | None
    ) -> Completion:
        """Permanent errors fail now; transient and ambiguous ones retry while attempts remain."""
        if isinstance(exc, PermanentDeliveryError):
            return self._failed(attempt, str(exc), exc, message_id)
        if attempt.is_last:
            return self._failed(
                attempt, f"gave up after {attempt.number} attempts: {exc}", exc, message_id
            )
        outcome = Outcome.AMBIGUOUS if isinstance(exc, AmbiguousDeliveryError) else Outcome.RETRY
        return self._completion(
            attempt,
            outcome,
            smtp_code=exc.smtp_code,
            smtp_text=_reply_text(exc),
            error=str(exc),
            retry_in_seconds=self._policy.delay(attempt.number),
            message_id=message_id,
        )

    def _failed(
        self,
        attempt: _Attempt,
        error: str,
        exc: DeliveryError | None = None,
        message_id: str | None = None,
    ) -> Completion:
        return self._completion(
            attempt,
            Outcome.FAILED,
            smtp_code=exc.smtp_code if exc else None,
            smtp_text=_reply_text(exc) if exc else None,
            error=error,
            message_id=message_id,
        )

    def _completion(
        self,
        attempt: _Attempt,
        outcome: Outcome,
        *,
        smtp_code: int | None = None,
        smtp_text: str | None = None,
        error: str | None = None,
        retry_in_seconds: float = 0.0,
        message_id: str | None = None,
        recipients: tuple[RecipientResult, ...] = (),
        min_duration: float = 0.0,
    ) -> Completion:
        return Completion(
            job_id=attempt.job.id,
            owner=self._owner,
            attempt=attempt.number,
            outcome=outcome,
            started_at=attempt.started_at,
            duration_seconds=max(min_duration, time.monotonic() - attempt.started),
            smtp_code=smtp_code,
            smtp_text=smtp_text,
            error=error,
            retry_in_seconds=retry_in_seconds,
            message_id=message_id,
            recipients=recipients,
        )

    def _finish(self, attempt: _Attempt, completion: Completion) -> Completion:
        _log_attempt(attempt, completion)
        return completion


def _retrieve(lookup: asyncio.Future[Any]) -> None:
    """Mark a batch lookup's error as seen: its jobs fall back to their own lookup."""
    if not lookup.cancelled():
        lookup.exception()


def _describe_acceptance(result: SendResult) -> str | None:
    """The server's reply, plus every recipient it refused, so a partial failure shows."""
    text = f"{result.smtp_code} {result.smtp_text}" if result.smtp_text else None
    if not result.refused:
        return text
    refusals = "; ".join(
        f"{address}: {code} {reply}" if code else f"{address}: {reply}"
        for address, (code, reply) in result.refused.items()
    )
    return f"{text or 'accepted'}; refused {len(result.refused)} recipient(s): {refusals}"


def _reply_text(exc: DeliveryError) -> str | None:
    """What the attempts table shows: the server's own words when it said something."""
    if exc.smtp_code is not None and exc.smtp_text:
        return f"{exc.smtp_code} {exc.smtp_text}"
    return str(exc)


_ATTEMPT_LOG_LEVEL = {
    Outcome.SENT: "info",
    Outcome.RETRY: "warning",
    Outcome.AMBIGUOUS: "warning",
    Outcome.DEFERRED: "warning",
}
_LEVEL_NUMBER = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _log_attempt(attempt: _Attempt, completion: Completion) -> None:
    """One event per attempt; addresses masked, no bodies, no subjects."""
    level = _ATTEMPT_LOG_LEVEL.get(completion.outcome, "error")
    # At `log_level = warning` a sent attempt is not logged: skip building the
    # event (~11 us a message, measured) when the logger would drop it.
    is_enabled_for = getattr(log, "is_enabled_for", None)
    if is_enabled_for is not None and not is_enabled_for(_LEVEL_NUMBER[level]):
        return
    recipients = mask_address_list(attempt.job.recipient_to)
    fields: dict[str, object] = {
        "job_id": completion.job_id,
        "attempt": completion.attempt,
        "max_attempts": attempt.max_attempts,
        "outcome": completion.outcome.value,
        "smtp_code": completion.smtp_code,
        "duration_ms": round(completion.duration_seconds * 1000, 1),
        "worker": completion.owner,
        "to": recipients[:_LOGGED_RECIPIENTS],
    }
    if len(recipients) > _LOGGED_RECIPIENTS:
        fields["to_more"] = len(recipients) - _LOGGED_RECIPIENTS
    if (
        completion.outcome is Outcome.SENT
        and completion.smtp_text
        and "refused" in (completion.smtp_text)
    ):
        fields["partial"] = mask_addresses_in(completion.smtp_text)
    if completion.error:
        fields["error"] = mask_addresses_in(completion.error)
    if completion.retry_in_seconds:
        fields["retry_in"] = round(completion.retry_in_seconds, 3)
    getattr(log, level)("delivery attempt", **fields)
