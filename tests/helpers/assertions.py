"""Tensor comparisons whose tolerance is relative to the largest value expected, and decompose against the oracle."""

from __future__ import annotations

import torch

import tuco_peft
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass

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


def assert_decomposition_matches_the_oracle(model, pretrained, ids, mask):
    """``decompose`` at every position and ``tuco`` equal the two-model oracle's (float32), whose FTC is not
    negligible; returns the oracle's PTC."""
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        decomposition = tuco_peft.decompose(model, ids, mask, positions="all")
        tuco = tuco_peft.tuco(model, ids, mask)
    real = mask.bool()[:, None, :, None]
    torch.testing.assert_close(decomposition.ptc, ptc * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decomposition.ftc, ftc * real, atol=1e-5, rtol=1e-5)
    assert (ftc * real).abs().max() > 1e-3
    torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)
    return ptc
