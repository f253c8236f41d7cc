"""`cbir review` in a real browser: the real server (a `cbir review` process) driven by headless
Chromium through Playwright, deciding with the keyboard as an archivist does."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import CBIR
from PIL import Image
from review_workspace import HOSTILE, build

from cbir.store import catalog
from cbir.store.decisions import pair_key

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
WAIT_MS = 600_000  # a busy machine is slow, never wrong: wait as long as it takes
N_TIMED = 12  # decisions timed for the decisions-per-minute figure

pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"headless Chromium not installed at {CHROMIUM} (.ci/run "
                              "installs Debian's chromium)"),
]
playwright = pytest.importorskip("playwright.sync_api",
                                 reason="playwright is not installed (pip install -e .[dev])")


@pytest.fixture
def server(tmp_path):
    settings = build(tmp_path / "ws")
    proc = subprocess.Popen([*CBIR, "review", "--params", str(settings.params_path), "--port",
                             "0", "--reviewer", "browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # as long as it takes: it prints its URL, or it dies
    assert " at http://" in line, (line, proc.stderr.read() if proc.stderr else "")
    try:
        yield settings, line.split(" at ")[-1].strip()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=600)
    assert proc.returncode == 130


# Where the outlined region lies on the left picture as it is shown (after zoom and pan), in
# fractions of the picture: left, top, width, height.
REGION = """() => {
  const img = document.getElementById('img-a');
  const f = img.getBoundingClientRect();
  const b = document.querySelector('#overlay-a .region').getBoundingClientRect();
  const k = Math.min(f.width / img.naturalWidth, f.height / img.naturalHeight);
  const w = img.naturalWidth * k, h = img.naturalHeight * k;
  const x = f.left + (f.width - w) / 2, y = f.top + (f.height - h) / 2;
  return [(b.left - x) / w, (b.top - y) / h, b.width / w, b.height / h];
}"""


def current(settings) -> dict[tuple[str, str], dict]:
    cols, rows = catalog.query(settings, "SELECT * FROM decisions")
    return {(r["image_a"], r["image_b"]): r for r in (dict(zip(cols, x)) for x in rows)}


def shown(page) -> tuple[str, str]:
    a, b = page.evaluate("document.body.dataset.pair").split("-")
    return pair_key(a, b)


def press(page, key: str, recorded: int) -> None:
    """Press `key` and wait until the page has recorded its `recorded`th change."""
    page.keyboard.press(key)
    page.wait_for_function(f"() => document.body.dataset.recorded === '{recorded}'", timeout=WAIT_MS)


def test_review_with_the_keyboard_in_chromium(server, tmp_path):
    settings, url = server
    dialogs: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(WAIT_MS)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            page.wait_for_function(
                "() => document.getElementById('img-a').complete && "
                "document.getElementById('img-a').naturalWidth > 0 && "
                "document.getElementById('img-b').naturalWidth > 0")
            page.wait_for_function("() => document.getElementById('progress').textContent.includes"
                                   "('remaining 28')")
            shot = Path(os.environ.get("CBIR_SCREENSHOT") or tmp_path / "review.png")
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            with Image.open(shot) as im:  # 256 colours: small enough for the README
                im.convert("RGB").quantize(256).save(shot, optimize=True)

            # views: difference blends the second scan over the first; the wheel zooms both
            page.keyboard.press("3")
            assert page.evaluate("() => getComputedStyle(document.getElementById('pane-b'))"
                                 ".mixBlendMode") == "difference"
            page.keyboard.press("2")
            assert page.evaluate("() => document.getElementById('stage').className")\
                .startswith("flicker")
            page.keyboard.press("1")
            page.mouse.move(400, 300)
            page.mouse.wheel(0, -300)
            page.wait_for_function("() => document.getElementById('img-b').style.transform"
                                   ".includes('scale(1.2')")
            page.keyboard.press("0")

            # s, d, u, m decide; n skips; z undoes the last decision (the pair comes back)
            decided = {}
            for n, (key, verdict) in enumerate((("s", "same"), ("d", "different"),
                                                ("u", "unsure"), ("m", "same")), start=1):
                pair = shown(page)
                press(page, key, n)
                decided[pair] = verdict
            last = pair
            skipped = shown(page)
            page.keyboard.press("n")
            page.wait_for_function(f"() => document.body.dataset.pair.split('-').sort().join('-') "
                                   f"!== '{'-'.join(skipped)}'")
            press(page, "z", 5)
            assert shown(page) == last
            del decided[last]
            got = current(settings)
            assert {k: v["decision"] for k, v in got.items()} == decided
            assert all(v["reviewer"] == "browser" and v["source"] == "review"
                       for v in got.values())

            # after a reload the decided pairs are gone from the queue, the rest are there
            page.reload()
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            assert shown(page) not in decided
            page.wait_for_function("() => document.getElementById('progress').textContent.includes"
                                   "('reviewed 3 / remaining 25')")

            # decisions per minute a keyboard user can make: each until it is recorded
            start = time.perf_counter()
            for n in range(1, N_TIMED + 1):
                press(page, "dus"[n % 3], n)
            seconds = time.perf_counter() - start
            print(f"\nreview: {N_TIMED} keyboard decisions in {seconds:.2f} s = "
                  f"{N_TIMED * 60 / seconds:.0f} decisions per minute")
            assert len(current(settings)) == 3 + N_TIMED

            # a file named like HTML is shown as its name, as text
            page.goto(url + "?decision=all&folder=" + quote(f"box-b/{HOSTILE}", safe=""))
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            paths = page.locator(".fact .path").all_text_contents()
            assert f"box-b/{HOSTILE}" in paths
            assert page.get_by_text(f"box-b/{HOSTILE}", exact=True).first.is_visible()
            assert page.locator("img[src='x']").count() == 0

            # a partial copy: the region verification matched is outlined on the larger
            # picture (late/p6 is the top right tenth of box-b/p4, on the left), zoomed with it
            page.goto(url + "?decision=all&relation=partial")
            page.wait_for_function("() => document.body.dataset.ready === '1' && "
                                   "document.getElementById('img-a').naturalWidth > 0")
            assert "the right is a detail of the left" in page.locator("#check").inner_text()
            assert page.locator("#overlay-b").is_hidden()
            assert page.evaluate(REGION) == pytest.approx([0.7, 0.0, 0.3, 1 / 3], abs=0.02)
            page.mouse.move(300, 300)
            page.mouse.wheel(0, -300)
            page.wait_for_function("() => document.getElementById('overlay-a').style.transform"
                                   ".includes('scale(1.2')")
            assert page.evaluate(REGION) == pytest.approx([0.7, 0.0, 0.3, 1 / 3], abs=0.02)

            # the same picture, as the server words it (no blank margin here: on_margin false)
            page.goto(url + "?decision=all&relation=full")
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            check = page.locator("#check").inner_text()
            assert check.startswith("same picture (") and "blank margin" not in check, check

            # the cluster view: rejecting two links of a triangle splits a member off
            page.goto(url.rstrip("/") + "/cluster/0")
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            assert page.locator("#links tbody tr").count() == 3
            for n in (1, 2):
                page.locator("#links tbody tr").nth(n).get_by_text("reject link").click()
                page.wait_for_function(f"() => document.body.dataset.recorded === '{n}'")
            page.wait_for_function("() => document.querySelectorAll('#components > li').length "
                                   "=== 2")
            assert not errors, errors
        finally:
            browser.close()
    assert dialogs == []  # no script from a file name ever ran
