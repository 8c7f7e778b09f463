"""Rendering message templates with a job's variables: Jinja2, sandboxed and strict.

A template's subject, text and html are Jinja2 sources. They are compiled
once (`compile_template`, also run when a template is added, so a broken one
is refused before any job uses it) and rendered per message (`render`):

- in Jinja2's immutable sandbox (`mailqd.templating.sandbox`): templates cannot reach
  Python internals (`{{ ''.__class__.__mro__ }}` is refused), call unsafe
  methods or modify the variables; and within a `RenderBudget`: a render
  that takes longer than `template_render_seconds`, writes a part larger
  than `template_max_output_bytes`, or would build a value larger than
  that (`'x'.ljust(800000000)`, `'x' * N`, a doubling loop) fails, before
  the value is built;
- with `StrictUndefined`: a variable the template uses but the job does not
  give is an error, never an empty string in a sent mail;
- the html part auto-escaped (a `<script>` in a variable arrives as text),
  the subject and text parts not (they are not HTML); the rendered subject
  must still be one line, so a variable with CR/LF cannot add a header.

Every failure is a `TemplateError` naming the template, the part and the
problem, never a variable's value (`mailqd.templating.errors`); the daemon
records it as the job's permanent failure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError

from mailqd.errors import MissingContentError, TemplateError, ValidationError
from mailqd.models import Template
from mailqd.templating.errors import SafeUndefined, UnsafeAccess, clean, scrub
from mailqd.templating.sandbox import (
    BoundedSandbox,
    BudgetExceeded,
    Meter,
    RenderBudget,
    TooLarge,
    metered,
)

__all__ = [
    "CompiledTemplate",
    "RenderBudget",
    "Rendered",
    "check_template",
    "compile_template",
    "render",
]

_FORBIDDEN_IN_SUBJECT = re.compile(r"[\r\n\x00]")
_PART_NAMES = {"subject": "the subject", "text": "the text body", "html": "the html body"}
_WORDS = re.compile(r"\w+")

_PLAIN = BoundedSandbox(undefined=SafeUndefined, autoescape=False, keep_trailing_newline=True)
_HTML = BoundedSandbox(undefined=SafeUndefined, autoescape=True, keep_trailing_newline=True)


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
    words: frozenset[str] = frozenset()
    """The words of the sources: what an error message may quote."""


def compile_template(template: Template) -> CompiledTemplate:
    """Compile the three parts; `TemplateError` for a syntax error, naming part and line.

    An empty subject is not a part: the job's own subject is used.
    """
    if _FORBIDDEN_IN_SUBJECT.search(template.subject):
        raise TemplateError(template.id, "the subject must be one line (no CR, LF or NUL)")
    sources = (template.subject, template.text_body, template.html_body)
    return CompiledTemplate(
        id=template.id,
        sources=sources,
        subject=_compile(template.id, "subject", template.subject or None, _PLAIN),
        text=_compile(template.id, "text", template.text_body, _PLAIN),
        html=_compile(template.id, "html", template.html_body, _HTML),
        words=frozenset(_WORDS.findall(" ".join(filter(None, sources)))),
    )


def _compile(
    template_id: str, part: str, source: str | None, environment: jinja2.Environment
) -> jinja2.Template | None:
    if source is None:
        return None
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        problem = clean(exc.message or "")
        raise TemplateError(
            template_id, f"syntax error in {_PART_NAMES[part]}, line {exc.lineno}: {problem}"
        ) from None
    except RecursionError:
        raise TemplateError(
            template_id, f"{_PART_NAMES[part]} nests too deeply to compile (brackets, blocks)"
        ) from None


def render(
    template: CompiledTemplate,
    variables: Mapping[str, Any] | None,
    budget: RenderBudget = RenderBudget(),  # noqa: B008 (frozen)
) -> Rendered:
    """Render every part with `variables` within `budget` (for all three parts together).

    Raises `TemplateError` saying which part failed and why, naming the
    budget's config key when one was exceeded.
    """
    values = dict(variables or {})
    meter = Meter(budget, template.words, values)
    restore = metered(meter)
    try:
        subject = _render(template, "subject", template.subject, meter)
        if subject is not None and _FORBIDDEN_IN_SUBJECT.search(subject):
            raise TemplateError(
                template.id, "the rendered subject contains CR, LF or NUL (from a variable?)"
            )
        return Rendered(
            subject=subject,
            text=_render(template, "text", template.text, meter),
            html=_render(template, "html", template.html, meter),
        )
    finally:
        restore()


def _render(
    template: CompiledTemplate, part: str, compiled: jinja2.Template | None, meter: Meter
) -> str | None:
    if compiled is None:
        return None
    where = _PART_NAMES[part]
    try:
        return _generate(compiled, meter)
    except BudgetExceeded as exc:
        raise TemplateError(template.id, f"{exc} in {where}") from None
    except TooLarge as exc:
        raise TemplateError(template.id, f"refused by the sandbox in {where}: {exc}") from None
    except jinja2.UndefinedError as exc:  # SafeUndefined's words: safe to show as they are
        raise TemplateError(template.id, f"{clean(str(exc))} in {where}") from None
    except UnsafeAccess as exc:
        problem = clean(str(exc))
        raise TemplateError(template.id, f"refused by the sandbox in {where}: {problem}") from None
    except SecurityError as exc:
        problem = scrub(str(exc), meter)
        raise TemplateError(template.id, f"refused by the sandbox in {where}: {problem}") from None
    except RecursionError:
        raise TemplateError(
            template.id, f"cannot render {where}: a macro or recursive loop nests too deeply"
        ) from None
    except jinja2.TemplateError as exc:
        raise TemplateError(
            template.id, f"cannot render {where}: {scrub(str(exc), meter)}"
        ) from None
    except Exception as exc:  # a filter or operator on the wrong type: the job's data
        problem = f"{type(exc).__name__}: {scrub(str(exc), meter)}"
        raise TemplateError(template.id, f"cannot render {where}: {problem}") from None


def _generate(compiled: jinja2.Template, meter: Meter) -> str:
    """The part's text, its size counted (UTF-8 bytes) as it is generated."""
    chunks: list[str] = []
    written = 0
    limit, deadline, clock = meter.limit, meter.deadline, time.monotonic
    for chunk in compiled.generate(meter.values):
        written += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "surrogatepass"))
        if written > limit or clock() > deadline:
            meter.count_output(written)  # raises, naming the budget
        chunks.append(chunk)
    return "".join(chunks)


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
