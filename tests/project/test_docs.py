"""The user docs are part of the product: no unresolved merge, no link to a missing page."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
# What git tracks, not what lies in the folder: a virtual environment or build output there
# holds third-party files that are not ours to check.
TRACKED = subprocess.run(
    ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
).stdout.split("\0")
TEXT_FILES = [
    REPO / name
    for name in TRACKED
    if name.endswith((".md", ".py", ".toml", ".sh")) or name == ".ci/run"
]
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


def test_ci_runs_the_readme_test_command():
    """CI runs the tests the way the README tells a user to (its `# run the tests` line),
    with only options after it (the durations list)."""
    (line,) = [
        line for line in (REPO / "README.md").read_text().splitlines() if "# run the tests" in line
    ]
    command = line.split("#")[0].strip()
    assert command.startswith("python -m pytest"), command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(step.strip().startswith(command) for step in ci), (command, ".ci/run")
