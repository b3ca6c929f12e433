"""Single LoRA linears for the kernel tests: dense and bitsandbytes 4-bit bases, wrapped by PEFT."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

IN, OUT = 72, 40  # not multiples of the interpreter's 16×32×32 tiles


def dense_linear(dtype: torch.dtype = torch.float32, seed: int = 0, shape: tuple[int, int] = (IN, OUT)) -> nn.Linear:
    """A seeded random nn.Linear [in → out] in ``dtype``."""
    torch.manual_seed(seed)
    return nn.Linear(*shape).to(dtype)


def linear_4bit(
    quant_type: str,
    nested: bool,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, int] = (IN, OUT),
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A bitsandbytes Linear4bit quantized on ``device`` (on a CPU kept in the standard, not repacked,
    layout)."""
    return as_linear_4bit(dense_linear(dtype, shape=shape), quant_type, nested, dtype, device)


def as_linear_4bit(
    dense: nn.Linear, quant_type: str, nested: bool, compute_dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """``dense`` as a bitsandbytes Linear4bit quantized on ``device`` (on a CPU, kept out of bitsandbytes'
    in-place repacking)."""
    layer = bnb.nn.Linear4bit(
        dense.in_features, dense.out_features, bias=dense.bias is not None, compute_dtype=compute_dtype,
        quant_type=quant_type, compress_statistics=nested,
    )
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device)
    layer.support_avx512bf16_for_cpu = False
    return layer


def lora_layer(base: nn.Module, ranks: tuple[int, ...] = (8,), seed: int = 3) -> nn.Module:
    """A PEFT LoRA layer around ``base``: one random adapter per rank, all active, distinct scalings."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=ranks[0], lora_alpha=2 * ranks[0] + 1, target_modules=["0"], init_lora_weights=False,
        fan_in_fan_out=isinstance(base, Conv1D),
    )
    model = get_peft_model(nn.Sequential(base), config)
    names = ["default"]
    for index, rank in enumerate(ranks[1:]):
        names.append(f"extra{index}")
        model.add_adapter(names[-1], LoraConfig(r=rank, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    layer.set_adapter(names)
    for name in names:  # PEFT's fp32 adapters follow a low-precision base in these tests
        layer.lora_A[name].to(base.bias.dtype)
        layer.lora_B[name].to(base.bias.dtype)
    return layer.eval()


def cpu_repacked_linear_4bit() -> nn.Module:
    """An NF4 Linear4bit [128 → 64] as bitsandbytes leaves it after repacking for its CPU AVX512 kernel."""
    base = linear_4bit("nf4", False, shape=(128, 64))  # the repacking needs whole 32-row groups
    base.weight.data, base.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state
    )
    return base


class CustomForwardLinear(nn.Linear):
    """Stands for GPTQ/AWQ/8-bit layers: an nn.Linear subclass whose forward is not x·Wᵀ + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).relu()
