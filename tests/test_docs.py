"""The user docs are part of the product: no unresolved merge, no link to a missing page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
TEXT_FILES = sorted(
    path
    for pattern in ("*.md", "*.py", "*.toml", "*.sh")
    for path in REPO.rglob(pattern)
    if not any(part.startswith(".") or part == "build" for part in path.relative_to(REPO).parts)
)
CONFLICT_MARKER = re.compile(r"^(<{7}|>{7}) ", re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_no_file_holds_an_unresolved_merge():
    unresolved = [
        str(path.relative_to(REPO))
        for path in TEXT_FILES
        if CONFLICT_MARKER.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert TEXT_FILES and not unresolved, f"merge conflict markers in {unresolved}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_name_existing_files(page: Path):
    targets = [m.group(1) for m in LINK.finditer(page.read_text(encoding="utf-8"))]
    missing = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"
