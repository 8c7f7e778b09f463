"""Turn `MAILQD_SMTP_URL` into a transport, or a `ConfigError` naming the problem.

Error messages never quote the URL or pieces of it: when a password holds
an unescaped `/`, `?`, `#` or `@`, URL parsing splits in the wrong place and
any "host", "port", "path" or option name it reports may be part of the
password. They name the problem and how to fix it instead.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from mailqd.errors import ConfigError
from mailqd.transport.base import Transport
from mailqd.transport.local import MaildirTransport, NullTransport
from mailqd.transport.settings import SmtpSettings, StartTLS, Timeouts
from mailqd.transport.smtp import SmtpTransport

__all__ = ["parse_smtp_url", "redact_url", "transport_from_url"]

CONFIG_KEY = "smtp_url"
DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
SMTP_OPTIONS = ("starttls", "tls_verify", "timeout")
ESCAPE_HINT = "percent-encode / ? # @ : in the user name and password (e.g. %2F for /)"

_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def transport_from_url(
    url: str,
    *,
    timeout: float = 30.0,
    connect_timeout: float | None = None,
    data_timeout: float | None = None,
    local_hostname: str | None = None,
) -> Transport:
    """Build the transport a URL names (smtp, smtps, maildir or null).

    `timeout` is the default for every network step; a `timeout=` in the URL
    replaces it. `connect_timeout` and `data_timeout`, when given, override
    the connect (including TLS and login) and end-of-DATA waits.
    """
    scheme = _scheme(url)
    if scheme in DEFAULT_PORTS:
        settings = parse_smtp_url(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            data_timeout=data_timeout,
            local_hostname=local_hostname,
        )
        return SmtpTransport(settings)
    if scheme == "maildir":
        return MaildirTransport(_maildir_path(url))
    if scheme == "null":
        _check_null_url(url)
        return NullTransport()
    raise ConfigError(CONFIG_KEY, "scheme must be smtp://, smtps://, maildir:// or null://")


def parse_smtp_url(
    url: str,
    *,
    timeout: float = 30.0,
    connect_timeout: float | None = None,
    data_timeout: float | None = None,
    local_hostname: str | None = None,
) -> SmtpSettings:
    """Parse `smtp://[user[:pass]@]host[:port][?options]` (or `smtps://`) into settings."""
    scheme = _scheme(url)
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(CONFIG_KEY, "scheme must be smtp:// or smtps://")
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
    username, password = _credentials(parts)
    base_timeout = _timeout(options["timeout"]) if "timeout" in options else timeout
    return SmtpSettings(
        host=_host(parts),
        port=_port(parts, DEFAULT_PORTS[scheme]),
        implicit_tls=implicit_tls,
        starttls=_starttls(options.get("starttls", StartTLS.OPPORTUNISTIC.value)),
        tls_verify=_boolean(options.get("tls_verify", "true"), "tls_verify"),
        username=username,
        password=password,
        timeouts=Timeouts(
            connect=connect_timeout or base_timeout,
            command=base_timeout,
            data=data_timeout or base_timeout,
        ),
        local_hostname=local_hostname,
    )


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, safe to log or print.

    Works on the raw text, so that it also hides a password whose special
    characters were not percent-encoded: everything between the first `:`
    after `://` and the last `@` is treated as the password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    at = rest.rfind("@")
    if at == -1:
        return url
    user, colon, _ = rest[:at].partition(":")
    if not colon:
        return url
    return f"{scheme}://{user}:***@{rest[at + 1 :]}"


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


def _credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    raw_user, raw_password = parts.username, parts.password
    if raw_user is None:
        return None, None
    user = unquote(raw_user)
    if not user:
        raise ConfigError(CONFIG_KEY, "a password is given without a user name")
    if raw_password is None:
        raise ConfigError(
            CONFIG_KEY, "a user name is given without a password; write user:password@host"
        )
    return user, unquote(raw_password)


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


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(CONFIG_KEY, "timeout must be a positive number of seconds")
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
