"""Entry points on PEFT LoRA layers: both outputs of a LoRA linear from one fused kernel launch."""

from __future__ import annotations

import torch
from torch import nn

from tuco_peft.adapters import is_additive_lora
from tuco_peft.errors import InputError, UnsupportedModelError

from .autograd import FusedLoraLinear
from .base_weight import base_weight
from .lora_factors import lora_factors
from .settings import INTERPRETING, SUPPORTED_DTYPES


def _check_layer_kind(layer: nn.Module) -> None:
    if not is_additive_lora(layer):
        raise UnsupportedModelError(
            f"{type(layer).__module__}.{type(layer).__name__} is not a PEFT LoRA linear (lora.Linear or "
            "lora.bnb.Linear4bit); use backend='torch'."
        )


def _check_inputs(inputs: tuple[torch.Tensor, ...]) -> None:
    for x in inputs:
        if x.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedModelError(
                f"inputs of dtype {x.dtype} are not supported; the kernels take fp16/bf16/fp32."
            )
        if x.device.type != "cuda" and not INTERPRETING:
            raise UnsupportedModelError(
                f"inputs on {x.device} need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                "triton, or use backend='torch'."
            )


def _rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise InputError(f"inputs end in {x.shape[-1]} features but the layer takes {layer.in_features}.")
    return x.reshape(-1, x.shape[-1]).contiguous()


def _apply(layer: nn.Module, x_pt: torch.Tensor, x_ft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_layer_kind(layer)
    base_layer = layer.get_base_layer()
    weight, factors = base_weight(base_layer), lora_factors(layer)
    _check_inputs(tuple(x for x in (x_pt, x_ft) if x is not None))
    y_pt, y_ft = FusedLoraLinear.apply(
        _rows(x_pt, layer), None if x_ft is None else _rows(x_ft, layer),
        factors.a, factors.b, factors.scale, base_layer.bias, weight,
    )
    x_ft = x_pt if x_ft is None else x_ft
    return y_pt.reshape(*x_pt.shape[:-1], -1), y_ft.reshape(*x_ft.shape[:-1], -1)


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
