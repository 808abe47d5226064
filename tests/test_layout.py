"""The package's layering rules, checked on its source: private names stay in their module, commands stay thin,
files are written in one place."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_gtv"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path: Path):
    tree = ast.parse(path.read_text())
    imported = [f"{node.module}.{alias.name} (line {node.lineno})" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnunetv2_gtv")
                for alias in node.names if _private(alias.name)]
    assert not imported, f"{path.name} imports private names of other modules: {imported}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "cli").glob("*.py")), ids=lambda p: p.name)
def test_commands_parse_arguments_and_call_the_library(path: Path):
    mains = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)
             and node.name == "main"]
    for main in mains:
        lines = main.end_lineno - main.lineno + 1
        assert lines <= 40, f"{path.name}: main has {lines} lines"


def test_files_are_renamed_into_place_only_by_the_io_package():
    """os.replace / tempfile outside nnunetv2_gtv.io would be a second atomic writer (registration swaps nnU-Net's
    shim folders, a folder exchange of its own)."""
    offenders = [str(p.relative_to(PACKAGE)) for p in MODULES
                 if p.parent != PACKAGE / "io" and p != PACKAGE / "registration.py"
                 and ("os.replace(" in p.read_text() or "tempfile.mk" in p.read_text())]
    assert not offenders
