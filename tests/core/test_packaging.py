"""What a wheel ships: every package of the source tree, found by setup.py, with kernels/ as tuco_peft.kernels.

A package missing from the wheel still works in an editable install, so the wheel itself is built and read.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from helpers import REPO_ROOT


def _packages_on_disk() -> set[str]:
    found = {"tuco_peft.kernels"}
    for init in (REPO_ROOT / "tuco_peft").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO_ROOT).parts))
    return found


def test_the_wheel_ships_every_package_and_the_kernels_under_tuco_peft(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*")
    for name in ("pyproject.toml", "setup.py", "README.md", "tuco_peft", "kernels"):
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        copy(REPO_ROOT / name, source / name, **({"ignore": ignore} if copy is shutil.copytree else {}))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=600, check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    shipped = {name.rpartition("/")[0].replace("/", ".") for name in files if name.endswith("/__init__.py")}
    assert shipped == _packages_on_disk()
    assert {name.partition("/")[0] for name in files if name.endswith(".py")} == {"tuco_peft"}
    kernel_files = {path.name for path in (REPO_ROOT / "kernels").glob("*.py")}
    assert {name.rpartition("/")[2] for name in files if name.startswith("tuco_peft/kernels/")} == kernel_files


def test_a_python_started_in_the_checkout_gets_hugging_face_kernels_not_ours():
    """transformers 5.25 imports Hugging Face's top-level ``kernels``: our folder of that name must not shadow it."""
    run = subprocess.run(
        [sys.executable, "-c", "import kernels, transformers.modeling_utils; print(kernels.__file__)"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        assert "ModuleNotFoundError: No module named 'kernels'" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert REPO_ROOT not in Path(run.stdout.strip()).resolve().parents


@pytest.mark.parametrize("facade", ["tuco_peft/__init__.py", "kernels/__init__.py"])
def test_a_facade_shows_type_checkers_the_names_it_imports_on_first_use(facade):
    """``__all__``, the names imported under ``TYPE_CHECKING`` and the lazy ``_EXPORTS`` agree, module for module."""
    tree = ast.parse((REPO_ROOT / facade).read_text(encoding="utf-8"))
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("_EXPORTS", "__all__")
    }
    (checking,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    typed = {alias.name: "." * node.level + node.module for node in checking.body for alias in node.names}
    lazy = {name: module if module.startswith(".") else f".{module}" for name, module in assigned["_EXPORTS"].items()}
    assert typed == lazy
    assert set(assigned["__all__"]) - {"__version__"} == set(lazy)
