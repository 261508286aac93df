"""The core library's import graph has no cycles (every import counted, also those inside functions)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from helpers import REPO

CORE = REPO / "bindweave_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The core modules ``path`` imports. ``from . import x`` names the submodule ``x`` when there is one;
    a module's own parent packages are left out (Python initialises them before the module anyway)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= subs or ({target} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return found - ancestors - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_are_resolved_to_modules(tmp_path):
    modules = {"bindweave_core", "bindweave_core.dit", "bindweave_core.dit.rope", "bindweave_core.config"}
    source = CORE / "dit" / "transformer.py"  # "from ..config import" and "from . import positions as P"
    found = imports_of(source, modules | {"bindweave_core.dit.positions"})
    assert {"bindweave_core.config", "bindweave_core.dit.rope", "bindweave_core.dit.positions"} <= found
    assert "bindweave_core.dit" not in found  # its own package


def test_bindweave_core_has_no_import_cycle():
    files = sorted(CORE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# checkpoints/ reads files (headers, tensors, key layouts, GGUF / fp8 formats); the models sit above it.
LAYERS_BELOW = {"bindweave_core.checkpoints": ("bindweave_core.dit", "bindweave_core.encoders")}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(path: Path, modules: set[str], above: tuple[str, ...]) -> list[str]:
    """Modules of the ``above`` packages that ``path`` imports, or names in a string (``importlib``)."""
    found = [m for m in imports_of(path, modules) if any(_within(m, p) for p in above)]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [node.value for p in above if _within(node.value, p)]
    return sorted(set(found))


def test_the_layer_check_sees_static_and_string_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)  # module names are taken relative to REPO
    sample = tmp_path / "bindweave_core" / "checkpoints" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text('import importlib\nfrom bindweave_core.dit import transformer\n'
                      'importlib.import_module("bindweave_core.encoders.vae")\n')
    modules = {"bindweave_core.dit", "bindweave_core.dit.transformer"}
    assert upward_imports(sample, modules, ("bindweave_core.dit", "bindweave_core.encoders")) == [
        "bindweave_core.dit.transformer", "bindweave_core.encoders.vae"]
    assert upward_imports(sample, modules, ("bindweave_core.training",)) == []


def test_checkpoints_imports_nothing_from_the_models():
    modules = {module_name(p) for p in CORE.rglob("*.py")}
    problems = []
    for package, above in LAYERS_BELOW.items():
        folder = REPO.joinpath(*package.split("."))
        files = sorted(folder.rglob("*.py"))
        assert len(files) > 5, folder  # the walk sees the package
        problems += [f"{module_name(p)} -> {m}" for p in files for m in upward_imports(p, modules, above)]
    assert not problems, "lower layer imports an upper one: " + "; ".join(problems)
