"""tuco-peft: how much a LoRA/QLoRA fine-tune contributes to each response (TuCo, Nuti et al., ICML 2025).

The public names are imported on first use (PEP 562): ``import tuco_peft`` does not import torch, so the
``tuco-peft`` command answers ``--help`` and usage errors at once.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names for type checkers and editors; at run time __getattr__ imports them
    from .core.contributions import Decomposition, DecompositionSums, tuco_from_sums
    from .core.decompose import decompose, tuco
    from .core.many_adapters import decompose_adapters
    from .errors import InputError, TuCoError, UnsupportedModelError
    from .integrations.alpha_sweep import PAPER_ALPHAS, ChoiceItem, SweepResult, alpha_sweep, load_items
    from .integrations.callback import TuCoCallback
    from .steering.forward import ftc_scale
    from .steering.generation import SteeredGeneration, generate

# Public name -> the submodule that defines it.
_EXPORTS = {
    "PAPER_ALPHAS": "integrations.alpha_sweep",
    "ChoiceItem": "integrations.alpha_sweep",
    "Decomposition": "core.contributions",
    "DecompositionSums": "core.contributions",
    "InputError": "errors",
    "SteeredGeneration": "steering.generation",
    "SweepResult": "integrations.alpha_sweep",
    "TuCoCallback": "integrations.callback",
    "TuCoError": "errors",
    "UnsupportedModelError": "errors",
    "alpha_sweep": "integrations.alpha_sweep",
    "decompose": "core.decompose",
    "decompose_adapters": "core.many_adapters",
    "ftc_scale": "steering.forward",
    "generate": "steering.generation",
    "load_items": "integrations.alpha_sweep",
    "tuco": "core.decompose",
    "tuco_from_sums": "core.contributions",
}

__all__ = [
    "PAPER_ALPHAS",
    "ChoiceItem",
    "Decomposition",
    "DecompositionSums",
    "InputError",
    "SteeredGeneration",
    "SweepResult",
    "TuCoCallback",
    "TuCoError",
    "UnsupportedModelError",
    "__version__",
    "alpha_sweep",
    "decompose",
    "decompose_adapters",
    "ftc_scale",
    "generate",
    "load_items",
    "tuco",
    "tuco_from_sums",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

