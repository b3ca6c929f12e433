"""tuco-peft: how much a LoRA/QLoRA fine-tune contributes to each response (TuCo, Nuti et al., ICML 2025)."""

from .callbacks import TuCoCallback
from .decompose import decompose, tuco
from .decomposition import Decomposition, tuco_from_sums
from .errors import InputError, TuCoError, UnsupportedModelError
from .generation import SteeredGeneration, generate
from .steering import ftc_scale
from .sweep import PAPER_ALPHAS, ChoiceItem, SweepResult, alpha_sweep, load_items

__version__ = "0.1.0"

__all__ = [
    "PAPER_ALPHAS",
    "ChoiceItem",
    "Decomposition",
    "InputError",
    "SteeredGeneration",
    "SweepResult",
    "TuCoCallback",
    "TuCoError",
    "UnsupportedModelError",
    "alpha_sweep",
    "decompose",
    "ftc_scale",
    "generate",
    "load_items",
    "tuco",
    "tuco_from_sums",
    "__version__",
]
