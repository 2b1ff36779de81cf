"""The folders are the pipeline: each stage imports only from the stages before it.

capture / find sites / plan (``frontend``) -> ``rewrite`` -> ``runtime`` -> ``lowering`` ->
the public API -> ``tools``. The shared layers (patterns, manifolds, ops, codegen, logs,
text, native) import no stage. docs/how-it-works.md maps the stages to these folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = {
    "hcpass": REPO / "hcpass",
    "hcpass.patterns": REPO / "patterns",
    "hcpass.codegen": REPO / "codegen",
}

# Rank of each top-level part of the package: a module may import equal or lower ranks.
RANK = {
    "logs": 0,
    "manifolds": 0,
    "text": 0,  # tables and unique names: imports nothing of hcpass
    "native": 0,  # builds the C++ kernels of manifolds and ops: imports only logs
    "ops": 1,  # the op contract is written in terms of manifolds
    "patterns": 2,  # patterns name the ops (the site boundary)
    "codegen": 2,
    "frontend": 3,
    "rewrite": 4,
    "runtime": 5,
    "lowering": 6,
    "api": 7,
    "training": 7,
    "tools": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    for package, root in sorted(SOURCES.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise AssertionError(path)


def part(module: str) -> str | None:
    """The top-level part of hcpass a module belongs to (None: the package root)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def imports(path: Path) -> list[str]:
    """hcpass modules `path` imports, at any depth of its code (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += (
                [node.module]
                if node.module != "hcpass"
                else [f"hcpass.{a.name}" for a in node.names]
            )
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m == "hcpass" or m.startswith("hcpass.")]


MODULES = sorted(p for root in SOURCES.values() for p in root.rglob("*.py"))


def test_every_part_of_the_package_has_a_rank():
    parts = {part(module_name(p)) for p in MODULES} - {None}
    assert parts <= set(RANK), parts - set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_stage_imports_only_from_earlier_stages(path: Path):
    own = part(module_name(path))
    if own is None:
        return  # hcpass/__init__.py assembles the public API from every stage
    later = []
    for target in imports(path):
        theirs = part(target)
        if theirs is None:
            # ``import hcpass``: the public API, for tools only
            if RANK[own] < RANK["tools"]:
                later.append(target)
        elif RANK[theirs] > RANK[own]:
            later.append(target)
    assert not later, f"{module_name(path)} ({own}) reaches forward to {later}"


# -- the tests' own layout -----------------------------------------------------------------------

TESTS = REPO / "tests"
TEST_FILES = sorted(TESTS.rglob("test_*.py"))


def test_test_files_sit_in_a_package_per_stage():
    # tests/<stage>/test_*.py (tests/__init__.py lists the folders); each folder a package,
    # so that modules are named tests.<stage>.test_* and two stages may share a file name
    assert [p.name for p in TEST_FILES if p.parent == TESTS] == []
    folders = {p.parent for p in TEST_FILES}
    assert [f.name for f in sorted(folders) if not (f / "__init__.py").exists()] == []


def test_no_test_file_imports_another():
    # models and helpers that several files use live in tests/models.py, factories.py,
    # graphs.py and op_inputs.py
    found = []
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(piece.startswith("test_") for name in names for piece in name.split(".")):
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert found == []
