"""What a wheel ships: every package of the source tree is listed in pyproject.toml.

setuptools installs only the packages named there (the kernels need an explicit mapping), so a new
subpackage missing from the list works in an editable install and is absent from a built wheel.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from helpers import REPO_ROOT


def _packages_on_disk() -> set[str]:
    found = {"tuco_peft.kernels"}
    for init in (REPO_ROOT / "tuco_peft").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO_ROOT).parts))
    return found


def test_every_package_is_in_the_wheel():
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _packages_on_disk()
    assert setuptools["package-dir"] == {"tuco_peft.kernels": "kernels"}


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
