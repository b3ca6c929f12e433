"""Tokens coloured by TuCo in a terminal (rich), plain text where colour cannot or should not show.

Colour is used when the stream is a terminal and ``NO_COLOR`` is unset (https://no-color.org); piped
output stays plain text, so files and other programs get the text alone.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Literal, TextIO

from .colours import gradient_stops, text_rgb, tuco_rgb
from .tokens import ScoredText

if TYPE_CHECKING:
    from rich.style import Style
    from rich.text import Text


def wants_colour(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal and the user has not asked for no colour (``NO_COLOR``)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def _style(value: float) -> Style:
    from rich.color import Color
    from rich.style import Style

    background = tuco_rgb(value)
    return Style(color=Color.from_rgb(*text_rgb(background)), bgcolor=Color.from_rgb(*background))


def coloured(text: ScoredText, legend: bool = True) -> Text:
    """``text`` as a ``rich.text.Text``, scored tokens on their TuCo colour, with a one-line legend after."""
    from rich.text import Text

    out = Text()
    for token in text.tokens:
        out.append(token.text, style=_style(token.tuco) if token.tuco is not None else "")
    if legend:
        out.append("\nTuCo ")
        for at, _ in gradient_stops():
            out.append(f" {at:g} ", style=_style(at))
    return out


def print_tokens(
    text: ScoredText, file: TextIO | None = None, *, colour: bool | None = None, legend: bool = True
) -> None:
    """Print ``text`` to ``file`` (stdout): coloured by TuCo per token, or as plain text.

    ``colour=None`` decides by ``wants_colour``; True or False forces it (e.g. for tests or ``--color``).
    """
    file = file if file is not None else sys.stdout
    if not (wants_colour(file) if colour is None else colour):
        print("".join(token.text for token in text.tokens), file=file)
        return
    from rich.console import Console

    # Forced colour may go to a non-terminal (a test, a pager): then no terminal to ask, so 24-bit colour.
    system: Literal["auto", "truecolor"] = "auto" if colour is None else "truecolor"
    Console(file=file, force_terminal=True, color_system=system, highlight=False, soft_wrap=True).print(
        coloured(text, legend)
    )
