"""The fused LoRA linear as an op on plain tensors: what the rest of tuco-peft calls."""

from __future__ import annotations

import torch

from .autograd import FusedLoraLinear
from .weights import BaseWeight


def lora_linear(
    x_pt: torch.Tensor,
    x_ft: torch.Tensor | None,
    weight: BaseWeight,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_pt·Wᵀ + bias, x_ft·Wᵀ + bias + (x_ft·Aᵀ·diag(scale))·Bᵀ)`` in one launch: each weight tile is read
    (and decoded) once for both.

    ``x_ft=None``: one shared input (``x_ft = x_pt``), both outputs from one accumulator. The inputs end in
    ``in_features`` and may have different leading shapes; they are fp16/bf16/fp32 (``SUPPORTED_DTYPES``) on
    CUDA, or on any device under the interpreter (``INTERPRETING``). ``a`` is ``[rank, in]``, ``b``
    ``[out, rank]``, ``scale`` float32 ``[rank]`` (rank 0: no adapter), all contiguous. Differentiable
    w.r.t. the inputs, ``a``, ``b`` and ``bias``; the weight and ``scale`` get no gradient.
    """
    rows_pt = x_pt.reshape(-1, x_pt.shape[-1]).contiguous()
    rows_ft = None if x_ft is None else x_ft.reshape(-1, x_ft.shape[-1]).contiguous()
    y_pt, y_ft = FusedLoraLinear.apply(rows_pt, rows_ft, a, b, scale, bias, weight)
    leading_ft = x_pt.shape[:-1] if x_ft is None else x_ft.shape[:-1]
    return y_pt.reshape(*x_pt.shape[:-1], -1), y_ft.reshape(*leading_ft, -1)
