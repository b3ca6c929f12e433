"""tuco-peft: how much a LoRA/QLoRA fine-tune contributes to each response (TuCo, Nuti et al., ICML 2025).

The public names are imported on first use (PEP 562): ``import tuco_peft`` does not import torch, so the
``tuco-peft`` command answers ``--help`` and usage errors at once.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "PAPER_ALPHAS": "sweep",
    "ChoiceItem": "sweep",
    "Decomposition": "decomposition",
    "DecompositionSums": "decomposition",
    "InputError": "errors",
    "SteeredGeneration": "generation",
    "SweepResult": "sweep",
    "TuCoCallback": "callbacks",
    "TuCoError": "errors",
    "UnsupportedModelError": "errors",
    "alpha_sweep": "sweep",
    "decompose": "decompose",
    "ftc_scale": "steering",
    "generate": "generation",
    "load_items": "sweep",
    "tuco": "decompose",
    "tuco_from_sums": "decomposition",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    """Keeps ``tuco_peft.decompose`` the function once the submodule of that name is imported.

    Importing ``tuco_peft.decompose`` binds the submodule on the package, which would hide the function
    ``from tuco_peft import decompose`` is documented to return; it is bound to the function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and value.__name__ == f"{__name__}.{_EXPORTS.get(name)}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
