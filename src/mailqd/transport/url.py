"""Turn `MAILQD_SMTP_URL` into a transport, or a `ConfigError` naming the problem.

Error messages never quote the URL or pieces of it: when a password holds
an unescaped `/`, `?`, `#` or `@`, URL parsing splits in the wrong place and
any "host", "port", "path" or option name it reports may be part of the
password. They name the problem and how to fix it instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from mailqd.credentials import (
    ESCAPE_HINT,
    check_userinfo,
    read_password_file,
    redact_url,
    smtp_password,
    url_user_and_password,
)
from mailqd.errors import ConfigError
from mailqd.transport.base import Transport
from mailqd.transport.local import MaildirTransport, NullTransport
from mailqd.transport.settings import DEFAULT_IDLE_TIMEOUT, SmtpSettings, StartTLS, Timeouts
from mailqd.transport.smtp import SmtpTransport

if TYPE_CHECKING:
    from mailqd.config import Settings
    from mailqd.routes import RelayPlan, RelaySpec

__all__ = [
    "TransportFactory",
    "parse_smtp_url",
    "redact_url",
    "relay_factories",
    "relay_smtp_settings",
    "tls_verification_off",
    "transport_factory",
    "transport_from_settings",
    "transport_from_url",
]

TransportFactory = Callable[[], Transport]

CONFIG_KEY = "smtp_url"
DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
SMTP_OPTIONS = ("starttls", "tls_verify", "pipelining", "timeout", "idle_timeout")

_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def transport_from_settings(settings: Settings, password: str | None = None) -> Transport:
    """The transport of `smtp_url`, logging in with the SMTP password from wherever it is set.

    `password`, when given, is used instead of resolving it again (see
    `mailqd.credentials.smtp_password` for the sources and their order).
    """
    if password is None:
        password = smtp_password(settings)
    return transport_from_url(settings.smtp_url, password=password, timeout=settings.smtp_timeout)


def transport_factory(settings: Settings, password: str | None) -> TransportFactory:
    """Parse `smtp_url` once; the factory then makes each slot's transport without parsing.

    `password` is the SMTP password already resolved (`mailqd.credentials.smtp_password`):
    built by `mailqd.runtime.Runtime` at start and on reload, never per worker or per slot.
    """
    return _factory(settings.smtp_url, password=password, timeout=settings.smtp_timeout)


def relay_factories(
    plan: RelayPlan, shared_password: str | None, timeout: float
) -> dict[str, TransportFactory]:
    """Each relay's transport factory, its URL parsed once; `ConfigError` naming the relay.

    A relay's password is its own (`password`, `password_file`), else the
    one written in its URL, else, when its URL names a user, the shared
    SMTP password (`smtp_password`, `smtp_password_file`, the systemd
    credential).
    """
    factories = {}
    for name, spec in plan.relays.items():
        try:
            factories[name] = _relay_factory(spec, shared_password, timeout)
        except ConfigError as exc:
            if spec.source == "smtp_url":
                raise
            raise ConfigError(f"relays.{name}", exc.problem) from None
    return factories


def _relay_factory(
    spec: RelaySpec, shared_password: str | None, timeout: float
) -> TransportFactory:
    smtp = relay_smtp_settings(spec, shared_password, timeout)
    if smtp is None:
        return _factory(spec.url, password=None, timeout=timeout)
    return partial(SmtpTransport, smtp)


def relay_smtp_settings(
    spec: RelaySpec, shared_password: str | None, timeout: float
) -> SmtpSettings | None:
    """The relay's SMTP settings as deliveries use them; None for maildir:// and null://."""
    if _scheme(spec.url) not in DEFAULT_PORTS:
        return None
    own = spec.password or None
    if own is None and spec.password_file:
        own = read_password_file(Path(spec.password_file), f"relays.{spec.name}.password_file")
    user, in_url = url_user_and_password(spec.url)
    password = own if own is not None else (shared_password if user and in_url is None else None)
    return parse_smtp_url(spec.url, password=password, timeout=timeout)


def transport_from_url(
    url: str,
    *,
    password: str | None = None,
    timeout: float = 30.0,
    connect_timeout: float | None = None,
    data_timeout: float | None = None,
    local_hostname: str | None = None,
) -> Transport:
    """Build the transport a URL names (smtp, smtps, maildir or null).

    `timeout` is the default for every network step; a `timeout=` in the URL
    replaces it. `connect_timeout` and `data_timeout`, when given, override
    the connect (including TLS and login) and end-of-DATA waits. `password`
    is the SMTP password when the URL names the user but not the password.
    """
    return _factory(
        url,
        password=password,
        timeout=timeout,
        connect_timeout=connect_timeout,
        data_timeout=data_timeout,
        local_hostname=local_hostname,
    )()


def _factory(
    url: str,
    *,
    password: str | None,
    timeout: float,
    connect_timeout: float | None = None,
    data_timeout: float | None = None,
    local_hostname: str | None = None,
) -> TransportFactory:
    scheme = _scheme(url)
    if scheme in DEFAULT_PORTS:
        settings = parse_smtp_url(
            url,
            password=password,
            timeout=timeout,
            connect_timeout=connect_timeout,
            data_timeout=data_timeout,
            local_hostname=local_hostname,
        )
        return partial(SmtpTransport, settings)
    if scheme == "maildir":
        return partial(MaildirTransport, _maildir_path(url))
    if scheme == "null":
        _check_null_url(url)
        return NullTransport
    raise ConfigError(CONFIG_KEY, "scheme must be smtp://, smtps://, maildir:// or null://")


