"""MkDocs hook: links in the tutorial notebooks, as the site's URLs; and a download link for each notebook.

mkdocs-jupyter renders a notebook's markdown itself, so its links to other pages (``../concepts.md``,
``steer.ipynb#anchor``, which also work when the notebook is opened in Jupyter) reach the page as written,
where they would not resolve: they are rewritten here to the linked page's URL, as mkdocs does for markdown
pages. A link to a page that does not exist fails the build.
"""

from __future__ import annotations

import posixpath
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

_LOCAL_PAGE_LINK = re.compile(r'href="(?![a-z][a-z0-9+.-]*:|/|#)([^"#]+\.(?:md|ipynb))(#[^"]*)?"')


def on_page_content(html: str, page: Page, config, files: Files) -> str:
    if not page.file.src_uri.endswith(".ipynb"):
        return html

    def site_url(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match.group(1)))
        linked = files.get_file_from_path(target)
        if linked is None:
            raise PluginError(f"{page.file.src_uri} links to {match.group(1)}, which is not a page of the site")
        return f'href="{linked.url_relative_to(page.file)}{match.group(2) or ""}"'

    name = posixpath.basename(page.file.src_uri)
    download = f'<p><a href="{name}" download>Download this notebook</a> ({name}).</p>\n'
    return download + _LOCAL_PAGE_LINK.sub(site_url, html)
