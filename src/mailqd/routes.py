"""Relays and routes: which SMTP relay each recipient's mail goes through, in what order.

Pure data and rules, no I/O: the settings hold them (`mailqd.config`), the
runtime resolves their passwords, the routed transport
(`mailqd.transport.routed`) sends by them.

- A **relay** is one SMTP server (or a maildir/null stand-in) with a name,
  its URL, its own connection cap (per daemon) and rate limit (messages per
  second, all daemons together; 0 is unlimited).
- A **route** names relays in failover order, for the recipients whose
  domain (and, optionally, the sender whose domain) it matches: exactly, or
  `*.parent` for every subdomain of `parent` (not `parent` itself), the rule
  of `domain_rate_limits`. Routes are tried in order and the first match
  wins; the last route matches everything (the default route).

`smtp_url` with several URLs separated by whitespace is a failover list:
relays `relay1`, `relay2`, ... and one default route through them in that
order. TOML `[relays.NAME]` and `[[routes]]` replace it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailqd.errors import ConfigError

__all__ = [
    "RelayPlan",
    "RelaySpec",
    "RouteSpec",
    "domain_matches",
    "parse_relays",
    "parse_routes",
    "relays_from_url",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_RELAY_KEYS = frozenset({"url", "max_connections", "rate_limit", "password", "password_file"})
_ROUTE_KEYS = frozenset({"recipient_domains", "sender_domains", "relays"})


@dataclass(frozen=True, slots=True)
class RelaySpec:
    """One relay as configured. `max_connections` 0 means one per delivery slot."""

    name: str
    url: str = field(repr=False)
    max_connections: int = 0
    rate_limit: float = 0.0
    password: str = field(default="", repr=False)
    password_file: str = ""
    source: str = "config"
    """Where it was defined: `smtp_url`, `config` (TOML `[relays.NAME]`) or `database`."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """Recipients (and senders) matched, and the relays to try for them, first one first."""

    relays: tuple[str, ...]
    recipient_domains: tuple[str, ...] = ()
    sender_domains: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return not self.recipient_domains and not self.sender_domains

    def matches(self, recipient_domain: str, sender_domain: str) -> bool:
        if self.recipient_domains and not any(
            domain_matches(p, recipient_domain) for p in self.recipient_domains
        ):
            return False
        return not self.sender_domains or any(
            domain_matches(p, sender_domain) for p in self.sender_domains
        )


def domain_matches(pattern: str, domain: str) -> bool:
    """`pattern` is a lower-cased domain or `*.parent`; `domain` is lower-cased too."""
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


@dataclass(frozen=True, slots=True)
class RelayPlan:
    """The relays by name and the routes, the last of them the default route."""

    relays: Mapping[str, RelaySpec]
    routes: tuple[RouteSpec, ...]

    @classmethod
    def build(cls, relays: Sequence[RelaySpec], routes: Sequence[RouteSpec]) -> RelayPlan:
        """Check that routes name known relays; add the default route if none is given.

        The implied default route goes through every relay in the order
        defined. Raises `ConfigError` (key `routes`).
        """
        by_name = {relay.name: relay for relay in relays}
        checked: list[RouteSpec] = []
        for number, route in enumerate(routes, 1):
            unknown = [name for name in route.relays if name not in by_name]
            if unknown:
                raise ConfigError(
                    "routes", f"route {number} names relay {unknown[0]!r}, which is not defined"
                )
            if checked and checked[-1].is_default:
                raise ConfigError(
                    "routes", f"route {number} comes after the default route and would never match"
                )
            checked.append(route)
        if not checked or not checked[-1].is_default:
            checked.append(RouteSpec(relays=tuple(by_name)))
        return cls(relays=by_name, routes=tuple(checked))

    @property
    def default_route(self) -> RouteSpec:
        return self.routes[-1]

    @property
    def single(self) -> bool:
        """One route only: every recipient goes the same way, nothing to split."""
        return len(self.routes) == 1

    def route_for(self, recipient: str, sender: str) -> RouteSpec:
        """The first route matching the recipient's (and the sender's) domain."""
        if len(self.routes) == 1:
            return self.routes[0]
        recipient_domain = _domain_of(recipient)
        sender_domain = _domain_of(sender)
        for route in self.routes:
            if route.matches(recipient_domain, sender_domain):
                return route
        return self.routes[-1]

    def split(self, recipients: Iterable[str], sender: str) -> list[tuple[RouteSpec, list[str]]]:
        """Recipients grouped by route, routes in the order their first recipient came."""
        groups: dict[int, tuple[RouteSpec, list[str]]] = {}
        for recipient in recipients:
            route = self.route_for(recipient, sender)
            groups.setdefault(id(route), (route, []))[1].append(recipient)
        return list(groups.values())


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def relays_from_url(smtp_url: str) -> tuple[RelaySpec, ...]:
    """`smtp_url` split on whitespace: `relay1`, `relay2`, ... in that order."""
    urls = smtp_url.split()
    if not urls:
        raise ConfigError("smtp_url", "is empty; expected e.g. smtp://host:25")
    return tuple(
        RelaySpec(name=f"relay{i}", url=url, source="smtp_url") for i, url in enumerate(urls, 1)
    )


def parse_relays(raw: Any) -> tuple[RelaySpec, ...]:
    """TOML `[relays.NAME]` tables → specs, in the order written. `ConfigError` (key `relays`)."""
    if isinstance(raw, tuple) and all(isinstance(r, RelaySpec) for r in raw):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError("relays", "must be a table of [relays.NAME] tables (TOML only)")
    specs = []
    for name, table in raw.items():
        where = f"relays.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError("relays", "a relay name is letters, digits, '_', '-' and '.'")
        if not isinstance(table, Mapping):
            raise ConfigError(where, "must be a table with at least url = ...")
        _check_keys(table, _RELAY_KEYS, where)
        url = table.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(where, 'needs url = "smtp://host:port"')
        specs.append(
            RelaySpec(
                name=name,
                url=url.strip(),
                max_connections=_whole(table.get("max_connections", 0), f"{where}.max_connections"),
                rate_limit=_rate(table.get("rate_limit", 0), f"{where}.rate_limit"),
                password=_text(table.get("password", ""), f"{where}.password", secret=True),
                password_file=_text(table.get("password_file", ""), f"{where}.password_file"),
            )
        )
    return tuple(specs)


def parse_routes(raw: Any) -> tuple[RouteSpec, ...]:
    """TOML `[[routes]]` → specs. `ConfigError` (key `routes`)."""
    if isinstance(raw, tuple) and all(isinstance(r, RouteSpec) for r in raw):
        return raw
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ConfigError("routes", "must be an array of [[routes]] tables (TOML only)")
    routes = []
    for number, table in enumerate(raw, 1):
        where = f"routes[{number}]"
        if not isinstance(table, Mapping):
            raise ConfigError(where, "must be a table")
        _check_keys(table, _ROUTE_KEYS, where)
        relays = _names(table.get("relays"), f"{where}.relays")
        routes.append(
            RouteSpec(
                relays=relays,
                recipient_domains=_domains(table, "recipient_domains", where),
                sender_domains=_domains(table, "sender_domains", where),
            )
        )
    return tuple(routes)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a non-empty list of relay names")
    if len(set(value)) != len(value):
        raise ConfigError(key, "names a relay twice")
    return tuple(value)


def _check_keys(table: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(where, f"unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _domains(table: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    from mailqd.config import rate_limited_domain

    value, key = table.get(name, []), f"{where}.{name}"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a list of domains (exact, or *.parent)")
    domains = []
    for entry in value:
        domain = rate_limited_domain(entry.strip())
        if domain is None:
            raise ConfigError(key, f"{entry!r} is not a domain name")
        domains.append(domain)
    return tuple(domains)


def _whole(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be a whole number >= 0, got {value!r}")
    return value


def _rate(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise ConfigError(key, f"must be a number of messages per second >= 0, got {value!r}")
    return float(value)


def _text(value: Any, key: str, *, secret: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string" + ("" if secret else f", got {value!r}"))
    return value
