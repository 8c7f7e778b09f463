"""The relays kept in the database, as the daemon uses them: read, unsealed, merged, polled.

`mailqctl relays add|set|remove` changes `mailqd_relays` for every daemon
on the database at once. The supervisor (never a worker) polls the
registry's cheap `version()` every `POLL_INTERVAL` seconds and, when it
moved, reloads the way SIGHUP does: settings read again, merged with the
database's relays, a new runtime, new workers (`Supervisor.reload`).

- `database_relays(store, box)` reads the rows, unseals each password and
  writes one `unseal` audit row per password unsealed (who: this
  process's database role and OS user; host and pid in the detail). A row
  that cannot be used (an unparseable URL or name, a password that does
  not open) is logged and left out; it never stops the daemon.
- `settings_with_database_relays(settings, relays)` merges them with the
  config's relays: a database relay with recipient domains becomes a route
  placed before the default route (relays with the same domains share one,
  in position order); the others join the default route after the config's
  relays, in position order. A database relay named like a config relay
  is ignored (the config file wins), with a warning.
- `RelaySync` is the supervisor's part: it keeps the previous good version
  of each relay, so a relay that turns bad keeps working as it was.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from mailqd.config import Settings, relay_plan
from mailqd.credentials import shared_smtp_password
from mailqd.errors import ConfigError, MailqError
from mailqd.routes import RelaySpec, RouteSpec, parse_relays, relays_from_url
from mailqd.runtime import Runtime
from mailqd.secrets import SecretBox, load_secret_box
from mailqd.store import Store
from mailqd.store.relay_registry import RelayVersion, StoredRelay

__all__ = [
    "POLL_INTERVAL",
    "DatabaseRelay",
    "RelaySync",
    "check_relay",
    "database_relays",
    "settings_with_database_relays",
]

POLL_INTERVAL = 2.0
"""Seconds between two looks at `mailqd_relays` by the supervisor."""

log = structlog.get_logger(component="supervisor")


@dataclass(frozen=True, slots=True)
class DatabaseRelay:
    """A relay from `mailqd_relays`, password unsealed, with where it goes in the routes."""

    spec: RelaySpec
    position: int = 0
    recipient_domains: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name


def check_relay(spec: RelaySpec, shared_password: str | None = None) -> None:
    """`ConfigError` (key `relays.NAME`) unless the runtime can build the relay's transport.

    The runtime's own rule (`mailqd.transport.url.relay_factories`): the
    relay's password, else the one in its URL, else the shared SMTP
    password for a URL naming a user.
    """
    from mailqd.routes import RelayPlan
    from mailqd.transport.url import relay_factories

    parse_relays({spec.name: {"url": spec.url}})
    relay_factories(RelayPlan.build([spec], []), shared_password, 30.0)


def database_relays(
    store: Store,
    box: SecretBox | None,
    *,
    shared_password: str | None = None,
    process: str = "mailqd supervisor",
) -> tuple[DatabaseRelay, ...]:
    """The usable relays of the database; unusable ones are logged and left out.

    `shared_password` is the daemon's SMTP password (`shared_smtp_password`),
    which a relay whose URL names only a user logs in with.
    """
    found = _read(store, box, shared_password, process)
    return tuple(relay for relay in found if isinstance(relay, DatabaseRelay))


def _read(
    store: Store, box: SecretBox | None, shared_password: str | None, process: str
) -> list[DatabaseRelay | str]:
    """Each row as a `DatabaseRelay`, or its name when it cannot be used (logged)."""
    found: list[DatabaseRelay | str] = []
    for row in store.relay_registry.all():
        try:
            relay = _usable(row, box, shared_password)
        except MailqError as exc:
            log.error(
                "a relay in the database cannot be used; left out", relay=row.name, error=str(exc)
            )
            found.append(row.name)
            continue
        if relay.spec.password:
            store.audit.record(
                "unseal",
                target=row.name,
                affected=1,
                detail={"process": process, "host": socket.gethostname(), "pid": os.getpid()},
            )
        found.append(relay)
    return found


def _usable(row: StoredRelay, box: SecretBox | None, shared_password: str | None) -> DatabaseRelay:
    from mailqd.config import rate_limited_domain

    password = row.password(box)
    domains = []
    for entry in row.recipient_domains:
        domain = rate_limited_domain(entry.strip())
        if domain is None:
            raise ConfigError(f"relays.{row.name}.recipient_domains", f"{entry!r} is no domain")
        domains.append(domain)
    spec = RelaySpec(
        name=row.name,
        url=row.url,
        max_connections=max(0, row.max_connections),
        rate_limit=max(0.0, row.rate_limit),
        password=password or "",
        source="database",
    )
    check_relay(spec, shared_password)
    return DatabaseRelay(spec, row.position, tuple(domains))


def shadowed(settings: Settings, relays: Sequence[DatabaseRelay]) -> list[str]:
    """Names of database relays that a config relay of the same name hides."""
    taken = {relay.name for relay in _config_relays(settings)}
    return [relay.name for relay in relays if relay.name in taken]


def settings_with_database_relays(settings: Settings, relays: Sequence[DatabaseRelay]) -> Settings:
    """`settings` with the database's relays merged in (see the module doc); itself if none."""
    config_relays = _config_relays(settings)
    taken = {relay.name for relay in config_relays}
    usable = sorted(
        (relay for relay in relays if relay.name not in taken), key=lambda r: (r.position, r.name)
    )
    if not usable:
        return settings
    plan = relay_plan(settings)
    *config_routes, default = plan.routes
    by_domains: dict[tuple[str, ...], list[str]] = {}
    for relay in usable:
        if relay.recipient_domains:
            by_domains.setdefault(relay.recipient_domains, []).append(relay.name)
    database_routes = [
        RouteSpec(relays=tuple(names), recipient_domains=domains)
        for domains, names in by_domains.items()
    ]
    joining = tuple(relay.name for relay in usable if not relay.recipient_domains)
    return settings.replace(
        relays=(*config_relays, *(relay.spec for relay in usable)),
        routes=(
            *config_routes,
            *database_routes,
            RouteSpec(relays=(*default.relays, *joining)),
        ),
    )


