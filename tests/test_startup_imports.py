"""Start-up: `import mailqd` and `mailqctl --version`/`--help` load no SQLAlchemy.

A behaviour check, not a timing one: each case runs in a fresh interpreter and
looks at `sys.modules`, so a module-level import that pulls the database layer
into the command line's start-up fails here whatever the machine's speed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from mailqd.cli.ctl import COMMANDS, cli

HEAVY = ("sqlalchemy", "alembic", "psycopg", "rich", "jinja2")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> set[str]:
    return {name for name in modules if name.split(".")[0] in HEAVY}


def test_import_mailqd_loads_no_database_layer() -> None:
    assert heavy(loaded_after("import mailqd")) == set()


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_mailqctl_start_up_loads_no_database_layer(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from mailqd.cli.ctl import cli\n"
        f"try:\n    cli.main({args!r}, prog_name='mailqctl')\n"
        "except SystemExit:\n    pass\n"
    )
    assert heavy(loaded_after(code)) == set()


def test_client_is_still_importable_from_the_package() -> None:
    from mailqd import AsyncClient, Client
    from mailqd.client import AsyncClient as AsyncDirect
    from mailqd.client import Client as Direct

    assert Client is Direct and AsyncClient is AsyncDirect


def test_the_help_table_matches_each_command() -> None:
    """The short help kept in `COMMANDS` is what each command's own docstring gives."""
    for name in COMMANDS:
        command = cli.commands[name]
        assert command.name == name
        for limit in (45, 1000):
            kept = click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)
            assert kept == command.get_short_help_str(limit), name
