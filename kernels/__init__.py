"""Triton kernels of tuco-peft, installed as ``tuco_peft.kernels``: pure ops, tensors in and tensors out.

Fused LoRA linears that read each base-weight tile (dense, or bitsandbytes NF4/FP4 decoded in the tile)
once for the pre-trained and the fine-tuned outputs. They import torch and triton only: reading PEFT
layers into these tensors is ``tuco_peft.lora.tensors``' job. Using them needs Triton; on CPU, set
TRITON_INTERPRET=1 before triton is imported.

In a source checkout, a Python started in the repository root (``python -m``, ``python -c``) also finds this
folder as a top-level ``kernels``: a name owned by Hugging Face's kernels package, which transformers
imports. Imported under that name, this file loads that package in its own place (or fails as if the
folder were not there), so a checkout never shadows it; names of our own load on first use.
"""

import sys
from importlib import import_module
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from pathlib import Path
from typing import TYPE_CHECKING


def _hand_over_the_name() -> None:
    """Load the installed top-level ``kernels`` package found beyond this checkout, as ``kernels``."""
    checkout = Path(__file__).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout]
    spec = PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    module = module_from_spec(spec)
    sys.modules[__name__] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_the_name()

if TYPE_CHECKING:  # the same names for type checkers and editors; at run time __getattr__ imports them
    from .ops import lora_linear
    from .settings import INTERPRETING, SUPPORTED_DTYPES
    from .weights import BaseWeight, DenseWeight, Packed4bitWeight, dequantize_4bit

_EXPORTS = {
    "lora_linear": ".ops",
    "dequantize_4bit": ".weights",
    "DenseWeight": ".weights",
    "Packed4bitWeight": ".weights",
    "BaseWeight": ".weights",
    "INTERPRETING": ".settings",
    "SUPPORTED_DTYPES": ".settings",
}

__all__ = [
    "INTERPRETING", "SUPPORTED_DTYPES", "BaseWeight", "DenseWeight", "Packed4bitWeight", "dequantize_4bit", "lora_linear"
]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
