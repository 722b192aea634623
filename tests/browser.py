"""A headless browser for tests that look at a page as a person would: Debian's Chromium driven by playwright.

Playwright's own browser download is not reachable from CI, so it drives the system `chromium`
(`executable_path`), which `.ci/run` installs with apt; as root this module installs it the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

APT_INSTALL = "apt-get update -qq && apt-get install -y -qq chromium"
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS_ENV = "SCREENSHOTS_DIR"  # also write each screenshot there (docs/screenshots for the README)


def system_chromium() -> str:
    """The path of Debian's chromium; installed with apt when missing and running as root."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(args)}` failed: {done.stderr.strip()[-500:]}", pytrace=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail(f"no chromium on PATH: install it with `{APT_INSTALL}` (as root)", pytrace=False)
    return found


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium (playwright `Browser`), closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = system_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, folder: Path, name: str) -> Path:
    """Save what the page shows as `folder/name.png`, and as `$SCREENSHOTS_DIR/name.png` when that is set."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get(SCREENSHOTS_ENV):
        target = Path(os.environ[SCREENSHOTS_ENV])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
    return path
