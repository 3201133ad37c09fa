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


#: Appended to a copy of a report: writes, for every figure, its rendered width (CSS px) and the
#: smallest text it shows in CSS px at 100 % zoom (smallest pt × rendered px / (inches × 72)).
_MEASURE = """<script>
window.addEventListener('load', () => {
  const out = [...document.querySelectorAll('figure.plot img')].map(img => {
    const px = img.getBoundingClientRect().width;
    const inches = parseFloat(img.dataset.widthIn), pt = parseFloat(img.dataset.smallestPt);
    return [img.dataset.file, px, pt * px / (inches * 72)].join('|');
  });
  const pre = document.createElement('pre'); pre.id = 'measured'; pre.textContent = out.join('\\n');
  document.body.appendChild(pre);
});
</script>"""


def rendered_figure_text(report, tmp_path, width: int = 1280) -> dict[str, tuple[float, float]]:
    """Figure file → (rendered width in CSS px, smallest text in CSS px) in headless Chromium at ``width``."""
    import html as html_lib
    import re

    browser = find_browser()
    page = tmp_path / "measured.html"
    page.write_text(report.read_text().replace("</body>", _MEASURE + "</body>"))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               f"--user-data-dir={tmp_path / 'profile-measure'}", f"--window-size={width},1000", "--virtual-time-budget=10000",
               "--dump-dom", page.as_uri()]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="measured">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, "the measuring script did not run"
    rows = [line.split("|") for line in html_lib.unescape(found.group(1)).splitlines() if line]
    return {name: (float(px), float(text)) for name, px, text in rows}


@pytest.mark.browser
def test_figures_span_the_page_and_their_text_is_at_least_11_px(six_run_report, tmp_path):
    measured = rendered_figure_text(six_run_report, tmp_path)
    assert len(measured) == six_run_report.read_text().count("<img ")
    widths = {round(px) for px, _text in measured.values()}
    assert len(widths) == 1 and widths.pop() >= 1100  # every figure the content's full width
    small = {name: round(text, 1) for name, (_px, text) in measured.items() if text < 11}
    assert not small, f"text under 11 px at 100 % zoom: {small}"