def _config_relays(settings: Settings) -> tuple[RelaySpec, ...]:
    """The config's relays: TOML's, else `smtp_url`'s (the shared SMTP password still applies)."""
    if settings.relays:
        return tuple(relay for relay in settings.relays if relay.source != "database")
    return relays_from_url(settings.smtp_url)


def _shared_password(settings: Settings) -> str | None:
    """The shared SMTP password as the runtime resolves it for merged settings (named relays)."""
    named = dataclasses.replace(settings, relays=_config_relays(settings))
    try:
        return shared_smtp_password(named)
    except ConfigError:
        return None  # the reload reports it, naming the key


class RelaySync:
    """The supervisor's view of `mailqd_relays`: merged at start and reload, polled between.

    Uses stores of its own (one per database URL, opened by `open_store`),
    dropped in a forked worker by `forget_after_fork`.
    """

    def __init__(
        self,
        open_store: Callable[[str], Store] | None = None,
        *,
        interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from mailqd.daemon.giveback import StoresByUrl

        self._stores = StoresByUrl(open_store)
        self._interval = interval
        self._clock = clock
        self._next_poll = 0.0
        self._version: RelayVersion | None = None
        self._good: dict[str, DatabaseRelay] = {}
        self._base: Settings | None = None
        self._merged: Settings | None = None
        self._poll_failing = False

    def runtime(self, settings: Settings, *, built: Runtime | None = None) -> Runtime:
        """The runtime of `settings` with the database's relays.

        `built` is the runtime of `settings` alone, if one is at hand (at
        start). With it, a database relay that breaks the runtime is
        logged and the daemon starts with the config's relays; without it
        (a reload) the error is raised, and the reload keeps the current
        runtime, previous relays included.
        """
        merged = self.merged(settings)
        if built is None:
            return Runtime.build(merged)
        if merged is settings:
            return built
        try:
            return Runtime.build(merged)
        except MailqError as exc:
            log.error(
                "the relays in the database cannot be used; starting with the config's only",
                error=str(exc),
            )
            return built

    def merged(self, settings: Settings) -> Settings:
        """`settings` with the database's relays, read now; the previous ones when unreadable.

        A merged settings object given back (a reload without a settings
        loader) is merged again from the settings it came from.
        """
        base = self._base if settings is self._merged and self._base is not None else settings
        relays = self._read(base)
        try:
            for name in shadowed(base, relays):
                log.warning(
                    "a relay in the database has the name of a config relay; the config's is used",
                    relay=name,
                )
            merged = settings_with_database_relays(base, relays)
        except MailqError as exc:
            log.error(
                "the relays in the database cannot be merged; using the config's only",
                error=str(exc),
            )
            merged = base
        self._base, self._merged = base, merged
        return merged

    def changed(self, database_url: str) -> bool:
        """Once per interval: whether `mailqd_relays` changed since it was last read."""
        now = self._clock()
        if now < self._next_poll:
            return False
        self._next_poll = now + self._interval
        try:
            version = self._stores.get(database_url).relay_registry.version()
        except MailqError as exc:
            if not self._poll_failing:
                log.warning("cannot look at the relays in the database", error=str(exc))
            self._poll_failing = True
            return False
        self._poll_failing = False
        if version == self._version:
            return False
        self._version = version  # one reload per change, even if that reload fails
        return True

    def _read(self, settings: Settings) -> list[DatabaseRelay]:
        try:
            store = self._stores.get(settings.database_url)
            version = store.relay_registry.version()
            box = load_secret_box(settings.secrets_key_file)
            found = _read(store, box, _shared_password(settings), "mailqd supervisor")
        except MailqError as exc:
            log.error(
                "cannot read the relays in the database; keeping the previous ones",
                error=str(exc),
            )
            return list(self._good.values())
        self._version = version
        self._next_poll = self._clock() + self._interval
        relays: list[DatabaseRelay] = []
        for entry in found:
            if isinstance(entry, DatabaseRelay):
                relays.append(entry)
            elif entry in self._good:
                log.warning("keeping the relay's previous settings", relay=entry)
                relays.append(self._good[entry])
        self._good = {relay.name: relay for relay in relays}
        return relays

    def close(self) -> None:
        self._stores.close()

    def forget_after_fork(self) -> None:
        """In a forked worker: the parent's pooled connections must not be used or closed."""
        self._stores.forget_after_fork()

    @property
    def relays(self) -> Mapping[str, DatabaseRelay]:
        """The database relays in use since the last read."""
        return dict(self._good)
