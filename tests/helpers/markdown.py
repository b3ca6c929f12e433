"""The fenced code blocks of a Markdown text: what the README and documentation tests run or check."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FencedBlock:
    language: str  # what follows the opening fence
    text: str
    section: str  # the heading above it


def fenced_blocks(markdown: str) -> list[FencedBlock]:
    """Every fenced block, indented ones (inside list items) included, with the heading it sits under."""
    blocks, section, fence, lines = [], "", None, []
    for line in markdown.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, lines = stripped[3:].strip(), []
        elif fence is not None and stripped.startswith("```"):
            blocks.append(FencedBlock(fence, "\n".join(lines), section))
            fence = None
        elif fence is not None:
            lines.append(line)
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    if fence is not None:
        raise ValueError("a code fence is never closed")
    return blocks
