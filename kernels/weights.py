"""The base weight as the fused kernels read it: a dense matrix or a bitsandbytes 4-bit one, as tensors.

Both views describe ``W`` of shape ``[out_features, in_features]`` so that the layer computes
``x·Wᵀ + bias``; each knows the kernel arguments that locate it and how to rebuild the dense matrix (for
backward, which re-dequantizes instead of keeping a dense copy alive). They hold tensors and ints only:
no layer, and no bitsandbytes object, reaches the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from .bnb_4bit import dequantize_4bit_kernel
from .settings import NO_FP_FUSION, triton_dtype


@dataclass(frozen=True)
class DenseWeight:
    """A floating-point weight, possibly a transposed view (GPT-2's Conv1D stores ``Wᵀ``)."""

    matrix: torch.Tensor  # [out_features, in_features], any strides

    @property
    def shape(self) -> tuple[int, int]:
        n_out, n_in = self.matrix.shape
        return n_out, n_in

    def kernel_args(self) -> dict[str, Any]:
        matrix = self.matrix
        return dict(
            w_ptr=matrix, stride_wn=matrix.stride(0), stride_wk=matrix.stride(1),
            absmax_ptr=matrix, code_ptr=matrix, nested_code_ptr=matrix, nested_absmax_ptr=matrix,
            nested_offset_ptr=matrix, QUANT_BLOCK=1, NESTED_BLOCK=1, WEIGHT_4BIT=False, NESTED=False,
            BLOCKWISE_4BIT=False, WEIGHT_DTYPE=triton_dtype(matrix.dtype),
        )

    def dense(self) -> torch.Tensor:
        return self.matrix


@dataclass(frozen=True)
class Packed4bitWeight:
    """A bitsandbytes NF4/FP4 weight: two codes a byte (high nibble first), one absmax per block.

    With nested (double) quantization the absmax values are themselves 8-bit codes, decoded as
    ``nested_code[q] · nested_absmax[block] + nested_offset``, exactly as bitsandbytes does.
    """

    packed: torch.Tensor  # uint8, flat, out·in/2 bytes of the row-major [out, in] matrix
    absmax: torch.Tensor  # float32, or uint8 when nested
    code: torch.Tensor  # float32 [16]: the NF4 or FP4 lookup table
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype  # dequantize_4bit's output dtype; decoded values are rounded to it
    nested_code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None  # float32 scalar tensor (no host sync to read it)
    nested_blocksize: int = 1

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state: Any) -> Packed4bitWeight:
        """The packed bytes and a ``bitsandbytes.functional.QuantState`` (read by attribute, so bitsandbytes
        need not be importable here) as the kernels' tensors."""
        nested = bool(quant_state.nested)
        state2 = quant_state.state2  # the absmax values' own quantization state; None unless nested
        n_out, n_in = quant_state.shape
        offset = None
        if nested:
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(1)
        return cls(
            packed=packed.contiguous().view(torch.uint8).reshape(-1),
            absmax=quant_state.absmax.contiguous(),
            code=quant_state.code.to(device=packed.device, dtype=torch.float32).contiguous(),
            blocksize=int(quant_state.blocksize),
            shape=(int(n_out), int(n_in)),
            dtype=quant_state.dtype,
            nested_code=state2.code.to(device=packed.device, dtype=torch.float32).contiguous() if nested else None,
            nested_absmax=state2.absmax.float().contiguous() if nested else None,
            nested_offset=offset,
            nested_blocksize=int(state2.blocksize) if nested else 1,
        )

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    @property
    def blockwise(self) -> bool:
        """Whether every quantization block lies in one row (``in_features % blocksize == 0``, a power of two).

        Then the kernels decode a tile from whole bytes and one absmax per block; otherwise element-wise.
        """
        size = self.blocksize
        return size >= 2 and size & (size - 1) == 0 and self.shape[1] % size == 0

    def kernel_args(self) -> dict[str, Any]:
        nested = self.nested
        return dict(
            w_ptr=self.packed, stride_wn=0, stride_wk=0, absmax_ptr=self.absmax, code_ptr=self.code,
            nested_code_ptr=self.nested_code if nested else self.code,
            nested_absmax_ptr=self.nested_absmax if nested else self.code,
            nested_offset_ptr=self.nested_offset if nested else self.code,
            QUANT_BLOCK=self.blocksize, NESTED_BLOCK=self.nested_blocksize, WEIGHT_4BIT=True, NESTED=nested,
            BLOCKWISE_4BIT=self.blockwise, WEIGHT_DTYPE=triton_dtype(self.dtype),
        )

    def dense(self) -> torch.Tensor:
        return dequantize_4bit(self)


def dequantize_4bit(weight: Packed4bitWeight) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of a packed 4-bit weight, in its quant_state dtype."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.packed.device)
    block = 1024
    args = weight.kernel_args()
    dequantize_4bit_kernel[(triton.cdiv(out.numel(), block),)](
        out, weight.packed, args["absmax_ptr"], args["code_ptr"], args["nested_code_ptr"],
        args["nested_absmax_ptr"], args["nested_offset_ptr"], out.numel(),
        QUANT_BLOCK=weight.blocksize, NESTED=weight.nested, NESTED_BLOCK=weight.nested_blocksize,
        WEIGHT_DTYPE=triton_dtype(weight.dtype), BLOCK=block, **NO_FP_FUSION,
    )
    return out


BaseWeight = DenseWeight | Packed4bitWeight
