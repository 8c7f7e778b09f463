"""`mailqctl grant-enqueue`: a PostgreSQL role that may queue mail but not read it."""

from __future__ import annotations

from pathlib import Path

import click

from mailqd.cli.context import Context, reports_errors
from mailqd.cli.safe import printable


@click.command("grant-enqueue")
@click.argument("role")
@click.option("--create", is_flag=True, help="Create the role (LOGIN) first.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Set the role's password from this file (hashed before it is sent).",
)
@click.option(
    "--schema",
    default="public",
    show_default=True,
    help="The schema holding the mailqd tables.",
)
@click.option(
    "--print-sql", is_flag=True, help="Print the SQL instead of running it (no database needed)."
)
@click.pass_obj
@reports_errors
def grant_enqueue(
    state: Context,
    role: str,
    create: bool,
    password_file: Path | None,
    schema: str,
    print_sql: bool,
) -> None:
    """Let ROLE queue mail (client library, COPY, plain SQL INSERT) and nothing else.

    ROLE may insert new jobs and read back their ids, but cannot read other
    jobs' recipients, subjects or bodies, change or delete jobs, or read
    attempts and templates (see docs/security.md). Run it as the role that
    owns the mailqd tables (the one that ran `mailqctl migrate`); --create
    needs the CREATEROLE privilege. PostgreSQL only.

    \b
    Example:
      $ mailqctl grant-enqueue shop_app --create --password-file /run/secrets/shop_app
      shop_app may now enqueue mail, and read no job's content
      $ mailqctl grant-enqueue shop_app --create --print-sql
    """
    from mailqd.credentials import read_password_file
    from mailqd.store.roles import enqueue_role_sql

    if print_sql:
        for statement in enqueue_role_sql(role, create=create, schema=schema):
            click.echo(f"{statement};")
        return
    password = None
    if password_file is not None:
        password = read_password_file(password_file, "--password-file")
    state.store.grant_enqueue_role(role, create=create, password=password, schema=schema)
    click.echo(f"{printable(role)} may now enqueue mail, and read no job's content")
