"""A PEFT LoRA linear read as the fused kernels' tensors: its base weight and its active adapters' factors.

This is the bridge from PEFT, bitsandbytes and transformers layers to ``tuco_peft.kernels``, which know
tensors only. Whatever the kernels cannot compute is refused here with UnsupportedModelError saying why,
so that the backend can run that layer on the torch path instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedModelError
from ..kernels import SUPPORTED_DTYPES, BaseWeight, DenseWeight, Packed4bitWeight
from ..model.analysis_state import cpu_repacked
from ..model.inventory import is_bnb_4bit

if TYPE_CHECKING:
    from ..model.inventory import LoraModule


def base_weight(layer: nn.Module) -> BaseWeight:
    """The weight of a LoRA layer's ``base_layer``, or UnsupportedModelError saying why the kernels can't read it."""
    name = type(layer).__name__
    quant_state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if is_bnb_4bit(layer) and quant_state is not None:
        if cpu_repacked(layer):
            raise UnsupportedModelError(
                f"this {name} weight was repacked by bitsandbytes for its CPU AVX512 kernel "
                "(quant_state.packing_format_for_cpu), a layout the Triton kernels do not read. Set "
                "module.support_avx512bf16_for_cpu = False before the first forward, or use backend='torch'."
            )
        if quant_state.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedModelError(f"{name} dequantizes to {quant_state.dtype}; the kernels need fp16/bf16/fp32.")
        packed = cast(torch.Tensor, layer.weight)  # bitsandbytes' Params4bit, a Tensor
        return Packed4bitWeight.from_quant_state(packed.data, quant_state)
    if isinstance(layer, Conv1D):
        matrix = layer.weight.t()
    elif isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        matrix = layer.weight
    else:
        raise UnsupportedModelError(
            f"the base layer is a {type(layer).__module__}.{name}, whose forward is not a plain x·Wᵀ + b the "
            "Triton kernels can fuse (8-bit, GPTQ and AWQ layers are not supported); use backend='torch'."
        )
    if matrix.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"the {name} weight is {matrix.dtype}; the kernels need fp16/bf16/fp32.")
    return DenseWeight(matrix)


@dataclass(frozen=True)
class LoraFactors:
    """``Σ_adapters s·B·A`` as ``B_cat · diag(scale) · A_cat``: adapters concatenated along the rank.

    ``a`` is ``[rank, in]``, ``b`` is ``[out, rank]``, ``scale`` float32 ``[rank]`` (each adapter's
    scaling repeated over its rank). The rank is 0 when no adapter is active.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor


def _check_plain_lora(layer: LoraModule, adapter: str) -> None:
    """Refuse what the fused kernel does not compute: dropout at train time, LoRA biases, DoRA, variants."""
    dropout = layer.lora_dropout[adapter]
    if dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise UnsupportedModelError(
            f"adapter {adapter!r} applies dropout (p={dropout.p}) in training mode, which the fused kernel does "
            "not sample; call model.eval() or use backend='torch'."
        )
    if layer.lora_B[adapter].bias is not None:
        raise UnsupportedModelError(f"adapter {adapter!r} has a LoRA bias (lora_bias=True); use backend='torch'.")
    if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
        raise UnsupportedModelError(f"adapter {adapter!r} is DoRA or another LoRA variant; use backend='torch'.")


def lora_factors(layer: LoraModule) -> LoraFactors:
    """The factors of a PEFT LoRA linear's active adapters (none when its adapters are disabled)."""
    adapters = [] if layer.disable_adapters else [name for name in layer.active_adapters if name in layer.lora_A]
    for adapter in adapters:
        _check_plain_lora(layer, adapter)
    weight = cast(torch.Tensor, layer.get_base_layer().weight)  # a linear base layer's weight Parameter
    if not adapters:
        n_out, n_in = layer.out_features, layer.in_features
        assert n_out is not None and n_in is not None  # PEFT sets both for every linear base layer
        empty = torch.empty(0, device=weight.device, dtype=torch.float32)
        return LoraFactors(a=empty.reshape(0, n_in), b=empty.reshape(n_out, 0), scale=empty)
    # The factors are nn.Linear layers, which PEFT's ModuleDicts type as any nn.Module.
    a = [cast(nn.Linear, layer.lora_A[name]).weight for name in adapters]
    b = [cast(nn.Linear, layer.lora_B[name]).weight for name in adapters]
    scalings = tuple(float(layer.scaling[name]) for name in adapters)
    scale = _rank_scales(tuple(w.shape[0] for w in a), scalings, a[0].device)
    if len(adapters) == 1:
        return LoraFactors(a=a[0].contiguous(), b=b[0].contiguous(), scale=scale)
    return LoraFactors(a=torch.cat(a).contiguous(), b=torch.cat(b, dim=1).contiguous(), scale=scale)


@lru_cache(maxsize=256)
def _rank_scales(ranks: tuple[int, ...], scalings: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Each adapter's scaling repeated over its rank, made once per layout: not a fill kernel per linear call.

    Read-only for everyone (the kernel reads it, backward casts a copy), so one tensor serves every call."""
    return torch.cat([torch.full((rank,), scaling, device=device) for rank, scaling in zip(ranks, scalings)])
