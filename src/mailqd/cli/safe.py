"""How `mailqctl` and `mailqd` end on an error: one line, no secret, no control character.

The line is the error's message with the secrets of the settings as `***`
and its control characters escaped (`mailqd.printable`). An exception
that is not a `MailqError` is a bug: it is named with where it was
raised, never with its message, which could quote a URL or job data.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import click

from mailqd.credentials import scrub
from mailqd.errors import MailqError
from mailqd.printable import json_safe, printable

__all__ = ["EXIT_FAILURE", "error_line", "json_safe", "printable", "run_guarded"]

EXIT_FAILURE = 1
"""A command that could not do its work: bad input or configuration, a database problem."""
EXIT_USAGE = 2
"""A usage error (click's convention): here, an argument that is not text."""


def error_line(prog: str, exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """The one line a command ends with on `exc`: `PROG: message`."""
    if isinstance(exc, MailqError):
        text = scrub(str(exc), secrets)
    else:
        text = (
            f"internal error: {type(exc).__name__}{_raised_at(exc)}; "
            "this is a bug in mailqd, please report it with the command that caused it"
        )
    return f"{prog}: {printable(text)}"


def _raised_at(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _is_text(argument: str) -> bool:
    """False for an argument holding bytes the locale could not decode (as lone surrogates)."""
    if argument.isascii():
        return True
    try:
        argument.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_guarded(prog: str, command: click.Command) -> NoReturn:
    """Run a console script's command: whatever escapes it is one line on stderr, exit code 1.

    Commands report their own errors (with the secrets of their settings
    hidden); this is the net under them, and under click's own handling.
    It is not in the commands themselves, so that tests running them in
    process (click's runner) still see a bug as the exception it is.
    """
    for position, argument in enumerate(sys.argv[1:], 1):
        if not _is_text(argument):
            click.echo(f"{prog}: argument {position} is not valid UTF-8 text", err=True)
            sys.exit(EXIT_USAGE)
    try:
        command.main(prog_name=prog)
    except Exception as exc:
        click.echo(error_line(prog, exc), err=True)
        sys.exit(EXIT_FAILURE)
    sys.exit(0)  # click's standalone mode exits itself; this is for the type checker
