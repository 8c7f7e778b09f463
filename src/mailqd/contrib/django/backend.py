"""The Django email backend: `django.core.mail` queues into mailqd instead of speaking SMTP.

    EMAIL_BACKEND = "mailqd.contrib.django.EmailBackend"
    MAILQD = {"USE_DJANGO_CONNECTION": True}      # or {"DATABASE_URL": "postgresql://..."}

With `USE_DJANGO_CONNECTION`, jobs are written through Django's own
connection (`DATABASE_ALIAS`, default `"default"`), inside
`transaction.atomic()`: in an open transaction they are a savepoint of it,
queued if and only if it commits; outside one, the batch is its own
transaction. With `DATABASE_URL`, mailqd's client writes on connections of
its own, committed when `send_messages` returns, whatever Django's
transaction does later.

The settings are read and checked when the backend is made (Django makes
one per `send_mail`), so a mistake raises `ImproperlyConfigured` before any
mail is taken. The `Client` behind it is made once per process for each
configuration and shared, as the client wants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from mailqd.client import Client
from mailqd.contrib.django.messages import enqueue_arguments
from mailqd.errors import ConfigError, MailqError, ValidationError
from mailqd.validation import DEFAULT_LIMITS, Limits

__all__ = ["SETTING", "BackendConfig", "EmailBackend"]

SETTING = "MAILQD"
_KEYS = ("DATABASE_URL", "USE_DJANGO_CONNECTION", "DATABASE_ALIAS", "SECRETS_KEY_FILE", "LIMITS")
_DOCS = "see docs/django.md"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """`settings.MAILQD`, checked."""

    database_url: str
    """With `use_django_connection`, a URL naming only the kind of database (see below)."""
    use_django_connection: bool = False
    database_alias: str = DEFAULT_DB_ALIAS
    secrets_key_file: str | None = None
    limits: Limits = DEFAULT_LIMITS

    @classmethod
    def from_settings(cls) -> BackendConfig:
        """Read `settings.MAILQD`; `ImproperlyConfigured` naming the key that is wrong."""
        values = getattr(settings, SETTING, None)
        if not isinstance(values, Mapping):
            raise ImproperlyConfigured(
                f"settings.{SETTING} must be a dict with DATABASE_URL, or with "
                f"USE_DJANGO_CONNECTION: True ({_DOCS})"
            )
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise ImproperlyConfigured(
                f"settings.{SETTING}: unknown key(s) {', '.join(map(str, unknown))}; "
                f"the keys are {', '.join(_KEYS)}"
            )
        use_django = bool(values.get("USE_DJANGO_CONNECTION"))
        if use_django and values.get("DATABASE_URL"):
            raise ImproperlyConfigured(
                f"settings.{SETTING}: give DATABASE_URL or USE_DJANGO_CONNECTION, not both"
            )
        alias = _optional_text(values, "DATABASE_ALIAS")
        return cls(
            database_url=_django_database_url(alias or DEFAULT_DB_ALIAS)
            if use_django
            else _database_url(values, alias),
            use_django_connection=use_django,
            database_alias=alias or DEFAULT_DB_ALIAS,
            secrets_key_file=_optional_text(values, "SECRETS_KEY_FILE"),
            limits=_limits(values.get("LIMITS")),
        )


def _database_url(values: Mapping[str, Any], alias: str | None) -> str:
    if alias is not None:
        raise ImproperlyConfigured(
            f"settings.{SETTING}['DATABASE_ALIAS'] goes with USE_DJANGO_CONNECTION: True only"
        )
    url = values.get("DATABASE_URL")
    if not isinstance(url, str) or not url.strip():
        raise ImproperlyConfigured(
            f"settings.{SETTING} needs DATABASE_URL (postgresql://... or sqlite:///path), "
            f"or USE_DJANGO_CONNECTION: True ({_DOCS})"
        )
    return url


def _optional_text(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is not None and not isinstance(value, str):
        raise ImproperlyConfigured(f"settings.{SETTING}['{key}'] must be a string")
    return value


def _limits(values: object) -> Limits:
    if values is None:
        return DEFAULT_LIMITS
    if not isinstance(values, Mapping):
        raise ImproperlyConfigured(f"settings.{SETTING}['LIMITS'] must be a dict")
    try:
        return Limits(**values)
    except TypeError as exc:
        raise ImproperlyConfigured(f"settings.{SETTING}['LIMITS']: {exc}") from None


def _django_database_url(alias: str) -> str:
    """Check that the client can write through Django's connection `alias`; a URL for its kind.

    The client only needs the URL to know it speaks to PostgreSQL: it writes
    through Django's connection (`connection=`), never through this URL.
    The URL has no user or password, so that a write that ever went through
    it would fail at once rather than commit outside Django's transaction.
    """
    if alias not in settings.DATABASES:
        raise ImproperlyConfigured(
            f"settings.{SETTING}['DATABASE_ALIAS']: {alias!r} is not in settings.DATABASES"
        )
    wrapper = connections[alias]
    driver = getattr(type(wrapper), "Database", None)
    if wrapper.vendor != "postgresql" or getattr(driver, "__name__", "") != "psycopg":
        raise ImproperlyConfigured(
            f"settings.{SETTING}['USE_DJANGO_CONNECTION'] needs the database {alias!r} to be "
            "PostgreSQL with the psycopg 3 driver (Django's django.db.backends.postgresql, "
            f"psycopg installed); it is {wrapper.vendor} with "
            f"{getattr(driver, '__name__', 'an unknown driver')}. mailqd's client cannot write "
            "through Django's sqlite3 or psycopg2 connection: give DATABASE_URL instead (jobs are "
            f"then committed on their own, outside Django's transactions; {_DOCS})"
        )
    name = str(wrapper.settings_dict.get("NAME") or "")
    return f"postgresql:///{quote(name, safe='')}"


@cache
def _shared_client(url: str, secrets_key_file: str | None, limits: Limits) -> Client:
    """One client per configuration and process (it holds the connection pool)."""
    return Client(url, limits=limits, secrets_key_file=secrets_key_file)


class EmailBackend(BaseEmailBackend):
    """Queues Django's mail into mailqd; `send_messages` returns how many messages were queued.

    A batch is queued in one transaction. A message with no recipient at
    all is skipped, as Django's SMTP backend does. With `fail_silently`, a
    mailqd error (a message mailqd refuses, the database down) is
    swallowed: a refused message is left out and the others are queued one
    by one; what could not be queued is not counted.
    """

    def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)
        self.config = BackendConfig.from_settings()
        try:
            self.client = _shared_client(
                self.config.database_url, self.config.secrets_key_file, self.config.limits
            )
        except ConfigError as exc:
            raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from None

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        batch: list[dict[str, Any]] = []
        for message in email_messages:
            if not message.recipients():
                continue
            try:
                batch.append(enqueue_arguments(message))
            except ValidationError:
                if not self.fail_silently:
                    raise
        if not batch:
            return 0
        try:
            return len(self._enqueue(batch))
        except ValidationError:
            if not self.fail_silently:
                raise
            return sum(self._enqueue_alone(arguments) for arguments in batch)
        except (MailqError, DatabaseError):
            if not self.fail_silently:
                raise
            return 0

    def _enqueue_alone(self, arguments: dict[str, Any]) -> int:
        try:
            self._enqueue([arguments])
        except (MailqError, DatabaseError):
            return 0
        return 1

    def _enqueue(self, batch: list[dict[str, Any]]) -> list[str]:
        if not self.config.use_django_connection:
            return self.client.enqueue_many(batch)
        alias = self.config.database_alias
        with transaction.atomic(using=alias):
            wrapper = connections[alias]
            wrapper.ensure_connection()
            return self.client.enqueue_many(batch, connection=wrapper.connection)
