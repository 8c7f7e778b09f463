"""The client library: how applications hand mail to mailqd.

    from mailqd import Client
    client = Client("postgresql://app@db/app")
    job_id = client.enqueue("alice@example.com", "Welcome", "Hello Alice")

`enqueue(..., connection=conn)` writes inside the caller's open transaction
(the transactional outbox): the mail is queued if and only if the caller's
transaction commits. `AsyncClient` is the same client for asyncio code; it
runs the blocking database work in a thread, so there is one implementation.

Templates (`add_template`, `render_template`, ...) live in the same
database; a job names one with `template_id=` and gives its `variables=`.
`enqueue` does not check that the template exists (that would cost a round
trip per message, and a template may be added after its jobs): a job whose
template is missing when it is sent fails with "unknown template".

With a key file (`secrets_key_file=`), a job's variables are encrypted
before they are written (see `mailqd.secrets`); the daemon needs the same
key to send them. The constructor reads no environment variable:
`Client.from_env()` (or `AsyncClient.from_env()`) is the named way to take
the URL and the key file from `MAILQD_DATABASE_URL` and
`MAILQD_SECRETS_KEY_FILE`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from mailqd.attachments import Attachment
from mailqd.errors import ConfigError
from mailqd.models import NewJob, Template
from mailqd.secrets import load_secret_box, seal_variables
from mailqd.store import Store
from mailqd.templating import Rendered, check_template, compile_template, render
from mailqd.validation import DEFAULT_LIMITS, Limits, Recipients, build_job

DATABASE_URL_ENV = "MAILQD_DATABASE_URL"
SECRETS_KEY_FILE_ENV = "MAILQD_SECRETS_KEY_FILE"


class Client:
    """Queues mail into a mailqd database. Thread-safe; create one per process.

    `secrets_key_file`: a Fernet key file (`mailqctl secrets generate-key`);
    when given, template variables are stored encrypted. The key file is
    read once, here; the environment is not read (`from_env` does that).
    A key file that cannot be read, or a malformed `database_url`, raises
    `ConfigError` ("database_url: ..."), with no part of the URL in its
    message.
    """

    def __init__(
        self,
        database_url: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        secrets_key_file: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            self._secrets = load_secret_box(secrets_key_file)
            self._store = Store.from_url(database_url, **engine_kwargs)
        except ConfigError as exc:
            # The same one line as the daemon's, naming the argument (never quoting the URL).
            raise ConfigError(exc.key, exc.problem, source="") from None
        self._limits = limits

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        **engine_kwargs: Any,
    ) -> Client:
        """A client for `MAILQD_DATABASE_URL`, encrypting with `MAILQD_SECRETS_KEY_FILE` if set.

        `env` defaults to `os.environ`. `ConfigError` ("database_url: ...")
        when `MAILQD_DATABASE_URL` is not set.
        """
        url, key_file = _from_env(os.environ if env is None else env)
        return cls(url, limits=limits, secrets_key_file=key_file, **engine_kwargs)

    def close(self) -> None:
        """Close the client's database connections."""
        self._store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(
        self,
        to: Recipients,
        subject: str,
        body: str | None = None,
        html: str | None = None,
        *,
        template_id: str | None = None,
        variables: Mapping[str, Any] | None = None,
        cc: Recipients = None,
        bcc: Recipients = None,
        reply_to: str | None = None,
        from_address: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        send_after: datetime | None = None,
        expires_at: datetime | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        attachments: Iterable[Attachment | tuple[Any, ...]] | None = None,
        connection: Any = None,
    ) -> str:
        """Queue one message and return its job id.

        `to`, `cc`, `bcc`: an address, a comma-separated string or a list.
        `priority`: higher is sent first (default 0, range -1000..1000).
        `send_after`/`expires_at`: timezone-aware datetimes; a job not sent by
        `expires_at` fails as expired. `idempotency_key`: enqueueing the same
        key again returns the first job's id and queues nothing.
        `attachments`: `Attachment`s, or Django-style `(filename, content,
        mimetype)` tuples; checked against `max_attachments` and
        `max_attachment_bytes` and stored with the job, out of its row
        (identical content once).
        `connection`: a SQLAlchemy Connection or psycopg Connection whose open
        transaction the row is written in; it is not committed here.
        Raises `mailqd.errors.ValidationError` (nothing written) for bad input.
        """
        job = build_job(
            to,
            subject,
            body,
            html,
            template_id=template_id,
            variables=variables,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            from_address=from_address,
            headers=headers,
            priority=priority,
            send_after=send_after,
            expires_at=expires_at,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            attachments=attachments,
            limits=self._limits,
        )
        return self._store.enqueue(seal_variables(job, self._secrets), connection)

    def enqueue_many(
        self, messages: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[str]:
        """Queue many messages in one transaction, one INSERT per 1,000 rows.

        Each message is a mapping of `enqueue`'s keyword arguments
        (`attachments` included). Every
        message is checked first; if any is bad, a ValidationError names its
        index and nothing is written. Returns the ids in input order.
        """
        jobs = [self._build(i, m) for i, m in enumerate(messages)]
        return self._store.enqueue_many(jobs, connection)

    def _build(self, index: int, message: Mapping[str, Any]) -> NewJob:
        from mailqd.errors import ValidationError

        try:
            return seal_variables(build_job(**message, limits=self._limits), self._secrets)
        except ValidationError as exc:
            raise type(exc)(f"messages[{index}].{exc.field}", exc.problem) from None
        except TypeError as exc:
            raise ValidationError(f"messages[{index}]", str(exc)) from None

    # -- templates -----------------------------------------------------------------

    def add_template(
        self,
        template_id: str,
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        replace: bool = False,
    ) -> Template:
        """Store a template (Jinja2 sources); returns it as stored.

        It is compiled first, so a syntax error raises `TemplateError` and
        nothing is written. An existing id raises `TemplateExistsError`
        unless `replace=True`; running daemons use a replaced template
        within a few seconds (docs/templates.md).
        """
        check_template(template_id, subject, text, html)
        return self._store.templates.put(template_id, subject, text, html, replace=replace)

    def get_template(self, template_id: str) -> Template:
        """The template, or `TemplateNotFoundError`."""
        return self._store.templates.get(template_id)

    def list_templates(self) -> list[Template]:
        """Every template, by id."""
        return self._store.templates.all()

    def delete_template(self, template_id: str) -> None:
        """Remove a template (`TemplateNotFoundError` if there is none); queued jobs keep its id."""
        self._store.templates.delete(template_id)

    def render_template(
        self, template_id: str, variables: Mapping[str, Any] | None = None
    ) -> Rendered:
        """Render a stored template as the daemon would, without sending anything (a preview).

        Raises `TemplateError` for what would fail the job: an undefined
        variable, a sandbox refusal, a subject that would not be one line.
        """
        return render(compile_template(self._store.templates.get(template_id)), variables)


class AsyncClient:
    """`Client` for asyncio code: the same methods, awaited.

    With `connection=`, pass a SQLAlchemy `AsyncConnection`; the row is written
    in its open transaction (through `run_sync`) and not committed here.
    """

    def __init__(
        self,
        database_url: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        secrets_key_file: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self._client = Client(
            database_url, limits=limits, secrets_key_file=secrets_key_file, **engine_kwargs
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        **engine_kwargs: Any,
    ) -> AsyncClient:
        """See `Client.from_env`."""
        url, key_file = _from_env(os.environ if env is None else env)
        return cls(url, limits=limits, secrets_key_file=key_file, **engine_kwargs)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enqueue(self, *args: Any, connection: Any = None, **kwargs: Any) -> str:
        """See `Client.enqueue`."""
        if connection is not None:
            return await connection.run_sync(  # type: ignore[no-any-return]
                lambda sync_conn: self._client.enqueue(*args, connection=sync_conn, **kwargs)
            )
        return await asyncio.to_thread(self._client.enqueue, *args, **kwargs)

    async def enqueue_many(
        self, messages: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[str]:
        """See `Client.enqueue_many`."""
        messages = list(messages)
        if connection is not None:
            return await connection.run_sync(  # type: ignore[no-any-return]
                lambda sync_conn: self._client.enqueue_many(messages, connection=sync_conn)
            )
        return await asyncio.to_thread(self._client.enqueue_many, messages)

    async def add_template(
        self,
        template_id: str,
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        replace: bool = False,
    ) -> Template:
        """See `Client.add_template`."""
        return await asyncio.to_thread(
            self._client.add_template, template_id, subject, text, html, replace=replace
        )

    async def get_template(self, template_id: str) -> Template:
        """See `Client.get_template`."""
        return await asyncio.to_thread(self._client.get_template, template_id)

    async def list_templates(self) -> list[Template]:
        """See `Client.list_templates`."""
        return await asyncio.to_thread(self._client.list_templates)

    async def delete_template(self, template_id: str) -> None:
        """See `Client.delete_template`."""
        await asyncio.to_thread(self._client.delete_template, template_id)

    async def render_template(
        self, template_id: str, variables: Mapping[str, Any] | None = None
    ) -> Rendered:
        """See `Client.render_template`."""
        return await asyncio.to_thread(self._client.render_template, template_id, variables)


def _from_env(env: Mapping[str, str]) -> tuple[str, str | None]:
    url = env.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigError("database_url", f"{DATABASE_URL_ENV} is not set", source="")
    return url, env.get(SECRETS_KEY_FILE_ENV) or None
