"""Whether a decoder block runs paired: the one decision ``decompose`` and ``ftc_scale`` both follow."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from ..lora.backend import LoraLinearBackend
from .paired import PairedBlock, StackedArguments


def paired_block(
    layer: nn.Module,
    config: PretrainedConfig,
    backend: LoraLinearBackend,
    separate_model: bool,
    arguments: StackedArguments,
    *,
    prefill: bool = False,
) -> PairedBlock | None:
    """``layer`` run paired where that saves weight reads, else None (the caller runs both blocks).

    Every backend reads each base weight once for both halves of a paired block (where nothing hooks the base
    layer, whose observers must see each half on its own). Pairing applies only to an
    adapter fine-tune (a ``separate_model`` has pre-trained blocks of its own) whose block
    ``PairedBlock.supports`` (known family, batch-wise attention, no accelerate-offloaded forwards). A
    ``prefill`` (decompose at every position) pairs only on a backend that ``pairs_prefill``: stacking
    doubles the block's activations, which a compute-bound matmul does not repay. ``arguments`` is shared by
    the paired blocks of one call.
    """
    if separate_model or not PairedBlock.supports(layer, config):
        return None
    if prefill and not backend.pairs_prefill:
        return None
    return PairedBlock(layer, config, backend, arguments)
