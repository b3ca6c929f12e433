"""MkDocs hook: math and diagrams drawn when the site is built, so that it reads the same with no network.

- Math: pymdownx.arithmatex marks each ``\\( … \\)`` and ``\\[ … \\]``; here its LaTeX becomes MathML, which
  browsers render natively. MathJax, loaded from a CDN, typeset nothing offline.
- Diagrams: a fenced ``dot`` block becomes the SVG that graphviz's ``dot`` draws from it, inline in the page.
  Mermaid, also loaded from a CDN, left its source text on the page offline.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError
from mkdocs.structure.pages import Page

_DOT_FENCE = re.compile(r"^```dot\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# arithmatex's generic output: the TeX, HTML-escaped, between \( \) in a span or \[ \] in a div
_ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">\s*\\[(\[](.*?)\\[)\]]\s*</\1>', re.DOTALL)


def on_page_markdown(markdown: str, page: Page, **kwargs) -> str:
    return _DOT_FENCE.sub(lambda fence: _svg(fence.group(1), page.file.src_uri), markdown)


def on_page_content(content: str, page: Page, **kwargs) -> str:
    def mathml(match: re.Match) -> str:
        display = "block" if match.group(1) == "div" else "inline"
        return convert(html.unescape(match.group(2)).strip(), display=display)

    return _ARITHMATEX.sub(mathml, content)


def _svg(source: str, where: str) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise PluginError(
            f"{where} draws a diagram with graphviz, and its `dot` is not installed: apt install graphviz"
        )
    drawn = subprocess.run([dot, "-Tsvg"], input=source, capture_output=True, text=True, check=False)
    if drawn.returncode != 0:
        raise PluginError(f"{where}: graphviz could not draw a diagram: {drawn.stderr.strip()}")
    svg = drawn.stdout[drawn.stdout.index("<svg") :]  # without the XML declaration and doctype
    # One raw HTML block for Markdown: no blank line may end it early.
    lines = [line for line in svg.splitlines() if line.strip()]
    return '<figure class="diagram">\n' + "\n".join(lines) + "\n</figure>"
