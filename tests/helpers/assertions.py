"""Tensor comparisons whose tolerance is relative to the largest value expected."""

from __future__ import annotations

import torch


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
