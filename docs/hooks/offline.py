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
from xml.etree import ElementTree

from latex2mathml import commands
from latex2mathml.converter import convert
from latex2mathml.symbols_parser import convert_symbol
from mkdocs.exceptions import PluginError
from mkdocs.structure.pages import Page

_COMMAND = re.compile(r"\\[A-Za-z]+")
_DOT_FENCE = re.compile(r"^```dot\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# arithmatex's generic output: the TeX, HTML-escaped, between \( \) in a span or \[ \] in a div
_ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">\s*\\[(\[](.*?)\\[)\]]\s*</\1>', re.DOTALL)


def _known_commands() -> frozenset[str]:
    """The commands latex2mathml converts: the names in ``latex2mathml.commands``, its constants and the keys and
    members of its tables (symbols it maps one by one are asked of ``convert_symbol``)."""
    names: set[object] = set()
    for value in vars(commands).values():
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, (dict, set, frozenset)):
            names.update(value)
    return frozenset(name for name in names if isinstance(name, str) and name.startswith("\\"))


_KNOWN = _known_commands()


def on_page_markdown(markdown: str, page: Page, **kwargs) -> str:
    return _DOT_FENCE.sub(lambda fence: _svg(fence.group(1), page.file.src_uri), markdown)


def on_page_content(content: str, page: Page, **kwargs) -> str:
    def mathml(match: re.Match) -> str:
        tex = html.unescape(match.group(2)).strip()
        if match.group(1) == "span":
            return _mathml(tex, "inline", page.file.src_uri)
        return f'<div class="arithmatex">{_mathml(tex, "block", page.file.src_uri)}</div>'  # Material's overflow

    return _ARITHMATEX.sub(mathml, content)


def _mathml(tex: str, display: str, where: str) -> str:
    """``tex`` as MathML; a command latex2mathml does not know (which it would drop or show as text) or a
    formula it cannot convert fails the build, naming the page and the formula."""
    unknown = sorted({name for name in _COMMAND.findall(tex) if name not in _KNOWN and convert_symbol(name) is None})
    if unknown:
        raise PluginError(f"{where}: latex2mathml does not know {', '.join(unknown)}, in the formula {tex!r}")
    try:
        mathml = convert(tex, display=display)
        ElementTree.fromstring(mathml)  # text such as \text{a < b} comes out unescaped
    except Exception as error:  # latex2mathml's errors name no formula
        raise PluginError(f"{where}: the formula {tex!r} cannot be drawn as MathML ({error!r})") from error
    return mathml


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
