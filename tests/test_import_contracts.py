"""The layers import only downward: each contract names what a package must never import.

Read from the source (every `import`, also inside functions), not by importing
it, so a lazy import inside a function breaks a contract as surely as one at
the top. The contracts are those of docs/architecture.md: the store is the
only code that speaks SQL, the transport the only code that speaks SMTP, the
CLI the only code that uses click, and the client an application embeds pulls
in neither the daemon nor the CLI.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# (who, what it must not import). `who` is a package or module prefix;
# "everything but X" is written as the prefix "mailqd" with the owner exempt.
FORBIDDEN: list[tuple[str, str, tuple[str, ...]]] = [
    # (importer prefix, forbidden import prefix, importers exempt from the rule)
    ("mailqd.store", "mailqd.daemon", ()),
    ("mailqd.store", "mailqd.cli", ()),
    ("mailqd.store", "mailqd.transport", ()),
    ("mailqd.client", "mailqd.daemon", ()),
    ("mailqd.client", "mailqd.cli", ()),
    ("mailqd.client", "click", ()),
    ("mailqd", "aiosmtplib", ("mailqd.transport",)),
    ("mailqd", "click", ("mailqd.cli",)),
    ("mailqd", "sqlalchemy", ("mailqd.store",)),
    ("mailqd", "alembic", ("mailqd.store",)),
    ("mailqd", "psycopg", ("mailqd.store",)),
    ("mailqd", "django", ("mailqd.contrib.django",)),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports_of_every_module() -> dict[str, frozenset[str]]:
    """Every mailqd module's absolute imports, relative ones resolved."""
    found: dict[str, frozenset[str]] = {}
    for path in sorted((SRC / "mailqd").rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names.add(base)
        found[module] = frozenset(names)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_sources_are_found() -> None:
    modules = imports_of_every_module()
    assert "mailqd.store.store" in modules and "mailqd.cli.ctl" in modules
    assert "sqlalchemy" in modules["mailqd.store.store"]
    assert "aiosmtplib" in modules["mailqd.transport.smtp"]


@pytest.mark.parametrize(
    ("importer", "forbidden", "exempt"),
    FORBIDDEN,
    ids=[f"{who}-imports-no-{what}" for who, what, _ in FORBIDDEN],
)
def test_import_contract(importer: str, forbidden: str, exempt: tuple[str, ...]) -> None:
    breaches = sorted(
        f"{module} imports {name}"
        for module, names in imports_of_every_module().items()
        if _within(module, importer) and not any(_within(module, e) for e in exempt)
        for name in names
        if _within(name, forbidden)
    )
    assert breaches == []
