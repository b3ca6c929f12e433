"""tuco-peft: how much a LoRA/QLoRA fine-tune contributes to each response (TuCo, Nuti et al., ICML 2025)."""

from .decompose import decompose, tuco
from .decomposition import Decomposition, tuco_from_sums
from .errors import InputError, TuCoError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "Decomposition",
    "InputError",
    "TuCoError",
    "UnsupportedModelError",
    "decompose",
    "tuco",
    "tuco_from_sums",
    "__version__",
]
