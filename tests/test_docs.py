"""The project's own docs: every pointer `docs/<NAME>.md#<anchor>` in the code and the docs resolves to a file and a
heading that exist, and no comment points to a method document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("kernels", "model", "train", "plan", "bench", "tests", "scripts", "docs")
           for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".md", ".sh")] + [ROOT / "README.md"]
POINTER = re.compile(r"docs/([A-Za-z_]+\.md)(?:#([a-z0-9-]+))?")
# Spelled with a class and an escape so that a plain grep for those pointers does not find this line itself.
OUTSIDE = re.compile(r"spec[ ]\u00a7|spec[ ]sec|shared/spec|shared/STYLE")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def pointers() -> list[tuple[str, str, str]]:
    found = []
    for path in SOURCES:
        for name, anchor in POINTER.findall(path.read_text(errors="replace")):
            found.append((str(path.relative_to(ROOT)), name, anchor))
    return found


def test_slug_matches_github():
    assert slug("The paper's recipe") == "the-papers-recipe"
    assert slug("World-size independence") == "world-size-independence"


def test_the_docs_exist():
    assert (ROOT / "docs" / "METHOD.md").is_file() and (ROOT / "docs" / "ARCHITECTURE.md").is_file()


@pytest.mark.parametrize("where,name,anchor", sorted(set(pointers())))
def test_every_pointer_resolves(where, name, anchor):
    doc = ROOT / "docs" / name
    assert doc.is_file(), f"{where} points to docs/{name}, which does not exist"
    if anchor:
        assert anchor in anchors(doc), f"{where} points to docs/{name}#{anchor}: no such heading"


def test_no_pointer_leaves_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "test_docs.py"
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, f"pointers to documents outside the repository: {bad}"
