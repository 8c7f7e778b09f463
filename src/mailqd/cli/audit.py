"""`mailqctl audit`: the audit trail, newest first: who changed what, and when.

Each entry names the database role and the OS user of the process that
made the change (for `unseal`, the daemon that opened a relay's sealed
password: host and pid in the detail). See `mailqd.store.audit`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click
from rich.console import Group, RenderableType

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import Output, format_time, plural, table, truncate
from mailqd.store.audit import AuditEntry

DETAIL_WIDTH = 80
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`90s`, `15m`, `2h`, `7d`, `1w` ago, or an ISO 8601 time (UTC when it has no offset)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            "expected a duration (90s, 15m, 2h, 7d, 1w) or an ISO 8601 time "
            "(2030-01-31T12:00:00+00:00)",
            param_hint="--since",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@click.command()
@click.option("--since", metavar="WHEN", help="Only entries since: 2h, 7d, or an ISO 8601 time.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    metavar="N",
    help="At most N entries, newest first.",
)
@json_option
@click.pass_obj
@reports_errors
def audit(state: Context, since: str | None, limit: int, out: Output) -> None:
    """Who changed what and when: relay changes, and daemons unsealing relay passwords.

    \b
    Example:
      $ mailqctl audit --since 24h
      $ mailqctl audit --json | jq -r '.entries[] | "\\(.at) \\(.os_user) \\(.command)"'
    """
    after = parse_since(since) if since else None
    entries = state.store.audit.entries(since=after, limit=limit)
    document = {"entries": [_document(entry) for entry in entries]}
    out.emit(document, lambda: _render(entries))


def _document(entry: AuditEntry) -> dict[str, object]:
    return {name: getattr(entry, name) for name in AuditEntry.__slots__}


def _render(entries: list[AuditEntry]) -> RenderableType:
    if not entries:
        return "no audit entries"
    rows = table("at", "db role", "os user", "command", "target", "affected", "detail")
    for entry in entries:
        rows.add_row(
            format_time(entry.at),
            entry.db_role or "-",
            entry.os_user or "-",
            entry.command,
            entry.target or entry.filter or "-",
            "-" if entry.affected is None else str(entry.affected),
            truncate(entry.detail, DETAIL_WIDTH) or "-",
        )
    return Group(rows, "", plural(len(entries), "entry", "entries"))
