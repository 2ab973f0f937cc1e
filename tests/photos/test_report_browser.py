"""The discovery report renders in headless Chromium (Debian's package) with one row per person.

Rows are separated by a band of the report's separator colour; the screenshot's left margin is scanned from top to
bottom and the bands counted. shell/test.sh installs chromium where apt can; elsewhere the test is skipped and says so.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from photos.report import ROW_SEPARATOR, PersonRow, Thumb, render_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium; shell/test.sh does)")


def _band_starts(column: np.ndarray) -> np.ndarray:
    """Rows where a run of the separator colour starts in a (H, 3) pixel column."""
    hit = (np.abs(column.astype(int) - ROW_SEPARATOR).sum(1) < 60).astype(int)
    return np.flatnonzero(np.diff(np.concatenate([[0], hit])) == 1)


def test_report_rows_in_a_screenshot(tmp_path):
    """Six people, one with 30 faces whose thumbnails wrap onto several lines: six rows on the page."""
    colours = [(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60), (60, 200, 200), (120, 120, 120)]
    rows = []
    for i, (colour, count) in enumerate(zip(colours, (3, 1, 30, 2, 5, 1))):
        faces = [Thumb(Image.new("RGB", (80, 80), colour), f"photo{j}.jpg", gallery=j == 0) for j in range(count)]
        rows.append(PersonRow(f"person{i}" if i < 3 else f"new_{i - 2:03d}", i < 3, faces))
    page = tmp_path / "report.html"
    page.write_text(render_html(rows, "Discovered people", "test page"))
    shot = tmp_path / "shot.png"
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path}/p",
    ]
    cmd += [f"--screenshot={shot}", "--window-size=900,1400", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    starts = _band_starts(pixels[:, 4])
    assert len(starts) == 6, starts
    heights = np.diff(starts)  # the 30 thumbnails of person2 wrap: its row is taller than one line of thumbnails
    assert heights[2] > 1.8 * heights[1], heights
