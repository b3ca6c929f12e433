"""Launch settings shared by the kernels: interpreter detection, dot dtype, autotune configurations."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter is chosen before any kernel is compiled.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch option of every kernel that decodes 4-bit weights: no fused multiply-add, so that the fp32
# products and sums round as in bitsandbytes (bit-identical decoding). The interpreter ignores it.
NO_FP_FUSION = {"enable_fp_fusion": False}

# Smallest tile side that tl.dot accepts on a GPU (the interpreter accepts less; we never rely on it).
MIN_DOT_SIDE = 16

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = frozenset(_TRITON_DTYPES)


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TRITON_DTYPES[dtype]


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand dtype of tl.dot for activations of ``dtype``.

    The interpreter's bf16 arithmetic and bf16 tl.dot are wrong (triton#11584): there, bf16 tiles are
    loaded as bf16 and multiplied in fp32. On a GPU they stay bf16 (fp32 accumulation either way).
    """
    if dtype == torch.bfloat16 and INTERPRETING:
        return tl.float32
    return triton_dtype(dtype)


def rank_tile(rank: int) -> int:
    """Rank padded to a power of two of at least MIN_DOT_SIDE; the padding is masked to zero."""
    return max(MIN_DOT_SIDE, triton.next_power_of_2(rank))


def rows_bucket(rows: int) -> int:
    """Autotune key for the row count: powers of two, so a new batch shape does not re-tune."""
    return min(triton.next_power_of_2(max(rows, 1)), 4096)


# Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kind of weight tile: skinny tiles
# (BLOCK_M 16, the smallest tl.dot side, or 32) for decode steps of 1..16 rows, square ones for prefill.
# Every shape compiles for sm_80 and sm_90 with no register spills and within the shared memory of one
# block, for every variant of its kind (dtype, stream layout, bias, nested, GPT-2's transposed weight):
# checked by ``python -m tuco_peft.kernels.ahead_of_time --arch 90 80`` (all) and
# tests/fused_kernels/test_kernels_compile.py (a subset). Measured and left out: 128x128 tiles (they spill in two-stream
# launches on sm_80, where Triton lays the chained dots of an iteration out with every warp along
# BLOCK_M), BLOCK_K 128 for dense weights (spills with a transposed weight), fp32 tiles over 64x64 (fp32
# dots run on FMA units, accumulators in registers).
HALF_DENSE_SHAPES = (
    (16, 64, 64, 4, 4),
    (16, 128, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 128, 32, 8, 3),
    (128, 64, 64, 8, 3),
)
FP32_DENSE_SHAPES = (
    (16, 64, 64, 4, 3),
    (32, 64, 32, 4, 3),
    (64, 64, 32, 8, 3),
)
# The decode of a weight tile (bytes → nibbles → code values × absmax) holds its values in registers:
# 4-bit tiles take more warps, or shorter BLOCK_K, than dense ones of the same size (16x64x128 spills in
# two-stream launches with fp32 LoRA factors, PEFT's default on a half-precision base).
PACKED_4BIT_SHAPES = (
    (16, 64, 64, 4, 4),
    (16, 128, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 64, 64, 8, 3),
    (64, 128, 32, 8, 3),
    (128, 64, 64, 8, 3),
)
# 4-bit weights whose quantization blocks straddle rows (in_features not a multiple of the block; no real
# model) are decoded element by element, with per-element gathers the software pipeliner stages in shared
# memory: few stages, short tiles.
ELEMENTWISE_4BIT_SHAPES = (
    (16, 64, 32, 4, 2),
    (16, 64, 64, 4, 1),
    (64, 64, 32, 8, 2),
    (64, 64, 64, 8, 1),
)
# Under the interpreter: one config (nothing to time it with); its sides are not multiples of the tests' shapes.
INTERPRETER_SHAPE = (16, 32, 32, 4, 1)


def _config(shape: tuple[int, int, int, int, int]) -> triton.Config:
    m, n, k, warps, stages = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def config_shapes(
    weight_4bit: bool, dtype: tl.dtype, blockwise: bool = True
) -> tuple[tuple[int, int, int, int, int], ...]:
    """The tile shapes autotuned over for a weight kind and tl.dot operand dtype (on a GPU)."""
    if weight_4bit:
        return PACKED_4BIT_SHAPES if blockwise else ELEMENTWISE_4BIT_SHAPES
    return FP32_DENSE_SHAPES if dtype == tl.float32 else HALF_DENSE_SHAPES


def matmul_configs() -> list[triton.Config]:
    """Every config of the fused kernel's autotuner; one under the interpreter, which has no driver to time them.

    A launch tries only those of its kind (``prune_matmul_configs``).
    """
    if INTERPRETING:
        return [_config(INTERPRETER_SHAPE)]
    shapes = dict.fromkeys(HALF_DENSE_SHAPES + FP32_DENSE_SHAPES + PACKED_4BIT_SHAPES + ELEMENTWISE_4BIT_SHAPES)
    return [_config(shape) for shape in shapes]


def configs_for(weight_4bit: bool, dtype: tl.dtype, blockwise: bool = True) -> list[triton.Config]:
    """The configs a launch with this weight kind and tl.dot operand dtype autotunes over on a GPU."""
    return [_config(shape) for shape in config_shapes(weight_4bit, dtype, blockwise)]


def prune_matmul_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """triton.autotune's early_config_prune: keep the configs of the launch's weight kind and dot dtype."""
    args = {**named_args, **kwargs}
    wanted = set(config_shapes(bool(args["WEIGHT_4BIT"]), args["DOT_DTYPE"], bool(args["BLOCKWISE_4BIT"])))
    kept = [
        c for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in wanted
    ]
    return kept
