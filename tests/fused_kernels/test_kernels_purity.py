"""tuco_peft.kernels are pure ops: every module of the kernels' folder imports with tuco_peft, peft,
transformers and bitsandbytes unimportable.

The folder is loaded as a standalone package in a fresh interpreter (importing ``tuco_peft.kernels``
would import ``tuco_peft`` first), so any import of those names, direct or through another module, fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT

pytest.importorskip("triton")

KERNELS = REPO_ROOT / "kernels"
FORBIDDEN = ("tuco_peft", "peft", "transformers", "bitsandbytes")

_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.util, pkgutil, sys
    from importlib.abc import MetaPathFinder

    folder, forbidden = sys.argv[1], tuple(sys.argv[2:])

    class Forbid(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in forbidden:
                raise ImportError(f"the kernels import {name}")
            return None

    sys.meta_path.insert(0, Forbid())
    spec = importlib.util.spec_from_file_location(
        "standalone_kernels", f"{folder}/__init__.py", submodule_search_locations=[folder]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    for module in pkgutil.iter_modules([folder]):
        importlib.import_module(f"{spec.name}.{module.name}")
    for name in package.__all__:
        getattr(package, name)
    print("imported", len(list(pkgutil.iter_modules([folder]))), "modules")
    """
)


def test_kernels_import_neither_tuco_peft_nor_peft_transformers_or_bitsandbytes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(KERNELS), *FORBIDDEN],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("imported")
