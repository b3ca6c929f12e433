"""Tensor comparisons whose tolerance is relative to the largest value expected."""

from __future__ import annotations

import torch

# Tolerances of decompose against the oracle run at the model's own precision, relative to the largest
# |component| (TuCo: absolute). float32: reduction order only. Half precision: the one-pass path runs the
# pre-trained block on one row per prompt where the oracle runs every row, and a GPU may pick other kernels
# (and accumulation orders) for the two shapes, so each block output may round differently: a few units
# of the format's rounding step (2^-8 for bfloat16, 2^-11 for float16), compounded over three blocks.
ORACLE_TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (8e-3, 3e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Same shape, and max |actual − expected| ≤ ``relative`` × max |expected| (in float64)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= relative * scale, f"max error {error:.3g} > {relative:g} × {scale:.3g}"


def assert_components_close(actual, expected, rel=1e-4):
    """PTC/FTC components: max |actual − expected| ≤ ``rel`` × max |expected| (at least 1e-6)."""
    scale = expected.abs().max().clamp_min(1e-6)
    assert (actual - expected).abs().max() <= rel * scale
