"""Secrets: where the SMTP password comes from, and how every secret is kept out of output.

The SMTP password has one of four sources, and only one may be set:

1. the URL itself, `smtp://user:password@host` (`smtp_url`);
2. `smtp_password` (the TOML key, or `MAILQD_SMTP_PASSWORD`);
3. `smtp_password_file`, a file holding the password;
4. systemd's credential `smtp_password` (`LoadCredential=smtp_password:/path`),
   read from `$CREDENTIALS_DIRECTORY/smtp_password`; used only when none of
   the others is set.

Setting two of the first three is a `ConfigError` naming both, rather than
a silent precedence. The user name is always in the URL (`smtp://user@host`);
a password with no user name is a `ConfigError` too. One trailing newline of
a file is dropped. Errors name the key or the file, never the content.

Masking: `redact_url` shows a URL with `***` for its password, and
`scrub` replaces every secret the settings hold or point to (URL passwords,
the SMTP password) by `***` in free text: driver errors, log lines.
`check_userinfo` refuses a URL whose user name or password holds an
unencoded `@`, `/`, `?` or `#`: such a URL splits in the wrong place, and
the "host" or "port" a parser then reports is a piece of the password.

This module is imported by `mailqd.config`, so it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from mailqd.errors import ConfigError

if TYPE_CHECKING:
    from mailqd.config import Settings

__all__ = [
    "CREDENTIAL_NAME",
    "ESCAPE_HINT",
    "check_userinfo",
    "read_password_file",
    "redact_url",
    "scrub",
    "secrets_of",
    "smtp_password",
    "smtp_password_source",
    "url_password",
]

CREDENTIAL_NAME = "smtp_password"
"""The name of the systemd credential (`LoadCredential=smtp_password:…`)."""

MASK = "***"
# Shorter secrets are not scrubbed from free text: replacing every "ab" would
# garble the logs and hide nothing worth hiding.
_MIN_SCRUBBED_LENGTH = 4
_SMTP_SCHEMES = ("smtp", "smtps")

ESCAPE_HINT = "percent-encode / ? # @ : in the user name and password (e.g. %40 for @, %2F for /)"
_AUTHORITY_END = ("/", "?", "#")


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, safe to log or print.

    Works on the raw text, so that it also hides a password whose special
    characters were not percent-encoded: everything between the first `:`
    after `://` and the last `@` is treated as the password.
    """
    scheme, user, password, rest = _userinfo(url)
    if password is None:
        return url
    return f"{scheme}://{user}:{MASK}@{rest}"


def check_userinfo(url: str, key: str) -> None:
    """Refuse a URL with an `@` anywhere but once, between the user part and the host.

    RFC 3986 ends the authority at the first `/`, `?` or `#`, and a host
    never holds an `@`; so one `@` inside the authority and none after it
    is the only shape in which every parser (libpq, SQLAlchemy, urllib) finds
    the same password, and the one `redact_url` hides. The error names the
    key and never quotes the URL.
    """
    rest = url.partition("://")[2]
    end = min((i for i in map(rest.find, _AUTHORITY_END) if i != -1), default=len(rest))
    authority, after = rest[:end], rest[end:]
    if authority.count("@") > 1:
        raise ConfigError(key, f"the user name or password holds an unencoded '@'; {ESCAPE_HINT}")
    if "@" in after:
        raise ConfigError(key, f"an '@' comes after a / ? or #; {ESCAPE_HINT}")


def url_user_and_password(url: str) -> tuple[str | None, str | None]:
    """The user and password written in a URL (raw text), each None when absent."""
    _, user, password, _ = _userinfo(url)
    return user or None, password


def url_password(url: str) -> str | None:
    """The password written in a URL (as written, still percent-encoded), if any."""
    return _userinfo(url)[2] or None


def _userinfo(url: str) -> tuple[str, str | None, str | None, str]:
    """`scheme, user, password, rest-after-@` from the raw text of a URL.

    `user` is None when there is no `@`; `password` is None when there is no
    `:` in the user part.
    """
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")
    if not separator or at == -1:
        return scheme, None, None, rest
    user, colon, password = rest[:at].partition(":")
    return scheme, user, (password if colon else None), rest[at + 1 :]


