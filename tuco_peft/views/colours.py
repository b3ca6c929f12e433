"""The one colour scale of every token view (HTML, terminal, notebooks): TuCo 0 → pale, 1 → deep red.

The scale is fixed on [0, 1] rather than stretched to the values shown, so the same colour means the
same TuCo on every page and in every terminal.
"""

from __future__ import annotations

import itertools
import math

RGB = tuple[int, int, int]

# (TuCo, colour) stops, linearly interpolated: white-ish, yellow, orange, red (ColorBrewer YlOrRd).
_STOPS: tuple[tuple[float, RGB], ...] = (
    (0.0, (255, 255, 229)),
    (0.25, (254, 227, 145)),
    (0.5, (254, 153, 41)),
    (0.75, (236, 112, 20)),
    (1.0, (153, 52, 4)),
)


def tuco_rgb(value: float) -> RGB:
    """Background colour of a token whose TuCo is ``value`` (clamped to [0, 1]; NaN → grey)."""
    if math.isnan(value):
        return (224, 224, 224)
    value = min(max(value, 0.0), 1.0)
    for (low, low_rgb), (high, high_rgb) in itertools.pairwise(_STOPS):
        if value <= high:
            share = (value - low) / (high - low)
            red, green, blue = (round(a + share * (b - a)) for a, b in zip(low_rgb, high_rgb))
            return (red, green, blue)
    return _STOPS[-1][1]


def text_rgb(background: RGB) -> RGB:
    """Black or white text, whichever reads better on ``background`` (relative luminance)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def css(rgb: RGB) -> str:
    return "rgb({}, {}, {})".format(*rgb)


def gradient_stops() -> list[tuple[float, RGB]]:
    """The scale's stops, for legends."""
    return list(_STOPS)
