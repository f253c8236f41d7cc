"""Review outputs: the catalogue's report views, the HTML gallery, plots, threshold calibration."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cbir.store import catalog
from cbir.paramsfile import set_params
from cbir.steps.calibrate import calibrate, param_value, run_calibrate
from cbir.cli import main as cli_main
from cbir.config import Settings, load_settings
from cbir.steps.embed import run_embed
from cbir.errors import CbirError
from cbir.steps.evaluate import run_evaluate
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.metrics import RankedResults
from cbir.steps.report import run_report
from cbir.steps.pairs import run_pairs
from conftest import REPO, photo, save, write_params

# A "file" whose relative path is markup: a folder `<script>alert(1)<` holding `script>.jpg`
# (a file name cannot hold "/").
HOSTILE = "<script>alert(1)</script>.jpg"
QUOTES = "odd names/q\"uote's & #5 100%.jpg"  # attribute and URL special characters
PAGE_SIZE = 3


def build_workspace(root: Path, *, evaluate: bool = True, page_size: int = PAGE_SIZE) -> Path:
    """A small collection with known near-duplicates, ingested in two runs, through report."""
    scans = root / "scans"
    big = (160, 120)
    orig = [photo(i, big) for i in range(8)]
    save(orig[0], scans / "box-a/p00.jpg", quality=95)
    save(orig[0].resize((120, 90)), scans / "box-b/p00-rescan.jpg")  # lower resolution
    save(orig[1], scans / "box-a/p01.png")  # same size as the JPEG copy, more bytes
    save(orig[1], scans / "box-b/p01-copy.jpg", quality=80)
    save(orig[2], scans / "box-a/p02.jpg")
    (scans / "copies").mkdir()
    (scans / "copies/p02.jpg").write_bytes((scans / "box-a/p02.jpg").read_bytes())  # exact copy
    t = (scans / "box-a/p02.jpg").stat().st_mtime
    os.utime(scans / "copies/p02.jpg", (t + 60, t + 60))  # the copy is the later file
    save(orig[3], scans / "box-a/p03.jpg")
    save(orig[3].resize((150, 112)), scans / HOSTILE)
    save(orig[4], scans / "box-a/p04.jpg")
    save(orig[5].resize((140, 105)), scans / QUOTES)
    for i in (5, 6, 7):
        save(orig[i], scans / f"box-c/p{i:02d}.jpg")
    gt = ["path,group", "scans/box-a/p00.jpg,g0", "scans/box-b/p00-rescan.jpg,g0",
          "scans/box-a/p01.png,g1", "scans/box-b/p01-copy.jpg,g1", "scans/box-a/p03.jpg,g3",
          f'"scans/{HOSTILE}",g3', "scans/box-a/p04.jpg,g4", "scans/late/p04-late.jpg,g4",
          f'"scans/{QUOTES.replace(chr(34), chr(34) * 2)}",g5', "scans/box-c/p05.jpg,g5",
          "scans/box-c/p06.jpg,g6", "scans/box-c/p07.jpg,g7"]
    (root / "ground_truth.csv").write_text("\n".join(gt) + "\n")
    params = write_params(root, {
        "data": {"scans_dir": "scans", "ground_truth": "ground_truth.csv" if evaluate else None},
        "ingest": {"workers": 2},
        "embed": {"resolution": 64, "batch_size": 16, "shard_size": 16, "workers": 0},
        "search": {"k": 4, "pair_threshold": 0.5, "cluster_threshold": 0.9},
        "evaluate": {"ks": [1, 3], "baselines": False},
        "report": {"page_size": page_size, "thumb_size": 64},
    })
    settings = load_settings(params)
    run_ingest(settings)
    save(orig[4].resize((130, 98)), scans / "late/p04-late.jpg")  # arrives in run 2
    run_ingest(settings)
    run_embed(settings)
    run_index(settings)
    run_pairs(settings)
    if evaluate:
        run_evaluate(settings)
    run_report(settings)
    return params


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Settings:
    return load_settings(build_workspace(tmp_path_factory.mktemp("report")))


def _gallery(s: Settings) -> Path:
    return s.path(s.data.reports_dir) / "gallery"


def _rows(s: Settings, sql: str, params: list | None = None) -> list[dict]:
    cols, rows = catalog.query(s, sql, params)
    return [dict(zip(cols, r)) for r in rows]


# --------------------------------------------------------------------------- views

def _pair(s: Settings, a: str, b: str) -> dict:
    rows = _rows(s, "SELECT * FROM pair_report WHERE [path_a, path_b] IN ([?, ?], [?, ?])",
                 [a, b, b, a])
    assert len(rows) == 1, (a, b, rows)
    return rows[0]


def test_pair_report_describes_both_files_and_the_likely_master(ws):
    rescan = _pair(ws, "box-a/p00.jpg", "box-b/p00-rescan.jpg")
    assert rescan["kind"] == "near" and 0.5 <= rescan["score"] <= 1.0
    assert rescan["master_path"] == "box-a/p00.jpg"
    assert rescan["master_reason"] == "higher resolution"
    side = "a" if rescan["path_a"] == "box-b/p00-rescan.jpg" else "b"
    assert (rescan[f"width_{side}"], rescan[f"height_{side}"]) == (120, 90)
    assert rescan[f"format_{side}"] == "JPEG"
    scans = ws.path(ws.data.scans_dir)
    assert rescan[f"bytes_{side}"] == (scans / "box-b/p00-rescan.jpg").stat().st_size

    same_size = _pair(ws, "box-a/p01.png", "box-b/p01-copy.jpg")
    assert same_size["master_path"] == "box-a/p01.png"
    assert same_size["master_reason"] == "lossless file"  # whichever file is larger

    exact = _pair(ws, "box-a/p02.jpg", "copies/p02.jpg")
    assert exact["kind"] == "exact" and exact["score"] == 1.0
    assert exact["master_path"] == "box-a/p02.jpg" and exact["master_reason"] == "earlier"
    assert exact["first_run_a"] == exact["first_run_b"] == 1 and exact["mtime_a"] < exact["mtime_b"]


def test_new_pairs_are_those_whose_newer_image_came_in_the_run(ws):
    late = _rows(ws, "SELECT * FROM new_pairs WHERE new_run = ? ORDER BY score DESC", [2])
    assert late and all(r["new_path"] == "late/p04-late.jpg" for r in late)
    assert "box-a/p04.jpg" in {r["match_path"] for r in late}
    assert all(r["match_run"] == 1 for r in late)
    earlier = _rows(ws, "SELECT new_path, match_path FROM new_pairs WHERE new_run = ?", [1])
    assert earlier and all("late/p04-late.jpg" not in r.values() for r in earlier)
    total = _rows(ws, "SELECT count(*) AS n FROM duplicate_pairs")[0]["n"]
    assert len(late) + len(earlier) == total


def test_cluster_report_summarises_each_cluster(ws):
    members = _rows(ws, "SELECT cluster_id, path, size, weakest_link FROM clusters")
    report = _rows(ws, "SELECT * FROM cluster_report ORDER BY cluster_id")
    assert report and len(report) == len({m["cluster_id"] for m in members})
    files = {r["path"]: r for r in _rows(ws, "SELECT * FROM images")}
    for c in report:
        mine = sorted(m["path"] for m in members if m["cluster_id"] == c["cluster_id"])
        assert c["members"] == mine and c["size"] == len(mine)
        assert c["weakest_link"] == pytest.approx(
            [m["weakest_link"] for m in members if m["cluster_id"] == c["cluster_id"]][0])
        best = max(mine, key=lambda p: files[p]["width"] * files[p]["height"])
        assert files[c["master_path"]]["width"] * files[c["master_path"]]["height"] == \
            files[best]["width"] * files[best]["height"]


def _readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## Reviewing duplicates")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_example_queries_run_as_written(ws, capsys):
    section = _readme_section()
    sql_blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    statements = [s.strip() for b in sql_blocks for s in b.split(";") if s.strip()]
    assert len(statements) >= 3
    results = [_rows(ws, s) for s in statements]
    assert results[0], "the latest run brought a pair above 0.9"  # last night's new pairs
    assert {r["new_path"] for r in results[0]} == {"late/p04-late.jpg"}
    assert results[1][0]["size"] == max(r["size"] for r in results[1])  # largest clusters

    commands = [line for b in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in b.splitlines() if line.startswith("cbir sql ")]
    assert len(commands) >= 2
    for line in commands:
        args = shlex.split(line, comments=True)[1:]
        assert cli_main([*args, "--params", str(ws.params_path)]) == 0, line
        assert "row" in capsys.readouterr().out


def test_user_values_are_parameters_not_sql(ws):
    # a value that would break out of a pasted string literal is only ever compared
    evil = "x' OR 1=1 --"
    assert _rows(ws, "SELECT * FROM pair_report WHERE ? IN (path_a, path_b)", [evil]) == []


# --------------------------------------------------------------------------- gallery

def _pages(s: Settings, pattern: str = "*.html") -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(_gallery(s).glob(pattern))}


def test_gallery_escapes_every_file_name(ws):
    pages = _pages(ws)
    escaped = html.escape(HOSTILE, quote=True)
    assert any(escaped in text for name, text in pages.items() if name.startswith("pairs-"))
    assert any(escaped in text for name, text in pages.items() if name.startswith("query-"))
    for name, text in pages.items():
        assert "<script>alert" not in text and "alert(1)</script>" not in text, name
        assert 'q"uote' not in text, name  # the quote never closes an attribute
        # the only script is the filter, allowed by the page's Content-Security-Policy
        assert text.count("<script") == text.count("<script>(function ()"), name
        assert "Content-Security-Policy" in text


def test_gallery_links_resolve_to_thumbnails_and_scans(ws):
    gallery = _gallery(ws)
    srcs, hrefs = set(), set()
    for text in _pages(ws).values():
        srcs |= set(re.findall(r'<img src="([^"]+)"', text))
        hrefs |= set(re.findall(r'href="([^"]+)"', text))
    thumbs = {s for s in srcs if s.startswith("thumbs/")}
    assert thumbs and all((gallery / html.unescape(s)).is_file() for s in thumbs)
    with Image.open(gallery / sorted(thumbs)[0]) as im:
        assert im.format == "JPEG" and max(im.size) <= 64
    scans = {h for h in hrefs if not h.endswith(".html") and "#" not in h}
    targets = {os.path.normpath(os.path.join(os.fsencode(gallery),
                                             unquote_to_bytes(html.unescape(h)))) for h in scans}
    assert all(os.path.isfile(t) for t in targets)
    root = os.fsencode(ws.path(ws.data.scans_dir))
    for rel in (HOSTILE, QUOTES, "copies/p02.jpg"):
        assert os.path.normpath(os.path.join(root, os.fsencode(rel))) in targets, rel
    pages = {h for h in hrefs if h.endswith(".html")}
    assert all((gallery / html.unescape(h)).is_file() for h in pages)


def _cards(text: str) -> list[float]:
    return [float(x) for x in re.findall(r'<article class="pair[^"]*" data-score="([0-9.]+)"',
                                         text)]


def test_pairs_are_paginated_by_score_and_surplus_pages_removed(ws, tmp_path):
    n_pairs = _rows(ws, "SELECT count(*) AS n FROM pair_report")[0]["n"]
    pages = _pages(ws, "pairs-*.html")
    assert len(pages) == math.ceil(n_pairs / PAGE_SIZE) > 1
    scores = [s for text in pages.values() for s in _cards(text)]
    assert len(scores) == n_pairs and scores == sorted(scores, reverse=True)
    assert all(len(_cards(t)) <= PAGE_SIZE for t in pages.values())

    clusters = _rows(ws, "SELECT cluster_id, size FROM cluster_report")
    for c in clusters:
        assert (_gallery(ws) / f"cluster-{c['cluster_id']:05d}.html").is_file()

    # one big page now: the surplus pages go, so no stale page survives
    big = load_settings(ws.params_path, overrides={"report.page_size": 1000})
    try:
        run_report(big)
        assert list(_pages(ws, "pairs-*.html")) == ["pairs-0001.html"]
    finally:
        run_report(ws)
    assert len(_pages(ws, "pairs-*.html")) == len(pages)


# --------------------------------------------------------------------------- verification

@pytest.fixture(scope="module")
def verified(tmp_path_factory) -> Settings:
    """The review workspace: pairs with geometric verification's values (tests/review_workspace
    VERIFIED), its gallery written."""
    from review_workspace import build

    s = build(tmp_path_factory.mktemp("verified") / "ws")
    run_report(s)
    return s


def test_pair_report_and_partial_copies_carry_the_verification(verified):
    from review_workspace import RUN1, RUN2, VERIFIED, assert_verified_rows

    rows = {(r["path_a"], r["path_b"]): r for r in _rows(verified, "SELECT * FROM pair_report")}
    assert_verified_rows(rows)
    for key, v in VERIFIED.items():
        r = rows[key]
        assert r["box_path"] == {"a": key[0], "b": key[1], None: None}[v["box_on"]]
        detail = {"a_in_b": key, "b_in_a": key[::-1]}.get(v["relation"], (None, None))
        assert (r["detail_path"], r["whole_path"]) == detail
    assert all(r["relation"] is None for k, r in rows.items() if k not in VERIFIED)
    # the whole picture is the likely master of a partial copy, even at a lower resolution
    cut = rows[(RUN1[4], RUN2[0])]  # late/p6 (160x120) is a detail of box-b/p4 (120x90)
    assert (cut["master_path"], cut["master_reason"]) == (RUN1[4], "the whole picture")

    partial = _rows(verified, "SELECT * FROM partial_copies ORDER BY covered")
    assert [(r["detail_path"], r["whole_path"]) for r in partial] == [
        (RUN2[0], RUN1[4]), (RUN1[0], RUN1[2]), (RUN1[5], RUN2[1])]
    assert [round(r["covered"], 3) for r in partial] == [0.1, 0.25, 0.5]
    assert [(r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) for r in partial] == [
        (84, 0, 120, 30), (30, 18, 90, 63), (0, 0, 160, 60)]
    ids = {r["path"]: r["image_id"] for r in _rows(verified, "SELECT path, image_id FROM images")}
    assert all((r["detail_id"], r["whole_id"]) == (ids[r["detail_path"]], ids[r["whole_path"]])
               for r in partial)
    assert [r["new_run"] for r in partial] == [2, 1, 2]
    new = _rows(verified, "SELECT relation, covered FROM new_pairs WHERE new_path = ? AND "
                          "match_path = ?", [RUN2[0], RUN1[4]])
    assert new == [{"relation": "b_in_a", "covered": pytest.approx(0.1)}]


def _article(text: str, path_a: str, path_b: str) -> str:
    """The card of the pair (path_a, path_b) on a gallery page."""
    a, b = (html.escape(p, quote=True) for p in (path_a, path_b))
    found = [x for x in re.findall(r"<article .*?</article>", text, re.S)
             if f'alt="{a}"' in x and f'alt="{b}"' in x]
    assert len(found) == 1, (path_a, path_b)
    return found[0]


def _regions(article: str) -> list[tuple[str, list[float]]]:
    """The outlined regions of a card: the thumbnail each is on, and left, top, width, height
    in % of it."""
    found = re.findall(r'<img src="[^"]*"[^>]*alt="([^"]*)"[^>]*><span class="region" '
                       r'style="left:([0-9.]+)%;top:([0-9.]+)%;width:([0-9.]+)%;'
                       r'height:([0-9.]+)%"', article)
    return [(html.unescape(f[0]), [float(x) for x in f[1:]]) for f in found]


def test_gallery_shows_the_verification_and_outlines_the_matched_region(verified):
    from review_workspace import HOSTILE, RUN1, RUN2

    page = _pages(verified, "pairs-*.html")["pairs-0001.html"]
    # late/p6 is the top right tenth of box-b/p4 (120x90): box (84, 0)-(120, 30)
    cut = _article(page, RUN1[4], RUN2[0])
    assert "partial copy: the right is a detail of the left, 10 % of its area (23 " in cut
    assert _regions(cut) == [(RUN1[4], [70.0, 0.0, 30.0, pytest.approx(33.33)])]
    # the middle quarter of box-a/p2 (120x90): box (30, 18)-(90, 63)
    mid = _article(page, RUN1[0], RUN1[2])
    assert "the left is a detail of the right, 25 % of its area" in mid
    assert _regions(mid) == [(RUN1[2], [25.0, 20.0, 50.0, 50.0])]
    # on the larger of two copies of the same picture: late/p7 (160x120), rows 1 to 119
    same = _article(page, RUN1[1], RUN2[1])
    assert "same picture: 95 matching points" in same
    assert _regions(same) == [(RUN2[1], [0.0, pytest.approx(0.83), 100.0, pytest.approx(98.33)])]
    # a file named like HTML stays text in the card of its partial copy
    hostile = _article(page, f"box-b/{HOSTILE}", RUN2[1])
    assert _regions(hostile) == [(RUN2[1], [0.0, 0.0, 100.0, 50.0])] and "onerror=" in hostile
    assert "<img src=x" not in page
    # contradicted: marked, kept; unchecked: nothing said, nothing outlined
    no = _article(page, RUN1[0], RUN1[1])
    assert no.startswith('<article class="pair contradicted"') and "not confirmed" in no
    assert _regions(no) == []
    plain = _article(page, RUN1[3], RUN1[4])
    assert 'class="check' not in plain and _regions(plain) == [] and "contradicted" not in plain
    assert len(_cards(page)) == 28  # every card, contradicted ones too, in the score filter
    index = _pages(verified, "index.html")["index.html"]
    assert "2 the same picture, 3 partial copies" in index and "1 not confirmed" in index


def test_thumbnails_are_made_once_and_reused(ws):
    folder = _gallery(ws) / "thumbs" / "64"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")}
    assert before
    stray = [folder / "ffffffffffffffff.jpg", _gallery(ws) / "thumbs" / "512" / "0123456789abcdef.jpg"]
    for p in stray:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"old")
    summary = run_report(ws)
    assert summary.thumbs.made == 0 and summary.thumbs.reused == len(before)
    assert summary.thumbs.pruned == 2 and not any(p.exists() for p in stray)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")} == before


def test_evaluation_pages_and_plots(ws):
    gallery = _gallery(ws)
    evaluation = (gallery / "evaluation.html").read_text()
    assert "µAP" in evaluation and "<table>" in evaluation
    n_queries = json.loads((ws.path(ws.data.reports_dir) / "metrics.json").read_text())[
        "model"]["n_queries"]
    queries = _pages(ws, "query-*.html")
    assert len(queries) == n_queries
    marks = sum(t.count("✓ correct") + t.count("✗ wrong") for t in queries.values())
    assert marks == n_queries * 3  # the top K = max(evaluate.ks) of every query
    plots = ws.path(ws.data.reports_dir) / "plots"
    for name in ("pr_curve", "precision_recall_at_k", "score_histogram"):
        with Image.open(plots / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300
        assert f"../plots/{name}.png" in evaluation
    assert (plots / "pr_curve.csv").read_text().startswith("threshold,precision,recall\n")
    assert not (plots / "train_loss.png").exists()  # no training history yet

    history = ws.path(ws.data.models_dir) / "history.csv"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text("epoch,step,loss,lr,seconds\n1,10,4.2,0.001,3.0\n2,20,3.1,0.0009,2.9\n")
    try:
        run_report(ws)
        assert (plots / "train_loss.png").is_file()
        assert "../plots/train_loss.png" in (gallery / "evaluation.html").read_text()
    finally:
        history.unlink()
        run_report(ws)
    assert not (plots / "train_loss.png").exists()


def test_evaluation_page_says_why_metrics_json_holds_no_metrics(tmp_path, ws):
    """metrics.json written when nothing was labelled (a note, no figures), then labels since
    (decisions, in an archive): the page says so instead of failing on the note."""
    s = load_settings(ws.params_path, overrides={"data.reports_dir": str(tmp_path / "r")})
    metrics = tmp_path / "r" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"model": {}, "note": "nothing labelled then"}))
    summary = run_report(s)
    page = (tmp_path / "r/gallery/evaluation.html").read_text()
    assert summary.n_queries > 0  # the rankings are shown all the same
    assert any("no metrics" in x and "nothing labelled then" in x for x in summary.lines())
    assert "nothing labelled then" in page and "Run <code>cbir evaluate</code> again" in page
    assert "<table>" not in page
    metrics.write_text("{not json")
    run_report(s)
    assert "cannot be read" in (tmp_path / "r/gallery/evaluation.html").read_text()
    metrics.unlink()
    run_report(s)
    assert "No metrics.json yet" in (tmp_path / "r/gallery/evaluation.html").read_text()


def test_report_without_ground_truth_or_pairs(tmp_path, ws):
    no_gt = load_settings(ws.params_path, overrides={"data.ground_truth": None,
                                                      "data.reports_dir": str(tmp_path / "r")})
    summary = run_report(no_gt)
    assert summary.n_queries == 0 and "no ground truth" in summary.evaluation_note
    assert "No evaluation" in (tmp_path / "r/gallery/evaluation.html").read_text()
    assert not list((tmp_path / "r").glob("plots/*.png"))

    empty = load_settings(write_params(tmp_path / "empty", {"data": {"scans_dir": "scans"}}))
    (tmp_path / "empty/scans").mkdir()
    save(photo(1), tmp_path / "empty/scans/a.jpg")
    run_ingest(empty)
    with pytest.raises(CbirError, match="cbir pairs"):
        run_report(empty)


# --------------------------------------------------------------------------- calibration

def _ranked(rel: list[list[bool]], scores: list[list[float]], n_rel: list[int]) -> RankedResults:
    return RankedResults(relevance=np.array(rel), scores=np.array(scores),
                         n_relevant=np.array(n_rel))


def test_calibrate_on_a_hand_made_case():
    # pooled by score: .95 T, .92 F, .90 T, .85 F, .80 T, .70 F; 4 relevant in all
    r = _ranked([[True, True, False], [False, True, False]],
                [[0.95, 0.90, 0.85], [0.92, 0.80, 0.70]], [2, 2])
    c = calibrate(r, 0.9)
    assert (c.threshold, c.recall, c.precision) == (0.95, 0.25, 1.0) and c.reached
    c = calibrate(r, 0.6)  # .80 keeps 3 of 5 = 0.6 precision with recall 3/4
    assert (c.threshold, c.recall, c.precision) == (0.80, 0.75, 0.6)
    c = calibrate(r, 0.5)  # .70 adds no recall: the higher threshold wins
    assert c.threshold == 0.80 and c.recall == 0.75
    assert c.n_pairs == 6 and c.n_queries == 2

    worse = _ranked([[False, True]], [[0.99, 0.5]], [1])
    c = calibrate(worse, 1.0)
    assert not c.reached and c.recall == 0.0 and c.precision == 0.5  # the best there is


def test_param_value_rounds_down_so_the_calibrated_pairs_stay():
    score = float(np.float32(0.99790668))
    v = param_value(score)
    assert v <= score and np.float32(score) >= v and score - v < 1e-6
    assert param_value(0.8) == 0.8


PARAMS_TEXT = """\
# comment at the top
data:
  scans_dir: scans   # where the scans are

