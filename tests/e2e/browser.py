"""A browser for the web app's tests: Debian's Chromium driven by Playwright, and screenshots of its pages.

A failing test leaves a screenshot of every open page under test-artifacts/screenshots/ (see the conftest's hook).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.e2e.processes import REPO

CHROMIUM = os.environ.get("HELIX_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def _no_browser(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (under CI=true a missing browser is a failure, not a skip; `make test` installs it)")
    pytest.skip(f"BROWSER TESTS SKIPPED: {reason}")


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser), closed on exit; skips the test without one, fails under CI=true."""
    if not os.access(CHROMIUM, os.X_OK):
        _no_browser(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set HELIX_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _no_browser(f"the playwright package is not installed ({exc})")
    with sync_playwright() as playwright:
        # Playwright's own browser download needs the internet: Debian's Chromium needs nothing.
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def screenshot_pages(browser: Any, prefix: str) -> list[str]:
    """Save every page the browser has open as SCREENSHOTS/<prefix>-<n>.png; a line for each (path and URL)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = []
    pages = [page for context in browser.contexts for page in context.pages]
    for index, page in enumerate(pages):
        path = SCREENSHOTS / f"{prefix}-{index}.png".replace("/", "_")
        try:
            page.screenshot(path=str(path), full_page=True)
            shots.append(f"{path} ({page.url})")
        except Exception as exc:  # a page that crashed still lets the others be shot
            shots.append(f"{path}: no screenshot ({exc})")
    return shots
