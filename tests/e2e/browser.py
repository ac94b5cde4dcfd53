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


# What every page must do at every width: fit it, keep the nav usable, and pass axe-core.

# The elements wider than the viewport, each as `tag.class (left-right)`: what a sideways scroll came from.
_TOO_WIDE = """() => {
  const width = document.documentElement.clientWidth;
  return [...document.body.querySelectorAll("*")]
    .filter((el) => el.getBoundingClientRect().right > width + 0.5 && !el.closest(".table-scroll"))
    .slice(0, 10)
    .map((el) => {
      const r = el.getBoundingClientRect();
      return `${el.tagName.toLowerCase()}.${el.className} (${Math.round(r.left)}-${Math.round(r.right)})`;
    });
}"""

# Each item of the dark bar that is not inside the bar, off the screen, or covered at its centre.
_NAV_PROBLEMS = """() => {
  const bar = document.querySelector("header.top").getBoundingClientRect();
  const width = document.documentElement.clientWidth;
  return [...document.querySelectorAll("header.top a, header.top button, header.top .who")].flatMap((el) => {
    const r = el.getBoundingClientRect();
    const problems = [];
    if (!r.width || !r.height) problems.push("not shown");
    const outside = r.left < bar.left || r.right > bar.right || r.top < bar.top || r.bottom > bar.bottom;
    if (outside) problems.push("outside the bar");
    if (r.right > width) problems.push("off the screen");
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    if (!hit || !(hit === el || el.contains(hit))) problems.push("covered");
    return problems.length ? [`${el.textContent.trim()}: ${problems.join(", ")}`] : [];
  });
}"""


def sideways_scroll(page: Any) -> str | None:
    """Why the page scrolls sideways (its widths and the elements too wide), or None when it fits."""
    scroll, client = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    if scroll <= client:
        return None
    return f"scrollWidth {scroll} > clientWidth {client}; too wide: {page.evaluate(_TOO_WIDE)}"


def nav_problems(page: Any) -> list[str]:
    """What is wrong with the dark bar's items: each must lie inside the bar, on screen, and take a click."""
    problems = page.evaluate(_NAV_PROBLEMS)
    for item in page.locator("header.top a, header.top button").all():
        try:
            item.click(trial=True, timeout=2_000)  # Playwright's own checks: visible, stable, not covered, enabled
        except Exception as exc:
            problems.append(f"{item.inner_text()}: not clickable ({str(exc).splitlines()[0]})")
    return problems


def axe_violations(page: Any, impacts: tuple[str, ...] = ("serious", "critical")) -> list[str]:
    """axe-core's violations of `impacts` on the page as it is now, one line per rule with the elements at fault.

    axe.min.js comes from the axe-playwright-python package (tests extra), so no CDN is needed.
    """
    try:
        from axe_playwright_python.base import AXE_SCRIPT
    except ImportError as exc:
        _no_browser(f"the axe-playwright-python package is not installed ({exc})")
    page.evaluate(AXE_SCRIPT)
    results = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({v['impact']}): {v['help']}: {[node['target'] for node in v['nodes']][:5]}"
            for v in results["violations"] if v["impact"] in impacts]
