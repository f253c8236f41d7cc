"""The review gallery: a static HTML site for archivists, under data/reports/gallery/.

It opens from the file system (no server): pages link to each other, to thumbnails and to the
scans themselves by relative URLs. Pairs come from the catalogue's `pair_report` view (so the
gallery and SQL agree on scores and on the likely master), clusters from `cluster_report`, the
evaluation from the same ranking `cbir evaluate` scores. Every file name is escaped; a page's only
script is the score filter, and its Content-Security-Policy allows no other.

Thumbnails are made once, at `report.thumb_size`, into `gallery/thumbs/<size>/<image_id>.jpg`
(content-addressed, so a later report reuses them) and pruned when their image leaves the
collection. Long lists are split into pages of `report.page_size`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from .. import faults, plots
from ..store import catalog
from ..config import Settings
from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_text
from ..imaging import ImageRejected, load_rgb
from ..store.layout import PLOTS, layout
from ..store.manifest import PRESENT, load_manifest
from ..metrics import precision_key
from ..progress import bar as progress_bar

THUMBS = "thumbs"
_NO_LIMIT = 1 << 62


def e(value: Any) -> str:
    """Text for HTML, safe in element content and in quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------- files and thumbnails

@dataclass(frozen=True)
class FileInfo:
    path: str
    path_raw: bytes
    image_id: str
    width: int
    height: int
    bytes: int
    format: str
    first_run: int


def _files_by_path(manifest: pa.Table, paths: Iterable[str]) -> dict[str, FileInfo]:
    """Present manifest files for the given display paths (only those, to stay small)."""
    wanted = pa.array(sorted(set(p for p in paths if p is not None)), pa.string())
    table = manifest.select(
        ["image_id", "path", "path_raw", "status", "width", "height", "bytes", "format",
         "first_run"])
    table = table.filter(pc.and_(pc.is_in(table["path"], value_set=wanted),
                                 pc.is_in(table["status"], value_set=pa.array(list(PRESENT)))))
    out: dict[str, FileInfo] = {}
    for r in table.to_pylist():
        out.setdefault(r["path"], FileInfo(
            path=r["path"], path_raw=r["path_raw"], image_id=r["image_id"], width=r["width"],
            height=r["height"], bytes=r["bytes"], format=r["format"], first_run=r["first_run"]))
    return out


@dataclass
class ThumbStats:
    made: int = 0
    reused: int = 0
    pruned: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image_id -> reason


class Thumbnails:
    """JPEG thumbnails named by image id (content hash): made once, reused by later reports."""

    def __init__(self, gallery: Path, size: int, scans: Path, max_pixels: int) -> None:
        self.root = gallery / THUMBS
        self.folder = self.root / str(size)
        self.size = size
        self.scans = os.fsencode(scans)
        self.max_pixels = max_pixels
        self.ok: set[str] = set()

    def name(self, image_id: str) -> str:
        return f"{THUMBS}/{self.size}/{image_id}.jpg"

    def _make(self, image_id: str, path_raw: bytes) -> str | None:
        target = self.folder / f"{image_id}.jpg"
        try:
            # a str path (bytes would be taken for the file's content); surrogateescape
            # keeps names that are not UTF-8 intact
            im = load_rgb(os.fsdecode(os.path.join(self.scans, path_raw)), self.size,
                          max_pixels=self.max_pixels)
        except ImageRejected as exc:
            return exc.reason
        except OSError as exc:
            return f"cannot read the scan: {exc.strerror or exc}"
        im.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        with atomic_path(target) as tmp:
            im.save(tmp, format="JPEG", quality=85, optimize=True)
        return None

    def ensure(self, sources: dict[str, bytes], workers: int, progress: bool) -> ThumbStats:
        """Make the missing thumbnails of `sources` (image_id -> a file of that content)."""
        stats = ThumbStats()
        self.folder.mkdir(parents=True, exist_ok=True)
        have = {p.stem for p in self.folder.glob("*.jpg")}
        todo = {i: raw for i, raw in sources.items() if i not in have}
        stats.reused = len(sources) - len(todo)
        self.ok = set(sources) - set(todo)
        bar = progress_bar(len(todo), "thumbnails", "img", progress)
        # Pillow decodes and resizes outside the GIL, so threads use the cores.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for image_id, why in zip(todo, pool.map(lambda kv: self._make(*kv), todo.items())):
                bar.update(1)
                if why is None:
                    self.ok.add(image_id)
                    stats.made += 1
                    faults.point("report.thumb")
                else:
                    stats.failed[image_id] = why
        bar.close()
        return stats

    def prune(self, keep: set[str]) -> int:
        """Remove thumbnails of images no longer in the collection, and of other sizes (only
        files named as cbir names thumbnails: anything else put there is left alone)."""
        n = 0
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            if sub.is_dir() and sub.name.isdigit() and sub != self.folder:
                n += _remove_stale(sub, (), _THUMB_NAME)
                with contextlib.suppress(OSError):  # left where something else is in it
                    sub.rmdir()
        return n + _remove_stale(self.folder, (self.folder / f"{i}.jpg" for i in keep),
                                 _THUMB_NAME)


