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
(grant-enqueue), `dkim` (dkim-record); `output` prints tables or `--json` for all of them.
"""

from __future__ import annotations

import click

from mailqd.cli.context import Context, reports_errors
from mailqd.cli.dkim import dkim_record
from mailqd.cli.enqueue import enqueue
from mailqd.cli.inspect import failed, show, stats
from mailqd.cli.maintain import cleanup, migrate
from mailqd.cli.repair import cancel, drain, requeue, retry
from mailqd.cli.roles import grant_enqueue
from mailqd.cli.safe import run_guarded
from mailqd.cli.templates import secrets, templates
from mailqd.cli.top import top

__all__ = ["Context", "cli", "main", "reports_errors"]


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
      MAILQD_DATABASE_URL=postgresql://mailqd@db/mailqd mailqctl stats
    """
    state = Context(config_path, database_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


for command in (migrate, stats, failed, show, top, enqueue, retry, requeue, cancel, drain, cleanup):
    cli.add_command(command)
cli.add_command(templates)
cli.add_command(grant_enqueue)
cli.add_command(secrets)
cli.add_command(dkim_record)


def main() -> None:
    """The `mailqctl` console script: no traceback, whatever happens."""
    run_guarded("mailqctl", cli)


if __name__ == "__main__":
    main()
