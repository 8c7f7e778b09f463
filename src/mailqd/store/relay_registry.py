"""Relays kept in the database (`mailqd_relays`): add, change, remove, list, and a version.

Reached as `Store.relay_registry`; `mailqctl relays` is its user, and the
daemon reads it (`mailqd.daemon.relay_sync`). Each change writes its audit
row (`mailqd.store.audit`) in the same transaction, so there is no change
without its entry, and no entry for a change that was rolled back.

The URL is stored without a password: one written in it is taken out and
kept with the others, sealed with the `SecretBox` of `secrets_key_file`
(`mailqd.secrets`). Without a box a password is refused, never stored in
clear. Names, limits and domains follow the TOML relays' rules
(`mailqd.routes.parse_relays`, `mailqd.config.rate_limited_domain`).

`version()` is what a daemon polls: the number of rows and the newest
`updated_at`; every change moves one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa

from mailqd.credentials import check_userinfo, url_password
from mailqd.errors import ConfigError, ConflictError, NotFoundError, SecretsError, ValidationError
from mailqd.secrets import SEALED_KEY, SecretBox
from mailqd.store import audit
from mailqd.store.database import Database
from mailqd.store.relay_tables import relay_state
from mailqd.store.relay_tables import relays as r
from mailqd.store.sql import at_time

__all__ = [
    "RelayExistsError",
    "RelayNotFoundError",
    "RelayRegistry",
    "RelayVersion",
    "StoredRelay",
]

RelayVersion = tuple[int, datetime | None]
"""(rows, newest updated_at): changes whenever a relay is added, changed or removed."""

NO_KEY_HINT = (
    "is not set, and a relay password is only stored sealed with it: write a key with "
    "`mailqctl secrets generate-key PATH` and set secrets_key_file (MAILQD_SECRETS_KEY_FILE) "
    "for mailqctl and every daemon"
)


class RelayExistsError(ConflictError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"relay {name!r} exists already; change it with `mailqctl relays set`")


class RelayNotFoundError(NotFoundError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no relay named {name!r} in the database")


@dataclass(frozen=True, slots=True)
class StoredRelay:
    """One row of `mailqd_relays`. `password_sealed` is a Fernet token, never the password."""

    name: str
    url: str
    password_sealed: str | None = field(repr=False)
    max_connections: int
    rate_limit: float
    position: int
    recipient_domains: tuple[str, ...]
    created_at: datetime | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None

    @property
    def has_password(self) -> bool:
        return bool(self.password_sealed)

    def password(self, box: SecretBox | None) -> str | None:
        """The password unsealed, None if none is set; `SecretsError` without the right key."""
        if not self.password_sealed:
            return None
        if box is None:
            raise SecretsError(
                f"relay {self.name!r} has a sealed password, but no secrets_key_file is configured"
            )
        value = box.open({SEALED_KEY: self.password_sealed})
        if not isinstance(value, str):
            raise SecretsError(f"relay {self.name!r}: the sealed password is not text")
        return value


def _stored(row: Any) -> StoredRelay:
    values = dict(row._mapping)
    domains = values.pop("recipient_domains") or ""
    return StoredRelay(
        **values, recipient_domains=tuple(d for d in domains.split(",") if d.strip())
    )


class RelayRegistry:
    """The relays of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[StoredRelay]:
        """Every relay, by position, then name."""
        with self._db.begin() as conn:
            rows = conn.execute(sa.select(r).order_by(r.c.position, r.c.name))
            return [_stored(row) for row in rows]

    def get(self, name: str) -> StoredRelay:
        with self._db.begin() as conn:
            row = conn.execute(sa.select(r).where(r.c.name == name)).first()
        if row is None:
            raise RelayNotFoundError(name)
        return _stored(row)

    def version(self) -> RelayVersion:
        """How many relays there are and when the newest change was: cheap, for polling."""
        with self._db.begin() as conn:
            count, newest = conn.execute(
                sa.select(sa.func.count(), sa.func.max(r.c.updated_at))
            ).one()
        return int(count), newest

    def add(
        self,
        name: str,
        url: str,
        *,
        password: str | None = None,
        box: SecretBox | None = None,
        max_connections: int = 0,
        rate_limit: float = 0.0,
        position: int | None = None,
        recipient_domains: Sequence[str] = (),
        now: datetime | None = None,
    ) -> StoredRelay:
        """Add a relay (last, unless `position` is given); `RelayExistsError` if it exists."""
        url, password = _split_password(url, password)
        _check(name, url, max_connections, rate_limit, position)
        domains = _domains(recipient_domains)
        sealed = _seal(password, box)
        at = at_time(now)
        with self._db.begin() as conn:
            if position is None:
                last = conn.execute(sa.select(sa.func.max(r.c.position))).scalar()
                position = 0 if last is None else int(last) + 1
            stmt = (
                self._db.dialect.insert(r)
                .values(
                    name=name,
                    url=url,
                    password_sealed=sealed,
                    max_connections=max_connections,
                    rate_limit=float(rate_limit),
                    position=position,
                    recipient_domains=",".join(domains) or None,
                    created_at=at,
                    updated_at=at,
                    updated_by=audit.os_user(),
                )
                .on_conflict_do_nothing(index_elements=[r.c.name])
                .returning(*r.c)
            )
            row = conn.execute(stmt).first()
            if row is None:
                raise RelayExistsError(name)
            stored = _stored(row)
            audit.write(
                conn, "relays add", target=name, affected=1, detail=_described(stored), now=now
            )
        return stored

    def set(
        self,
        name: str,
        *,
        url: str | None = None,
        password: str | None = None,
        clear_password: bool = False,
        box: SecretBox | None = None,
        max_connections: int | None = None,
        rate_limit: float | None = None,
        position: int | None = None,
        recipient_domains: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> StoredRelay:
        """Change what is given, keep the rest; `RelayNotFoundError` if there is no such relay."""
        if password is not None and clear_password:
            raise ValidationError("password", "give a new password or clear it, not both")
        changes: dict[str, Any] = {}
        if url is not None:
            url, password = _split_password(url, password)
            changes["url"] = url
        _check(name, url or "-", max_connections or 0, rate_limit or 0, position)
        if password is not None:
            changes["password_sealed"] = _seal(password, box)
        elif clear_password:
            changes["password_sealed"] = None
        for column, value in (
            ("max_connections", max_connections),
            ("rate_limit", None if rate_limit is None else float(rate_limit)),
            ("position", position),
        ):
            if value is not None:
                changes[column] = value
        if recipient_domains is not None:
            changes["recipient_domains"] = ",".join(_domains(recipient_domains)) or None
        if not changes:
            raise ValidationError("relays set", "nothing to change")
        with self._db.begin() as conn:
            row = conn.execute(
                r.update()
                .where(r.c.name == name)
                .values(**changes, updated_at=at_time(now), updated_by=audit.os_user())
                .returning(*r.c)
            ).first()
            if row is None:
                raise RelayNotFoundError(name)
            stored = _stored(row)
            detail = {
                key: value
                for key, value in _described(stored).items()
                if key in changes or (key == "password" and "password_sealed" in changes)
            }
            audit.write(conn, "relays set", target=name, affected=1, detail=detail, now=now)
        return stored

    def remove(self, name: str, now: datetime | None = None) -> None:
        """Remove the relay and its breaker state; `RelayNotFoundError` if there is none."""
        with self._db.begin() as conn:
            if conn.execute(r.delete().where(r.c.name == name)).rowcount == 0:
                raise RelayNotFoundError(name)
            conn.execute(relay_state.delete().where(relay_state.c.relay == name))
            audit.write(conn, "relays remove", target=name, affected=1, now=now)


def _described(relay: StoredRelay) -> dict[str, Any]:
    """What the audit keeps of a relay: everything but the password, which is only set or not."""
    return {
        "url": relay.url,
        "password": "set" if relay.has_password else "none",
        "max_connections": relay.max_connections,
        "rate_limit": relay.rate_limit,
        "position": relay.position,
        "recipient_domains": ",".join(relay.recipient_domains),
    }


def _split_password(url: str, password: str | None) -> tuple[str, str | None]:
    """The URL without a password written in it, and the password (from it, or as given)."""
    url = url.strip()
    check_userinfo(url, "url")
    written = url_password(url)
    if written is None:
        return url, password
    if password is not None:
        raise ValidationError("url", "holds a password and another one is given; keep one")
    scheme, _, rest = url.partition("://")
    at = rest.rfind("@")
    user = rest[:at].partition(":")[0]
    return f"{scheme}://{user}@{rest[at + 1 :]}", unquote(written)


def _check(
    name: str, url: str, max_connections: int, rate_limit: float, position: int | None
) -> None:
    """The TOML relays' rules for the name and limits (`parse_relays`), as a `ValidationError`."""
    from mailqd.routes import parse_relays

    table = {"url": url, "max_connections": max_connections, "rate_limit": rate_limit}
    try:
        parse_relays({name: table})
    except ConfigError as exc:
        field_name = exc.key.rpartition(".")[2] if exc.key.count(".") > 1 else "relay name"
        raise ValidationError(field_name, exc.problem) from None
    if position is not None and (isinstance(position, bool) or position < 0):
        raise ValidationError("position", f"must be a whole number >= 0, got {position!r}")


def _domains(domains: Sequence[str]) -> tuple[str, ...]:
    from mailqd.config import rate_limited_domain

    checked: list[str] = []
    for entry in (d.strip() for d in domains):
        if not entry:
            continue
        domain = rate_limited_domain(entry)
        if domain is None:
            raise ValidationError("domains", f"{entry!r} is not a domain name (exact, or *.parent)")
        if domain not in checked:
            checked.append(domain)
    return tuple(checked)


def _seal(password: str | None, box: SecretBox | None) -> str | None:
    if password is None:
        return None
    if not password:
        raise ValidationError("password", "is empty")
    if box is None:
        raise ConfigError("secrets_key_file", NO_KEY_HINT)
    return box.seal(password)[SEALED_KEY]