# --------------------------------------------------------------------------- HTML pieces

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 1.5em 3em;color:#222;background:#fafafa}
header{padding:.7em 0;border-bottom:1px solid #ccc;margin-bottom:1em}
header a{margin-right:1.2em}
h1{font-size:1.4em}
.pair{display:flex;gap:1.2em;align-items:flex-start;border:1px solid #ccc;border-radius:6px;
  background:#fff;margin:.8em 0;padding:.6em}
.pair .score{min-width:5.5em;font-size:1.25em;font-weight:600}
.kind{display:block;font-size:.7em;font-weight:400;color:#666}
.grid{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;width:260px;background:#fff;padding:4px;border-radius:4px}
figure img,.noimg{display:block;max-width:256px;max-height:256px;background:#eee}
.noimg{width:256px;height:96px;color:#666;font-size:12px;padding:4px;box-sizing:border-box}
figcaption{font-size:12px;overflow-wrap:anywhere}
.path{font-family:ui-monospace,monospace}
.master{outline:3px solid #2a7}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;background:#2a7;color:#fff}
.correct{outline:3px solid #2a7}.wrong{outline:3px solid #c33}.query{outline:3px solid #36c}
.missed{outline:3px dashed #c80}
.filter{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ddd}
.filter input[type=number]{width:6em}
nav.pages{margin:.6em 0}nav.pages a,nav.pages span{margin-right:.5em}
nav.pages a.off{opacity:.35}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.2em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.strip img{max-height:64px;max-width:96px;margin-right:2px;vertical-align:middle}
[hidden]{display:none!important}
"""

# Hides cards outside the score range; the range travels to other pages in the URL fragment.
_FILTER_JS = """
(function () {
  var lo = document.getElementById('lo'), hi = document.getElementById('hi');
  var ex = document.getElementById('exact'), shown = document.getElementById('shown');
  var cards = document.querySelectorAll('[data-score]');
  var q = {};
  location.hash.slice(1).split('&').forEach(function (kv) {
    var p = kv.split('='); if (p[0]) q[p[0]] = decodeURIComponent(p[1] || '');
  });
  if (q.lo) lo.value = q.lo;
  if (q.hi) hi.value = q.hi;
  if (ex && q.exact === '0') ex.checked = false;
  function apply() {
    var a = parseFloat(lo.value), b = parseFloat(hi.value), n = 0;
    for (var i = 0; i < cards.length; i++) {
      var c = cards[i], s = parseFloat(c.getAttribute('data-score'));
      var kind = c.getAttribute('data-kind');
      var ok = !(s < a) && !(s > b) && (!ex || ex.checked || kind !== 'exact');
      c.hidden = !ok; if (ok) n++;
    }
    shown.textContent = n;
    var frag = 'lo=' + encodeURIComponent(lo.value) + '&hi=' + encodeURIComponent(hi.value) +
               (ex && !ex.checked ? '&exact=0' : '');
    var links = document.querySelectorAll('a.page');
    for (var j = 0; j < links.length; j++) {
      var l = links[j], top = parseFloat(l.getAttribute('data-hi')),
          bottom = parseFloat(l.getAttribute('data-lo'));
      l.href = l.getAttribute('href').split('#')[0] + '#' + frag;
      l.className = (bottom > b || top < a) ? 'page off' : 'page';
    }
  }
  lo.addEventListener('input', apply); hi.addEventListener('input', apply);
  if (ex) ex.addEventListener('change', apply);
  apply();
})();
""".strip()

_JS_HASH = base64.b64encode(hashlib.sha256(_FILTER_JS.encode()).digest()).decode()
# Defence in depth: even a name that slipped past escaping could run no script of its own.
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{_JS_HASH}'")


def _page(title: str, body: str, *, script: bool = False) -> str:
    js = f"<script>{_FILTER_JS}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{e(_CSP)}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
            f'<header><a href="index.html">Overview</a><a href="pairs-0001.html">Pairs</a>'
            f'<a href="clusters-0001.html">Clusters</a><a href="evaluation.html">Evaluation</a>'
            f"</header><h1>{e(title)}</h1>\n{body}\n{js}</body></html>\n")


def _filter_box(count: int, lo: float, hi: float, exact: bool) -> str:
    lo, hi = math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4  # shown to 4 places: widen
    toggle = ('<label><input type="checkbox" id="exact" checked> byte-identical copies</label>'
              if exact else "")
    return (f'<div class="filter">Score from <input type="number" id="lo" step="0.001" '
            f'value="{lo:.4f}"> to <input type="number" id="hi" step="0.001" value="{hi:.4f}"> '
            f"{toggle} · showing <span id=\"shown\">{count}</span> of {count}</div>")


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _pages(n: int, size: int) -> int:
    return max(1, math.ceil(n / size))


def _nav(current: int, n_pages: int, name: Callable[[int], str],
         ranges: Sequence[tuple[float, float]] | None = None) -> str:
    """Links to the first, last, previous, next and nearby pages (never all of thousands)."""
    if n_pages <= 1:
        return ""
    shown = sorted({1, n_pages, *range(max(1, current - 3), min(n_pages, current + 3) + 1)})
    parts, last = [], 0
    for p in shown:
        if p > last + 1:
            parts.append("<span>…</span>")
        if p == current:
            parts.append(f"<span><b>{p}</b></span>")
        else:
            rng = (f' data-hi="{ranges[p - 1][0]:.6f}" data-lo="{ranges[p - 1][1]:.6f}"'
                   if ranges else "")
            parts.append(f'<a class="page" href="{e(name(p))}"{rng}>{p}</a>')
        last = p
    prev = f'<a href="{e(name(current - 1))}">‹ previous</a>' if current > 1 else ""
    nxt = f'<a href="{e(name(current + 1))}">next ›</a>' if current < n_pages else ""
    return f'<nav class="pages">Page {current} of {n_pages}: {prev} {" ".join(parts)} {nxt}</nav>'


class _Render:
    """Turns files into figure cards with thumbnails and links to the full scans."""

    def __init__(self, gallery: Path, scans: Path, files: dict[str, FileInfo],
                 thumbs: Thumbnails, failed: dict[str, str]) -> None:
        self.gallery = os.fsencode(os.path.abspath(gallery))
        self.scans = os.fsencode(os.path.abspath(scans))
        self.files = files
        self.thumbs = thumbs
        self.failed = failed  # image_id -> why it has no thumbnail

    def href(self, f: FileInfo) -> str:
        rel = os.path.relpath(os.path.join(self.scans, f.path_raw), self.gallery)
        return quote(rel, safe="/")

    def thumb(self, f: FileInfo | None, path: str, size: int | None = None) -> str:
        if f is None:
            return f'<div class="noimg">not in the collection now: {e(path)}</div>'
        if f.image_id not in self.thumbs.ok:
            why = self.failed.get(f.image_id, "not made")
            return f'<a href="{e(self.href(f))}"><div class="noimg">no preview: {e(why)}</div></a>'
        s = size or self.thumbs.size
        scale = min(1.0, s / max(f.width, f.height, 1))
        w, h = max(1, round(f.width * scale)), max(1, round(f.height * scale))
        return (f'<a href="{e(self.href(f))}"><img src="{e(self.thumbs.name(f.image_id))}" '
                f'width="{w}" height="{h}" alt="{e(f.path)}" title="{e(f.path)}"></a>')

    def card(self, path: str, *, cls: str = "", note: str = "") -> str:
        f = self.files.get(path)
        meta = (f"{f.width}×{f.height} · {_human_bytes(f.bytes)} · {e(f.format)} · "
                f"first seen in run {f.first_run}" if f else "")
        return (f'<figure class="{e(cls)}">{self.thumb(f, path)}<figcaption>'
                f'<span class="path">{e(path)}</span><br>{meta}{note}</figcaption></figure>')

    def pair(self, row: dict[str, Any]) -> str:
        sides = []
        for side in ("a", "b"):
            path = row[f"path_{side}"]
            master = path == row["master_path"]
            note = (f'<br><span class="badge">likely master</span> {e(row["master_reason"])}'
                    if master else "")
            sides.append(self.card(path, cls="master" if master else "", note=note))
        kind = "byte-identical copy" if row["kind"] == "exact" else "near-duplicate"
        return (f'<article class="pair" data-score="{row["score"]:.6f}" '
                f'data-kind="{e(row["kind"])}">'
                f'<div class="score">{row["score"]:.4f}<span class="kind">{kind}</span></div>'
                f'{"".join(sides)}</article>')


# --------------------------------------------------------------------------- data

def _rows(con: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = con.execute(sql, list(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


@dataclass
class _Evaluation:
    label: str
    k: int
    queries: list[dict[str, Any]]  # path, neighbours [(path, rank, score, correct)], missed, n_rel
    metrics: dict[str, dict[str, float | None]] | None


def _evaluation(settings: Settings, plots_dir: Path) -> tuple[_Evaluation | None, str, list[Path]]:
    """The model's ranking of the ground-truth queries, and its plots; or why there is none."""
    if settings.data.ground_truth is None:
        return None, "no ground truth configured (data.ground_truth)", []
    from .calibrate import calibrate, configured_thresholds
    from .evaluate import rank_model  # torch and faiss load only when there is ground truth

    try:
        model = rank_model(settings)
    except CbirError as exc:
        return None, str(exc), []
    cfg = settings.evaluate
    k = max(cfg.ks)
    cal = calibrate(model.ranked, cfg.precision_target)
    pair_threshold, _ = configured_thresholds(settings)
    written = (plots.pr_curve(model.ranked, plots_dir, threshold=pair_threshold,
                              target_precision=cfg.precision_target)
               + plots.at_k(model.ranked, k, plots_dir)
               + plots.score_histogram(model.ranked, plots_dir,
                                       threshold=pair_threshold,
                                       calibrated=cal.threshold if cal.reached else None,
                                       target_precision=cfg.precision_target))
    by_query: dict[str, list[tuple[str, int, float, bool]]] = {}
    for r in model.neighbours:
        by_query.setdefault(r["query_path"], []).append(
            (r["neighbor_path"], r["rank"], r["score"], r["correct"]))
    members: dict[str, list[str]] = {}
    for row, g in model.group_of.items():
        members.setdefault(g, []).append(model.path_of.get(model.image_ids[row], "?"))
    queries = []
    for q, n_rel in zip(model.query_rows, model.ranked.n_relevant):
        path = model.path_of.get(model.image_ids[q], "?")
        nbrs = by_query.get(path, [])
        found = {p for p, _, _, ok in nbrs if ok}
        missed = sorted(p for p in members[model.group_of[int(q)]] if p != path and p not in found)
        queries.append({"path": path, "neighbours": nbrs, "missed": missed, "n_rel": int(n_rel),
                        "hits": len(found)})
    # Worst first: these are the queries worth looking at.
    queries.sort(key=lambda x: (x["hits"] / x["n_rel"], x["path"]))
    metrics_file = layout(settings).metrics_json
    table = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return _Evaluation(label=model.label, k=k, queries=queries, metrics=table), "", written


# --------------------------------------------------------------------------- the step

@dataclass
class ReportSummary:
    n_pairs: int = 0
    n_pairs_total: int = 0
    n_pair_pages: int = 0
    n_clusters: int = 0
    n_queries: int = 0
    evaluation_note: str = ""
    thumbs: ThumbStats = field(default_factory=ThumbStats)
    index: Path | None = None
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        capped = (f" (the strongest {self.n_pairs} of {self.n_pairs_total})"
                  if self.n_pairs < self.n_pairs_total else "")
        t = self.thumbs
        out = [f"report: {_n(self.n_pairs, 'pair')}{capped} on {_n(self.n_pair_pages, 'page')}, "
               f"{_n(self.n_clusters, 'cluster')}, {self.n_queries} evaluated queries; thumbnails "
               f"{t.made} made, {t.reused} reused, {t.pruned} pruned; {self.seconds:.1f} s",
               f"  open {self.index}"]
        if self.evaluation_note:
            out.append(f"  no evaluation pages: {self.evaluation_note}")
        if t.failed:
            out.append(f"  {len(t.failed)} images without a preview, e.g. "
                       f"{next(iter(t.failed.values()))}")
        out += [f"  plot {p}" for p in self.plots if p.suffix == ".png"]
        return out


def run_report(settings: Settings, *, progress: bool = False) -> ReportSummary:
    """Write the review gallery and the plots under data.reports_dir."""
    t0 = time.perf_counter()
    cfg = settings.report
    lay = layout(settings)
    gallery, plots_dir = lay.gallery, lay.plots
    for folder in (gallery, gallery / THUMBS / str(cfg.thumb_size), plots_dir):
        clean_stale_tmp(folder)  # left by a killed run
    summary = ReportSummary()

    con = catalog.connect(settings)
    try:
        tables = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        if "pair_report" not in tables or "cluster_report" not in tables:
            raise CbirError("no pairs in the catalogue: run `cbir pairs` first")
        summary.n_pairs_total = con.execute("SELECT count(*) FROM pair_report").fetchone()[0]
        pairs = _rows(con, "SELECT * FROM pair_report ORDER BY score DESC, kind, path_a, path_b "
                           "LIMIT ?", [cfg.max_pairs or _NO_LIMIT])
        clusters = _rows(con, "SELECT * FROM cluster_report ORDER BY size DESC, cluster_id")
        cluster_pairs = _rows(con, """
            SELECT ca.cluster_id, p.*, count(*) OVER (PARTITION BY ca.cluster_id) AS n_in_cluster
            FROM pair_report p
            JOIN clusters ca ON ca.image_id = p.image_a
            JOIN clusters cb ON cb.image_id = p.image_b AND cb.cluster_id = ca.cluster_id
            WHERE p.kind = 'near'
            QUALIFY row_number() OVER (PARTITION BY ca.cluster_id
                                       ORDER BY p.score DESC, p.path_a, p.path_b) <= ?
            ORDER BY ca.cluster_id, p.score DESC, p.path_a, p.path_b""", [cfg.page_size])
        n_images = con.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
    finally:
        con.close()

    plots_written: list[Path] = []
    ev, summary.evaluation_note, plots_written = _evaluation(settings, plots_dir)
    plots_written += plots.training_loss(
        plots.read_history(lay.history), plots_dir)

    paths = {p for r in pairs for p in (r["path_a"], r["path_b"])}
    paths |= {p for c in clusters for p in c["members"]}
    paths |= {p for r in cluster_pairs for p in (r["path_a"], r["path_b"])}
    if ev:
        for q in ev.queries:
            paths |= {q["path"], *q["missed"], *(n[0] for n in q["neighbours"])}
    manifest = load_manifest(settings)
    files = _files_by_path(manifest, paths)

    thumbs = Thumbnails(gallery, cfg.thumb_size, lay.scans,
                        settings.ingest.max_pixels)
    sources: dict[str, bytes] = {}
    for f in files.values():
        sources.setdefault(f.image_id, f.path_raw)
    summary.thumbs = thumbs.ensure(sources, settings.workers, progress)
    render = _Render(gallery, lay.scans, files, thumbs,
                     summary.thumbs.failed)

    pages: dict[str, str] = {}
    n_exact = sum(1 for r in pairs if r["kind"] == "exact")
    summary.n_pair_pages = _pair_pages(pages, render, pairs, cfg.page_size, n_exact > 0)
    _cluster_pages(pages, render, clusters, cluster_pairs, cfg.page_size)
    _evaluation_pages(pages, render, ev, summary.evaluation_note, plots_written, settings)
    pages["index.html"] = _index_page(settings, n_images, pairs, summary.n_pairs_total,
                                      summary.n_pair_pages, clusters, ev, plots_written)
    for name, text in pages.items():
        faults.point("report.page")
        _write_if_changed(text, gallery / name)
    # What the new pages no longer show goes last: a run killed before this point leaves every
    # page, old or new, with its images.
    _remove_stale(gallery, [gallery / n for n in pages], _PAGE_NAME)
    _remove_stale(plots_dir, plots_written, _PLOT_NAME)
    summary.thumbs.pruned = thumbs.prune(_present_ids(manifest))

    summary.n_pairs, summary.n_clusters = len(pairs), len(clusters)
    summary.n_queries = len(ev.queries) if ev else 0
    summary.index, summary.plots = gallery / "index.html", plots_written
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_if_changed(text: str, target: Path) -> None:
    # An unchanged page is left alone: no write (each is fsynced), and its mtime says so.
    try:
        if target.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text(text, target)


def _present_ids(manifest: pa.Table) -> set[str]:
    t = manifest.select(["image_id", "status"])
    t = t.filter(pc.is_in(t["status"], value_set=pa.array(list(PRESENT))))
    return set(t["image_id"].to_pylist())


# The names report writes: only files named so are ever deleted (a user's own file put in the
# gallery or plots folder stays).
_PAGE_NAME = re.compile(r"(index|evaluation)\.html|(pairs|clusters|queries)-\d{4,}\.html"
                        r"|cluster-\d{5,}(-\d+)?\.html|query-\d{5,}\.html")
_PLOT_NAME = re.compile(rf"({'|'.join(map(re.escape, plots.NAMES))})\.(png|csv)")
_THUMB_NAME = re.compile(r"[0-9a-f]{16}\.jpg")


def _remove_stale(folder: Path, keep: Iterable[Path], own: re.Pattern[str]) -> int:
    """Delete this step's earlier outputs that this run did not write (e.g. surplus pages):
    files whose names match `own`, the names this step writes. Returns how many."""
    keep_names = {p.name for p in keep}
    n = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if own.fullmatch(p.name) and p.name not in keep_names and p.is_file():
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------- pages

def _pair_name(p: int) -> str:
    return f"pairs-{p:04d}.html"


def _pair_pages(pages: dict[str, str], render: _Render, pairs: list[dict[str, Any]],
                size: int, exact: bool) -> int:
    n_pages = _pages(len(pairs), size)
    chunks = [pairs[i * size:(i + 1) * size] for i in range(n_pages)]
    ranges = [(c[0]["score"], c[-1]["score"]) if c else (1.0, 0.0) for c in chunks]
    # The filter starts at the range of the whole gallery, so no page is dimmed until narrowed.
    lo = min((r["score"] for r in pairs), default=0.0)
    hi = max((r["score"] for r in pairs), default=1.0)
    for p, chunk in enumerate(chunks, start=1):
        nav = _nav(p, n_pages, _pair_name, ranges)
        body = (_filter_box(len(chunk), lo, hi, exact) + nav
                + ("".join(render.pair(r) for r in chunk) or "<p>No pairs.</p>") + nav)
        pages[_pair_name(p)] = _page(f"Pairs by score ({p}/{n_pages})", body, script=True)
    return n_pages


def _cluster_name(cluster_id: int, p: int = 1) -> str:
    return f"cluster-{cluster_id:05d}.html" if p == 1 else f"cluster-{cluster_id:05d}-{p}.html"


def _cluster_pages(pages: dict[str, str], render: _Render, clusters: list[dict[str, Any]],
                   cluster_pairs: list[dict[str, Any]], size: int) -> None:
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for r in cluster_pairs:
        by_cluster.setdefault(r["cluster_id"], []).append(r)
    n_pages = _pages(len(clusters), size)
    for p in range(1, n_pages + 1):
        rows = []
        for c in clusters[(p - 1) * size:p * size]:
            strip = "".join(render.thumb(render.files.get(m), m, 64) for m in c["members"][:8])
            if len(c["members"]) > 8:
                strip += f" and {len(c['members']) - 8} more"
            rows.append(f'<tr><td><a href="{_cluster_name(c["cluster_id"])}">'
                        f'{c["cluster_id"]}</a></td><td class="num">{c["size"]}</td>'
                        f'<td class="num">{c["weakest_link"]:.4f}</td>'
                        f'<td class="path">{e(c["master_path"])}</td>'
                        f'<td class="strip">{strip}</td></tr>')
        name = lambda i: f"clusters-{i:04d}.html"  # noqa: E731
        body = ((_nav(p, n_pages, name) + "<table><tr><th>cluster</th><th>size</th><th>weakest "
                 "link</th><th>likely master</th><th>members</th></tr>" + "".join(rows)
                 + "</table>") if clusters else "<p>No clusters.</p>")
        pages[name(p)] = _page(f"Clusters, largest first ({p}/{n_pages})", body)

    for c in clusters:
        cid, members = c["cluster_id"], c["members"]
        m_pages = _pages(len(members), size)
        for p in range(1, m_pages + 1):
            cards = "".join(
                render.card(m, cls="master" if m == c["master_path"] else "",
                            note='<br><span class="badge">likely master</span>'
                            if m == c["master_path"] else "")
                for m in members[(p - 1) * size:p * size])
            nav = _nav(p, m_pages, lambda i, cid=cid: _cluster_name(cid, i))
            body = (f"<p>{c['size']} images; weakest link {c['weakest_link']:.4f} (the lowest "
                    f"similarity that keeps the cluster connected); likely master "
                    f'<span class="path">{e(c["master_path"])}</span>.</p>'
                    f'<h2>Members</h2>{nav}<div class="grid">{cards}</div>{nav}')
            if p == 1:
                prs = by_cluster.get(cid, [])
                total = prs[0]["n_in_cluster"] if prs else 0
                more = (f" (the strongest {len(prs)} of {total}; query `pair_report` for all)"
                        if total > len(prs) else "")
                lo = min((r["score"] for r in prs), default=0.0)
                body += (f"<h2>Pairs within the cluster{e(more)}</h2>"
                         + _filter_box(len(prs), lo, 1.0, False)
                         + "".join(render.pair(r) for r in prs))
            pages[_cluster_name(cid, p)] = _page(f"Cluster {cid}" + (
                f" ({p}/{m_pages})" if m_pages > 1 else ""), body, script=p == 1)


def _metrics_table(table: dict[str, dict[str, float | None]], ks: Sequence[int],
                   precision: float, labels: dict[str, str]) -> str:
    pk = precision_key(precision)
    cols = [(f"P@{k}", f"precision@{k}") for k in ks] + [(f"R@{k}", f"recall@{k}") for k in ks]
    cols += [(f"F1@{k}", f"f1@{k}") for k in ks] + [(f"mAP@{k}", f"map@{k}") for k in ks]
    cols += [("µAP", "micro_ap"), (f"R@P{precision:g}", f"recall@{pk}"),
             (f"threshold@P{precision:g}", f"threshold@{pk}")]
    head = "".join(f"<th>{e(h)}</th>" for h, _ in cols)
    rows = []
    for name, vals in table.items():
        cells = "".join(
            f'<td class="num">{"n/a" if vals.get(key) is None else f"{vals[key]:.4f}"}</td>'
            for _, key in cols)
        rows.append(f"<tr><td>{e(labels.get(name, name))}</td>{cells}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def _plot_imgs(written: Sequence[Path], names: Sequence[str]) -> str:
    have = {p.stem for p in written if p.suffix == ".png"}
    return "".join(f'<img src="../{PLOTS}/{n}.png" alt="{e(n)}" width="600" height="450"> '
                   for n in names if n in have)


def _query_name(i: int) -> str:
    return f"query-{i:05d}.html"


def _evaluation_pages(pages: dict[str, str], render: _Render, ev: _Evaluation | None,
                      note: str, written: Sequence[Path], settings: Settings) -> None:
    if ev is None:
        loss = _plot_imgs(written, [plots.TRAIN_LOSS])
        pages["evaluation.html"] = _page("Evaluation", f"<p>No evaluation: {e(note)}.</p>{loss}")
        return
    cfg, size = settings.evaluate, settings.report.page_size
    table = (_metrics_table(ev.metrics, sorted(set(cfg.ks)), cfg.precision_target,
                            {"model": ev.label})
             if ev.metrics else "<p>No metrics.json yet: run <code>cbir evaluate</code>.</p>")
    n_pages = _pages(len(ev.queries), size)
    qlist = lambda p: f"queries-{p:04d}.html"  # noqa: E731
    body = (f"<p>{len(ev.queries)} queries (images whose ground-truth group has two or more "
            f"members); model: {e(ev.label)}.</p>{table}<h2>Plots</h2>"
            + _plot_imgs(written, [plots.PR_CURVE, plots.AT_K, plots.SCORES, plots.TRAIN_LOSS])
            + f'<h2>Queries</h2><p><a href="{qlist(1)}">Every query with its top {ev.k}</a>, '
              f"worst first.</p>")
    pages["evaluation.html"] = _page("Evaluation", body)
    for p in range(1, n_pages + 1):
        rows = []
        for i in range((p - 1) * size, min(p * size, len(ev.queries))):
            q = ev.queries[i]
            thumb = render.thumb(render.files.get(q["path"]), q["path"], 64)
            rows.append(f'<tr><td><a href="{_query_name(i + 1)}" class="path">{e(q["path"])}</a>'
                        f'</td><td class="num">{q["hits"]} of {q["n_rel"]}</td>'
                        f'<td class="strip">{thumb}</td></tr>')
        nav = _nav(p, n_pages, qlist)
        pages[qlist(p)] = _page(
            f"Queries, worst first ({p}/{n_pages})",
            nav + f"<table><tr><th>query</th><th>duplicates in the top {ev.k}</th><th></th></tr>"
            + "".join(rows) + "</table>" + nav)
    for i, q in enumerate(ev.queries, start=1):
        cards = [render.card(q["path"], cls="query", note="<br><b>query</b>")]
        for path, rank, score, ok in q["neighbours"]:
            mark = "✓ correct" if ok else "✗ wrong"
            cards.append(render.card(path, cls="correct" if ok else "wrong",
                                     note=f"<br><b>#{rank}</b> {score:.4f} · {mark}"))
        missed = "".join(render.card(m, cls="missed", note="<br>missed") for m in q["missed"])
        body = (f"<p>{q['hits']} of its {q['n_rel']} true duplicates in the top {ev.k}.</p>"
                f'<div class="grid">{"".join(cards)}</div>'
                + (f'<h2>Missed duplicates</h2><div class="grid">{missed}</div>' if missed else ""))
        pages[_query_name(i)] = _page(f"Query {i}: {q['path']}", body)


def _threshold(value: float | None) -> str:
    return "(not calibrated yet)" if value is None else f"{value:.4f}"


def _index_page(settings: Settings, n_images: int, pairs: list[dict[str, Any]], n_total: int,
                n_pages: int, clusters: list[dict[str, Any]], ev: _Evaluation | None,
                written: Sequence[Path]) -> str:
    n_exact = sum(1 for r in pairs if r["kind"] == "exact")
    size = settings.report.page_size
    capped = (f" The gallery shows the strongest {len(pairs)} of {n_total}; query the "
              f"<code>pair_report</code> view for all." if len(pairs) < n_total else "")
    page_rows = []
    for p in range(1, n_pages + 1):
        chunk = pairs[(p - 1) * size:p * size]
        if chunk:
            page_rows.append(f'<tr><td><a href="{_pair_name(p)}">page {p}</a></td>'
                             f'<td class="num">{chunk[0]["score"]:.4f}</td>'
                             f'<td class="num">{chunk[-1]["score"]:.4f}</td></tr>')
    largest = clusters[0]["size"] if clusters else 0
    evaluation = (f'<a href="evaluation.html">Metrics, plots and {len(ev.queries)} queries</a>'
                  if ev else '<a href="evaluation.html">No evaluation</a>')
    from .calibrate import configured_thresholds

    pair_t, cluster_t = configured_thresholds(settings)
    body = (f"<p>{n_images} images. {len(pairs) - n_exact} near-duplicate pairs with similarity "
            f"at least {_threshold(pair_t)} and {n_exact} byte-identical copies.{capped} "
            f'<a href="clusters-0001.html">{_n(len(clusters), "cluster")}</a> (similarity at least '
            f"{_threshold(cluster_t)}; largest {largest}). {evaluation}.</p>"
            "<p>The likely master of a pair has the higher resolution, else the larger file, else "
            "was seen first. Thumbnails link to the full scans.</p>"
            "<h2>Pairs, strongest first</h2><table><tr><th></th><th>from score</th>"
            f"<th>to score</th></tr>{''.join(page_rows)}</table>"
            + _plot_imgs(written, [plots.TRAIN_LOSS]))
    return _page("Near-duplicate review", body)
