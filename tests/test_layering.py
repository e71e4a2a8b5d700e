"""sftkit's imports only point down: every module has a layer, none imports a higher one, and no two modules
import each other, directly or around a loop, at the top of a file or inside a function.

A new module or package gets its place in ``LAYERS`` (docs/architecture.md says what each layer is for).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "sftkit"

# Lowest first. A module may import its own layer and those below; within a layer, modules import each other freely
# as long as no import loop forms.
LAYERS = (
    ("sftkit.errors",),
    ("sftkit.values", "sftkit.redaction", "sftkit.hardware", "sftkit.embedded", "sftkit.caches"),
    ("sftkit.contract", "sftkit.hookspecs"),
    ("sftkit.records",),
    ("sftkit",),  # the names a plugin imports: ``from sftkit import Adapter, hookimpl``
    ("sftkit.plugins",),
    ("sftkit.adapters",),
    ("sftkit.recipe_keys", "sftkit.recipe"),
    ("sftkit.data",),
    ("sftkit.testing",),
    ("sftkit.train",),
    ("sftkit.outputs",),
    ("sftkit.export",),
    ("sftkit.setup",),
    ("sftkit.jobs",),
    ("sftkit.k8s",),
    ("sftkit.cli",),
    ("sftkit.__main__",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest name in ``LAYERS`` that is the module or a package holding it."""
    matches = [(len(name), index) for index, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".") and name != "sftkit"]
    if not matches:
        raise AssertionError(f"{module} has no layer: give it one in LAYERS")
    return max(matches)[1]


def imported(module: str) -> set[str]:
    """The sftkit modules ``module`` imports anywhere in its file (a function-level import counts)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in names if name in MODULES and name != module}


GRAPH = {module: imported(module) for module in MODULES}


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except AssertionError as error:
            unplaced.append(str(error))
    assert not unplaced, "\n".join(unplaced)


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in GRAPH.items() for target in sorted(targets) if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def import_loop(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of imports, as the modules along it, or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        trail.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (loop := visit(target)):
                return loop
        state[module] = "done"
        trail.pop()
        return None

    for module in sorted(graph):
        if module not in state and (loop := visit(module)):
            return loop
    return None


def test_no_import_loop():
    loop = import_loop(GRAPH)
    assert loop is None, "import loop: " + " -> ".join(loop)


@pytest.mark.parametrize("graph", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}])
def test_the_loop_finder_finds_a_loop(graph):
    loop = import_loop(graph)
    assert loop is not None and loop[0] == loop[-1]
