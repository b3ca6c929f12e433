"""tuco-peft: how much a LoRA/QLoRA fine-tune contributes to each response (TuCo, Nuti et al., ICML 2025)."""

from .decompose import decompose, tuco
from .decomposition import Decomposition, tuco_from_sums
from .errors import InputError, TuCoError, UnsupportedModelError
from .generation import SteeredGeneration, generate
from .steering import ftc_scale
from .sweep import PAPER_ALPHAS, ChoiceItem, SweepResult, alpha_sweep, load_items

__version__ = "0.1.0"


def __getattr__(name: str):
    # TuCoCallback needs transformers.Trainer, whose import takes seconds; load it on first use only.
    if name == "TuCoCallback":
        from .callbacks import TuCoCallback

        return TuCoCallback
    raise AttributeError(f"module 'tuco_peft' has no attribute {name!r}")

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
