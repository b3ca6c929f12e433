"""A headless browser for the tests that render a page (token views, the documentation site)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def needed(what: str) -> None:
    """Skip without what a test needs, but fail in CI, where a skip would hide that it went unchecked."""
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


def headless_browser() -> str:
    """The path of an installed Chromium or Chrome (CI installs one: .ci/run)."""
    found = next((path for path in map(shutil.which, _BROWSERS) if path), None)
    if found is None:
        needed(f"no headless browser found (looked for {', '.join(_BROWSERS)}); apt-get install chromium")
    return found


def render(page: Path, screenshot: Path, profile: Path, window: str) -> str:
    """Open ``page`` headless: its DOM after scripts ran, with a screenshot of ``window`` ("W,H") written."""
    common = [headless_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", f"--window-size={window}", url],
                   capture_output=True, timeout=120, check=True)
    print(f"screenshot of {page}: {screenshot}")
    return dom
