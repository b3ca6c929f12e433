"""The documentation site, built as CI builds it: strictly, its tutorials executed on the demo pair.

One build per module (the ``site`` fixture, about a minute and a half on two CPU cores once the demo pair is
cached): it must pass ``mkdocs build --strict``, document every public name, and render in a real headless
browser, tutorial plots and token views included. Screenshots are written under the pytest tmp dir and
their paths printed (``pytest -s``). The docs tooling is the ``docs`` extra: ``pip install -e ".[docs]"``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from helpers.browser import evaluate, needed, render

import tuco_peft

pytestmark = pytest.mark.slow  # the build executes both tutorials

_DOCS_MODULES = ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter", "nbclient", "ipykernel")
_PNG = b"\x89PNG\r\n\x1a\n"


def _docs_tools() -> None:
    missing = [name for name in _DOCS_MODULES if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        needed(f"the docs tooling is not installed ({', '.join(missing)}): pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once, strictly, with the tutorials executed (mkdocs.yml as it is in the repository)."""
    _docs_tools()
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    env.pop("TUCO_PEFT_DOCS_EXECUTE", None)  # the tutorials run, as in CI
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,  # the assertion below shows mkdocs' output
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    assert "Converting notebook (execute=True)" in built.stderr  # the tutorials were executed, not just shown
    return out


def _page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text(encoding="utf-8")


def test_the_site_builds_strictly_with_every_page(site):
    pages = [path.relative_to(site).parent.as_posix() for path in site.rglob("index.html")]
    for expected in (
        ".",
        "concepts",
        "tutorials/analyse-and-compare",
        "tutorials/steer",
        "tutorials/train-with-callback",
        "how-to/analyse-a-checkpoint",
        "reference/api",
        "reference/cli",
        "reference/families",
        "reference/errors",
        "benchmarks",
    ):
        assert expected in pages
    # The notebooks come with their page, for readers to run them.
    assert (site / "tutorials" / "steer" / "steer.ipynb").is_file()


_LINK = re.compile(r'(?:href|src)="([^"]*)"')


def test_every_link_within_the_site_resolves(site):
    """Local links and images of every page, anchors included (mkdocs checks its markdown pages' links; this
    also covers the tutorials, which mkdocs-jupyter renders, and the generated references)."""
    ids: dict[Path, set[str]] = {}

    def ids_of(page: Path) -> set[str]:
        if page not in ids:
            ids[page] = set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
        return ids[page]

    broken = []
    for page in sorted(set(site.rglob("*.html")) - {site / "404.html"}):  # 404.html links from the site's root
        for link in _LINK.findall(page.read_text(encoding="utf-8")):
            if not link or re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):
                continue  # the page itself, another site, data: URIs
            path, _, anchor = link.partition("#")
            target = (page.parent / path.split("?")[0]).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {link}")
            elif anchor and target.suffix == ".html" and anchor not in ids_of(target):
                broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_every_public_name_is_in_the_api_reference(site):
    page = _page(site, "reference/api")
    names = [name for name in tuco_peft.__all__ if name != "__version__"]
    missing = [name for name in names if f'id="tuco_peft.{name}"' not in page]
    assert not missing, f"tuco_peft names without an entry in reference/api: {missing}"


@pytest.mark.parametrize("module", ["views", "evaluation", "kernels"])
def test_every_name_of_the_documented_submodules_is_in_their_reference(site, module):
    page = _page(site, f"reference/{module}")
    # Read __all__ from the source: tuco_peft.evaluation imports lm-eval, tuco_peft.kernels wants Triton.
    spec = importlib.util.find_spec(f"tuco_peft.{module}")
    source = Path(spec.origin).read_text(encoding="utf-8")
    names = re.findall(r'"(\w+)"', source[source.index("__all__") :].split("]")[0])
    assert names
    missing = [name for name in names if f'id="tuco_peft.{module}.{name}"' not in page]
    assert not missing, f"tuco_peft.{module} names without an entry: {missing}"