search:
  k: 10                      # neighbours
  pair_threshold: 0.8        # cosine similarity for a near-duplicate pair
  cluster_threshold: 0.9     # stricter
# trailing comment
"""


def test_set_params_edits_one_line_and_keeps_comments(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS_TEXT)
    (tmp_path / "scans").mkdir()
    set_params(p, {"search.pair_threshold": 0.912345})
    want = PARAMS_TEXT.replace("pair_threshold: 0.8        #", "pair_threshold: 0.912345   #")
    assert p.read_text() == want
    assert load_settings(p).search.pair_threshold == 0.912345

    p.write_text("data:\n  scans_dir: scans\nsearch:\n  k: 4\n")
    set_params(p, {"search.pair_threshold": 0.7, "search.cluster_threshold": 0.75})
    s = load_settings(p).search
    assert (s.k, s.pair_threshold, s.cluster_threshold) == (4, 0.7, 0.75)

    p.write_text("data:\n  scans_dir: scans  # no search section\n")
    set_params(p, {"search.pair_threshold": 0.6})
    assert load_settings(p).search.pair_threshold == 0.6
    assert "# no search section" in p.read_text()

    p.write_text("search: {k: 3}\n")
    with pytest.raises(CbirError, match="by hand"):
        set_params(p, {"search.pair_threshold": 0.6})
    assert p.read_text() == "search: {k: 3}\n"


def test_calibrate_command_matches_evaluate_and_writes_params(ws, tmp_path, capsys):
    metrics = json.loads((ws.path(ws.data.reports_dir) / "metrics.json").read_text())["model"]
    res = run_calibrate(ws, precision=0.9)  # evaluate.precision_target: metrics' threshold@p90
    assert res.calibration.threshold == pytest.approx(metrics["threshold@p90"], abs=1e-6)
    assert res.calibration.recall == pytest.approx(metrics["recall@p90"])

    # a commented params file for the same workspace (absolute paths: it lives elsewhere)
    copy = tmp_path / "params.yaml"
    data = {k: str(ws.path(getattr(ws.data, k))) for k in
            ("scans_dir", "ground_truth", "manifest_dir", "catalog", "embeddings_dir",
             "index_dir", "models_dir", "pairs_dir", "reports_dir", "cache_dir")}
    lines = ["# my archive", "data:"] + [f"  {k}: {v}" for k, v in data.items()]
    lines += ["embed:", "  resolution: 64  # small", "  workers: 0", "search:", "  k: 4",
              "  pair_threshold: 0.5   # set by hand", "  cluster_threshold: 0.9",
              "evaluate:", "  ks: [1, 3]", ""]
    copy.write_text("\n".join(lines))
    assert cli_main(["calibrate", "--precision", "0.5", "--write", "--params", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "recall" in out and "wrote search.pair_threshold" in out
    edited = copy.read_text()
    assert "# my archive" in edited and "# set by hand" in edited and "# small" in edited
    cal = run_calibrate(load_settings(copy), precision=0.5).calibration
    assert load_settings(copy).search.pair_threshold == param_value(cal.threshold)


def test_a_moved_scan_brings_no_new_pairs(tmp_path):
    """Moving a scan changes its path, not its picture: its pairs keep the run that brought it.

    The late copy is moved (run 3), then the original it matches (run 4): neither night has a new
    pair, and the late copy's pairs show both files at their new paths, still new in run 2.
    """
    s = load_settings(build_workspace(tmp_path, evaluate=False))
    scans = s.path(s.data.scans_dir)
    sql = "SELECT new_run, match_path, match_run FROM new_pairs WHERE new_path = ?"
    before = _rows(s, sql, ["late/p04-late.jpg"])
    assert {"new_run": 2, "match_path": "box-a/p04.jpg", "match_run": 1} in before
    assert {r["new_run"] for r in before} == {2}
    for old, new in (("late/p04-late.jpg", "moved/p04-late.jpg"),
                     ("box-a/p04.jpg", "box-z/p04.jpg")):
        (scans / new).parent.mkdir(exist_ok=True)
        (scans / old).rename(scans / new)
        run = run_ingest(s).run_id
        run_embed(s)
        run_index(s)
        run_pairs(s, incremental=True)
        assert _rows(s, "SELECT * FROM new_pairs WHERE new_run = ?", [run]) == []
    after = _rows(s, sql, ["moved/p04-late.jpg"])
    renamed = {"box-a/p04.jpg": "box-z/p04.jpg"}
    key = lambda r: (r["new_run"], renamed.get(r["match_path"], r["match_path"]), r["match_run"])
    assert sorted(map(key, after)) == sorted(map(key, before))


def _stored_equals_live(s: Settings, name: str = "pair_report") -> int:
    """The stored result of a view, as queries read it (its rows that count: View.alive),
    holds exactly the rows its live query gives (rows counted)."""
    import duckdb

    chosen = catalog._plan(s)
    view = next(v for v in chosen if v.name == name)
    assert view.stored is not None and catalog.stored_files(view.stored)
    con = duckdb.connect(":memory:")
    for v in chosen:
        con.execute(f'CREATE TEMP VIEW "{v.name}" AS {v.live(None)}')
    kept = view.body(None)
    for a, b in ((f'SELECT * FROM "{name}"', kept), (kept, f'SELECT * FROM "{name}"')):
        assert con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone()[0] == 0
    n = con.execute(f"SELECT count(*) FROM ({kept})").fetchone()[0]
    con.close()
    return n


def test_a_night_of_new_scans_grows_the_stored_reports(tmp_path, monkeypatch):
    """New scans only append manifest rows: the stored pair_report keeps the recorded pairs' rows
    and computes those of the night's partition (and the exact copies), the stored
    cluster_report those of the clusters the update formed, each in a part of its own, the
    rows of clusters no longer listed left out; a night that changes a row (a scan moved), or
    clusters numbered whole again, computes them whole. Either way each equals its live
    query."""
    s = load_settings(build_workspace(tmp_path, evaluate=False))
    scans = s.path(s.data.scans_dir)
    before = _stored_equals_live(s)
    grown: list[tuple[str, bool]] = []
    real = catalog._grow

    def spy(con, view, growth, tmp, meta) -> bool:
        grown.append((view.name, real(con, view, growth, tmp, meta)))
        return grown[-1][1]

    monkeypatch.setattr(catalog, "_grow", spy)
    connected: list[list[str]] = []  # the growths of each connection made
    real_connect = catalog._connect_views

    def connect_spy(settings, chosen, growths=(), rows=None):
        connected.append([g.over for g in growths])
        return real_connect(settings, chosen, growths, rows)

    monkeypatch.setattr(catalog, "_connect_views", connect_spy)
    held: list[bool] = []  # whether a growth read the pairs step's rows, not the manifest
    real_holds = catalog._holds

    def holds_spy(*args) -> bool:
        held.append(real_holds(*args))
        return held[-1]

    monkeypatch.setattr(catalog, "_holds", holds_spy)

    def night() -> int:
        run = run_ingest(s).run_id
        run_embed(s)
        run_index(s)
        run_pairs(s, incremental=True)
        return run

    report = next(v.stored for v in catalog.views(s) if v.name == "pair_report")
    whole = catalog.stored_files(report)  # the file (exact copies) and one part (near pairs)
    assert whole is not None and len(whole) == 2
    part = whole[1].stat()
    by_cluster = next(v.stored for v in catalog.views(s) if v.name == "cluster_report")
    cluster_files = catalog.stored_files(by_cluster)  # an empty file and one part
    assert cluster_files is not None and len(cluster_files) == 2
    cluster_part = cluster_files[1].stat()
    ids_before = {r["cluster_id"]: r["member_ids"] for r in
                  _rows(s, "SELECT cluster_id, member_ids FROM cluster_report")}
    save(photo(4, (160, 120)).resize((110, 82)), scans / "later/p04-small.jpg")
    (scans / "later/p02-again.jpg").write_bytes((scans / "box-a/p02.jpg").read_bytes())
    run = night()
    assert grown == [("pair_report", True), ("cluster_report", True)]
    # both grown on one connection, from the manifest's rows the pairs step read (every row
    # of the new pairs' images, of their clusters' members and of the exact copies' images):
    # no pass over the manifest of their own
    assert connected == [["duplicate_pairs", "clusters"]]
    assert held == [True]
    # the near pairs' rows kept where they were (same file), the night's in a part of its own
    grown_files = catalog.stored_files(report)
    assert grown_files is not None and grown_files[:2] == whole and len(grown_files) == 3
    assert (whole[1].stat().st_ino, whole[1].stat().st_mtime_ns) == (part.st_ino,
                                                                       part.st_mtime_ns)
    assert set(pq.read_table(grown_files[2]).column("kind").to_pylist()) == {"near"}
    assert set(pq.read_table(report).column("kind").to_pylist()) == {"exact"}
    # the clusters' rows kept where they were, the clusters formed in a part of their own
    grown_clusters = catalog.stored_files(by_cluster)
    assert grown_clusters is not None and grown_clusters[:2] == cluster_files
    assert len(grown_clusters) == 3
    assert (cluster_files[1].stat().st_ino, cluster_files[1].stat().st_mtime_ns) == (
        cluster_part.st_ino, cluster_part.st_mtime_ns)
    formed = pq.read_table(grown_clusters[2]).column("cluster_id").to_pylist()
    assert formed and min(formed) > max(ids_before)  # new ids, after every earlier one
    ids_after = {r["cluster_id"]: r["member_ids"] for r in
                 _rows(s, "SELECT cluster_id, member_ids FROM cluster_report")}
    # a cluster still listed keeps its id and members; one the night joined with a new image
    # is no longer listed, though its row stays in the older part (left out: View.alive)
    dropped = set(ids_before) - set(ids_after)
    assert dropped and all(ids_after[c] == m for c, m in ids_before.items() if c in ids_after)
    raw = sum(pq.read_metadata(f).num_rows for f in grown_clusters)
    assert raw == len(ids_after) + len(dropped)
    after = _stored_equals_live(s)
    assert after > before
    clusters = _stored_equals_live(s, "cluster_report")
    assert clusters == len(ids_after)
    assert _rows(s, "SELECT count(*) AS n FROM new_pairs WHERE new_run = ?", [run])[0]["n"] > 0
    exact = _rows(s, "SELECT path_a, path_b FROM pair_report WHERE kind = 'exact'")
    assert any("later/p02-again.jpg" in r.values() for r in exact)

    grown.clear()
    (scans / "moved").mkdir()
    (scans / "box-a/p03.jpg").rename(scans / "moved/p03.jpg")
    night()
    assert grown == []  # a row changed: computed whole
    assert _stored_equals_live(s) == after
    assert len(catalog.stored_files(report)) == 2  # the file and one part again
    assert _stored_equals_live(s, "cluster_report") == clusters

    # a growth whose rows do not add up (here: said to expect none) is computed whole
    import dataclasses

    planned = catalog._growth
    monkeypatch.setattr(catalog, "_growth", lambda *a: None if (g := planned(*a)) is None else (
        dataclasses.replace(g, expected="SELECT 0") if a[1].name == "cluster_report" else g))
    grown.clear()
    save(photo(6, (160, 120)), scans / "later/p06-again.jpg", quality=70)
    night()
    assert grown == [("pair_report", True), ("cluster_report", False)]
    assert _stored_equals_live(s) > after
    # the parts no stored result names (those before it was computed whole) removed by the
    # next writer
    on_disk = set(report.parent.glob("pair_report-*.parquet"))
    assert on_disk == set(catalog.stored_files(report)[1:]) and len(on_disk) == 2
    _stored_equals_live(s, "cluster_report")

    # a result grown to MAX_PARTS parts is computed whole: one part again
    monkeypatch.setattr(catalog, "_growth", planned)
    monkeypatch.setattr(catalog, "MAX_PARTS", 2)
    assert len(catalog.stored_files(by_cluster) or []) == 2  # computed whole above: one part
    for n, (copy, parts) in enumerate((("p07-again", 2), ("p05-again", 1))):
        grown.clear()
        save(photo(7 - 2 * n, (160, 120)), scans / f"later/{copy}.jpg", quality=70)
        night()
        assert grown == [("pair_report", True)] + [("cluster_report", True)] * (parts == 2)
        assert len(catalog.stored_files(by_cluster) or []) == 1 + parts
        _stored_equals_live(s, "cluster_report")

    # a full run clusters everything again, numbered by size from 1 (another lineage): the
    # stored cluster_report is computed whole (an id may name another group now)
    monkeypatch.setattr(catalog, "MAX_PARTS", 32)
    grown.clear()
    run_pairs(s)
    assert "cluster_report" not in dict(grown)
    ids = sorted(r["cluster_id"] for r in _rows(s, "SELECT cluster_id FROM cluster_report"))
    assert ids == list(range(1, len(ids) + 1))
    assert _stored_equals_live(s, "cluster_report") == len(ids)
    from cbir.store.layout import layout as _layout

    held = _layout(s).clusters.stat()
    run_pairs(s)  # the same clusters numbered whole again: the file (and its lineage) kept
    now = _layout(s).clusters.stat()
    assert (now.st_ino, now.st_mtime_ns) == (held.st_ino, held.st_mtime_ns)

    # clusters of another lineage, even up to the same next id: computed whole
    from cbir.fsutil import write_parquet
    from cbir.store.layout import layout
    from cbir.store.pairs import CLUSTER_IDS, cluster_ids

    clusters_file = layout(s).clusters
    table, numbering = pq.read_table(clusters_file), cluster_ids(clusters_file)
    assert numbering is not None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    meta[CLUSTER_IDS] = json.dumps({"lineage": "another", "next": numbering.next})
    write_parquet(table.replace_schema_metadata(meta), clusters_file)
    grown.clear()
    catalog.refresh_catalog(s)
    assert grown == [] and _stored_equals_live(s, "cluster_report") == len(ids)


def test_a_card_says_which_picture_adds_a_blank_margin():
    # a copy on a card mount is the same picture (cbir.verify.BLANK_MARGIN), not a detail
    from cbir.steps.report.render import ENV

    card = ENV.from_string('{% from "macros.html.j2" import verified %}{{ verified(row) }}')
    row = {"relation": "full", "inliers": 122, "covered": 0.79, "box_on": "a"}
    assert "same picture, the left on a blank margin: 122 matching points" in card.render(row=row)
    row.update(box_on="b")
    assert "the right on a blank margin" in card.render(row=row)
    row.update(covered=0.97)
    assert "same picture: 122 matching points" in card.render(row=row)
