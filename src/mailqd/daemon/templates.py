"""A worker's compiled templates, so a hot template costs no query and no parse per message.

A template is read from the store at most once per `TEMPLATE_CACHE_SECONDS`
per worker, however many messages use it: concurrent deliveries that need
the same template wait for one read. A read that finds the same sources
keeps the compiled template; changed sources are compiled again. So an
edited template (`mailqctl templates add --replace`) is used by every
worker within `TEMPLATE_CACHE_SECONDS` of the edit, and a deleted one fails
jobs ("unknown template") within the same time. A template that is not
found is not cached: a job naming it looks it up again, so a template added
just after its jobs were queued is found at once. Changed sources are
compiled once, in the thread that read them, off the event loop: Jinja2 may
take seconds over a pathological source, and the loop keeps the other
jobs' sends and the heartbeat going meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailqd.errors import StoreError, TemplateNotFoundError, TransientDeliveryError
from mailqd.store import Store
from mailqd.templating import CompiledTemplate, compile_template

__all__ = ["TEMPLATE_CACHE_SECONDS", "TemplateCache"]

TEMPLATE_CACHE_SECONDS = 5.0
"""How long a worker uses a template it read before reading it again."""


@dataclass(slots=True)
class _Entry:
    compiled: CompiledTemplate
    read_at: float  # the clock's time


class TemplateCache:
    """Compiled templates by id, read through `store` (in a thread, off the event loop)."""

    def __init__(
        self,
        store: Store,
        ttl: float = TEMPLATE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._reading: dict[str, asyncio.Task[CompiledTemplate | None]] = {}

    async def get(self, template_id: str) -> CompiledTemplate | None:
        """The template compiled, or None if there is none with this id.

        Raises `TemplateError` if the stored sources do not compile (a row
        written by plain SQL), and `TransientDeliveryError` if the database
        cannot be read now (the job is retried later).
        """
        entry = self._entries.get(template_id)
        if entry is not None and self._clock() - entry.read_at < self._ttl:
            return entry.compiled
        compiled = await self._read(template_id, entry.compiled if entry else None)
        if compiled is None:
            self._entries.pop(template_id, None)
            return None
        self._entries[template_id] = _Entry(compiled, self._clock())
        return compiled

    async def _read(
        self, template_id: str, known: CompiledTemplate | None
    ) -> CompiledTemplate | None:
        """One read per id at a time; deliveries that need it meanwhile share its result."""
        reading = self._reading.get(template_id)
        if reading is None:
            reading = asyncio.create_task(asyncio.to_thread(self._load, template_id, known))
            self._reading[template_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(template_id, None))
        return await asyncio.shield(reading)

    def _load(self, template_id: str, known: CompiledTemplate | None) -> CompiledTemplate | None:
        """Read the template; `known` again if its sources did not change, else compile them."""
        try:
            template = self._store.templates.get(template_id)
        except TemplateNotFoundError:
            return None
        except StoreError as exc:
            raise TransientDeliveryError(f"cannot read template {template_id!r}: {exc}") from exc
        sources = (template.subject, template.text_body, template.html_body)
        if known is not None and known.sources == sources:
            return known
        return compile_template(template)
