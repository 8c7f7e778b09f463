"""Message templates: compiled once, rendered per message in a bounded Jinja2 sandbox.

The package by part: `render` (compile, check and render a template's
subject, text and html), `sandbox` (the immutable sandbox with a render
budget), `bounds` (the size a filter or operator may build, known before it
builds it) and `errors` (failures that name the problem, never a variable's
value). Callers import from here.
"""

from __future__ import annotations

from mailqd.templating.render import (
    CompiledTemplate,
    RenderBudget,
    Rendered,
    check_template,
    compile_template,
    render,
)

__all__ = [
    "CompiledTemplate",
    "RenderBudget",
    "Rendered",
    "check_template",
    "compile_template",
    "render",
]