def test_the_generated_references_are_in_the_site(site):
    from tuco_peft.cli import build_parser
    from tuco_peft.families import registered_model_types

    cli = _page(site, "reference/cli")
    (commands,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, parser in commands.choices.items():
        assert f'id="tuco-peft-{name}"' in cli
        for action in parser._actions:
            for option in action.option_strings:
                assert option in cli, f"tuco-peft {name} {option} is missing from the CLI reference"
    families = _page(site, "reference/families")
    for model_type in registered_model_types():
        assert f'id="{model_type}"' in families
    errors = _page(site, "reference/errors")
    assert "UnsupportedModelError" in errors and "unmerge_adapter" in errors


def test_the_tutorials_hold_their_outputs(site):
    analyse = _page(site, "tutorials/analyse-and-compare")
    steer = _page(site, "tutorials/steer")
    for page in (analyse, steer):
        assert page.count('src="data:image/png;base64,') >= 1  # matplotlib figures, executed at build time
        assert 'class="tuco-tok' in page  # a token view
        assert "Traceback" not in page
    assert "ROC-AUC (chat vs web):" in analyse
    assert "held-out accuracy" in steer


def test_the_site_needs_no_network(site):
    """Math, diagrams and fonts come with the pages (docs/hooks/offline.py): nothing is fetched to show them."""
    for page in site.rglob("*.html"):
        fetched = re.findall(r'<(?:script|link)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]+)"', page.read_text("utf-8"))
        assert not fetched, f"{page.relative_to(site)} fetches {fetched}"
    concepts = _page(site, "concepts")
    assert concepts.count("<math") >= 20 and not re.search(r'class="arithmatex">\s*\\[(\[]', concepts)  # no TeX left
    assert '<figure class="diagram">' in concepts and "<svg" in concepts and "PTC_l at t" in concepts


def _distinct_colours(png: Path) -> int:
    from matplotlib.image import imread

    pixels = imread(png)[..., :3].reshape(-1, 3)
    return len({tuple(pixel) for pixel in (pixels[:: max(1, len(pixels) // 20000)] * 255).round().astype(int)})


@pytest.mark.parametrize(
    "page, rendered",
    [
        (".", "Getting started"),
        ("tutorials/analyse-and-compare", "tuco-picked"),  # the token view's script ran inside the page
        ("reference/api", 'id="tuco_peft.decompose"'),
    ],
)
def test_pages_render_in_a_headless_browser(site, tmp_path, page, rendered):
    screenshot = tmp_path / f"{page.strip('.').replace('/', '-') or 'home'}.png"
    dom = render(site / page / "index.html", screenshot, tmp_path / "profile", "1280,2400")
    assert rendered in dom
    assert screenshot.read_bytes()[:8] == _PNG
    assert _distinct_colours(screenshot) > 50  # text, code and figures, not a blank or an error page


@contextlib.contextmanager
def _served(site: Path):
    """The site over HTTP on a free local port, as `mkdocs serve` gives it: its search loads its index with a
    fetch, which a page opened from disk may not make."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_the_search_box_finds_decompose(site, tmp_path):
    """Typing `decompose` in the search box (the `?q=` of a search link) lists the API reference among the
    hits, in a real browser whose search worker loaded the site's index."""
    hits = "Array.from(document.querySelectorAll('.md-search-result__item > a'), hit => hit.href)"
    with _served(site) as url:
        found = evaluate(f"{url}/?q=decompose", hits, tmp_path / "profile", tmp_path / "search.png")
    assert any("/reference/api/" in hit for hit in found), found
    assert (tmp_path / "search.png").read_bytes()[:8] == _PNG


_FETCHED_ELSEWHERE = (
    "JSON.stringify(performance.getEntriesByType('resource').map(entry => entry.name)"
    ".filter(name => !name.startsWith(location.origin)))"
)


@pytest.mark.parametrize("page", ["", "concepts/", "tutorials/analyse-and-compare/", "reference/api/"])
def test_a_page_fetches_nothing_from_another_origin(site, tmp_path, page):
    """What the browser actually loaded for the page, scripts, styles, fonts and images included."""
    with _served(site) as url:
        fetched = evaluate(f"{url}/{page}", _FETCHED_ELSEWHERE, tmp_path / "profile", tmp_path / "page.png")
    assert fetched == "[]"


def test_the_browser_draws_the_math_as_mathml(site, tmp_path):
    """The display formulas of the concepts page are laid out by the browser's own MathML engine."""
    display = "getComputedStyle(document.querySelector('math[display=block]')).display"
    with _served(site) as url:
        assert evaluate(f"{url}/concepts/", display, tmp_path / "profile", tmp_path / "concepts.png") == "block math"
