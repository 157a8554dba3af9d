"""Reports as a person sees them: headless Chromium lays the page out and we measure it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
WINDOW = "--window-size=1280,2400"  # a laptop-width window
# Appended to a copy of the page: after load, record what the browser made of every image
# (decoded size, laid-out width, the width its figure had to give) and table, where
# --dump-dom shows it.
PROBE = """<script>window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (i) {
    return [i.naturalWidth, i.naturalHeight, Math.round(i.getBoundingClientRect().width),
            Math.round(i.closest('figure').getBoundingClientRect().width)]; });
  var tables = Array.prototype.map.call(document.querySelectorAll('table'), function (t) {
    return [t.rows.length, Array.prototype.map.call(t.rows[0].cells, function (c) {
      return c.textContent; })]; });
  document.body.setAttribute('data-probe', JSON.stringify({images: images, tables: tables}));
});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed to check the report as a person sees it; install it "
        "with `apt-get install -y chromium` (Debian)"
    )


def run_chromium(tmp_path: Path, *args: str) -> str:
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def browser_view(report: Path, tmp_path: Path) -> dict:
    """Images and tables of the report as laid out by headless Chromium."""
    probe = report.with_name(f".probe-{report.name}")  # beside it: relative links resolve
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    try:
        dom = run_chromium(tmp_path, WINDOW, "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the page's load handler did not run"
    return json.loads(html.unescape(found.group(1)))


def screenshot(report: Path, tmp_path: Path) -> np.ndarray:
    png = tmp_path / "report.png"
    run_chromium(tmp_path, f"--screenshot={png}", WINDOW, report.as_uri())
    return matplotlib.image.imread(png)


def assert_figures_readable(report: Path, tmp_path: Path, n_figures: int) -> dict:
    """Every figure shown at >= 90% of its own width or of the page's, and saved as the PNG
    beside the report that it links to; the page self-contained and not blank."""
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "network resource"
    view = browser_view(report, tmp_path)
    assert len(view["images"]) == n_figures
    for natural, height, shown, room in view["images"]:
        assert natural > 100 and height > 100, "a figure did not decode"
        # 90%: the figure may be scaled down to fit the page, not shrunk below it
        assert shown >= 0.9 * min(natural, room), (natural, shown, room)
    links = re.findall(r'<a href="([^"]+\.png)"><img', page)
    assert len(links) == n_figures
    for name in links:
        assert (report.parent / name).read_bytes()[:4] == b"\x89PNG", name
    pixels = screenshot(report, tmp_path)[..., :3]
    ink = (pixels < 0.9).any(axis=-1).mean()  # share of pixels that are not near-white
    # one small line plot on a 1280x2400 page measured 1.3% ink; a page of headings only ~0.2%
    assert ink > 0.005, f"the rendered page is almost blank ({ink:.1%} ink)"
    return view