def parse_smtp_url(
    url: str,
    *,
    password: str | None = None,
    timeout: float = 30.0,
    connect_timeout: float | None = None,
    data_timeout: float | None = None,
    local_hostname: str | None = None,
) -> SmtpSettings:
    """Parse `smtp://[user[:pass]@]host[:port][?options]` (or `smtps://`) into settings.

    `password` is the password of a URL that names only the user (it came
    from another source); a URL holding a password as well is refused.
    """
    scheme = _scheme(url)
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(CONFIG_KEY, "scheme must be smtp:// or smtps://")
    check_userinfo(url, CONFIG_KEY)
    parts = _split(url)
    if parts.fragment or url.endswith("#"):
        raise ConfigError(CONFIG_KEY, f"unexpected '#' in the URL; {ESCAPE_HINT}")
    if parts.path not in ("", "/"):
        raise ConfigError(CONFIG_KEY, f"unexpected path after the host; {ESCAPE_HINT}")
    options = _options(parts.query)
    implicit_tls = scheme == "smtps"
    if implicit_tls and "starttls" in options:
        raise ConfigError(
            CONFIG_KEY, "starttls does not apply to smtps:// (TLS from the start); use smtp://"
        )
    username, password = _credentials(parts, password)
    base_timeout = _timeout(options["timeout"]) if "timeout" in options else timeout
    idle_timeout = _timeout(options.get("idle_timeout", str(DEFAULT_IDLE_TIMEOUT)), "idle_timeout")
    return SmtpSettings(
        host=_host(parts),
        port=_port(parts, DEFAULT_PORTS[scheme]),
        implicit_tls=implicit_tls,
        starttls=_starttls(options.get("starttls", StartTLS.OPPORTUNISTIC.value)),
        tls_verify=_boolean(options.get("tls_verify", "true"), "tls_verify"),
        pipelining=_boolean(options.get("pipelining", "true"), "pipelining"),
        username=username,
        password=password,
        timeouts=Timeouts(
            connect=connect_timeout or base_timeout,
            command=base_timeout,
            data=data_timeout or base_timeout,
        ),
        local_hostname=local_hostname,
        idle_timeout=idle_timeout,
    )


def tls_verification_off(url: str) -> bool:
    """Whether an `smtp://` or `smtps://` URL turns certificate checks off (`tls_verify=false`)."""
    if _scheme(url) not in DEFAULT_PORTS:
        return False
    return not _boolean(_options(_split(url).query).get("tls_verify", "true"), "tls_verify")


def _scheme(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(CONFIG_KEY, "is empty; expected e.g. smtp://host:25")
    match = _SCHEME.match(url)
    if match is None:
        raise ConfigError(CONFIG_KEY, "has no scheme; expected e.g. smtp://host:25")
    return match.group(1).lower()


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url.strip())
    except ValueError:
        raise ConfigError(CONFIG_KEY, f"is not a valid URL; {ESCAPE_HINT}") from None


def _host(parts: SplitResult) -> str:
    host = parts.hostname
    if not host:
        raise ConfigError(CONFIG_KEY, "has no host; expected e.g. smtp://host:25")
    if not _HOST.fullmatch(host):
        raise ConfigError(CONFIG_KEY, f"the host name is not valid; {ESCAPE_HINT}")
    return host


def _port(parts: SplitResult, default: int) -> int:
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        return default
    if not 1 <= port <= 65535:
        raise ConfigError(CONFIG_KEY, f"the port must be a number from 1 to 65535; {ESCAPE_HINT}")
    return port


def _credentials(parts: SplitResult, password: str | None) -> tuple[str | None, str | None]:
    raw_user, raw_password = parts.username, parts.password or None
    if raw_user is None:
        if password is not None:
            raise ConfigError(CONFIG_KEY, "an SMTP password is set but the URL has no user name")
        return None, None
    user = unquote(raw_user)
    if not user:
        raise ConfigError(CONFIG_KEY, "a password is given without a user name")
    if raw_password is not None and password is not None:
        raise ConfigError(CONFIG_KEY, "the URL holds a password and another one is set")
    if raw_password is None and password is None:
        raise ConfigError(
            CONFIG_KEY,
            "a user name is given without a password; write user:password@host, or set "
            "smtp_password, smtp_password_file or the systemd credential smtp_password",
        )
    return user, unquote(raw_password) if raw_password is not None else password


def _options(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(CONFIG_KEY, f"the query string is malformed; {ESCAPE_HINT}") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in SMTP_OPTIONS:
            raise ConfigError(
                CONFIG_KEY,
                f"unknown option in the query string (known: {', '.join(SMTP_OPTIONS)}); "
                f"{ESCAPE_HINT}",
            )
        if name in options:
            raise ConfigError(CONFIG_KEY, f"option {name} is given more than once")
        options[name] = value
    return options


def _starttls(value: str) -> StartTLS:
    try:
        return StartTLS(value.lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in StartTLS)
        raise ConfigError(CONFIG_KEY, f"starttls must be one of {choices}") from None


def _boolean(value: str, name: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(CONFIG_KEY, f"{name} must be true or false")


def _timeout(value: str, name: str = "timeout") -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(CONFIG_KEY, f"{name} must be a positive number of seconds")
    return seconds


def _maildir_path(url: str) -> Path:
    parts = _split(url)
    if parts.netloc:
        raise ConfigError(CONFIG_KEY, "a maildir URL has no host; write maildir:///absolute/path")
    if parts.query or parts.fragment:
        raise ConfigError(CONFIG_KEY, "a maildir URL takes no options")
    path = unquote(parts.path)
    if not path or path == "/":
        raise ConfigError(CONFIG_KEY, "a maildir URL needs a directory: maildir:///path/to/dir")
    return Path(path)


def _check_null_url(url: str) -> None:
    parts = _split(url)
    if parts.netloc or parts.path or parts.query or parts.fragment:
        raise ConfigError(CONFIG_KEY, "the null transport takes no host, path or options: null://")
