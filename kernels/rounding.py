"""Rounding of fp32 tiles to their storage dtype, the same on a GPU and under the interpreter."""

import triton
import triton.language as tl

from .settings import INTERPRETING

# The interpreter truncates fp32 → bf16 where torch and the GPU round to nearest even.
SOFTWARE_BF16_ROUNDING = tl.constexpr(INTERPRETING)


@triton.jit
def round_to(values, DTYPE: tl.constexpr):
    """fp32 → DTYPE with round-to-nearest-even, as torch does.

    The interpreter truncates fp32 → bf16; there the rounding is done on the bits first, which leaves a
    value the truncating cast keeps exactly.
    """
    if DTYPE == tl.bfloat16 and SOFTWARE_BF16_ROUNDING:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        values = bits.to(tl.float32, bitcast=True)
    return values.to(DTYPE)