def smtp_password_source(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The key the SMTP password comes from (see the module doc), or None if there is none.

    Raises `ConfigError` if more than one source is set.
    """
    explicit = [
        key
        for key, present in (
            ("smtp_url", any(url_password(u) is not None for u in settings.smtp_url.split())),
            ("smtp_password", bool(settings.smtp_password)),
            ("smtp_password_file", bool(settings.smtp_password_file)),
        )
        if present
    ]
    if len(explicit) > 1:
        raise ConfigError(
            explicit[1],
            f"the SMTP password is set twice, here and in {explicit[0]}; keep only one",
        )
    if explicit:
        return explicit[0]
    credential = _credential_path(os.environ if env is None else env)
    return f"credential {CREDENTIAL_NAME}" if credential is not None else None


def shared_smtp_password(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The SMTP password set outside the URLs, for relays whose URL names a user only.

    With one relay from `smtp_url` this is `smtp_password` (and its checks);
    with several relays it is whichever of `smtp_password`,
    `smtp_password_file` or the systemd credential is set, or None.
    """
    env = os.environ if env is None else env
    if not settings.relays and len(settings.smtp_url.split()) <= 1:
        return smtp_password(settings, env)
    if settings.smtp_password:
        return settings.smtp_password
    if settings.smtp_password_file:
        return read_password_file(Path(settings.smtp_password_file), "smtp_password_file")
    path = _credential_path(env)
    return read_password_file(path, "smtp_url") if path is not None else None


def smtp_password(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The SMTP password set outside the URL, or None (none, or the URL holds it).

    A password written in the URL is parsed with the rest of the URL
    (`mailqd.transport.url`); this is the one the transport is given beside
    it. Only SMTP URLs log in: for `maildir://` and `null://` this is None.
    Raises `ConfigError` (naming the key, never the content) if two sources
    are set, a file cannot be read or is empty, or the URL has no user name.
    """
    env = os.environ if env is None else env
    if settings.smtp_url.partition("://")[0].lower() not in _SMTP_SCHEMES:
        return None
    source = smtp_password_source(settings, env)
    if source in (None, "smtp_url"):
        return None
    if not _userinfo(settings.smtp_url)[1]:
        key = source if source.startswith("smtp_password") else "smtp_url"
        raise ConfigError(
            key,
            f"an SMTP password is set ({source}) but smtp_url has no user name to log in "
            "with; write smtp://user@host",
        )
    if source == "smtp_password":
        return settings.smtp_password
    if source == "smtp_password_file":
        return read_password_file(Path(settings.smtp_password_file), "smtp_password_file")
    path = _credential_path(env)
    assert path is not None
    return read_password_file(path, "smtp_url")


def _credential_path(env: Mapping[str, str]) -> Path | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    return path if path.exists() else None


def read_password_file(path: Path, key: str) -> str:
    """A password kept in a file, one trailing newline dropped; `ConfigError` naming `key`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(key, f"cannot read the password file {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"the password file {path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise ConfigError(key, f"the password file {path} is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(key, f"the password file {path} holds more than one line")
    return text


def secrets_of(settings: Settings, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret the settings hold or point to, in each form it may appear in text.

    URL passwords both as written and percent-decoded; the SMTP password from
    whichever source it comes from (a source that cannot be read is skipped:
    reading it fails elsewhere, with its own error).
    """
    values: set[str] = set()
    urls = [settings.database_url, *settings.smtp_url.split(), *(r.url for r in settings.relays)]
    for url in urls:
        password = url_password(url)
        if password:
            values.update((password, unquote(password)))
    try:
        resolved = shared_smtp_password(settings, env)
    except ConfigError:
        resolved = settings.smtp_password or None
    if resolved:
        values.add(resolved)
    for relay in settings.relays:
        values.add(relay.password)
        if relay.password_file:
            with contextlib.suppress(ConfigError):
                values.add(read_password_file(Path(relay.password_file), "password_file"))
    printed = {form for value in values for form in _printed_forms(value)}
    # Longest first, so that a secret containing another is replaced whole.
    kept = (v for v in printed if len(v) >= _MIN_SCRUBBED_LENGTH)
    return tuple(sorted(kept, key=len, reverse=True))


def _printed_forms(secret: str) -> set[str]:
    """The secret as written, and as a JSON or a console log line escapes it.

    A password with a quote, a backslash or a non-ASCII letter is written
    `\\"`, `\\\\` or `\\u00df` inside a JSON string and escaped again by
    `repr` on the console, so the plain form alone would not be found there.
    """
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
    }


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
