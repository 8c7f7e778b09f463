"""`mailqctl templates add|list|show|render|delete`, and `mailqctl secrets generate-key`.

A template is checked (id, content, Jinja2 syntax) before it is written,
so a broken one is refused here, not by every job that uses it. `render`
previews a stored template with the daemon's own renderer: what it prints,
or the error it gives, is what a job with those variables would get.
See docs/templates.md.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Group, RenderableType

from mailqd.cli.context import EXIT_FAILURE, Context, json_option, reports_errors
from mailqd.cli.enqueue import _key_value
from mailqd.cli.output import Output, format_age, key_value_table, plural, table, truncate
from mailqd.cli.safe import printable
from mailqd.models import Template
from mailqd.secrets import generate_key_file
from mailqd.templating import Rendered, check_template, compile_template, render

SUBJECT_WIDTH = 50


@click.group()
def templates() -> None:
    """Message templates: Jinja2 sources rendered with a job's variables when it is sent.

    \b
    Example:
      $ mailqctl templates add welcome --subject 'Welcome, {{ name }}' \\
            --text-file welcome.txt --html-file welcome.html
      $ mailqctl templates render welcome --var name=Alice
      $ mailqctl enqueue --to alice@example.com --template welcome --var name=Alice
    """


def _read_source(path: str | None, option: str) -> str | None:
    """A template file as text; `-` reads stdin."""
    if path is None:
        return None
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint=option) from None
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None


@templates.command()
@click.argument("template_id", metavar="ID")
@click.option("--subject", required=True, help="Subject template (may be '' to use the job's).")
@click.option("--text-file", metavar="FILE", help="Plain-text body template (`-`: stdin).")
@click.option("--html-file", metavar="FILE", help="HTML body template (`-`: stdin).")
@click.option("--replace", is_flag=True, help="Replace the template if the id exists.")
@json_option
@click.pass_obj
@reports_errors
def add(
    state: Context,
    template_id: str,
    subject: str,
    text_file: str | None,
    html_file: str | None,
    replace: bool,
    out: Output,
) -> None:
    """Add a template (or replace one with --replace); give a text body, an html body or both.

    The sources are compiled first: a syntax error is reported with its
    line and nothing is written. Running daemons pick up a replaced
    template within 5 seconds.

    \b
    Example:
      $ mailqctl templates add welcome --subject 'Welcome, {{ name }}' --text-file welcome.txt
      added template welcome
    """
    if text_file is None and html_file is None:
        raise click.UsageError("give --text-file, --html-file or both")
    if text_file == "-" and html_file == "-":
        raise click.UsageError("only one of --text-file and --html-file can be - (stdin)")
    text = _read_source(text_file, "--text-file")
    html = _read_source(html_file, "--html-file")
    check_template(template_id, subject, text, html)
    stored = state.store.templates.put(template_id, subject, text, html, replace=replace)
    replaced = stored.updated_at != stored.created_at
    out.emit(
        {**template_document(stored), "replaced": replaced},
        lambda: f"{'replaced' if replaced else 'added'} template {stored.id}",
    )


@templates.command(name="list")
@json_option
@click.pass_obj
@reports_errors
def list_(state: Context, out: Output) -> None:
    """Every template, by id, with its subject and which bodies it has.

    \b
    Example:
      $ mailqctl templates list
      $ mailqctl templates list --json | jq -r '.templates[].id'
    """
    found = state.store.templates.all()
    document = {"templates": [_summary_document(t) for t in found]}
    out.emit(document, lambda: _render_list(found))


@templates.command()
@click.argument("template_id", metavar="ID")
@json_option
@click.pass_obj
@reports_errors
def show(state: Context, template_id: str, out: Output) -> None:
    """One template: its subject, times, and both body sources in full. Exits 1 if there is none.

    \b
    Example:
      $ mailqctl templates show welcome
    """
    template = state.store.templates.get(template_id)
    out.emit(template_document(template), lambda: _render_template(template))


@templates.command(name="render")
@click.argument("template_id", metavar="ID")
@click.option(
    "--var", "variables", multiple=True, callback=_key_value, help="Variable KEY=VALUE (repeat)."
)
@click.option("--vars-json", metavar="JSON", help="Variables as a JSON object (--var entries win).")
@json_option
@click.pass_obj
@reports_errors
def render_(
    state: Context,
    template_id: str,
    variables: dict[str, str],
    vars_json: str | None,
    out: Output,
) -> None:
    """Preview a template rendered with the given variables, as a job would send it.

    An undefined variable or a sandbox refusal is the one-line error the
    job would fail with, and exit code 1. The html printed is before
    sanitizing, which happens when the message is composed.

    \b
    Example:
      $ mailqctl templates render welcome --var name=Alice
      $ mailqctl templates render invoice --vars-json '{"items": [{"name": "Pen", "price": 2}]}'
    """
    values = {**_json_variables(vars_json), **variables}
    compiled = compile_template(state.store.templates.get(template_id))
    rendered = render(compiled, values)
    document = {"id": template_id, **_rendered_document(rendered)}
    out.emit(document, lambda: _render_rendered(rendered))


@templates.command()
@click.argument("template_id", metavar="ID")
@json_option
@click.pass_obj
@reports_errors
def delete(state: Context, template_id: str, out: Output) -> None:
    """Delete a template. Queued jobs that name it fail with "unknown template" when sent.

    \b
    Example:
      $ mailqctl templates delete welcome
      deleted template welcome
    """
    state.store.templates.delete(template_id)
    out.emit({"deleted": template_id}, lambda: f"deleted template {template_id}")


def _json_variables(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--vars-json") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--vars-json")
    return value


# -- documents and renderings --------------------------------------------------------


def template_document(template: Template) -> dict[str, Any]:
    """The `show --json` document: every column under its name."""
    return {name: getattr(template, name) for name in Template.__slots__}


def _summary_document(template: Template) -> dict[str, Any]:
    return {
        "id": template.id,
        "subject": template.subject,
        "has_text": template.text_body is not None,
        "has_html": template.html_body is not None,
        "created_at": template.created_at,
        "updated_at": template.updated_at,
    }


def _rendered_document(rendered: Rendered) -> dict[str, Any]:
    return {"subject": rendered.subject, "text": rendered.text, "html": rendered.html}


def _render_list(found: list[Template]) -> RenderableType:
    if not found:
        return "no templates"
    rows = table("id", "subject", "text", "html", "updated")
    for template in found:
        rows.add_row(
            template.id,
            truncate(template.subject, SUBJECT_WIDTH),
            _size(template.text_body),
            _size(template.html_body),
            format_age(template.updated_at, datetime.now(UTC)),
        )
    return Group(rows, "", plural(len(found), "template"))


def _size(source: str | None) -> str:
    return "-" if source is None else plural(len(source), "char")


def _render_template(template: Template) -> RenderableType:
    now = datetime.now(UTC)
    fields = key_value_table(
        [
            ("id", template.id),
            ("subject", template.subject or "- (the job's own subject)"),
            ("created_at", format_age(template.created_at, now)),
            ("updated_at", format_age(template.updated_at, now)),
        ]
    )
    return Group(fields, *_bodies(template.text_body, template.html_body))


def _render_rendered(rendered: Rendered) -> RenderableType:
    subject = rendered.subject if rendered.subject is not None else "- (the job's own subject)"
    return Group(key_value_table([("subject", subject)]), *_bodies(rendered.text, rendered.html))


def _bodies(text: str | None, html: str | None) -> list[RenderableType]:
    parts: list[RenderableType] = []
    for name, value in (("text", text), ("html", html)):
        parts += ["", f"--- {name} ---" if value is not None else f"--- no {name} ---"]
        if value is not None:
            parts.append(value.rstrip("\n"))
    return parts


# -- secrets -------------------------------------------------------------------------


@click.group()
def secrets() -> None:
    """Keys for the secrets mailqd keeps encrypted in the database (template variables).

    \b
    Example:
      $ mailqctl secrets generate-key /etc/mailqd/secrets.key
    """


@secrets.command(name="generate-key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def generate_key(path: Path, out: Output) -> None:
    """Write a new Fernet key to PATH (mode 0600); never overwrites a file.

    Point `secrets_key_file` at it, for the daemon and for every client
    that enqueues (`MAILQD_SECRETS_KEY_FILE`).

    \b
    Example:
      $ mailqctl secrets generate-key /etc/mailqd/secrets.key
      wrote a new key to /etc/mailqd/secrets.key (mode 0600)
    """
    try:
        generate_key_file(path)
    except FileExistsError:
        _fail(f"{path} exists already; a key file is never overwritten")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
    out.emit({"path": str(path)}, lambda: f"wrote a new key to {path} (mode 0600)")


def _fail(message: str) -> NoReturn:
    click.echo(f"mailqctl: {printable(message)}", err=True)
    sys.exit(EXIT_FAILURE)
