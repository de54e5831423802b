"""Headless Chromium for browser tests: Debian's chromium + chromium-driver, driven by Selenium.

No browser can be downloaded here, so tests use the system packages (`make test` installs them when
it can) and skip when they are missing. The flags keep Chromium off the network: without the
background-networking ones it tries to reach Google's hosts at every start.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)


def chromium_available() -> bool:
    """True when the browser, its driver and Selenium are all installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and os.path.exists(DRIVER)


@contextmanager
def headless_chromium(profile_dir: Path) -> Iterator[Any]:
    """A Selenium Chrome driver on a fresh profile in ``profile_dir``; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir(tmp_path_factory: Any) -> Path:
    """Where browser tests save their screenshots: ``$VOIDPROMPT_TEST_ARTIFACTS`` when set (CI keeps
    it), else a pytest temporary folder."""
    folder = os.environ.get("VOIDPROMPT_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(condition: Any, timeout: float = 60.0, what: str = "the browser", poll: float = 0.1) -> Any:
    """Poll ``condition()`` until it gives a true value and return it; an AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
