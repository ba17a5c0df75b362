"""Pytest plugin: one headless Chromium (Debian's) for the whole session, driven by Playwright.

Fixtures
--------
chromium_endpoint (session) -> str: the DevTools websocket of a Chromium started once per session.
browser           (module)  -> playwright Browser connected to it. Playwright's sync API keeps an asyncio loop
                               marked as running while it is started, which would break the anyio tests; so
                               each module that uses a browser starts Playwright and stops it at its end, and
                               only the Chromium process lives for the session.
screenshot        (function)-> ``screenshot(page, name)`` saves a PNG under test-artifacts/screenshots/ (for a
                               human to look at; never compared pixel by pixel), listed at the end of the run.

``playwright install`` downloads a browser and cannot work here: we use /usr/bin/chromium
(apt package ``chromium``, installed by scripts/test.sh).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.services import REPO_ROOT, require

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries to reach Google's hosts, which this network refuses.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
_saved: list[Path] = []


@pytest.fixture(scope="session")
def chromium_endpoint() -> Iterator[str]:
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} not found (apt package chromium)")
    try:
        import playwright.sync_api  # noqa: F401 - only checking it is there
    except ImportError:
        require(False, "playwright is not installed (pip extra 'test')")
    profile = Path(tempfile.mkdtemp(prefix="dhp-chromium-"))
    with open(profile / "chromium.log", "wb") as log:
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                require(False, f"Chromium did not start: {(profile / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port, path = active.read_text().split()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(chromium_endpoint: str):
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        connected = playwright.chromium.connect_over_cdp(chromium_endpoint)
        yield connected
        connected.close()  # disconnects; the session's Chromium keeps running
    finally:
        playwright.stop()


@pytest.fixture
def screenshot() -> Callable[..., Path]:
    def save(page, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        _saved.append(path)
        return path

    return save


def pytest_terminal_summary(terminalreporter) -> None:
    if _saved:
        terminalreporter.write_line(f"screenshots ({len(_saved)}) saved in {SCREENSHOTS}")
