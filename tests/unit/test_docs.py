"""The README and docs/ are read in a user's clone, which holds nothing outside the repository: every
relative link and every path they cite must resolve inside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown [text](target)
CODE_PATH = re.compile(r"`(\.\./[^`\s]+)`")  # a path in backticks that climbs out of the file's folder


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.name} links outside the repository or to missing files: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_points_at_the_teams_shared_folder(doc):
    text = doc.read_text()
    assert "shared/research" not in text and "shared/DESIGN" not in text
    for target in CODE_PATH.findall(text):
        assert (doc.parent / target).resolve().is_relative_to(ROOT), f"{doc.name} cites {target}"
