"""The six-run report in a real browser: headless Chromium opens it offline without a console
message, and what it paints is not blank."""

from __future__ import annotations

import shutil
import subprocess

import matplotlib.image as mpimg
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (`make test` installs Debian's chromium when run as root)")


@pytest.mark.browser
def test_report_opens_in_headless_chromium(six_run_report, tmp_path):
    browser = find_browser()
    screenshot = tmp_path / "report.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={screenshot}", "--window-size=1280,2000", six_run_report.as_uri(),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # The report has no script: any console message (an error, a resource that failed) is a fault.
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    pixels = mpimg.imread(screenshot)[..., :3].mean(axis=-1)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 0.05, "the screenshot is blank"
    assert (pixels < 0.5).mean() > 0.005, "no dark text or lines were painted"
