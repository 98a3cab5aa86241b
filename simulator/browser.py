"""Chromium for the status page's tests and screenshots, driven by Playwright.

The browser is the system's (Debian's ``chromium`` package, ``make browser`` installs it;
``CHROMIUM=<path>`` names another): Playwright's own browser download is never used. One
page per call, at a given viewport, with every console error and page error collected, so
a caller can assert there were none.

Runs in the caller's thread (Playwright's sync API).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Page, sync_playwright

DEFAULT_CHROMIUM = "/usr/bin/chromium"


class BrowserMissing(RuntimeError):
    pass


def chromium_path() -> Path:
    path = Path(os.environ.get("CHROMIUM") or DEFAULT_CHROMIUM)
    if not os.access(path, os.X_OK):
        raise BrowserMissing(f"no browser at {path}: run `make browser` (apt-get install "
                             "chromium) or set CHROMIUM=<path to a Chromium binary>")
    return path


@dataclass
class Console:
    """Console errors and uncaught page errors seen while the page was open."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url', '')})")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"page error: {error}")


@contextmanager
def open_page(width: int = 1024, height: int = 900, ignore_https_errors: bool = False
              ) -> Iterator[tuple[Page, Console]]:
    """A fresh headless Chromium page; the browser is closed on exit.

    ``ignore_https_errors``: accept a certificate from a test CA the browser cannot be told
    to trust (the page is still fetched over TLS)."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height},
                                          ignore_https_errors=ignore_https_errors)
            page = context.new_page()
            console = Console()
            page.on("console", console.on_console)
            page.on("pageerror", console.on_page_error)
            yield page, console
        finally:
            browser.close()
