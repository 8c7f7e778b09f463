"""`mailqd`: the daemon's command. Runs in the foreground, the way systemd wants it.

It loads the settings (defaults, `--config` file, `MAILQD_*` environment,
flags), checks that the database has this mailqd's schema, and hands over to
the `Supervisor`, which forks the workers. A configuration or database
problem at start is one line on stderr and exit code 1, never a traceback.

Exit codes: 0 stopped cleanly (or `--check-config` passed); 1 bad
configuration, database unusable at start, or an immediate stop (second
SIGTERM/SIGINT, SIGQUIT), or `--check-config --probe` found a relay of
the default route unusable; 2 usage error (click); 3 a worker could not boot
(`WORKER_BOOT_ERROR`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from mailqd import __version__
from mailqd.cli.relay_probe import probe_targets, report_probes
from mailqd.cli.safe import EXIT_FAILURE, error_line, run_guarded
from mailqd.config import Settings, load_settings, relay_plan
from mailqd.credentials import redact_url, secrets_of, smtp_password_source
from mailqd.daemon.supervisor import KILL_GRACE, Supervisor, WorkerEntry, open_store
from mailqd.errors import MailqError
from mailqd.logging import configure_logging
from mailqd.runtime import Runtime

__all__ = ["check_configuration", "command", "load_daemon_settings", "main", "run_daemon"]

EXIT_CONFIG = EXIT_FAILURE


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: MAILQD_CONFIG).",
)
@click.option(
    "--workers", metavar="N", help="Number of worker processes (default: MAILQD_WORKERS or 3)."
)
@click.option("--database-url", help="Queue database URL (default: MAILQD_DATABASE_URL).")
@click.option("--smtp-url", help="Where mail goes (default: MAILQD_SMTP_URL).")
@click.option(
    "--check-config",
    is_flag=True,
    help="Check the configuration and the database schema, print one line, and exit.",
)
@click.option(
    "--probe",
    is_flag=True,
    help="With --check-config: also connect to each relay (no mail sent), one line each.",
)
@click.version_option(__version__, prog_name="mailqd")
@click.pass_context
def command(
    ctx: click.Context,
    config_path: Path | None,
    workers: str | None,
    database_url: str | None,
    smtp_url: str | None,
    check_config: bool,
    probe: bool,
) -> None:
    """Deliver the mail queued in the mailqd database, with a pool of worker processes.

    Runs in the foreground until SIGTERM or SIGINT (graceful stop); SIGHUP
    reloads the configuration.

    \b
    Example:
      MAILQD_DATABASE_URL=sqlite:///mailqd.db MAILQD_SMTP_URL=smtp://127.0.0.1:25 mailqd
    """
    # --workers is passed on as text so that the config layer reports a bad
    # value the same way as a bad MAILQD_WORKERS: one line naming the key.
    overrides = {"workers": workers, "database_url": database_url, "smtp_url": smtp_url}
    if probe and not check_config:
        raise click.UsageError("--probe goes with --check-config")
    if check_config:
        ctx.exit(check_configuration(config_path, overrides, probe=probe))
    ctx.exit(run_daemon(config_path, overrides))


def main() -> None:
    """The `mailqd` console script: no traceback, whatever happens at start."""
    run_guarded("mailqd", command)


def load_daemon_settings(
    config_path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """The settings, validated as far as possible without starting a worker.

    Beyond `load_settings`, the runtime is built (and dropped): the SMTP URL
    parsed, the password, secrets key and DKIM key read, so that a bad one
    fails here, naming its key.
    """
    return load_daemon_runtime(config_path, overrides).settings


def load_daemon_runtime(
    config_path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> Runtime:
    """The settings and the runtime built from them once, for the supervisor to fork with."""
    return Runtime.build(load_settings(config_path, overrides=overrides))


def check_configuration(
    config_path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    probe: bool = False,
) -> int:
    """`mailqd --check-config`: one line on stdout and 0, or one line on stderr and 1.

    The line shows the URLs with their passwords as `***`, and where the
    SMTP password comes from, never the password. With `probe`, then one
    line per relay (`mailqd.cli.relay_probe`), and 1 with a line on stderr
    if a relay of the default route failed.
    """
    settings: Settings | None = None
    try:
        settings = load_daemon_settings(config_path, overrides)
        revision = _schema_revision(settings.database_url)
        targets = probe_targets(settings) if probe else []
    except MailqError as exc:
        return _fail(exc, settings)
    plural = "" if settings.workers == 1 else "s"
    source = smtp_password_source(settings)
    password = f" (password from {source})" if source else ""
    click.echo(
        f"mailqd: configuration OK (database {redact_url(settings.database_url)}, "
        f"schema {revision}, {_relays(settings)}{password}, "
        f"{settings.workers} worker{plural}{_domain_limits(settings)})"
    )
    return report_probes(settings, targets) if probe else 0


def _relays(settings: Settings) -> str:
    """`smtp URL` for one relay; else `relays NAME URL, ...` and the number of routes."""
    plan = relay_plan(settings)
    if len(plan.relays) == 1 and not settings.relays:
        return f"smtp {redact_url(settings.smtp_url)}"
    named = ", ".join(f"{name} {redact_url(spec.url)}" for name, spec in plan.relays.items())
    routes = len(plan.routes)
    return f"relays {named}; {routes} route{'' if routes == 1 else 's'}"


def _domain_limits(settings: Settings) -> str:
    rates = settings.domain_rates
    if not rates:
        return ""
    return ", domain limits: " + ", ".join(f"{d} {r:g}/s" for d, r in rates.items())


def run_daemon(
    config_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    worker_entry: WorkerEntry | None = None,
    kill_grace: float = KILL_GRACE,
) -> int:
    """Start the supervisor and run until it stops; returns the process exit code.

    `worker_entry` and `kill_grace` are for tests that run the real start-up
    path with a stand-in worker (see tests/test_supervisor.py).
    """
    settings: Settings | None = None
    try:
        runtime = load_daemon_runtime(config_path, overrides)
        settings = runtime.settings
        configure_logging(settings, secrets=runtime.log_secrets)
        supervisor = Supervisor(
            settings,
            # The supervisor builds the runtime of a reload itself (a bad one keeps the old).
            load_settings=lambda: load_settings(config_path, overrides=overrides),
            runtime=runtime,
            worker_entry=worker_entry,
            kill_grace=kill_grace,
            notify_socket=os.environ.get("NOTIFY_SOCKET"),
            watchdog_seconds=_watchdog_seconds(os.environ),
        )
        return supervisor.run()
    except MailqError as exc:
        # Only start-up errors get here: once the workers run, the supervisor handles its own.
        return _fail(exc, settings)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """systemd's watchdog interval for this process (`WatchdogSec=`), as `sd_watchdog_enabled`."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


def _schema_revision(database_url: str) -> str:
    store = open_store(database_url)
    try:
        return store.check_schema()
    finally:
        store.close()


def _fail(exc: MailqError, settings: Settings | None) -> int:
    # Belt and braces: no driver message may echo a password back to the terminal.
    secrets = () if settings is None else secrets_of(settings)
    click.echo(error_line("mailqd", exc, secrets), err=True)
    return EXIT_CONFIG
