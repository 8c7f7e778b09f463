"""One error tree for mailqd.

Every error an operator or an application can meet derives from `MailqError`,
and its message says what is wrong and, where there is one, what to do.
Driver errors (SQLAlchemy, psycopg, aiosmtplib) are translated into these at
the boundary of the layer that speaks to the driver.
"""

from __future__ import annotations


class MailqError(Exception):
    """Root of every error mailqd raises on purpose."""


class ConfigError(MailqError):
    """A configuration key has a missing, malformed or out-of-range value.

    The message reads "config KEY: problem"; `Client` arguments of the same
    name read "KEY: problem" (`source=""`), as they are not configuration.
    """

    def __init__(self, key: str, problem: str, *, source: str = "config") -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{source} {key}: {problem}" if source else f"{key}: {problem}")


class ValidationError(MailqError):
    """A message handed to mailqd is not acceptable; nothing was written."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class InvalidAddressError(ValidationError):
    """An e-mail address is malformed or too long."""


class HeaderInjectionError(ValidationError):
    """A subject, address or header holds CR, LF or NUL."""


class MissingContentError(ValidationError):
    """A message has neither body, html nor template."""


class LimitExceededError(ValidationError):
    """A message is over a configured limit (max_recipients, max_subject_length, ...).

    The problem names the limit's config key, so an operator knows what to raise.
    """


class TemplateError(ValidationError):
    """A template cannot be compiled or rendered: bad syntax, an undefined variable, the sandbox.

    The field is the template (`template 'welcome'`), so the message reads
    "template 'welcome': variable 'name' is undefined in the subject".
    """

    def __init__(self, template_id: str, problem: str) -> None:
        self.template_id = template_id
        super().__init__(f"template {template_id!r}", problem)


class StoreError(MailqError):
    """The queue database cannot be used.

    Daemons catch it as an outage and retry; a missing job or template, or
    a job in the wrong state, is a `NotFoundError` or `ConflictError`
    instead, as retrying would not help.
    """


class DatabaseUnavailableError(StoreError):
    """The database does not answer (down, unreachable, refused the login)."""


class SchemaError(StoreError):
    """The database schema is missing or at another version than this mailqd."""


class ConstraintError(StoreError):
    """A write broke a unique key of the database (found by SQLSTATE or SQLite's code).

    A `StoreError`, as every database error that is not an outage always was.
    """


class NotFoundError(MailqError):
    """What an operation names does not exist (a job, a template); the database is fine."""


class ConflictError(MailqError):
    """The operation conflicts with what is stored (a job's state, an existing id)."""


class JobNotFoundError(NotFoundError):
    """No job has the given id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class TemplateNotFoundError(NotFoundError):
    """No template has the given id."""

    def __init__(self, template_id: str) -> None:
        self.template_id = template_id
        super().__init__(f"no template with id {template_id!r}")


class TemplateExistsError(ConflictError):
    """A template with this id exists already, and replacing it was not asked for."""

    def __init__(self, template_id: str) -> None:
        self.template_id = template_id
        super().__init__(
            f"template {template_id!r} exists already; replace it with --replace (replace=True)"
        )


class JobStateError(ConflictError):
    """The job exists but is not in a state that allows the operation."""

    def __init__(self, job_id: str, status: str, operation: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"cannot {operation} job {job_id}: it is {status}")


class SecretsError(MailqError):
    """A secret kept in the database cannot be decrypted: no key, the wrong key, a damaged token."""


class DeliveryError(MailqError):
    """A message could not be handed to the mail server on this attempt.

    `smtp_code`/`smtp_text` carry the server's reply when there was one.
    Subclasses say what the daemon does next.
    """

    def __init__(self, message: str, smtp_code: int | None = None, smtp_text: str | None = None):
        self.smtp_code = smtp_code
        self.smtp_text = smtp_text
        super().__init__(message)


class TransientDeliveryError(DeliveryError):
    """4xx reply, timeout or connection error: retry later with backoff."""


class RelayUnavailableError(TransientDeliveryError):
    """The relay, not the message, failed: it could not be reached or refused the session.

    Raised for a refused or reset connection, a timeout or a 4xx (421)
    before `MAIL FROM`, and TLS or AUTH failures. The job is deferred
    without using an attempt, and the relay's circuit breaker counts it.
    `reason` is one of `RELAY_REASONS`; `relay` is the relay's name once the
    routed transport knows it.
    """

    def __init__(
        self,
        message: str,
        reason: str,
        smtp_code: int | None = None,
        smtp_text: str | None = None,
        *,
        relay: str | None = None,
    ) -> None:
        super().__init__(message, smtp_code, smtp_text)
        self.reason = reason
        self.relay = relay
        self.retry_after: float | None = None
        """Seconds until a relay of the route may be tried again, when the sender knows."""

    @property
    def opens_breaker_now(self) -> bool:
        """TLS and AUTH failures are configuration, not luck: stop every worker at once."""
        return self.reason in ("tls", "auth")


RELAY_REASONS = ("refused", "timeout", "closed", "unavailable", "tls", "auth", "down")
"""Why a relay failed: connection refused/reset, timed out, closed, 4xx/421 session reply,
TLS failure, AUTH failure; `down` is a send not tried because the relay was marked down."""


class PermanentDeliveryError(DeliveryError):
    """5xx reply or a message that can never be sent: fail the job now."""


class AmbiguousDeliveryError(TransientDeliveryError):
    """The server took the data but its final reply never came: retry, same Message-ID."""
