"""`mailqctl`: the operator's command line.

Every command finds the database the way the daemon does (`--database-url`,
`MAILQD_DATABASE_URL`, or the config file). A user error prints one line on
stderr and exits 1; usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from mailqd.config import Settings, load_settings
from mailqd.errors import MailqError
from mailqd.store import Store
from mailqd.store.migrate import upgrade

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every command needs: the settings, and a store opened on first use."""

    def __init__(self, config_path: str | None, database_url: str | None) -> None:
        self._config_path = config_path
        self._database_url = database_url
        self._settings: Settings | None = None
        self._store: Store | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(
                self._config_path, overrides={"database_url": self._database_url}
            )
        return self._settings

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_url(self.settings.database_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def reports_errors(command: F) -> F:
    """Turn a mailqd error into one line on stderr and exit code 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MailqError as exc:
            click.echo(f"mailqctl: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--database-url", help="Database URL (default: MAILQD_DATABASE_URL or config).")
@click.version_option(package_name="mailqd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """Operate a mailqd queue: inspect it, fix it, and run maintenance.

    \b
    Example:
      mailqctl --database-url sqlite:///mailqd.db migrate
    """
    state = Context(config_path, database_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


@cli.command()
@click.pass_obj
@reports_errors
def migrate(state: Context) -> None:
    """Create or upgrade the mailqd tables to this version's schema.

    Safe to run again: an up-to-date schema is left as it is.

    \b
    Example:
      $ mailqctl migrate
      migrated the schema from (none) to 0001
    """
    result = upgrade(state.store.engine)
    if result.changed:
        click.echo(f"migrated the schema from {result.before or '(none)'} to {result.after}")
    else:
        click.echo(f"the schema is already at {result.after}; nothing to do")


def main() -> None:
    cli(prog_name="mailqctl")


if __name__ == "__main__":
    main()
