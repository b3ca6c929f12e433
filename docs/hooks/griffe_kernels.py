"""Griffe extension: ``tuco_peft.kernels`` for mkdocstrings, also from a source checkout.

The Triton kernels live in ``kernels/`` at the top of the repository and ship as ``tuco_peft.kernels``
(``[tool.setuptools.package-dir]``). An installed wheel holds them inside ``tuco_peft/``, where griffe finds
them; an editable install maps them with an import hook that griffe does not follow. This extension loads the
folder that Python imports as ``tuco_peft.kernels`` (found without importing it) as that submodule.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import griffe


class TucoPeftKernels(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "tuco_peft" or "kernels" in pkg.members:
            return
        spec = importlib.util.find_spec("tuco_peft.kernels")
        if spec is None or not spec.submodule_search_locations:
            return
        folder = Path(next(iter(spec.submodule_search_locations)))
        kernels = loader._load_module("kernels", folder / "__init__.py", submodules=False, parent=pkg)
        pkg.set_member("kernels", kernels)
        for path in sorted(folder.glob("*.py")):
            if path.stem != "__init__":
                kernels.set_member(path.stem, loader._load_module(path.stem, path, submodules=False, parent=kernels))
        loader.expand_exports(kernels)
