"""`mailqctl relays add|set|remove|list`: relays kept in the database, for every daemon at once.

A relay added here is used by every daemon on the database within a few
seconds, without a restart (`mailqd.daemon.relay_sync`); the config file's
relays stay as they are, and the database's are merged with them (see
docs/configuration.md). A password is read from a file or stdin, never
from the command line (which every user sees in `ps`), and stored sealed
with `secrets_key_file`; nothing here ever prints it: `list` says only
whether one is set. Every change is written to the audit trail
(`mailqctl audit`) with the change.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Group, RenderableType

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import Output, format_age, plural, table, truncate
from mailqd.config import Settings, relay_plan
from mailqd.credentials import read_password_file, redact_url, smtp_password_source, url_password
from mailqd.errors import ConfigError, ValidationError
from mailqd.routes import RelaySpec

ERROR_WIDTH = 60


@click.group()
def relays() -> None:
    """Relays kept in the database, used by every daemon at once beside the config file's.

    \b
    Example:
      $ mailqctl relays add backup smtp://mailer@mx-backup.internal:587 \\
            --password-file /root/backup.pass
      $ mailqctl relays add eu smtp://mx-eu.internal --domains example.de,*.example.eu
      $ mailqctl relays list
      $ mailqctl relays remove backup
    """


def _password_options(command: Any) -> Any:
    command = click.option(
        "--password-stdin", is_flag=True, help="Read the SMTP password from stdin (one line)."
    )(command)
    return click.option(
        "--password-file",
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the SMTP password from FILE (one line).",
    )(command)


def _limit_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--max-connections",
                type=click.IntRange(min=0),
                metavar="N",
                help="Connections to it per daemon (0: one per delivery slot).",
            ),
            click.option(
                "--rate-limit",
                type=click.FloatRange(min=0),
                metavar="R",
                help="Messages per second through it, all daemons together (0: no limit).",
            ),
            click.option(
                "--domains",
                metavar="LIST",
                help="Recipient domains (a.com,*.b.org) it serves on a route of its own; "
                "without, it joins the default route.",
            ),
            click.option(
                "--position",
                type=click.IntRange(min=0),
                metavar="N",
                help="Order among the database's relays (lowest first); default: last.",
            ),
        ]
    ):
        command = option(command)
    return command


def _read_password(password_file: Path | None, password_stdin: bool) -> str | None:
    if password_file is not None and password_stdin:
        raise click.UsageError("give --password-file or --password-stdin, not both")
    if password_file is not None:
        return read_password_file(password_file, "--password-file")
    if not password_stdin:
        return None
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise click.UsageError("--password-stdin: the first line of stdin is empty")
    return line


def _domains(text: str | None) -> list[str] | None:
    return None if text is None else [part for part in text.split(",") if part.strip()]


def _check_url(name: str, url: str, *, has_password: bool) -> None:
    """The URL as the daemon will parse it; a password written in it is refused here."""
    from mailqd.daemon.relay_sync import check_relay

    if url_password(url) is not None:
        raise ValidationError(
            "url",
            "holds a password; give it with --password-file or --password-stdin "
            "(a command line is visible to every user in ps)",
        )
    user = url.partition("://")[2].rpartition("@")
    if user[1] and not has_password:
        raise ValidationError(
            "url",
            f"names the user {user[0]!r} but no password is given; add --password-file FILE "
            "or --password-stdin",
        )
    placeholder = "placeholder" if has_password and user[1] else ""
    try:
        check_relay(RelaySpec(name, url, password=placeholder, source="database"))
    except ConfigError as exc:
        raise ValidationError("url", exc.problem) from None


def _box(settings: Settings, password: str | None) -> Any:
    if password is None:
        return None
    from mailqd.secrets import load_secret_box

    return load_secret_box(settings.secrets_key_file)


def _config_names(settings: Settings) -> set[str]:
    return set(relay_plan(settings).relays)


@relays.command()
@click.argument("name")
@click.argument("url")
@_password_options
@_limit_options
@json_option
@click.pass_obj
@reports_errors
def add(
    state: Context,
    name: str,
    url: str,
    password_file: Path | None,
    password_stdin: bool,
    max_connections: int | None,
    rate_limit: float | None,
    domains: str | None,
    position: int | None,
    out: Output,
) -> None:
    """Add a relay for every daemon on the database; they use it within a few seconds.

    The password (from --password-file or --password-stdin) is stored
    sealed with secrets_key_file, which must be set.

    \b
    Example:
      $ mailqctl relays add backup smtp://mailer@mx-backup.internal:587 --password-stdin < pass
      added relay backup (password set)
    """
    password = _read_password(password_file, password_stdin)
    if name in _config_names(state.settings):
        raise ValidationError("relay name", f"{name!r} is a relay of the config file already")
    _check_url(name, url, has_password=password is not None)
    stored = state.store.relay_registry.add(
        name,
        url,
        password=password,
        box=_box(state.settings, password),
        max_connections=max_connections or 0,
        rate_limit=rate_limit or 0.0,
        position=position,
        recipient_domains=_domains(domains) or (),
    )
    out.emit(
        _stored_document(stored),
        lambda: f"added relay {stored.name}{' (password set)' if stored.has_password else ''}",
    )


@relays.command(name="set")
@click.argument("name")
@click.option("--url", help="A new URL (without a password).")
@_password_options
@click.option("--no-password", is_flag=True, help="Remove the stored password.")
@_limit_options
@json_option
@click.pass_obj
@reports_errors
def set_(
    state: Context,
    name: str,
    url: str | None,
    password_file: Path | None,
    password_stdin: bool,
    no_password: bool,
    max_connections: int | None,
    rate_limit: float | None,
    domains: str | None,
    position: int | None,
    out: Output,
) -> None:
    """Change a database relay: only what is given changes. `--domains ''` clears its domains.

    \b
    Example:
      $ mailqctl relays set backup --rate-limit 20 --position 0
      $ mailqctl relays set backup --password-file /root/new.pass
    """
    password = _read_password(password_file, password_stdin)
    if password is not None and no_password:
        raise click.UsageError("give a new password or --no-password, not both")
    registry = state.store.relay_registry
    current = registry.get(name)
    has_password = password is not None or (current.has_password and not no_password)
    _check_url(name, url or current.url, has_password=has_password)
    stored = registry.set(
        name,
        url=url,
        password=password,
        clear_password=no_password,
        box=_box(state.settings, password),
        max_connections=max_connections,
        rate_limit=rate_limit,
        position=position,
        recipient_domains=_domains(domains),
    )
    out.emit(_stored_document(stored), lambda: f"changed relay {stored.name}")


@relays.command()
@click.argument("name")
@json_option
@click.pass_obj
@reports_errors
def remove(state: Context, name: str, out: Output) -> None:
    """Remove a database relay (and its recorded health); daemons stop using it within seconds.

    \b
    Example:
      $ mailqctl relays remove backup
      removed relay backup
    """
    state.store.relay_registry.remove(name)
    out.emit({"removed": name}, lambda: f"removed relay {name}")


@relays.command(name="list")
@json_option
@click.pass_obj
@reports_errors
def list_(state: Context, out: Output) -> None:
    """Every relay, the config file's and the database's, with its health; never a password.

    \b
    Example:
      $ mailqctl relays list
      $ mailqctl relays list --json | jq -r '.relays[] | select(.state == "down") | .name'
    """
    settings = state.settings
    store = state.store
    health = {s.relay: s for s in store.relay_health.states()}
    plan = relay_plan(settings)
    rows = [_config_row(relay, settings, plan) for relay in plan.relays.values()]
    rows += [_stored_document(relay) for relay in store.relay_registry.all()]
    for row in rows:
        row.update(_health(health.get(row["name"])))
    out.emit({"relays": rows}, lambda: _render(rows))


# -- documents and renderings --------------------------------------------------------


def _config_row(relay: RelaySpec, settings: Settings, plan: Any) -> dict[str, Any]:
    if settings.relays:
        password_set = bool(relay.password or relay.password_file or url_password(relay.url))
    else:  # from smtp_url: the SMTP password, wherever it is set
        password_set = bool(url_password(relay.url) or smtp_password_source(settings))
    routes = [
        "default" if route.is_default else ",".join(route.recipient_domains or ("senders",))
        for route in plan.routes
        if relay.name in route.relays
    ]
    return {
        "name": relay.name,
        "source": "config",
        "url": redact_url(relay.url),
        "password_set": password_set,
        "max_connections": relay.max_connections,
        "rate_limit": relay.rate_limit,
        "routes": routes,
        "position": None,
        "updated_at": None,
        "updated_by": None,
    }


def _stored_document(relay: Any) -> dict[str, Any]:
    return {
        "name": relay.name,
        "source": "database",
        "url": redact_url(relay.url),
        "password_set": relay.has_password,
        "max_connections": relay.max_connections,
        "rate_limit": relay.rate_limit,
        "routes": [",".join(relay.recipient_domains)] if relay.recipient_domains else ["default"],
        "position": relay.position,
        "updated_at": relay.updated_at,
        "updated_by": relay.updated_by,
    }


def _health(state: Any) -> dict[str, Any]:
    if state is None:
        return {
            "state": "up",
            "down_since": None,
            "failures": 0,
            "last_reason": None,
            "last_error": None,
            "last_failure_at": None,
        }
    return {
        "state": "up" if state.up else "down",
        "down_since": state.down_since,
        "failures": state.failures,
        "last_reason": state.last_reason,
        "last_error": state.last_error,
        "last_failure_at": state.last_failure_at,
    }


def _render(rows: list[dict[str, Any]]) -> RenderableType:
    if not rows:
        return "no relays"
    now = datetime.now(UTC)
    shown = table(
        "relay",
        "source",
        "url",
        "password",
        "routes",
        "state",
        "since",
        "failures",
        "last error",
        right=("failures",),
    )
    for row in rows:
        error = row["last_error"]
        if error and row["last_reason"]:
            error = f"{row['last_reason']}: {error}"
        shown.add_row(
            row["name"],
            row["source"],
            row["url"],
            "set" if row["password_set"] else "-",
            " ".join(row["routes"]),
            row["state"],
            format_age(row["down_since"], now) if row["down_since"] else "-",
            str(row["failures"]),
            truncate(error, ERROR_WIDTH) or "-",
        )
    down = sum(1 for row in rows if row["state"] == "down")
    return Group(shown, "", f"{plural(len(rows), 'relay')}, {down} down")
