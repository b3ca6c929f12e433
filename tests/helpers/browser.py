"""A headless browser for the tests that render a page (token views, the documentation site)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import shutil
import subprocess
import time
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
    subprocess.run(
        [*common, f"--screenshot={screenshot}", f"--window-size={window}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    print(f"screenshot of {page}: {screenshot}")
    return dom


def evaluate(url: str, expression: str, profile: Path, screenshot: Path, timeout: float = 60.0) -> object:
    """The value of the JavaScript ``expression`` in the page at ``url`` once it loaded, polled until it is
    truthy, with a screenshot of the page then. Unlike ``render``'s ``--dump-dom``, this waits for what a page
    does in real time after loading: web workers, fetches (the site's search). The page must load, and the
    value turn truthy, within ``timeout`` seconds (the screenshot has 30 more), else ``TimeoutError`` or the
    last value; an expression that throws raises.

    It speaks Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON commands on the browser's fd 3,
    replies on its fd 4, each message ended by a NUL byte."""
    browser_path, deadline = headless_browser(), time.monotonic() + timeout
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()
    # bash puts the pipe's ends on the browser's fds 3 and 4 (a preexec_fn would do it in Python, which is
    # unsafe in a process with threads, such as a test serving the site)
    on_3_and_4 = 'exec "$0" "${@:3}" 3<&"$1" 4>&"$2"'
    options = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--window-size=1280,1600"]
    browser = subprocess.Popen(
        ["bash", "-c", on_3_and_4, browser_path, str(commands_read), str(replies_write), *options,
         "--remote-debugging-pipe", "about:blank"],
        pass_fds=(commands_read, replies_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(commands_read)
    os.close(replies_write)
    devtools = _DevTools(commands_write, replies_read, deadline + 30)
    try:
        (page,) = [target for target in devtools.call("Target.getTargets")["targetInfos"] if target["type"] == "page"]
        session = devtools.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        devtools.call("Page.enable", session)
        devtools.call("Page.navigate", session, url=url)
        devtools.wait_for("Page.loadEventFired", session, deadline)
        while True:
            reply = devtools.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            if "exceptionDetails" in reply:
                raise RuntimeError(f"{expression!r} threw: {reply['exceptionDetails']}")
            value = reply["result"].get("value")
            if value or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        png = devtools.call("Page.captureScreenshot", session)["data"]
        screenshot.write_bytes(base64.b64decode(png))
        print(f"screenshot of {url}: {screenshot}")
        return value
    finally:
        browser.kill()
        browser.wait()
        os.close(commands_write)
        os.close(replies_read)


class _DevTools:
    """Commands to a browser and their replies over the DevTools pipe; the events in between are kept for
    ``wait_for``. No read waits past ``deadline``."""

    def __init__(self, commands: int, replies: int, deadline: float):
        self._commands, self._replies, self._deadline = commands, replies, deadline
        self._ids = itertools.count(1)
        self._pending = b""
        self._events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params) -> dict:
        command = {"id": next(self._ids), "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        while True:
            message = self._next_message()
            if message.get("id") == command["id"]:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self._events.append(message)

    def wait_for(self, event: str, session: str, deadline: float) -> None:
        """Until the browser sent ``event`` for ``session`` (it may have come already), by ``deadline``."""
        while not any(e["method"] == event and e.get("sessionId") == session for e in self._events):
            message = self._next_message(deadline)
            if "method" in message:
                self._events.append(message)

    def _next_message(self, deadline: float | None = None) -> dict:
        while b"\0" not in self._pending:
            left = min(self._deadline, deadline or self._deadline) - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return json.loads(message)
