"""A static folder served on 127.0.0.1 and a page driven in Debian's headless chromium.

Playwright (the `deploy` extra) drives /usr/bin/chromium itself: `playwright install` downloads
browsers, which is never done here. Tests that need the browser skip with `browser_missing()`.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGE_SECONDS = 120  # loading the 15 MB wasm and the model, then classifying, on a busy 2-core box


def browser_missing() -> str | None:
    """None when playwright and chromium are installed, else why the browser tests skip."""
    if not Path(CHROMIUM).exists():
        return "no chromium to run the page (apt-get install chromium; .ci/run does it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'no playwright to drive chromium (pip install -e ".[deploy]"; make test does)'
    return None


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # the test's output stays readable
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """`folder` over HTTP on 127.0.0.1, a random port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class PageRun:
    """What the page showed: its status, the labels it lists and one row per image."""

    status: str
    status_text: str
    labels: list[str]
    rows: list[dict[str, str]]  # each card's data attributes: name, state, top1, top3 (JSON)
    fetched: list[str] = field(default_factory=list)  # every URL the page requested

    def top3(self, name: str) -> list[dict[str, Any]]:
        row = next(r for r in self.rows if r["name"] == name)
        return json.loads(row["top3"])


_SETTLED = "document.body.dataset.status !== 'loading'"
_FINISHED = "n => document.querySelectorAll('#results li.result:not([data-state=pending])').length === n"  # fmt: skip


def classify_in_page(
    url: str, images: Sequence[Path], *, screenshot: Path | None = None
) -> PageRun:
    """Open the page at `url` in headless chromium, pick `images` in it and read back the results."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            fetched: list[str] = []
            page.on("request", lambda request: fetched.append(request.url))
            page.goto(url)
            page.wait_for_function(_SETTLED, timeout=PAGE_SECONDS * 1000)
            status = page.evaluate("document.body.dataset.status")
            if status == "ready" and images:
                page.set_input_files("#files", [str(p) for p in images])
                page.wait_for_function(_FINISHED, arg=len(images), timeout=PAGE_SECONDS * 1000)
            rows = page.eval_on_selector_all(
                "#results li.result", "cards => cards.map(c => ({...c.dataset}))"
            )
            labels = page.eval_on_selector_all("#labels li", "items => items.map(i => i.textContent)")  # fmt: skip
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return PageRun(status, page.inner_text("#status"), labels, rows, fetched)
        finally:
            browser.close()
