"""The package layout's import rules (docs/design.md), checked on the source: every import, module-level or inside a
function, of every module. A new import that crosses a boundary fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nvflare_unlearn"

#: part of the package -> the parts it may import (itself always allowed). Mirrors the table in docs/design.md.
ALLOWED: dict[str, set[str]] = {
    "_io": set(),
    "_validation": set(),
    "options": {"_validation"},
    "models": {"_validation", "options"},
    "data": {"_validation", "options"},
    "method": {"_validation", "options", "models", "data"},
    "runtime": {"_validation", "options", "models", "data", "method"},
    "unlearning": {"_validation", "options", "models", "data", "method", "runtime"},
    "protect": {"_validation", "options", "models", "data", "method", "runtime", "unlearning"},
    "evaluation": {"_validation", "options", "models", "data", "method", "runtime", "unlearning", "protect"},
    "fl": {"_validation", "options", "models", "data", "method", "runtime", "unlearning", "protect"},
    "cli": {
        "_validation",
        "options",
        "models",
        "data",
        "method",
        "runtime",
        "unlearning",
        "protect",
        "evaluation",
        "fl",
    },
    "__init__": {"method", "models"},
}
#: leaves every part may import (atomic writes)
for _part_name in ALLOWED:
    if _part_name != "_io":
        ALLOWED[_part_name].add("_io")
MAY_IMPORT_NVFLARE = {"fl", "cli"}


def _part(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports would hide the target part from this check
                yield node.lineno, "." * node.level + (node.module or "")
            elif node.module == "nvflare_unlearn":  # "from nvflare_unlearn import _io" imports the part _io
                for alias in node.names:
                    part = alias.name if alias.name in ALLOWED else "__init__"
                    yield node.lineno, "nvflare_unlearn" + ("" if part == "__init__" else "." + part)
            elif node.module:
                yield node.lineno, node.module


def test_every_folder_has_a_docstring_saying_what_it_owns():
    for folder in sorted(p for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("__")):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder.name}/ has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 60, f"{folder.name}/__init__.py needs a docstring saying what it owns"
        assert folder.name in ALLOWED, f"{folder.name}/ is missing from the import rules (docs/design.md and here)"


def violations(root: Path = PKG) -> list[str]:
    """Every import under ``root`` (a package laid out like nvflare_unlearn) that breaks the rules."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        part = _part(path, root)
        where = f"{path.relative_to(root.parent)}"
        if part not in ALLOWED:
            bad.append(f"{where}: belongs to no part of the layout")
            continue
        for line, name in _imports(path):
            if name.startswith("."):
                bad.append(f"{where}:{line}: relative import {name!r} (use nvflare_unlearn.<part>...)")
            elif name == "nvflare" or name.startswith("nvflare."):
                if part not in MAY_IMPORT_NVFLARE:
                    bad.append(f"{where}:{line}: {part} imports nvflare ({name})")
            elif name.startswith("nvflare_unlearn"):
                target = name.split(".")[1] if "." in name else "__init__"
                if target != part and target not in ALLOWED[part]:
                    bad.append(f"{where}:{line}: {part} may not import {target} ({name})")
    return bad


def test_import_rules_hold():
    bad = violations()
    assert not bad, "import rules broken (docs/design.md):\n" + "\n".join(bad)


def test_the_rule_check_catches_a_crossing(tmp_path):
    root = tmp_path / "nvflare_unlearn"
    (root / "method").mkdir(parents=True)
    (root / "method" / "ok.py").write_text(
        "from nvflare_unlearn.models import build_model\nfrom nvflare_unlearn import _io\n"
    )
    (root / "method" / "part.py").write_text("from nvflare_unlearn import fl\n")
    (root / "method" / "bad.py").write_text("def f():\n    from nvflare_unlearn.fl import x\n    import nvflare.apis\n")
    (root / "method" / "rel.py").write_text("from ..cli import main\n")
    (root / "stray.py").write_text("")
    found = "\n".join(violations(root))
    assert "bad.py:2: method may not import fl" in found and "bad.py:3: method imports nvflare" in found
    assert "rel.py:1: relative import" in found and "stray.py: belongs to no part" in found
    assert "part.py:1: method may not import fl" in found
    assert "ok.py" not in found


@pytest.mark.parametrize(
    "module",
    [
        "nvflare_unlearn",
        "nvflare_unlearn.method",
        "nvflare_unlearn.evaluation",
        "nvflare_unlearn.protect.robust",
        "nvflare_unlearn.options",
    ],
)
def test_the_core_imports_without_nvflare(module):
    """Stronger than the static check: importing the core in a fresh interpreter loads no nvflare module."""
    import subprocess
    import sys

    code = f"import sys, {module}; bad = [m for m in sys.modules if m.split('.')[0] == 'nvflare']; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} pulled in nvflare: {out.stdout.strip()}"
