"""mailqd's configuration: one typed object, built once at start-up and passed down.

Sources, later ones winning: the defaults below, a TOML file (`--config PATH`
or `MAILQD_CONFIG`), the environment (`MAILQD_<KEY>`, e.g. `MAILQD_WORKERS`),
and command-line flags. A bad value fails with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailqd.credentials import redact_url, smtp_password_source
from mailqd.errors import ConfigError
from mailqd.routes import (
    RelayPlan,
    RelaySpec,
    RouteSpec,
    parse_relays,
    parse_routes,
    relays_from_url,
)

ENV_PREFIX = "MAILQD_"
DEFAULT_METRICS_PORT = 9478


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting mailqd has. Field names are the TOML keys; env is MAILQD_<NAME>."""

    database_url: str = "sqlite:///mailqd.db"
    smtp_url: str = "smtp://127.0.0.1:25"
    from_address: str = "mailqd@localhost"
    workers: int = 3
    concurrency: int = 32
    metrics_listen: str = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
    max_attempts: int = 3
    backoff_base: float = 60.0
    backoff_factor: float = 2.0
    backoff_max: float = 3600.0
    backoff_jitter: float = 0.1
    rate_limit: float = 0.0
    lease_seconds: float = 300.0
    poll_interval: float = 1.0
    shutdown_timeout: float = 30.0
    heartbeat_timeout: float = 30.0
    smtp_timeout: float = 30.0
    log_format: str = "auto"
    log_level: str = "info"
    # Content and security (docs/security.md).
    max_recipients: int = 100
    max_subject_length: int = 998
    max_body_bytes: int = 10 * 1024 * 1024
    max_attachments: int = 100
    max_attachment_bytes: int = 25 * 1024 * 1024
    dkim_domain: str = ""
    dkim_selector: str = ""
    dkim_key_file: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_password_file: str = ""
    secrets_key_file: str = ""
    dedup_window: float = 0.0
    recipient_hourly_cap: int = 0
    domain_rate_limits: str = ""
    """Messages per second per recipient domain, e.g. "example.com=10, *.example.org=2.5"."""
    # Template render budget (docs/templates.md).
    template_render_seconds: float = 1.0
    template_max_output_bytes: int = 1_000_000
    # Relays and the delivery model (docs/operations.md, "Delivery model").
    queue_lifetime: float = 5 * 86400.0
    """Seconds a job may stay queued, however often its relay was down; then it expires."""
    relay_failure_threshold: int = 3
    """Consecutive relay failures (all workers together) that mark a relay down."""
    relay_probe_interval: float = 5.0
    """Seconds from marking a relay down to its first probe; doubled after each failed probe ..."""
    relay_probe_max: float = 60.0
    """... up to this."""
    relays: tuple[RelaySpec, ...] = ()
    """TOML `[relays.NAME]` tables; when given, they replace `smtp_url`."""
    routes: tuple[RouteSpec, ...] = ()
    """TOML `[[routes]]`: recipient/sender domains → relays in failover order."""

    @property
    def domain_rates(self) -> dict[str, float]:
        """`domain_rate_limits` parsed: lower-cased domain (or `*.parent`) → messages per second."""
        return parse_domain_rates(self.domain_rate_limits)

    def replace(self, **changes: Any) -> Settings:
        return _validated(dataclasses.replace(self, **changes))

    def __repr__(self) -> str:
        """Safe to log: URL passwords show as `***`, and `smtp_password` not at all."""
        shown = (
            f"{f.name}={_shown(f.name, getattr(self, f.name))}" for f in fields(self) if f.repr
        )
        return f"Settings({', '.join(shown)})"


# Keys only a TOML file can set (tables), parsed by `mailqd.routes`.
_TABLE_KEYS = {"relays": parse_relays, "routes": parse_routes}

# Keys whose values may hold a password: shown redacted, never quoted in errors.
_URL_KEYS = frozenset({"database_url", "smtp_url"})
_SECRET_KEYS = _URL_KEYS | {"smtp_password"}


def _shown(name: str, value: Any) -> str:
    if name in _URL_KEYS:
        return repr(" ".join(redact_url(url) for url in value.split()))
    return repr(value)


# Names in the file and environment that differ from the attribute name.
_ALIASES = {"from": "from_address"}

_RULES: dict[str, dict[str, Any]] = {
    "workers": {"low": 1},
    "concurrency": {"low": 1},
    "max_attempts": {"low": 1},
    "backoff_base": {"low": 0},
    "backoff_factor": {"low": 1},
    "backoff_max": {"low": 0},
    "backoff_jitter": {"low": 0},
    "rate_limit": {"low": 0},
    "lease_seconds": {"low": 1},
    "poll_interval": {"low": 0.01},
    "shutdown_timeout": {"low": 0},
    "heartbeat_timeout": {"low": 1},
    "smtp_timeout": {"low": 0.1},
    "log_format": {"choices": ("auto", "json", "console")},
    "log_level": {"choices": ("debug", "info", "warning", "error")},
    "max_recipients": {"low": 1},
    "max_subject_length": {"low": 1},
    "max_body_bytes": {"low": 1},
    "max_attachments": {"low": 0},
    "max_attachment_bytes": {"low": 0},
    "dedup_window": {"low": 0},
    "recipient_hourly_cap": {"low": 0},
    "template_render_seconds": {"low": 0.01},
    "template_max_output_bytes": {"low": 1024},
    "queue_lifetime": {"low": 1},
    "relay_failure_threshold": {"low": 1},
    "relay_probe_interval": {"low": 0.1},
    "relay_probe_max": {"low": 0.1},
}


