"""What every `mailqctl` command shares: the settings, the store, and how errors end.

Kept apart from `ctl.py` (the click group) so that each command module can
import it without importing the group that imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mailqd.cli.output import Output
from mailqd.cli.safe import EXIT_FAILURE as EXIT_FAILURE
from mailqd.cli.safe import error_line
from mailqd.config import Settings, load_settings
from mailqd.errors import MailqError

if TYPE_CHECKING:
    from mailqd.store import Store

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """The settings, and a store opened on first use.

    `store` checks that the database has this mailqd's schema before the
    first command uses it, so an outdated database is one clear line
    ("run `mailqctl migrate`") instead of an SQL error; `migrate` itself
    uses `unchecked_store`.
    """

    def __init__(self, config_path: str | None, database_url: str | None) -> None:
        self._config_path = config_path
        self._database_url = database_url
        self._settings: Settings | None = None
        self._store: Store | None = None
        self._checked = False

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(
                self._config_path, overrides={"database_url": self._database_url}
            )
        return self._settings

    @property
    def unchecked_store(self) -> Store:
        if self._store is None:
            from mailqd.store import Store

            self._store = Store.from_url(self.settings.database_url, application_name="mailqctl")
        return self._store

    @property
    def store(self) -> Store:
        store = self.unchecked_store
        if not self._checked:
            store.check_schema()
            self._checked = True
        return store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def secrets(self) -> tuple[str, ...]:
        """The passwords of the loaded settings (none if they are not loaded), to hide in text."""
        if self._settings is None:
            return ()
        from mailqd.credentials import secrets_of

        return secrets_of(self._settings)


def reports_errors(command: F) -> F:
    """Turn a mailqd error into one line on stderr (no password, no control character), exit 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MailqError as exc:
            click_context = click.get_current_context(silent=True)
            state = click_context.find_object(Context) if click_context else None
            click.echo(error_line("mailqctl", exc, state.secrets() if state else ()), err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


def json_option(command: F) -> F:
    """Add `--json` and pass the command an `Output` (`out`) that honours it."""

    def to_output(ctx: click.Context, _param: click.Parameter, value: bool) -> Output:
        return Output(as_json=value)

    return click.option(
        "--json",
        "out",
        is_flag=True,
        callback=to_output,
        help="Print JSON (stable keys, see docs/cli.md) instead of a table.",
    )(command)
