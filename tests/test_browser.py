"""The review gallery in a real browser: headless Chromium opens it from file:// (no server)."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cbir.store import catalog
from cbir.config import load_settings
from test_report import HOSTILE, build_workspace

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"headless Chromium not installed at {CHROMIUM} (.ci/run installs Debian's chromium)")


def _chromium(tmp: Path, *args: str) -> str:
    out = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class _Dom(HTMLParser):
    """What the rendered DOM holds: pair cards, images, script bodies, text."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = 0
        self.imgs: list[str] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False
        self.shown = ""
        self._in_shown = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "article" and "pair" in (a.get("class") or "").split():  # contradicted too
            self.pairs += 1
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")
        elif tag == "span" and a.get("id") == "shown":
            self._in_shown = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        elif tag == "span":
            self._in_shown = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)
        if self._in_shown:
            self.shown += data


def test_gallery_renders_in_headless_chromium(tmp_path):
    settings = load_settings(build_workspace(tmp_path / "ws", evaluate=False, page_size=200))
    gallery = settings.path(settings.data.reports_dir) / "gallery"
    page = gallery / "pairs-0001.html"
    _, rows = catalog.query(settings, "SELECT count(*) FROM pair_report")
    n_pairs = rows[0][0]

    # the DOM after the page loaded and its script ran, under the browser's normal file:// rules
    dom = _Dom()
    dom.feed(_chromium(tmp_path, "--dump-dom", page.as_uri()))
    assert dom.pairs == n_pairs > 0
    assert dom.shown == str(n_pairs)  # the score filter ran (the page's CSP allowed it)
    assert HOSTILE in "".join(dom.text)  # shown as text ...
    assert not any("alert" in s for s in dom.scripts)  # ... never as a script
    assert len(dom.imgs) == 2 * n_pairs
    assert all((gallery / src).is_file() for src in dom.imgs)

    # every image decoded: a harness page reads the gallery's images from a frame
    harness = tmp_path / "harness.html"
    harness.write_text(f"""<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="f" src="{page.as_uri()}" width="1280" height="2000"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {{
  var out;
  try {{
    var d = this.contentDocument, imgs = d.images, bad = [];
    for (var i = 0; i < imgs.length; i++)
      if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad.push(imgs[i].getAttribute('src'));
    out = {{images: imgs.length, bad: bad, text: d.body.textContent}};
  }} catch (e) {{ out = {{error: String(e)}}; }}
  document.getElementById('result').textContent = JSON.stringify(out);
}});
</script></body></html>""")
    dumped = _chromium(tmp_path, "--allow-file-access-from-files", "--dump-dom",
                       harness.as_uri())
    result = _result(dumped)
    assert "error" not in result, result
    assert result["images"] == 2 * n_pairs and result["bad"] == []
    assert HOSTILE in result["text"]

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colours = im.convert("RGB").resize((320, 500)).getcolors(1 << 20)
        assert colours is not None and len(colours) > 500  # photographs, not a blank page


def _result(dumped: str) -> dict:
    """The JSON the harness wrote into its <pre id="result">."""
    m = re.search(r'<pre id="result">(.*?)</pre>', dumped, re.S)
    assert m, dumped[:2000]
    return json.loads(html.unescape(m[1]))
