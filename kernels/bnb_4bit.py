"""bitsandbytes NF4/FP4 decoding in Triton, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

``decode_4bit`` decodes any tile of flat element indices; the fused linear kernels call it on their
weight tile, and ``dequantize_4bit`` uses it to rebuild the whole matrix (backward, tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .rounding import round_to
from .settings import triton_dtype

if TYPE_CHECKING:
    from .base_weight import Packed4bitWeight


@triton.jit
def decode_4bit(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    flat, valid,
    QUANT_BLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
):
    """Values at flat indices ``flat`` (int64) of the row-major matrix; zero where ``valid`` is False.

    Same arithmetic as bitsandbytes: code[nibble] · absmax in fp32, rounded once to the weight dtype.
    """
    byte = tl.load(packed_ptr + flat // 2, mask=valid, other=0)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble.to(tl.int32))
    block = flat // QUANT_BLOCK
    if NESTED:
        quantized_absmax = tl.load(absmax_ptr + block, mask=valid, other=0)
        absmax = tl.load(nested_code_ptr + quantized_absmax.to(tl.int32)) * tl.load(
            nested_absmax_ptr + block // NESTED_BLOCK, mask=valid, other=0.0
        ) + tl.load(nested_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=valid, other=0.0)
    return round_to(tl.where(valid, value * absmax, 0.0), WEIGHT_DTYPE)


@triton.jit
def _dequantize_4bit_kernel(
    out_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    numel,
    QUANT_BLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = flat < numel
    values = decode_4bit(
        packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, flat, valid,
        QUANT_BLOCK, NESTED, NESTED_BLOCK, WEIGHT_DTYPE,
    )
    tl.store(out_ptr + flat, values, mask=valid)


def dequantize_4bit(weight: Packed4bitWeight) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of a packed 4-bit weight, in its quant_state dtype."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.packed.device)
    block = 1024
    args = weight.kernel_args()
    _dequantize_4bit_kernel[(triton.cdiv(out.numel(), block),)](
        out, weight.packed, args["absmax_ptr"], args["code_ptr"], args["nested_code_ptr"],
        args["nested_absmax_ptr"], args["nested_offset_ptr"], out.numel(),
        QUANT_BLOCK=weight.blocksize, NESTED=weight.nested, NESTED_BLOCK=weight.nested_blocksize,
        WEIGHT_DTYPE=triton_dtype(weight.dtype), BLOCK=block,
    )
    return out
