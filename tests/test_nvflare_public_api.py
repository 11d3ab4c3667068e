"""The package uses NVFlare's public API only (issue 21): no name starting with ``_`` from an nvflare module.

Any NVFlare minor release may rename or drop a private name, so none may be imported (``from nvflare.x import _y``,
a module ``nvflare.x._y``), read as an attribute of something imported from nvflare (``poc_commands._start_poc``), or
called on ``self`` in a class deriving from an NVFlare class without being defined by that class itself
(``self._get_session_manager()`` in a ``PocEnv`` subclass). Read from the source (AST), nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nvflare_unlearn"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _own_names(cls: ast.ClassDef) -> set[str]:
    """What a class defines itself: methods, class attributes, and ``self.X`` it assigns."""
    own = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            own.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    own.add(sub.attr)
    return own


def nvflare_private_uses(source: str) -> list[str]:
    """Every use of a private NVFlare name in ``source``, as 'line N: what'."""
    tree = ast.parse(source)
    found: list[str] = []
    from_nvflare: set[str] = set()  # local names bound to nvflare modules, classes and functions
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nvflare":
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                from_nvflare.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nvflare":
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    from_nvflare.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in from_nvflare:
                found.append(f"line {node.lineno}: {root.id}...{node.attr}")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        bases = {_root(b).id for b in cls.bases if isinstance(_root(b), ast.Name)}
        if not bases & from_nvflare:
            continue
        own = _own_names(cls)
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and _private(node.attr)
                and node.attr not in own
            ):
                found.append(f"line {node.lineno}: self.{node.attr} (inherited from NVFlare's {sorted(bases)})")
    return found


#: known uses, being removed: NVFlare's ``Recipe`` keeps its job as ``self._job`` with no public accessor (the
#: recipe can keep its own reference to the ``FedJob`` it builds, and list its targets itself instead of reading
#: ``FedJob._deploy_map``); fl/recipes.py is refactored in issue 21. Shrink this, never grow it.
ALLOWED = {"nvflare_unlearn/fl/recipes.py": "self._job"}


def test_the_package_uses_no_private_nvflare_name():
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        hits = [h for h in nvflare_private_uses(path.read_text()) if ALLOWED.get(rel, "\0") not in h]
        if hits:
            problems[rel] = hits
    assert not problems, f"private NVFlare names (use the public API, or subclass a public class): {problems}"


def test_the_check_finds_each_form_of_private_use():
    source = """
from nvflare.tool.poc.poc_commands import _start_poc, prepare_poc_provision
from nvflare.tool.poc import poc_commands as pc
import nvflare.fuel._internal
from nvflare.recipe.poc_env import PocEnv

pc._stop_poc()
prepare_poc_provision._cache

class Env(PocEnv):
    def __init__(self):
        self._mine = 1

    def deploy(self, job):
        self._mine += 1
        self._helper()
        return self._get_session_manager().submit_job(job)

    def _helper(self):
        return self.__class__
"""
    hits = nvflare_private_uses(source)
    assert len(hits) == 5, hits
    for what in ("_start_poc", "nvflare.fuel._internal", "pc..._stop_poc", "_cache", "self._get_session_manager"):
        assert any(what in h for h in hits), (what, hits)
    assert not nvflare_private_uses(
        "import nvflare\nprint(nvflare.__version__)\nclass A:\n    def f(self):\n        return self._x\n"
    )
