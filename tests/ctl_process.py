"""Run the installed `mailqctl` as a subprocess, the way an operator does.

The child gets the test's environment minus every `MAILQD_*` variable, so
a developer's own settings never leak into a test; a test passes what it
wants through `env`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MAILQCTL = str(Path(sys.executable).with_name("mailqctl"))
TIMEOUT = 120.0

EVERY_COMMAND = [
    ["stats"],
    ["failed"],
    ["show", "some-id"],
    ["top", "--once"],
    ["retry", "--all"],
    ["requeue", "some-id"],
    ["cancel", "some-id"],
    ["drain"],
    ["cleanup", "--days", "1"],
    ["enqueue", "--to", "a@example.com", "--body", "b"],
    ["templates", "list"],
    ["grant-enqueue", "some_role"],
    ["relays", "list"],
    ["audit"],
]
"""Every command but `migrate`, with the arguments it needs to reach the database."""

# The documented `--json` keys (docs/cli.md) that scripts may rely on.
STATS_KEYS = {
    "at",
    "counts",
    "queue_depth",
    "due",
    "oldest_pending_age_seconds",
    "retries_waiting",
    "retries_due_soon",
    "retries_due_soon_seconds",
    "sending_without_lease",
    "last_5m",
    "last_1h",
    "rate_limits",
}
DRAIN_KEYS = {
    "rescued",
    "claimed",
    "sent",
    "retried",
    "ambiguous",
    "failed",
    "expired",
    "deduplicated",
    "deferred_by_recipient_cap",
    "throttled_by_domain_limit",
    "deferred_by_relay",
}
CLEANUP_KEYS = {"days", "dry_run", "deleted", "batches", "seconds", "longest_batch_seconds"}

Result = subprocess.CompletedProcess[str]


def ctl_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILQD_")}
    clean.update(env or {})
    return clean


def mailqctl(
    *args: str,
    db: str | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = TIMEOUT,
) -> Result:
    """`mailqctl [--database-url DB] ARGS…`; returns the finished process."""
    command = [MAILQCTL, *(["--database-url", db] if db else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, input=input, env=ctl_env(env), timeout=timeout
    )


def run_all(commands: Sequence[Sequence[str]], db: str | None = None) -> list[Result]:
    """Run several commands at once (they are independent), results in order."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: mailqctl(*args, db=db), commands))


def ok_json(result: Result) -> Any:
    """The JSON a successful command printed."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def error_line(result: Result, code: int = 1) -> str:
    """The one line a failed command printed on stderr (and nothing else, no traceback)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def invoke(
    *args: str,
    db: str | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> Result:
    """Run mailqctl in this process with click's runner: the same code, no interpreter start.

    Returns what `mailqctl` returns, as a finished process. An exception
    other than the exit (a bug: the command would print a traceback) is
    raised here, so the test fails on it.
    """
    from click.testing import CliRunner

    from mailqd.cli.ctl import cli

    environment: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MAILQD_")}
    environment.update(env or {})
    command = [*(["--database-url", db] if db else []), *args]
    result = CliRunner(env=environment).invoke(cli, command, input=input, prog_name="mailqctl")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(command, result.exit_code, result.stdout, result.stderr)
