"""What a wheel ships: every package of the source tree is listed in pyproject.toml.

setuptools installs only the packages named there (the kernels need an explicit mapping), so a new
subpackage missing from the list works in an editable install and is absent from a built wheel.
"""

from __future__ import annotations

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
