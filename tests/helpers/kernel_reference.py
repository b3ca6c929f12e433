"""A LoRA linear's output written plainly: ``x·Wᵀ + b + Σ s·(x·Aᵀ)·Bᵀ``, with W dense or decoded step by step
from bitsandbytes' packed 4-bit bytes. Nothing here is shared with tuco_peft.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def decode_4bit_reference(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' 4-bit format, decoded step by step: high nibble first, one absmax per block."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    absmax = state.absmax
    if state.nested:
        per_block = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: absmax.numel()]
        absmax = state.state2.code[absmax.long()] * per_block + state.offset
    values = state.code[codes] * absmax.repeat_interleave(state.blocksize)[: codes.numel()]
    return values.to(state.dtype).reshape(state.shape)


def reference_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's W [out, in]: decoded from 4 bits, transposed from a GPT-2 Conv1D, or as it is."""
    base = layer.get_base_layer()
    if isinstance(base, bnb.nn.Linear4bit):
        return decode_4bit_reference(base.weight.data, base.weight.quant_state)
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def reference_outputs(x_pt: torch.Tensor, x_ft: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_pt·Wᵀ + b, x_ft·Wᵀ + b + Σ s·(x_ft·Aᵀ)·Bᵀ) in the dtype of ``x_pt`` (float64 for forward checks)."""
    dtype = x_pt.dtype
    weight, bias = reference_weight(layer).to(dtype), layer.get_base_layer().bias.to(dtype)
    y_ft = x_ft @ weight.t() + bias
    for name in layer.active_adapters:
        a, b = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)
        y_ft = y_ft + layer.scaling[name] * (x_ft @ a.t()) @ b.t()
    return x_pt @ weight.t() + bias, y_ft
