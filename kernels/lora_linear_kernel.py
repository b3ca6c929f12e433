"""One fused kernel for both LoRA linear shapes of the analysis (a constexpr picks the shape).

For a tile of output rows × columns it walks the input dimension once; every weight tile is loaded (and,
for 4-bit weights, decoded) once and feeds:

- shared input (``TWO_STREAMS=False``): ``Y_base = X·Wᵀ + b`` and ``Y_ft = Y_base + (X·Aᵀ·diag(s))·Bᵀ``
  from the same accumulator;
- two streams (``TWO_STREAMS=True``): ``Y_pt = X_pt·Wᵀ + b`` and ``Y_ft = X_ft·Wᵀ + b + (X_ft·Aᵀ·diag(s))·Bᵀ``.

The low-rank projection ``X·Aᵀ`` is accumulated next to the base product in the same K loop, and
``Bᵀ`` is applied to it once at the end. Every column tile recomputes ``X·Aᵀ`` for its rows (rank/BLOCK_N
extra work over the base product), the price of one launch without a second pass. Several adapters arrive
concatenated along the rank, with the scaling of each as a per-rank vector ``s``; the rank is padded to a
power of two ≥ 16 and masked.
Accumulation is in fp32; fp32 dots are IEEE (no TF32), so the analysis keeps full precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bnb_4bit import decode_4bit, decode_4bit_tile
from .rounding import round_to
from .settings import (
    NO_FP_FUSION,
    dot_dtype,
    matmul_configs,
    prune_matmul_configs,
    rank_tile,
    rows_bucket,
    triton_dtype,
)
from .weights import BaseWeight


@triton.jit
def _load_weight_tile(
    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    offs_n, k0, N, K,
    QUANT_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHT_4BIT: tl.constexpr, NESTED: tl.constexpr,
    BLOCKWISE_4BIT: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The ``[BLOCK_N, BLOCK_K]`` tile of W at columns ``k0 ..`` (zero outside the matrix), as tl.dot operands.

    4-bit weights are decoded block-wise (one byte tile, one absmax per quantization block) when every
    quantization block lies in one row (``BLOCKWISE_4BIT``, set by the launcher), else element-wise.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if WEIGHT_4BIT:
        if BLOCKWISE_4BIT:
            tile = decode_4bit_tile(
                w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
                offs_n, k0, N, K, QUANT_BLOCK, NESTED, NESTED_BLOCK, WEIGHT_DTYPE, BLOCK_K,
            )
        else:
            valid = (offs_n < N)[:, None] & (offs_k < K)[None, :]
            flat = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
            tile = decode_4bit(
                w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, flat, valid,
                QUANT_BLOCK, NESTED, NESTED_BLOCK, WEIGHT_DTYPE,
            )
    else:
        valid = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        offsets = offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        tile = tl.load(w_ptr + offsets, mask=valid, other=0.0)
    return tile.to(DOT_DTYPE)


@triton.jit
def _load_rows(ptr, offs_m, offs_k, rows, K, DOT_DTYPE: tl.constexpr):
    """A ``[BLOCK_M, BLOCK_K]`` tile of a contiguous ``[rows, K]`` matrix, zero outside it."""
    valid = (offs_m < rows)[:, None] & (offs_k < K)[None, :]
    return tl.load(ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=valid, other=0.0).to(DOT_DTYPE)


@triton.jit
def _store_rows(ptr, values, offs_m, offs_n, rows, N, OUT_DTYPE: tl.constexpr):
    valid = (offs_m < rows)[:, None] & (offs_n < N)[None, :]
    tl.store(ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], round_to(values, OUT_DTYPE), mask=valid)


@triton.autotune(
    configs=matmul_configs(),
    key=["rows_bucket", "N", "K", "RANK_TILE", "WEIGHT_4BIT", "BLOCKWISE_4BIT", "TWO_STREAMS", "DOT_DTYPE"],
    prune_configs_by={"early_config_prune": prune_matmul_configs},
)
@triton.jit
def _lora_linear_kernel(
    y_pt_ptr, y_ft_ptr, x_pt_ptr, x_ft_ptr,
    w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    bias_ptr, a_ptr, b_ptr, scale_ptr,
    rows_pt, rows_ft, N, K, rank,
    rows_bucket,  # autotune key only
    QUANT_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHT_4BIT: tl.constexpr, NESTED: tl.constexpr,
    BLOCKWISE_4BIT: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, TWO_STREAMS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr, RANK_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_TILE)
    acc_pt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO_STREAMS:
        acc_ft = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_a = tl.zeros((BLOCK_M, RANK_TILE), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _load_weight_tile(
            w_ptr, stride_wn, stride_wk, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
            nested_offset_ptr, offs_n, k0, N, K,
            QUANT_BLOCK, NESTED_BLOCK, WEIGHT_4BIT, NESTED, BLOCKWISE_4BIT, WEIGHT_DTYPE, DOT_DTYPE, BLOCK_K,
        )
        x_pt = _load_rows(x_pt_ptr, offs_m, offs_k, rows_pt, K, DOT_DTYPE)
        if TWO_STREAMS:
            x_ft = _load_rows(x_ft_ptr, offs_m, offs_k, rows_ft, K, DOT_DTYPE)
        else:
            x_ft = x_pt
        a = _load_rows(a_ptr, offs_r, offs_k, rank, K, DOT_DTYPE)
        # The dots of one iteration share operands, so Triton lays them out as a chain, after whichever
        # it converts first: the last one. With the base product last, warps split its [BLOCK_M, BLOCK_N]
        # tile along BLOCK_N on skinny tiles; with the narrow X·Aᵀ last, every warp would hold the whole
        # weight tile in registers (measured: 255 registers and spills at 16×128×64).
        x_a = tl.dot(x_ft, tl.trans(a), x_a, input_precision=INPUT_PRECISION)
        acc_pt = tl.dot(x_pt, tl.trans(w), acc_pt, input_precision=INPUT_PRECISION)
        if TWO_STREAMS:
            acc_ft = tl.dot(x_ft, tl.trans(w), acc_ft, input_precision=INPUT_PRECISION)
    if not TWO_STREAMS:
        acc_ft = acc_pt
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc_pt += bias[None, :]
        acc_ft += bias[None, :]
    scale = tl.load(scale_ptr + offs_r, mask=offs_r < rank, other=0.0)
    x_a = round_to(x_a * scale[None, :], DOT_DTYPE)
    b_valid = (offs_n < N)[:, None] & (offs_r < rank)[None, :]
    b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * rank + offs_r[None, :], mask=b_valid, other=0.0)
    acc_ft = tl.dot(x_a, tl.trans(b.to(DOT_DTYPE)), acc_ft, input_precision=INPUT_PRECISION)
    _store_rows(y_pt_ptr, acc_pt, offs_m, offs_n, rows_pt, N, OUT_DTYPE)
    _store_rows(y_ft_ptr, acc_ft, offs_m, offs_n, rows_ft, N, OUT_DTYPE)


def lora_linear_forward(
    x_pt: torch.Tensor, x_ft: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None, weight: BaseWeight,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel on 2-D contiguous inputs (``FusedLoraLinear``'s forward, in its argument order);
    ``x_ft=None`` means one shared input.

    ``a`` ``[rank, in]``, ``b`` ``[out, rank]`` and ``scale`` float32 ``[rank]`` are contiguous. Returns
    ``(y_pt, y_ft)`` in the inputs' dtype; the rows of the two streams may differ in number.
    """
    n_out, n_in = weight.shape
    two_streams = x_ft is not None
    x_ft_or_pt = x_pt if x_ft is None else x_ft
    rows_pt, rows_ft = x_pt.shape[0], x_ft_or_pt.shape[0]
    y_pt = x_pt.new_empty(rows_pt, n_out)
    y_ft = x_pt.new_empty(rows_ft, n_out)
    operand = dot_dtype(x_pt.dtype)
    rank = a.shape[0]

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(max(rows_pt, rows_ft), meta["BLOCK_M"])

    _lora_linear_kernel[grid](
        y_pt, y_ft, x_pt, x_ft_or_pt,
        **weight.kernel_args(),
        bias_ptr=bias if bias is not None else x_pt,
        a_ptr=a, b_ptr=b, scale_ptr=scale,
        rows_pt=rows_pt, rows_ft=rows_ft, N=n_out, K=n_in, rank=rank,
        rows_bucket=rows_bucket(max(rows_pt, rows_ft)),
        TWO_STREAMS=two_streams, HAS_BIAS=bias is not None, DOT_DTYPE=operand,
        INPUT_PRECISION="ieee" if operand == tl.float32 else "tf32", OUT_DTYPE=triton_dtype(x_pt.dtype),
        RANK_TILE=rank_tile(rank), **NO_FP_FUSION,
    )
    return y_pt, y_ft
