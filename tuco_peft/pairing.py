"""Whether a decoder block runs paired: the one decision ``decompose`` and ``ftc_scale`` both follow."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .backend import LoraLinearBackend
from .paired import PairedBlock


def paired_block(
    layer: nn.Module, config: PretrainedConfig, backend: LoraLinearBackend, separate_model: bool
) -> PairedBlock | None:
    """``layer`` run paired where that saves weight reads, else None (the caller runs both blocks).

    Pairing pays only on a backend that reads each weight once for both halves (``backend.pairs_blocks``),
    and applies only to an adapter fine-tune (a ``separate_model`` has pre-trained blocks of its own) whose
    block ``PairedBlock.supports``.
    """
    if not backend.pairs_blocks or separate_model or not PairedBlock.supports(layer, config):
        return None
    return PairedBlock(layer, config, backend)
