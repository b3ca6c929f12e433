"""One self-contained HTML page (or notebook fragment) of TuCo per token: no network, opens from disk.

Each text's tokens are coloured by their TuCo (``colours``); hovering a token shows its value and
per-block ‖PTC_l‖₁ / ‖FTC_l‖₁ as a tooltip (no script needed), clicking it draws them as bars. On top:
a summary table, the colour legend and the per-block profile (mean at each text's last scored token).
Every text shown is escaped; the data for the script sits in a JSON block that cannot close its tag.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..io.locking import WRITER, WRITTEN_BY, write_text_atomically
from .colours import css, gradient_stops, text_rgb, tuco_rgb
from .tokens import ScoredText, ScoredToken

_GENERATOR_TAG = f'<meta name="generator" content="{WRITTEN_BY}">'
PAGE_MARK = f'<meta name="generator" content="{WRITER}'.encode()  # so that a rerun may overwrite its page

_STYLE = """
.tuco-view { font-family: system-ui, sans-serif; color: #222; max-width: 60rem; }
.tuco-view table { border-collapse: collapse; margin: .5rem 0; }
.tuco-view td, .tuco-view th { border-bottom: 1px solid #ddd; padding: .2rem .6rem; text-align: left; }
.tuco-view .tuco-legend { display: flex; align-items: center; gap: .5rem; font-size: .85rem; }
.tuco-view .tuco-ramp { width: 12rem; height: .8rem; border: 1px solid #999; }
.tuco-view .tuco-tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
  border: 1px solid #ddd; padding: .5rem; }
.tuco-view .tuco-tok[data-token] { border-radius: 2px; cursor: pointer;
  box-shadow: inset -1px 0 rgba(255, 255, 255, .7); }
.tuco-view .tuco-tok.tuco-new { outline: 1px solid #555; }
.tuco-view .tuco-tok.tuco-picked { outline: 2px solid #1f5fbf; }
.tuco-view .tuco-detail { font-size: .85rem; margin: .3rem 0 1.2rem; min-height: 1.2rem; }
.tuco-view .tuco-bar { display: inline-block; height: .7rem; vertical-align: middle; }
.tuco-view .tuco-note { color: #666; font-size: .85rem; }
"""

# Click a token: its TuCo and per-block norms as bars under its text (at load: each text's last scored
# token). Data: [text][token] = [tuco, ptc, ftc].
_SCRIPT = """
(function () {
  var root = document.getElementById(%(root)s);
  var data = JSON.parse(document.getElementById(%(data)s).textContent);
  function fmt(v) { return v === null ? "NaN" : Number(v).toPrecision(3); }
  function show(span) {
    var t = +span.dataset.text, k = +span.dataset.token, d = data[t][k];
    var panel = document.getElementById(%(root)s + "-detail-" + t);
    span.closest("section").querySelectorAll(".tuco-picked").forEach(function (picked) {
      picked.classList.remove("tuco-picked");
    });
    span.classList.add("tuco-picked");
    panel.textContent = "token " + k + " " + JSON.stringify(span.textContent) + ": TuCo " + fmt(d[0]);
    if (!d[1]) { return; }
    var top = Math.max.apply(null, d[1].concat(d[2]).concat([1e-30])), table = document.createElement("table");
    table.innerHTML = "<tr><th>block</th><th>‖PTC_l‖₁</th><th>‖FTC_l‖₁</th></tr>";
    d[1].forEach(function (p, l) {
      var row = table.insertRow();
      row.insertCell().textContent = l;
      [[p, "#3b6fb6"], [d[2][l], "#e6550d"]].forEach(function (pair) {
        var cell = row.insertCell(), bar = document.createElement("span");
        bar.className = "tuco-bar"; bar.style.width = (8 * pair[0] / top) + "rem"; bar.style.background = pair[1];
        cell.appendChild(bar); cell.appendChild(document.createTextNode(" " + fmt(pair[0])));
      });
    });
    panel.appendChild(table);
  }
  root.querySelectorAll("section").forEach(function (section) {
    var spans = section.querySelectorAll(".tuco-tok[data-token]");
    spans.forEach(function (span) { span.addEventListener("click", function () { show(span); }); });
    if (spans.length) { show(spans[spans.length - 1]); }
  });
})();
"""


def _number(value: float | None) -> str:
    return "–" if value is None else ("NaN" if math.isnan(value) else f"{value:.3f}")


def _tooltip(token: ScoredToken) -> str:
    lines = [f"TuCo {_number(token.tuco)}"]
    if token.ptc_l1 is not None and token.ftc_l1 is not None:  # a token has both or neither
        lines += [
            f"block {l}: ‖PTC‖₁ {p:.3g}  ‖FTC‖₁ {f:.3g}" for l, (p, f) in enumerate(zip(token.ptc_l1, token.ftc_l1))
        ]
    return "\n".join(lines)


def _token_span(token: ScoredToken, text_index: int, token_index: int) -> str:
    shown = html.escape(token.text.replace("\n", "↵\n"))
    if token.tuco is None:
        return f'<span class="tuco-tok">{shown}</span>'
    background = tuco_rgb(token.tuco)
    classes = "tuco-tok tuco-new" if token.generated else "tuco-tok"
    return (
        f'<span class="{classes}" data-text="{text_index}" data-token="{token_index}" '
        f'style="background: {css(background)}; color: {css(text_rgb(background))}" '
        f'title="{html.escape(_tooltip(token))}">{shown}</span>'
    )


_OPEN_TABLE_ROWS = 12


def _summary(texts: Sequence[ScoredText]) -> str:
    rows = []
    for text in texts:
        label, value = text.headline()
        tokens = len(text.tokens)
        rows.append(
            f"<tr><td>{html.escape(text.title)}</td><td>{tokens}</td><td>{html.escape(label)}</td>"
            f"<td>{_number(value)}</td></tr>"
        )
    values = [v for _, v in (t.headline() for t in texts) if v is not None and not math.isnan(v)]
    if len(texts) == 1:
        overall = "<p>1 text.</p>"  # its one value is in the table below
    elif values:
        overall = (
            f"<p>{len(texts)} texts; over their values below: mean {_number(sum(values) / len(values))}, "
            f"min {_number(min(values))}, max {_number(max(values))}.</p>"
        )
    else:
        overall = ""
    table = f"<table><tr><th>text</th><th>tokens</th><th>measure</th><th>value</th></tr>{''.join(rows)}</table>"
    if len(texts) > _OPEN_TABLE_ROWS:  # a long table would push every text below the fold: folded, one click away
        table = f"<details><summary>the {len(texts)} texts, one row each</summary>{table}</details>"
    return overall + table


def _legend() -> str:
    stops = ", ".join(f"{css(rgb)} {100 * at:g}%" for at, rgb in gradient_stops())
    return (
        '<div class="tuco-legend">TuCo 0 <span class="tuco-ramp" '
        f'style="background: linear-gradient(to right, {stops})"></span> 1 '
        "<span class=\"tuco-note\">(fixed scale; hover a token for its value, click for its blocks)</span></div>"
    )


def _profile_svg(texts: Sequence[ScoredText]) -> str:
    """Mean ‖PTC_l‖₁ and ‖FTC_l‖₁ per block over the texts' last scored tokens, as an inline SVG line chart."""
    profiles = [p for p in (t.profile() for t in texts) if p is not None]
    if not profiles:
        return '<p class="tuco-note">No per-block norms to profile.</p>'
    n_layers = len(profiles[0][0])
    ptc = [sum(p[0][l] for p in profiles) / len(profiles) for l in range(n_layers)]
    ftc = [sum(p[1][l] for p in profiles) / len(profiles) for l in range(n_layers)]
    width, height, pad = 480, 180, 36
    top = max(ptc + ftc + [1e-30])

    def point(layer: int, value: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (layer / max(n_layers - 1, 1))
        return x, height - pad - (height - 2 * pad) * value / top

    parts = [
        (f'<svg class="tuco-profile" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="per-block profile">'),
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">block</text>',
        f'<text x="4" y="{pad - 10}" font-size="11">mean L1 norm at the last token (max {top:.3g})</text>',
    ]
    for name, values, colour in (("‖PTC_l‖₁", ptc, "#3b6fb6"), ("‖FTC_l‖₁", ftc, "#e6550d")):
        points = [point(l, v) for l, v in enumerate(values)]
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>'
        )
        parts += [
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>block {l}: {name} {v:.4g}</title></circle>'
            for l, ((x, y), v) in enumerate(zip(points, values))
        ]
    for layer in range(n_layers):
        x, _ = point(layer, 0)
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 14}" text-anchor="middle" font-size="10">{layer}</text>')
    parts.append(
        f'<text x="{width - pad}" y="{pad - 10}" text-anchor="end" font-size="11">'
        '<tspan fill="#3b6fb6">— ‖PTC_l‖₁</tspan> <tspan fill="#e6550d">— ‖FTC_l‖₁</tspan></text></svg>'
    )
    return "".join(parts)


def _script_json(value: object) -> str:
    """JSON safe inside a <script> element: no "<", ">" or "&" can end the element or start markup."""
    text = json.dumps(value, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else value


def _token_data(texts: Sequence[ScoredText]) -> list[list[list]]:
    return [
        [
            [_finite(t.tuco), None if t.ptc_l1 is None else [_finite(v) for v in t.ptc_l1],
             None if t.ftc_l1 is None else [_finite(v) for v in t.ftc_l1]]
            for t in text.tokens
        ]
        for text in texts
    ]


def render_html(texts: Sequence[ScoredText], title: str = "TuCo per token", *, fragment: bool = False) -> str:
    """The view as an HTML page, or (``fragment=True``) as a ``<div>`` for a notebook cell."""
    root = f"tuco-{uuid.uuid4().hex[:12]}"
    sections = []
    for index, text in enumerate(texts):
        label, value = text.headline()
        spans = "".join(_token_span(token, index, k) for k, token in enumerate(text.tokens))
        note = f'<p class="tuco-note">{html.escape(text.note)}</p>' if text.note else ""
        sections.append(
            f"<section><h3>{html.escape(text.title)} <small>({html.escape(label)} {_number(value)})</small></h3>"
            f'{note}<div class="tuco-tokens">{spans}</div><div class="tuco-detail" id="{root}-detail-{index}"></div>'
            "</section>"
        )
    body = (
        f'<div class="tuco-view" id="{root}"><style>{_STYLE}</style><h2>{html.escape(title)}</h2>'
        f"{_summary(texts)}{_legend()}{_profile_svg(texts)}{''.join(sections)}"
        f'<script type="application/json" id="{root}-data">{_script_json(_token_data(texts))}</script>'
        f"<script>{_SCRIPT % {'root': json.dumps(root), 'data': json.dumps(root + '-data')}}</script></div>"
    )
    if fragment:
        return body
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{_GENERATOR_TAG}'
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>\n"
    )


def check_html_path(path: str | Path) -> Path:
    """Refuse an output path whose folder is missing before any model runs, rather than after."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist.")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a file name such as report.html.")
    return path


def write_html(texts: Sequence[ScoredText], path: str | Path, title: str = "TuCo per token") -> Path:
    """Write the page to ``path`` (UTF-8, replacing any file there in one rename) and return the path."""
    return write_text_atomically(check_html_path(path), render_html(texts, title))


class TokenReport:
    """Scored texts that show themselves in a notebook (``_repr_html_``) and save as a page (``save``)."""

    def __init__(self, texts: Sequence[ScoredText], title: str = "TuCo per token"):
        self.texts = list(texts)
        self.title = title

    def _repr_html_(self) -> str:
        return render_html(self.texts, self.title, fragment=True)

    def save(self, path: str | Path) -> Path:
        return write_html(self.texts, path, self.title)

    def __repr__(self) -> str:
        return f"TokenReport({len(self.texts)} texts, title={self.title!r})"
