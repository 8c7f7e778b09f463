"""Message templates in `email_templates`: add, replace, read, list and delete.

Reached as `Store.templates`. Each method is one short transaction on the
store's engine, with driver errors translated like the rest of the store.
The sources are stored as given; whether they compile is checked by the
caller (`mailqd.templating.compile_template`) before `put`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from mailqd.errors import TemplateExistsError, TemplateNotFoundError
from mailqd.models import Template
from mailqd.store.database import Database
from mailqd.store.schema import email_templates as t
from mailqd.store.schema import utcnow

__all__ = ["TemplateStore"]


def _template_from_row(row: sa.Row[Any]) -> Template:
    values = row._mapping
    return Template(**{name: values[name] for name in Template.__slots__})


class TemplateStore:
    """The templates of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(
        self,
        template_id: str,
        subject: str,
        text_body: str | None,
        html_body: str | None,
        *,
        replace: bool = False,
    ) -> Template:
        """Add a template, or with `replace` add or replace it; returns it as stored.

        Replacing keeps `created_at` and moves `updated_at` to now, which is
        what tells a running worker's cache that the sources changed.
        Without `replace`, an existing id raises `TemplateExistsError` and
        nothing is written.
        """
        insert = self._db.dialect.insert(t).values(
            id=template_id, subject=subject, text_body=text_body, html_body=html_body
        )
        if replace:
            stmt = insert.on_conflict_do_update(
                index_elements=[t.c.id],
                set_={
                    "subject": insert.excluded.subject,
                    "text_body": insert.excluded.text_body,
                    "html_body": insert.excluded.html_body,
                    "updated_at": utcnow(),
                },
            )
        else:
            stmt = insert.on_conflict_do_nothing(index_elements=[t.c.id])
        with self._db.begin() as conn:
            row = conn.execute(stmt.returning(*t.c)).first()
        if row is None:
            raise TemplateExistsError(template_id)
        return _template_from_row(row)

    def get(self, template_id: str) -> Template:
        """The template, or `TemplateNotFoundError`."""
        with self._db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == template_id)).first()
        if row is None:
            raise TemplateNotFoundError(template_id)
        return _template_from_row(row)

    def all(self) -> list[Template]:
        """Every template, by id."""
        with self._db.begin() as conn:
            return [_template_from_row(r) for r in conn.execute(sa.select(t).order_by(t.c.id))]

    def delete(self, template_id: str) -> None:
        """Remove the template, or raise `TemplateNotFoundError`.

        Jobs still queued with this template id fail when they are sent
        ("unknown template"); they are not touched here.
        """
        with self._db.begin() as conn:
            if conn.execute(t.delete().where(t.c.id == template_id)).rowcount == 0:
                raise TemplateNotFoundError(template_id)
