"""The HTML report in a real browser: headless chromium screenshots the page, and the PNG
(decoded here with zlib) shows the summary: the page with its summary section removed leaves
that area white. Chromium is installed by the set-up where it can be (root with apt), and the
test fails saying how to install it otherwise; it is never skipped."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import test_report as synth
from hypatia.debug.report import build_report
from hypatia.debug.report_html import render_html

WIDTH, HEIGHT = 1280, 2000
BLUE = np.array([0x3B, 0x5B, 0xDB])  # the summary's cards and table headers
INSTALL_HINT = "install Debian's chromium: `sudo apt-get install -y chromium` (the test runs `chromium --headless`)"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The chromium binary; installed with apt-get when missing and this runs as root."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "chromium"]
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:  # the package lists may be missing on a fresh image
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        found = shutil.which("chromium")
        if found is None:
            pytest.fail(f"`apt-get install -y chromium` failed ({proc.returncode}): {proc.stderr[-2000:]}\n{INSTALL_HINT}")
    if found is None:
        pytest.fail(f"chromium is not installed and this user cannot install it; {INSTALL_HINT}")
    return found


def screenshot(chromium: str, page: Path, tmp_path: Path) -> bytes:
    """``page`` rendered by headless chromium at WIDTH x HEIGHT, as PNG bytes."""
    shot = page.with_suffix(".png")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         f"--window-size={WIDTH},{HEIGHT}", page.as_uri()],
        capture_output=True, text=True, timeout=120, env=os.environ | {"HOME": str(tmp_path)})
    assert proc.returncode == 0 and shot.exists(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return shot.read_bytes()


def decode_png(data: bytes, rows: int) -> np.ndarray:
    """The first ``rows`` rows of an 8-bit RGB or RGBA PNG as an array (rows, width, 3)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompressobj().decompress(b"".join(idat), rows * (stride + 1))
    out = np.zeros((rows, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(rows):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(stride) % 256
        elif kind == 2:
            cur = (line + prev) % 256
        else:  # Average and Paeth depend on the byte to the left: one by one
            cur = np.array(_unfilter_sequential(kind, line.tolist(), prev.tolist(), bpp), dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(rows, width, bpp)[:, :, :3]


def _unfilter_sequential(kind: int, line: list[int], prev: list[int], bpp: int) -> list[int]:
    """PNG filter 3 (Average) or 4 (Paeth) undone over one row."""
    cur = line
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 255
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return cur


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.timeout(1200)  # the first run may install chromium
def test_the_summary_renders_in_chromium(chromium, tmp_path):
    root = synth.make_artifacts(tmp_path / "artifacts")
    report = build_report(root, None, plans={synth.KEY1: synth.EXECUTOR_PLAN})
    page = render_html(report)
    full = tmp_path / "report.html"
    full.write_text(page)
    start, end = page.index('<section id="summary">'), page.index("</section>") + len("</section>")
    bare = tmp_path / "bare.html"
    bare.write_text(page[:start] + page[end:])

    shots = {name: screenshot(chromium, path, tmp_path) for name, path in (("full", full), ("bare", bare))}
    for data in shots.values():
        assert png_size(data) == (WIDTH, HEIGHT)
    top = 1200  # the summary's cards and tables render here
    pixels = {name: decode_png(data, top) for name, data in shots.items()}
    nonwhite = {name: int((p.min(axis=2) < 235).sum()) for name, p in pixels.items()}
    blue = {name: int((np.abs(p - BLUE).max(axis=2) <= 12).sum()) for name, p in pixels.items()}
    area = WIDTH * top
    assert nonwhite["full"] > 0.05 * area, nonwhite
    assert blue["full"] > 40_000, blue  # eight cards and nine table headers, in the summary's blue
    # without the summary only headings' underlines are that blue, and most of the area is white
    assert blue["bare"] < blue["full"] / 10, blue
    assert nonwhite["bare"] < nonwhite["full"] / 2, nonwhite
