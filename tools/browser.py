"""A `serve` process and a headless Chromium to drive it: for the page's browser tests, its latency
benchmark and its screenshot (Selenium, a dev dependency, driving Debian's chromium + chromium-driver).

    with serving(["--prior", "prior.ckpt"]) as url, chromium() as driver:
        driver.get(url)

The browser never reaches beyond this machine: background networking, component updates, sync and QUIC
are off (on a closed network their connection attempts only add noise and delays), and every run gets a
fresh profile directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
         "--metrics-recording-only", "--no-default-browser-check"]  # fmt: skip
INSTALL = "apt-get install -y chromium chromium-driver"


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    browser = next((p for p in CHROMIUM if os.access(p, os.X_OK)), shutil.which("chromium"))
    driver = next((p for p in CHROMEDRIVER if os.access(p, os.X_OK)), shutil.which("chromedriver"))
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator:
    """A headless Chromium under Selenium, closed (and its profile deleted) on exit."""
    from selenium import webdriver  # dev dependency: only the tests and benchmarks need it
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise RuntimeError(f"no chromium/chromedriver here; install them: {INSTALL}")
    profile = tempfile.mkdtemp(prefix="vqgen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]  # given both paths, Selenium never looks for (or fetches) a browser
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def serving(args: list[str], timeout: float = 120.0, env: dict | None = None) -> Iterator[str]:
    """`serve ARGS --port 0` in a child process; yields the page's URL once it listens, stops it on exit.
    Its output goes on to this process's stderr (a failing test shows the server's traceback)."""
    cmd = [sys.executable, "-m", "tools.serve", *args, "--port", "0"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            sys.stderr.write(f"[serve] {line}")
            if re.search(r"serve: (http://\S+)", line):
                found.set()
        found.set()  # the process ended

    threading.Thread(target=pump, daemon=True).start()
    try:
        found.wait(timeout)
        match = next((m for m in map(re.compile(r"serve: (http://\S+)").search, lines) if m), None)
        if match is None:
            raise RuntimeError(f"serve did not start within {timeout:.0f} s:\n{''.join(lines)[-3000:]}")
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
