"""Rendering message templates with a job's variables: Jinja2, sandboxed and strict.

A template's subject, text and html are Jinja2 sources. They are compiled
once (`compile_template`, also run when a template is added, so a broken one
is refused before any job uses it) and rendered per message (`render`):

- in Jinja2's immutable sandbox: templates cannot reach Python internals
  (`{{ ''.__class__.__mro__ }}` is refused), call unsafe methods or modify
  the variables; `range` is capped, and so are `*` and `**` on big operands,
  so a template cannot make a worker build a gigabyte string;
- with `StrictUndefined`: a variable the template uses but the job does not
  give is an error, never an empty string in a sent mail;
- the html part auto-escaped (a `<script>` in a variable arrives as text),
  the subject and text parts not (they are not HTML); the rendered subject
  must still be one line, so a variable with CR/LF cannot add a header.

Every failure is a `TemplateError` naming the template, the part and the
problem; the daemon records it as the job's permanent failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailqd.errors import MissingContentError, TemplateError, ValidationError
from mailqd.models import Template

__all__ = ["CompiledTemplate", "Rendered", "check_template", "compile_template", "render"]

MAX_PRODUCT_LENGTH = 1_000_000
"""Longest string or list a template may build with `*` (characters or items)."""
MAX_EXPONENT = 1000
_FORBIDDEN_IN_SUBJECT = re.compile(r"[\r\n\x00]")
_UNDEFINED_NAME = re.compile(r"^'([^']+)' is undefined$")
_PART_NAMES = {"subject": "the subject", "text": "the text body", "html": "the html body"}


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on the two operators that can exhaust memory or CPU."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent larger than {MAX_EXPONENT}")
            return left**right
        for sized, count in ((left, right), (right, left)):
            if (
                isinstance(sized, str | list | tuple)
                and isinstance(count, int)
                and len(sized) * count > MAX_PRODUCT_LENGTH
            ):
                raise SecurityError(f"result longer than {MAX_PRODUCT_LENGTH}")
        return left * right


_PLAIN = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
_HTML = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=True, keep_trailing_newline=True)


@dataclass(frozen=True, slots=True)
class Rendered:
    """What a template gave; None for a part the template does not define."""

    subject: str | None
    text: str | None
    html: str | None


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A template ready to render many times. `sources` tells whether it is still current."""

    id: str
    sources: tuple[str, str | None, str | None]
    subject: jinja2.Template | None
    text: jinja2.Template | None
    html: jinja2.Template | None


def compile_template(template: Template) -> CompiledTemplate:
    """Compile the three parts; `TemplateError` for a syntax error, naming part and line.

    An empty subject is not a part: the job's own subject is used.
    """
    if _FORBIDDEN_IN_SUBJECT.search(template.subject):
        raise TemplateError(template.id, "the subject must be one line (no CR, LF or NUL)")
    return CompiledTemplate(
        id=template.id,
        sources=(template.subject, template.text_body, template.html_body),
        subject=_compile(template.id, "subject", template.subject or None, _PLAIN),
        text=_compile(template.id, "text", template.text_body, _PLAIN),
        html=_compile(template.id, "html", template.html_body, _HTML),
    )


def _compile(
    template_id: str, part: str, source: str | None, environment: jinja2.Environment
) -> jinja2.Template | None:
    if source is None:
        return None
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            template_id, f"syntax error in {_PART_NAMES[part]}, line {exc.lineno}: {exc.message}"
        ) from None


def render(template: CompiledTemplate, variables: Mapping[str, Any] | None) -> Rendered:
    """Render every part with `variables`; `TemplateError` saying which part failed and why."""
    values = dict(variables or {})
    subject = _render(template, "subject", template.subject, values)
    if subject is not None and _FORBIDDEN_IN_SUBJECT.search(subject):
        raise TemplateError(
            template.id, "the rendered subject contains CR, LF or NUL (from a variable?)"
        )
    return Rendered(
        subject=subject,
        text=_render(template, "text", template.text, values),
        html=_render(template, "html", template.html, values),
    )


def _render(
    template: CompiledTemplate,
    part: str,
    compiled: jinja2.Template | None,
    values: dict[str, Any],
) -> str | None:
    if compiled is None:
        return None
    where = _PART_NAMES[part]
    try:
        return compiled.render(values)
    except jinja2.UndefinedError as exc:
        raise TemplateError(template.id, f"{_describe_undefined(exc)} in {where}") from None
    except SecurityError as exc:
        raise TemplateError(template.id, f"refused by the sandbox in {where}: {exc}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(template.id, f"cannot render {where}: {exc}") from None
    except Exception as exc:  # a filter or operator on the wrong type: the job's data
        raise TemplateError(
            template.id, f"cannot render {where}: {type(exc).__name__}: {exc}"
        ) from None


def _describe_undefined(exc: jinja2.UndefinedError) -> str:
    """`variable 'name' is undefined` for a missing variable, Jinja's words for the rest."""
    message = exc.message or "undefined value"
    missing = _UNDEFINED_NAME.match(message)
    return f"variable {missing.group(1)!r} is undefined" if missing else message


_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}\Z")


def check_template(
    template_id: str, subject: str, text_body: str | None, html_body: str | None
) -> CompiledTemplate:
    """Check a template before it is stored, and compile it: a broken one is never saved.

    The id is 1 to 200 characters of letters, digits and `. _ : / @ + -`; at
    least one of the text and html bodies is required; every part must
    compile. Raises `ValidationError` (or `TemplateError`) saying what is wrong.
    """
    if not isinstance(template_id, str) or not _TEMPLATE_ID.match(template_id):
        raise ValidationError(
            "template_id",
            f"{template_id!r} is not a template id: use 1 to 200 letters, digits and "
            "`. _ : / @ + -`, starting with a letter or digit",
        )
    for part, value in (("subject", subject), ("text", text_body), ("html", html_body)):
        if value is not None and not isinstance(value, str):
            raise ValidationError(part, f"must be a string, got {type(value).__name__}")
        if value is not None and "\x00" in value:
            raise ValidationError(part, "must not contain NUL characters")
    if subject is None:
        raise ValidationError("subject", "is required (it may be empty)")
    if not text_body and not html_body:
        raise MissingContentError("text", "a template needs a text body, an html body, or both")
    now = datetime.now(UTC)
    return compile_template(Template(template_id, subject, text_body, html_body, now, now))
