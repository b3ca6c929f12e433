"""TuCo per token, shown as colour on the text: an HTML page or notebook view, and a terminal view."""

from .html import TokenReport, check_html_path, render_html, write_html
from .terminal import print_tokens, wants_colour
from .tokens import (
    ScoredText,
    ScoredToken,
    text_from_row,
    texts_from_decomposition,
    texts_from_generation,
    token_texts,
)

__all__ = [
    "ScoredText",
    "ScoredToken",
    "TokenReport",
    "check_html_path",
    "print_tokens",
    "render_html",
    "text_from_row",
    "texts_from_decomposition",
    "texts_from_generation",
    "token_texts",
    "wants_colour",
    "write_html",
]
