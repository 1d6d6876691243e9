"""No import cycle between the trainer, the run directory, deployment and the policies.

Two checks: every module imports alone in a fresh interpreter (a top-level cycle fails there), and
the static import graph (every ``import fxquant.…``, module level *and* inside functions, read with
``ast``) has no cycle through these modules: a lazy import inside a function hides a cycle from
the first check but is still one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fxquant"
MODULES = ["fxquant.trainer", "fxquant.run_dir", "fxquant.deployment", "fxquant.quantized_graph", "fxquant.rng",
           "fxquant.census", "fxquant.bitops", "fxquant.io", "fxquant.errors", "fxquant.policies",
           "fxquant.policies.base", "fxquant.policies.static", "fxquant.policies.cpt", "fxquant.policies.adapt",
           "fxquant.policies.kl", "fxquant.policies.prt", "fxquant.cli.train", "fxquant.cli.show", "fxquant.cli.prt"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> fxquant modules it imports`` (anywhere in its file), for every module of the package."""
    names = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = t.split(".")
                deps.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                            if p in names and p != name and not name.startswith(p + "."))
        graph[name] = deps
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path ``start -> … -> start`` in ``graph``, or ``None``."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph.get(node, ()):
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


@pytest.mark.parametrize("module", MODULES)
def test_no_import_cycle_through(module) -> None:
    graph = import_graph()
    assert module in graph
    assert cycle_through(graph, module) is None, " -> ".join(cycle_through(graph, module))


def test_the_old_cycle_is_seen_by_the_checker() -> None:
    graph = {"fxquant.trainer": {"fxquant.policies.prt"}, "fxquant.policies.prt": {"fxquant.trainer"}}
    assert cycle_through(graph, "fxquant.trainer") == ["fxquant.trainer", "fxquant.policies.prt", "fxquant.trainer"]


ALONE = ["fxquant.trainer", "fxquant.run_dir", "fxquant.deployment", "fxquant.policies.prt", "fxquant.policies",
         "fxquant.quantized_graph", "fxquant.rng", "fxquant.census"]
"""The modules of the old cycle and the new ones (a fresh interpreter each costs a torch import)."""


def test_each_module_imports_alone() -> None:
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for module in ALONE:  # one fresh interpreter per module: nothing imported before it
        proc = subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{module}: {proc.stderr.strip().splitlines()[-1:]}"


DIST_OF = {"sklearn": "scikit-learn", "onnx_ir": "onnx-ir", "tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}
"""Import names whose distribution is called otherwise."""


def test_pyproject_lists_exactly_what_fxquant_imports() -> None:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-") for d in project["dependencies"]}
    optional = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-")
                for deps in project["optional-dependencies"].values() for d in deps}
    imported: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            imported.update(t for t in tops if t != "fxquant" and t not in sys.stdlib_module_names)
    needed = {DIST_OF.get(t, t).lower().replace("_", "-") for t in imported}
    assert needed - declared - optional == set(), "imported but not declared"
    assert declared - needed == set(), "declared but never imported"
