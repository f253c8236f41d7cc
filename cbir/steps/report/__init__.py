"""The review gallery: a static HTML site for archivists, under data/reports/gallery/.

It opens from the file system (no server): pages link to each other, to thumbnails and to the
scans themselves by relative URLs. Pairs come from the catalogue's `pair_report` view (so the
gallery and SQL agree on scores and on the likely master), clusters from `cluster_report`, the
evaluation from the same ranking `cbir evaluate` scores. Every file name is escaped; a page's only
script is the score filter, and its Content-Security-Policy allows no other.

The modules: `thumbnails` (made once, reused), `evaluation` (the ranked queries and plots),
`pages` (what each page holds, from the rows), `render` (the Jinja2 templates in `templates/`,
the style sheet, the script and the policy), `files` (the names written; stale ones removed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ... import faults, plots
from ...config import Settings
from ...fsutil import clean_stale_tmp
from ...safetext import counted
from ...store import catalog
from ...store.layout import layout
from ...store.manifest import load_manifest
from .evaluation import Evaluation, evaluation
from .files import PAGE_NAME, PLOT_NAME, remove_stale, write_if_changed
from .pages import cluster_pages, evaluation_pages, index_page, pair_pages
from .render import Pages
from .thumbnails import THUMBS, Thumbnails, ThumbStats, files_by_path, present_ids

__all__ = ["ReportSummary", "run_report"]


@dataclass
class ReportSummary:
    """What `cbir report` wrote, for its lines on the terminal and the nightly report."""

    n_pairs: int = 0
    n_pairs_total: int = 0
    n_pair_pages: int = 0
    n_clusters: int = 0
    n_queries: int = 0
    evaluation_note: str = ""
    metrics_note: str = ""  # evaluation pages without metrics: why (Evaluation.metrics_note)
    thumbs: ThumbStats = field(default_factory=ThumbStats)
    index: Path | None = None
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """What `cbir report` prints."""
        capped = (
            f" (the strongest {self.n_pairs} of {self.n_pairs_total})"
            if self.n_pairs < self.n_pairs_total
            else ""
        )
        t = self.thumbs
        out = [
            f"report: {counted(self.n_pairs, 'pair')}{capped} on "
            f"{counted(self.n_pair_pages, 'page')}, {counted(self.n_clusters, 'cluster')}, "
            f"{self.n_queries} evaluated queries; thumbnails {t.made} made, {t.reused} "
            f"reused, {t.pruned} pruned; {self.seconds:.1f} s",
            f"  open {self.index}",
        ]
        if self.evaluation_note:
            out.append(f"  no evaluation pages: {self.evaluation_note}")
        if self.metrics_note:
            out.append(f"  no metrics: {self.metrics_note}; run `cbir evaluate` again")
        if t.failed:
            out.append(
                f"  {len(t.failed)} images without a preview, e.g. {next(iter(t.failed.values()))}"
            )
        out += [f"  plot {p}" for p in self.plots if p.suffix == ".png"]
        return out


def _shown_paths(rows: catalog.ReportRows, ev: Evaluation | None) -> set[str]:
    """Every file a page shows: only their manifest rows are read, only they get thumbnails."""
    paths = {p for r in rows.pairs for p in (r["path_a"], r["path_b"])}
    paths |= {p for c in rows.clusters for p in c["members"]}
    paths |= {p for r in rows.cluster_pairs for p in (r["path_a"], r["path_b"])}
    for q in ev.queries if ev else ():
        paths |= {q["path"], *q["missed"], *(n[0] for n in q["neighbours"])}
    return paths


def run_report(settings: Settings, *, progress: bool = False) -> ReportSummary:
    """Write the review gallery and the plots under data.reports_dir."""
    t0 = time.perf_counter()
    cfg = settings.report
    lay = layout(settings)
    gallery, plots_dir = lay.gallery, lay.plots
    for folder in (gallery, gallery / THUMBS / str(cfg.thumb_size), plots_dir):
        clean_stale_tmp(folder)  # left by a killed run
    summary = ReportSummary()
    rows = catalog.report_rows(settings, cfg.max_pairs, cfg.page_size)
    summary.n_pairs_total = rows.n_pairs_total

    ev, summary.evaluation_note, written = evaluation(settings, plots_dir)
    summary.metrics_note = ev.metrics_note if ev is not None else ""
    written += plots.training_loss(plots.read_history(lay.history), plots_dir)

    manifest = load_manifest(settings)
    files = files_by_path(manifest, _shown_paths(rows, ev))
    thumbs = Thumbnails(gallery, cfg.thumb_size, lay.scans, settings.ingest.max_pixels)
    sources: dict[str, bytes] = {}
    for f in files.values():
        sources.setdefault(f.image_id, f.path_raw)
    summary.thumbs = thumbs.ensure(sources, settings.decode_workers, progress)
    out = Pages(gallery, lay.scans, files, thumbs, summary.thumbs.failed)

    pages: dict[str, str] = {}
    n_exact = sum(1 for r in rows.pairs if r["kind"] == "exact")
    summary.n_pair_pages = pair_pages(pages, out, rows.pairs, cfg.page_size, n_exact > 0)
    cluster_pages(pages, out, rows, cfg.page_size)
    evaluation_pages(pages, out, ev, summary.evaluation_note, written, settings)
    index_page(pages, out, settings, rows, summary.n_pair_pages, ev, written)
    for name, text in pages.items():
        faults.point("report.page")
        write_if_changed(text, gallery / name)
    # What the new pages no longer show goes last: a run killed before this point leaves every
    # page, old or new, with its images.
    remove_stale(gallery, [gallery / n for n in pages], PAGE_NAME)
    remove_stale(plots_dir, written, PLOT_NAME)
    summary.thumbs.pruned = thumbs.prune(present_ids(manifest))

    summary.n_pairs, summary.n_clusters = len(rows.pairs), len(rows.clusters)
    summary.n_queries = len(ev.queries) if ev else 0
    summary.index, summary.plots = gallery / "index.html", written
    summary.seconds = time.perf_counter() - t0
    return summary
