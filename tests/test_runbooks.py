"""Every alert's runbook link lands on a heading that exists (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "monitoring" / "prometheus").glob("*.yml"))
RUNBOOK = re.compile(r'runbook:\s*"([^"#]+)#([^"]+)"')


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to '-'."""
    found = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("rules", RULE_FILES, ids=[path.name for path in RULE_FILES])
def test_every_runbook_anchor_exists(rules: Path) -> None:
    links = RUNBOOK.findall(rules.read_text())
    assert links
    for document, anchor in links:
        assert anchor in anchors(REPO / document), f"{rules.name}: {document}#{anchor}"
