"""bitsandbytes NF4/FP4 decoding in Triton, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

- ``decode_4bit_tile`` decodes a ``[BLOCK_N, BLOCK_K]`` tile of the weight when every quantization block
  lies inside one row (``K % QUANT_BLOCK == 0``, true of every real model): one contiguous byte tile, the
  nibbles split in registers, one absmax per quantization block broadcast over it. The fused linear
  kernels use it.
- ``decode_4bit`` decodes any tile of flat element indices, gathering the absmax per element: the exact
  path for other shapes, and what ``dequantize_4bit_kernel`` (``weights.dequantize_4bit``) rebuilds the
  whole matrix with (backward, tests).

Bit-identity needs ``code · absmax`` and, with nested quantization, ``nested_code · nested_absmax`` then
``+ offset`` each rounded in fp32 as bitsandbytes does: kernels that decode are launched with
``enable_fp_fusion=False`` (``NO_FP_FUSION``), since a fused multiply-add rounds once and can differ.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _absmax_of_blocks(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, block, valid,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
):
    """fp32 absmax of the quantization blocks ``block`` (int64, any shape); 0 where ``valid`` is False."""
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=valid, other=0)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=valid, other=0.0)
        absmax = tl.load(nested_code_ptr + quantized.to(tl.int32)) * scale + tl.load(nested_offset_ptr)
        absmax = tl.where(valid, absmax, 0.0)
    else:
        absmax = tl.load(absmax_ptr + block, mask=valid, other=0.0)
    return absmax


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
    absmax = _absmax_of_blocks(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, flat // QUANT_BLOCK, valid,
        NESTED, NESTED_BLOCK,
    )
    return round_to(tl.where(valid, value * absmax, 0.0), WEIGHT_DTYPE)


@triton.jit
def _code_pair(code_ptr, low: tl.constexpr, bit0):
    return tl.where(bit0, tl.load(code_ptr + low + 1), tl.load(code_ptr + low))


@triton.jit
def _lookup_code(code_ptr, nibbles):
    """``code[nibbles]`` as a select tree over the 16 table entries, in registers (as bitsandbytes' own
    NF4 kernel does): no per-element gather, which the software pipeliner would stage in shared memory.
    """
    bit0 = (nibbles & 1) != 0
    bit1 = (nibbles & 2) != 0
    bit2 = (nibbles & 4) != 0
    low = tl.where(
        bit2,
        tl.where(bit1, _code_pair(code_ptr, 6, bit0), _code_pair(code_ptr, 4, bit0)),
        tl.where(bit1, _code_pair(code_ptr, 2, bit0), _code_pair(code_ptr, 0, bit0)),
    )
    high = tl.where(
        bit2,
        tl.where(bit1, _code_pair(code_ptr, 14, bit0), _code_pair(code_ptr, 12, bit0)),
        tl.where(bit1, _code_pair(code_ptr, 10, bit0), _code_pair(code_ptr, 8, bit0)),
    )
    return tl.where((nibbles & 8) != 0, high, low)


@triton.jit
def decode_4bit_tile(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
    offs_n, k0, N, K,
    QUANT_BLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows ``offs_n``, columns ``k0 .. k0 + BLOCK_K`` of the ``[N, K]`` matrix; zero outside it.

    Needs ``K % QUANT_BLOCK == 0``, QUANT_BLOCK a power of two and ``k0 % BLOCK_K == 0``: then a tile
    holds whole quantization blocks (BLOCK_K ≥ QUANT_BLOCK) or lies in one (BLOCK_K < QUANT_BLOCK).
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    HALF_K: tl.constexpr = BLOCK_K // 2
    # Quantization blocks in the tile, and columns per block within the tile.
    TILE_BLOCKS: tl.constexpr = BLOCK_K // QUANT_BLOCK if BLOCK_K >= QUANT_BLOCK else 1
    TILE_BLOCK_K: tl.constexpr = BLOCK_K // TILE_BLOCKS
    rows_valid = offs_n < N
    rows = offs_n.to(tl.int64)
    # Two codes a byte, high nibble first: byte j of a row holds columns 2j and 2j + 1.
    offs_byte = k0 // 2 + tl.arange(0, HALF_K)
    byte_valid = rows_valid[:, None] & (offs_byte < K // 2)[None, :]
    packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + offs_byte[None, :], mask=byte_valid, other=0)
    nibbles = tl.interleave(packed >> 4, packed & 0xF)
    values = _lookup_code(code_ptr, nibbles)
    blocks_per_row = K // QUANT_BLOCK
    offs_block = k0 // QUANT_BLOCK + tl.arange(0, TILE_BLOCKS)
    block_valid = rows_valid[:, None] & (offs_block < blocks_per_row)[None, :]
    absmax = _absmax_of_blocks(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr,
        rows[:, None] * blocks_per_row + offs_block[None, :], block_valid, NESTED, NESTED_BLOCK,
    )
    if TILE_BLOCKS == 1:
        values = values * absmax
    else:
        values = tl.reshape(values, (BLOCK_N, TILE_BLOCKS, TILE_BLOCK_K)) * absmax[:, :, None]
        values = tl.reshape(values, (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return round_to(tl.where((offs_k < K)[None, :], values, 0.0), WEIGHT_DTYPE)


@triton.jit
def dequantize_4bit_kernel(
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
