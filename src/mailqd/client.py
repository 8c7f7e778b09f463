"""The client library: how applications hand mail to mailqd.

    from mailqd import Client
    client = Client("postgresql://app@db/app")
    job_id = client.enqueue("alice@example.com", "Welcome", "Hello Alice")

`enqueue(..., connection=conn)` writes inside the caller's open transaction
(the transactional outbox): the mail is queued if and only if the caller's
transaction commits. `AsyncClient` is the same client for asyncio code; it
runs the blocking database work in a thread, so there is one implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from mailqd.models import NewJob
from mailqd.store import Store
from mailqd.validation import DEFAULT_LIMITS, Limits, Recipients, build_job


class Client:
    """Queues mail into a mailqd database. Thread-safe; create one per process."""

    def __init__(
        self, database_url: str, *, limits: Limits = DEFAULT_LIMITS, **engine_kwargs: Any
    ) -> None:
        self._store = Store.from_url(database_url, **engine_kwargs)
        self._limits = limits

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
        connection: Any = None,
    ) -> str:
        """Queue one message and return its job id.

        `to`, `cc`, `bcc`: an address, a comma-separated string or a list.
        `priority`: higher is sent first (default 0, range -1000..1000).
        `send_after`/`expires_at`: timezone-aware datetimes; a job not sent by
        `expires_at` fails as expired. `idempotency_key`: enqueueing the same
        key again returns the first job's id and queues nothing.
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
            limits=self._limits,
        )
        return self._store.enqueue(job, connection)

    def enqueue_many(
        self, messages: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[str]:
        """Queue many messages in one transaction, one INSERT per 1,000 rows.

        Each message is a mapping of `enqueue`'s keyword arguments. Every
        message is checked first; if any is bad, a ValidationError names its
        index and nothing is written. Returns the ids in input order.
        """
        jobs = [self._build(i, m) for i, m in enumerate(messages)]
        return self._store.enqueue_many(jobs, connection)

    def _build(self, index: int, message: Mapping[str, Any]) -> NewJob:
        from mailqd.errors import ValidationError

        try:
            return build_job(**message, limits=self._limits)
        except ValidationError as exc:
            raise type(exc)(f"messages[{index}].{exc.field}", exc.problem) from None
        except TypeError as exc:
            raise ValidationError(f"messages[{index}]", str(exc)) from None


class AsyncClient:
    """`Client` for asyncio code: the same methods, awaited.

    With `connection=`, pass a SQLAlchemy `AsyncConnection`; the row is written
    in its open transaction (through `run_sync`) and not committed here.
    """

    def __init__(
        self, database_url: str, *, limits: Limits = DEFAULT_LIMITS, **engine_kwargs: Any
    ) -> None:
        self._client = Client(database_url, limits=limits, **engine_kwargs)

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
