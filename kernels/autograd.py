"""Autograd for the fused LoRA linear, so training loops can use it.

Saved for backward: the inputs and the LoRA factors only. The base weight is not saved dequantized: a
4-bit weight is decoded again in backward (one temporary dense matrix, freed right after), as QLoRA does.
Backward is plain matmuls (cuBLAS is already right for them); the base weight and scaling get no gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from .lora_linear_kernel import lora_linear_forward
from .weights import BaseWeight


class FusedLoraLinear(torch.autograd.Function):
    """``(x_pt, x_ft | None, A, B, scale, bias, weight) → (y_pt, y_ft)``; see ``lora_linear_forward``."""

    @staticmethod
    def forward(
        ctx: Any,
        x_pt: torch.Tensor,
        x_ft: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        weight: BaseWeight,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x_pt, x_ft, a, b, scale, bias)
        ctx.weight = weight
        return lora_linear_forward(x_pt, x_ft, a, b, scale, bias, weight)

    @staticmethod
    def backward(ctx: Any, grad_pt: torch.Tensor, grad_ft: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_pt, x_ft, a, b, scale, bias = ctx.saved_tensors
        need_x_pt, need_x_ft, need_a, need_b, _, need_bias, _ = ctx.needs_input_grad
        shared = x_ft is None
        x_lora = x_pt if shared else x_ft
        dtype = x_pt.dtype
        a_c, b_c, scale_c = a.to(dtype), b.to(dtype), scale.to(dtype)
        grad_x_a = (grad_ft @ b_c) * scale_c  # ∂L/∂(X·Aᵀ), [rows_ft, rank]
        grad_x_pt = grad_x_ft = grad_a = grad_b = grad_bias = None
        if need_x_pt or need_x_ft:
            w = ctx.weight.dense().to(dtype)
            if shared:
                grad_x_pt = (grad_pt + grad_ft) @ w + grad_x_a @ a_c
            else:
                grad_x_pt = grad_pt @ w if need_x_pt else None
                grad_x_ft = grad_ft @ w + grad_x_a @ a_c if need_x_ft else None
            del w
        if need_a:
            grad_a = (grad_x_a.t() @ x_lora).to(a.dtype)
        if need_b:
            grad_b = (grad_ft.t() @ ((x_lora @ a_c.t()) * scale_c)).to(b.dtype)
        if need_bias:
            grad_bias = (grad_pt.sum(0) + grad_ft.sum(0)).to(bias.dtype)
        return grad_x_pt, grad_x_ft, grad_a, grad_b, None, grad_bias, None
