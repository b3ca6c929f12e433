"""Launch settings shared by the kernels: interpreter detection, dot dtype, autotune configurations."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter is chosen before any kernel is compiled.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

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


def matmul_configs() -> list[triton.Config]:
    """Tile shapes to autotune over; one under the interpreter, which has no driver to time them."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): skinny tiles for decode, square ones for prefill.
        (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]
