"""Both outputs of a PEFT LoRA linear from one fused kernel launch: the Triton backend's entry points.

Checks the layer and the inputs, reads the layer into tensors (``lora.tensors``) and calls the pure op
``tuco_peft.kernels.lora_linear``. Importing this module imports Triton: the backend imports it lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError
from ..kernels import INTERPRETING, SUPPORTED_DTYPES, lora_linear
from .adapters import is_additive_lora
from .tensors import base_weight, lora_factors

if TYPE_CHECKING:
    from ..model.inventory import LoraModule

__all__ = ["INTERPRETING", "dual_lora_linear", "two_stream_lora_linear"]


def _check_input(x: torch.Tensor, layer: LoraModule) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"inputs of dtype {x.dtype} are not supported; the kernels take fp16/bf16/fp32.")
    if x.device.type != "cuda" and not INTERPRETING:
        raise UnsupportedModelError(
            f"inputs on {x.device} need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton, or use backend='torch'."
        )
    if x.shape[-1] != layer.in_features:
        raise InputError(f"inputs end in {x.shape[-1]} features but the layer takes {layer.in_features}.")


def _apply(layer: nn.Module, x_pt: torch.Tensor, x_ft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not is_additive_lora(layer):
        raise UnsupportedModelError(
            f"{type(layer).__module__}.{type(layer).__name__} is not a PEFT LoRA linear (lora.Linear or "
            "lora.bnb.Linear4bit); use backend='torch'."
        )
    base_layer = layer.get_base_layer()
    weight, factors = base_weight(base_layer), lora_factors(layer)
    for x in (x_pt, x_ft):
        if x is not None:
            _check_input(x, layer)
    bias = cast("torch.Tensor | None", base_layer.bias)  # of a layer base_weight reads: nn.Linear, Conv1D, 4-bit
    return lora_linear(x_pt, x_ft, weight, bias, factors.a, factors.b, factors.scale)


def dual_lora_linear(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer.base_layer(x), layer(x))`` of a PEFT LoRA linear in one launch, from one accumulator.

    The active adapters are summed, each with its own rank and scaling. Differentiable w.r.t. ``x``, the
    LoRA weights and a trainable base bias.
    """
    return _apply(layer, x, None)


def two_stream_lora_linear(
    x_pt: torch.Tensor, x_ft: torch.Tensor, layer: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer.base_layer(x_pt), layer(x_ft))``: each weight tile is read (and decoded) once for both.

    ``x_pt`` and ``x_ft`` may have different leading shapes (e.g. only some rows on the pre-trained path).
    """
    return _apply(layer, x_pt, x_ft)
