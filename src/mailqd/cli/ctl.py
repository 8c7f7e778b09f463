"""`mailqctl`: the operator's command line.

Every command finds the database the way the daemon does (`--database-url`,
`MAILQD_DATABASE_URL`, or the config file). Exit codes: 0 success; 1 the
command could not do its work (a user error such as an unknown id, a bad
URL, a database that is down or not migrated, printed as one line on
stderr; or, for `drain`, a message not delivered); 2 usage errors (click's
convention).

The commands live in modules by role: `inspect` (stats, failed, show),
`top`, `repair` (retry, requeue, cancel, drain), `maintain` (migrate,
cleanup), `enqueue`, `templates` (templates, secrets) and `roles`
(grant-enqueue), `dkim` (dkim-record); `output` prints tables or `--json`.

A command's module is imported only when that command runs (`COMMANDS`), so
`mailqctl --version` or `--help` never pays for SQLAlchemy, alembic, rich or
Jinja2; `--help` lists the commands from the short help kept in the table
(a test checks it matches each command's own).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import click

from mailqd import __version__
from mailqd.cli.safe import run_guarded

if TYPE_CHECKING:
    from mailqd.cli.context import Context, reports_errors

__all__ = ["COMMANDS", "Context", "cli", "main", "reports_errors"]

# name -> ("module:attribute", short help). The short help is the first sentence
# of the command's docstring, as click would print it.
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": (
        "mailqd.cli.audit:audit",
        "Who changed what and when: relay changes, and daemons unsealing relay passwords.",
    ),
    "cancel": (
        "mailqd.cli.repair:cancel",
        "Stop a pending job from being sent (a job being sent right now cannot be stopped).",
    ),
    "cleanup": (
        "mailqd.cli.maintain:cleanup",
        "Delete sent, failed and cancelled jobs (and their attempts) older than N days.",
    ),
    "dkim-record": (
        "mailqd.cli.dkim:dkim_record",
        "Print the DNS TXT record to publish for the configured DKIM key.",
    ),
    "drain": (
        "mailqd.cli.repair:drain",
        "Deliver due jobs from this process, without a running daemon (for recovery).",
    ),
    "enqueue": ("mailqd.cli.enqueue:enqueue", "Queue one message and print its job id."),
    "failed": (
        "mailqd.cli.inspect:failed",
        "The most recent permanently failed jobs, newest first, with their last error.",
    ),
    "grant-enqueue": (
        "mailqd.cli.roles:grant_enqueue",
        "Let ROLE queue mail (client library, COPY, plain SQL INSERT) and nothing else.",
    ),
    "migrate": (
        "mailqd.cli.maintain:migrate",
        "Create or upgrade the mailqd tables to this version's schema.",
    ),
    "relays": (
        "mailqd.cli.relays:relays",
        "Relays kept in the database, used by every daemon at once beside the config file's.",
    ),
    "requeue": (
        "mailqd.cli.repair:requeue",
        "Send a failed or cancelled job again: pending, due now, fresh attempt budget.",
    ),
    "retry": (
        "mailqd.cli.repair:retry",
        "Put failed jobs back in the queue: pending, due now, with a fresh attempt budget.",
    ),
    "secrets": (
        "mailqd.cli.templates:secrets",
        "Keys for the secrets mailqd keeps encrypted in the database (template variables).",
    ),
    "show": (
        "mailqd.cli.inspect:show",
        "Every field of one job, its body, and its attempt history (oldest first).",
    ),
    "stats": (
        "mailqd.cli.inspect:stats",
        "Queue counts, what is due, and what was sent and failed recently.",
    ),
    "templates": (
        "mailqd.cli.templates:templates",
        "Message templates: Jinja2 sources rendered with a job's variables when it is sent.",
    ),
    "top": (
        "mailqd.cli.top:top",
        "A live view: send and failure rates, queue depth, oldest due job, retries due soon.",
    ),
}


class LazyCommands(MutableMapping[str, click.Command]):
    """The group's `commands`: a name is known from the table, its module imported on lookup."""

    def __init__(self, table: dict[str, tuple[str, str]]) -> None:
        self._table = table
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            module, _, attribute = self._table[name][0].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}:{attribute} is not a click command")
            self._loaded[name] = command
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._table), **dict.fromkeys(self._loaded)})

    def __len__(self) -> int:
        return len(self._table.keys() | self._loaded.keys())

    def short_help(self, name: str, limit: int) -> str:
        """A command's line in `--help`, without importing a module not yet loaded."""
        if name in self._loaded:
            return self._loaded[name].get_short_help_str(limit)
        return click.Command(name, help=self._table[name][1]).get_short_help_str(limit)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when they are used."""

    commands: LazyCommands

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, self.commands.short_help(name, limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--database-url", help="Database URL (default: MAILQD_DATABASE_URL or config).")
@click.version_option(__version__)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """Operate a mailqd queue: inspect it, fix it, and run maintenance.

    \b
    Example:
      mailqctl --database-url sqlite:///mailqd.db migrate
      MAILQD_DATABASE_URL=postgresql://mailqd@db/mailqd mailqctl stats
    """
    from mailqd.cli.context import Context

    state = Context(config_path, database_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


def __getattr__(name: str) -> Any:
    """`Context` and `reports_errors`, still importable from here, loaded on first use."""
    if name in ("Context", "reports_errors"):
        from mailqd.cli import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """The `mailqctl` console script: no traceback, whatever happens."""
    run_guarded("mailqctl", cli)


if __name__ == "__main__":
    main()
