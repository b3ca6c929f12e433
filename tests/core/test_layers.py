"""The package's layers: every module imports only from its own layer and those below it, and no modules
import each other in a cycle (type-only and function-level imports count too).

``LAYERS`` is the one place the order is written; a new subpackage fails here until it is given a place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO_ROOT

# Lowest first. A module may import from its own layer and from any layer listed before it.
LAYERS = (
    "errors",  # tuco_peft.errors, and the package root for __version__
    "kernels",  # pure Triton ops on tensors (the repository's kernels/ folder)
    "families",  # per-architecture facts, as data
    "model",  # finding the parts of a PEFT-wrapped model, and stepping into its forward
    "lora",  # PEFT's adapter layers as tensors, and the backends that compute them
    "io",  # checkpoints, prompts and results on disk
    "views",  # TuCo per token drawn as colour
    "core",  # the decomposition
    "steering",  # FTC_α-steered forwards and generation
    "integrations",  # Trainer callback, lm-evaluation-harness, α sweeps
    "apps",  # what the command line runs: runner, distributed, benchmark, statistics, plots
    "demo",
    "cli",
    "evaluation",  # the documented alias tuco_peft.evaluation of integrations.evaluation
)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, the kernels under ``tuco_peft.kernels`` as installed."""
    found = {}
    for root, package in ((REPO_ROOT / "tuco_peft", "tuco_peft"), (REPO_ROOT / "kernels", "tuco_peft.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (a name imported from a package
    counts as that submodule where one exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            submodules = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {module})
    return {imported for imported in found if imported.partition(".")[0] == "tuco_peft" and imported != name}


def _layer(name: str) -> int:
    if name == "tuco_peft":
        return 0
    top = name.split(".")[1]
    if top not in LAYERS:
        pytest.fail(f"{name} is in no layer: add {top!r} to LAYERS in {Path(__file__).name}")
    return LAYERS.index(top)


GRAPH = {name: _imports(name, path) for name, path in MODULES.items() if name != "tuco_peft"}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_nothing_from_a_layer_above_its_own(name):
    above = sorted(imported for imported in GRAPH[name] if _layer(imported) > _layer(name))
    assert not above, f"{name} ({LAYERS[_layer(name)]}) imports from a layer above it: {above}"


def test_no_modules_import_each_other_in_a_cycle():
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        path.append(name)
        for imported in sorted(GRAPH.get(name, ())):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if (REPO_ROOT / "tuco_peft" / layer).is_dir()])
def test_every_layer_package_says_what_it_holds(layer):
    docstring = ast.get_docstring(ast.parse((REPO_ROOT / "tuco_peft" / layer / "__init__.py").read_text()))
    assert docstring and len(docstring) > 80, f"tuco_peft/{layer}/__init__.py needs a docstring saying what it holds"
