"""``status --html``: the page a real headless browser renders, with the timeline's marks where they belong.

Chromium (Debian's ``chromium``, installed by ``scripts/bootstrap.sh``) loads the page from a file:
``--dump-dom`` gives the document as the browser parsed it (the SVG's elements, their classes), and
``--screenshot`` the picture, whose pixels are checked for the colours of the recovery window, a
verified, a failed and an unverified backup and the WAL gap. Without chromium the test skips, except
under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.pitr import cli_env, run_cli
from tests.support.require import tool

if TYPE_CHECKING:
    from tests.support.observe import Scene

WINDOW, VERIFIED, FAILED, UNVERIFIED = (0x90, 0xCA, 0xF9), (0x2E, 0x7D, 0x32), (0xC6, 0x28, 0x28), (0xF9, 0xA8, 0x25)


def chromium() -> str:
    return tool("chromium", "chromium", "chromium-browser")


@pytest.fixture
def browser() -> Iterator[Callable[..., subprocess.CompletedProcess[bytes]]]:
    """Run headless chromium on a page with a throwaway profile, removed afterwards."""
    executable = chromium()
    profile = Path(tempfile.mkdtemp(prefix="bt-test-chromium-"))

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,700", *args],
                              capture_output=True, timeout=120, check=False, cwd=profile)

    try:
        yield run
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Marks(HTMLParser):
    """Counts elements by tag and class, and remembers the ``<title>`` texts (the tooltips)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[str] = Counter()
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        self.count[tag] += 1
        for name in classes:
            self.count[f"{tag}.{name}"] += 1
        if len(classes) > 1:
            self.count[f"{tag}." + ".".join(classes)] += 1
        self._in_title = tag == "title"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.titles.append(data)
            self._in_title = False


def png_pixels(data: bytes) -> Counter[tuple[int, int, int]]:
    """The RGB colours of an 8-bit RGB(A), non-interlaced PNG (what chromium writes), with their pixel counts."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, "an 8-bit RGB(A) picture"
    step = 4 if colour == 6 else 3
    raw, stride = zlib.decompress(b"".join(chunks)), width * step
    previous, counts = bytearray(stride), Counter()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up, up_left = previous[i], previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        counts.update(tuple(line[i:i + 3]) for i in range(0, stride, step))  # type: ignore[misc]
        previous = line
    return counts


@pytest.mark.slow
def test_the_page_renders_the_timeline_in_a_real_browser(disk_scene: Callable[..., Scene], tmp_path: Path,
                                                          browser: Callable[..., subprocess.CompletedProcess[bytes]]
                                                          ) -> None:
    scene = disk_scene()
    scene.without_segment(0x14)  # a WAL gap, drawn where recovery from the first snapshot stops
    page = tmp_path / "report" / "status.html"
    page.parent.mkdir()
    result = run_cli("status", "--html", str(page), env=cli_env(scene.settings))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"page written to {page}")
    source = page.read_text()
    assert "http://" not in source.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in source, \
        "self-contained: no external asset"
    assert [p.name for p in page.parent.iterdir()] == ["status.html"], "written atomically: no temporary left"

    dom = browser("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    marks = Marks()
    marks.feed(dom.stdout.decode())
    assert marks.count["svg"] == 1 and marks.count["rect.window"] == 1
    assert marks.count["line.gap"] == 1
    assert marks.count["path.snapshot"] == 2
    assert (marks.count["circle.backup.dump.verified"], marks.count["circle.backup.dump.failed"],
            marks.count["circle.backup.dump.unverified"]) == (1, 1, 1)
    assert marks.count["line.now"] == 1
    assert any(scene.segment(0x14) in title for title in marks.titles), "the gap's tooltip names the segment"
    assert any(scene.dumps[1].id in title and "failed" in title for title in marks.titles)

    shot = tmp_path / "page.png"
    rendered = browser(f"--screenshot={shot}", page.as_uri())
    assert rendered.returncode == 0 and shot.is_file(), rendered.stderr.decode(errors="replace")[-2000:]
    colours = png_pixels(shot.read_bytes())
    assert colours[WINDOW] > 100, "the recovery window is drawn (7 h of 28 days: a narrow band)"
    for colour, what in ((VERIFIED, "verified"), (FAILED, "failed and the gap"), (UNVERIFIED, "unverified")):
        assert colours[colour] > 30, f"no {what} mark drawn"