def key_names() -> list[str]:
    """The public names of all keys (as used in TOML and after MAILQD_)."""
    reverse = {v: k for k, v in _ALIASES.items()}
    return [reverse.get(f.name, f.name) for f in fields(Settings)]


def load_settings(
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, file, environment and overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = config_path or env.get(f"{ENV_PREFIX}CONFIG")
    if path:
        raw.update(_read_toml(Path(path)))
    for public in key_names():
        if public in _TABLE_KEYS:
            continue  # tables: TOML only
        value = env.get(ENV_PREFIX + public.upper())
        if value is not None and value != "":
            raw[public] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    return _validated(Settings(**_coerce_all(raw)))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} does not exist") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError("config", f"cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # The parser's message says where (line, column), never what the line holds.
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    section = data.get("mailqd", data)
    if not isinstance(section, dict):
        raise ConfigError("config", f"{path}: [mailqd] must be a table")
    return section


def _coerce_all(raw: Mapping[str, Any]) -> dict[str, Any]:
    types = {f.name: f.type for f in fields(Settings)}
    known = set(key_names())
    result: dict[str, Any] = {}
    for public, value in raw.items():
        if public not in known:
            raise ConfigError(public, "unknown key; known keys: " + ", ".join(sorted(known)))
        name = _ALIASES.get(public, public)
        if name in _TABLE_KEYS:
            result[name] = _TABLE_KEYS[name](value)
            continue
        result[name] = _coerce(public, value, types[name])
    return result


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    kind = {"int": int, "float": float, "str": str}[str(type_name)]
    if kind is str:
        if not isinstance(value, str):
            got = "" if key in _SECRET_KEYS else f", got {value!r}"
            raise ConfigError(key, f"must be a string{got}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes the environment could not decode
                raise ConfigError(key, "is not valid UTF-8 text") from None
        return value
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a number, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(key, f"must be {noun}, got {value!r}") from None


def _validated(settings: Settings) -> Settings:
    reverse = {v: k for k, v in _ALIASES.items()}
    for name, rule in _RULES.items():
        value = getattr(settings, name)
        public = reverse.get(name, name)
        if "low" in rule and value < rule["low"]:
            raise ConfigError(public, f"must be at least {rule['low']}, got {value}")
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(public, f"must be one of {', '.join(rule['choices'])}, got {value!r}")
    _check_listen(settings.metrics_listen)
    parse_domain_rates(settings.domain_rate_limits)
    smtp_password_source(settings, env={})  # two passwords set: say so before anything runs
    if settings.relay_probe_max < settings.relay_probe_interval:
        raise ConfigError("relay_probe_max", "must be at least relay_probe_interval")
    relay_plan(settings)  # routes name defined relays; smtp_url not empty
    if settings.backoff_max < settings.backoff_base:
        raise ConfigError("backoff_max", "must be at least backoff_base")
    if settings.template_render_seconds > settings.heartbeat_timeout:
        # A render holds the worker's event loop: it must end before the supervisor's patience.
        raise ConfigError("template_render_seconds", "must be at most heartbeat_timeout")
    from mailqd.store.engine import normalize_url

    normalize_url(settings.database_url)
    return settings


def parse_domain_rates(text: str) -> dict[str, float]:
    """`"example.com=10, *.example.org=2.5"` → `{"example.com": 10.0, "*.example.org": 2.5}`.

    Entries are separated by commas; domains are lower-cased and matched
    exactly (a subdomain is another domain), except that `*.parent`
    matches every subdomain of `parent` (not `parent` itself) and its
    subdomains share that one limit. Raises `ConfigError` naming the bad
    entry.
    """
    rates: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, number = (part.strip() for part in entry.partition("="))
        if not sep:
            raise ConfigError("domain_rate_limits", f"{entry!r} is not DOMAIN=RATE")
        domain = rate_limited_domain(name)
        if domain is None:
            raise ConfigError("domain_rate_limits", f"{entry!r}: {name!r} is not a domain name")
        try:
            rate = float(number)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(
                "domain_rate_limits",
                f"{entry!r}: the rate must be a positive number of messages per second",
            )
        if domain in rates:
            raise ConfigError("domain_rate_limits", f"{domain!r} is listed twice")
        rates[domain] = rate
    return rates


def relay_plan(settings: Settings) -> RelayPlan:
    """The relays (TOML `relays`, else `smtp_url`'s URLs) and routes; `ConfigError` if wrong."""
    relays = settings.relays or relays_from_url(settings.smtp_url)
    return RelayPlan.build(relays, settings.routes)


def rate_limited_domain(name: str) -> str | None:
    """`name` lower-cased in A-labels, as recipients' domains are sent and compared;
    None if it is no DNS name (`mailqd.rules.domains`, the rule for every domain)."""
    from mailqd.rules.domains import ascii_dns_name, is_dns_name

    wildcard, bare = ("*.", name[2:]) if name.startswith("*.") else ("", name)
    ascii_name = ascii_dns_name(bare.lower().rstrip("."))
    if not ascii_name or not is_dns_name(ascii_name):
        return None
    return wildcard + ascii_name.lower()


def _check_listen(value: str) -> None:
    host, sep, port = value.rpartition(":")
    # Port 0 lets the system choose; the sidecar logs the port it got.
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("metrics_listen", f"must be HOST:PORT, got {value!r}")
