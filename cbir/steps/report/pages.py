"""The gallery's pages, built from the catalogue's rows: what each page holds and how long
lists are split into pages of `report.page_size`. The HTML is in the templates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import plots
from ...config import Settings
from ...metrics import precision_key
from ...store.catalog import ReportRows
from ...store.pairs import CONFIRMED, PARTIAL
from .evaluation import Evaluation
from .files import cluster_page, clusters_page, pair_page, queries_page, query_page
from .render import Pages

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class PageLink:
    """A link to another page of a list, the current page, or a gap between them."""

    number: int | None  # None: a gap
    href: str | None = None  # None: the current page
    scores: tuple[float, float] | None = None  # the first and last score on that page


@dataclass(frozen=True)
class Nav:
    """Links to the first, last, previous, next and nearby pages (never all of thousands)."""

    current: int
    pages: int
    previous: str | None
    next: str | None
    links: list[PageLink]


def nav(
    current: int,
    n_pages: int,
    name: Callable[[int], str],
    scores: Sequence[tuple[float, float]] | None = None,
) -> Nav | None:
    """The links of page `current` of `n_pages` (named by `name`); None when there is one."""
    if n_pages <= 1:
        return None
    near = sorted({1, n_pages, *range(max(1, current - 3), min(n_pages, current + 3) + 1)})
    links, last = [], 0
    for p in near:
        if p > last + 1:
            links.append(PageLink(None))
        if p == current:
            links.append(PageLink(p))
        else:
            links.append(PageLink(p, name(p), scores[p - 1] if scores else None))
        last = p
    return Nav(
        current,
        n_pages,
        name(current - 1) if current > 1 else None,
        name(current + 1) if current < n_pages else None,
        links,
    )


@dataclass(frozen=True)
class ScoreFilter:
    """The score range the filter starts from, and whether to offer hiding exact copies."""

    count: int
    lo: float
    hi: float
    exact: bool


def score_filter(count: int, lo: float, hi: float, exact: bool) -> ScoreFilter:
    """The range is shown to 4 places: widened to them, so it still holds every card."""
    return ScoreFilter(count, math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4, exact)


def n_pages(n: int, size: int) -> int:
    """Pages for `n` items, `size` a page; an empty list still has its one page."""
    return max(1, math.ceil(n / size))


def plots_shown(written: Sequence[Path], names: Sequence[str]) -> list[str]:
    """Those of the plots `names` written as PNG this run."""
    have = {p.stem for p in written if p.suffix == ".png"}
    return [n for n in names if n in have]


def pair_pages(pages: dict[str, str], out: Pages, pairs: Rows, size: int, exact: bool) -> int:
    """The pairs, strongest first; returns the number of pages."""
    count = n_pages(len(pairs), size)
    chunks = [pairs[i * size : (i + 1) * size] for i in range(count)]
    scores = [(c[0]["score"], c[-1]["score"]) if c else (1.0, 0.0) for c in chunks]
    # The filter starts at the range of the whole gallery, so no page is dimmed until narrowed.
    lo = min((r["score"] for r in pairs), default=0.0)
    hi = max((r["score"] for r in pairs), default=1.0)
    for p, chunk in enumerate(chunks, start=1):
        pages[pair_page(p)] = out.render(
            "pairs.html.j2",
            f"Pairs by score ({p}/{count})",
            script=True,
            rows=chunk,
            pages=nav(p, count, pair_page, scores),
            score_filter=score_filter(len(chunk), lo, hi, exact),
        )
    return count


def cluster_pages(pages: dict[str, str], out: Pages, rows: ReportRows, size: int) -> None:
    """The list of clusters, largest first, and each cluster's pages of members."""
    clusters = rows.clusters
    count = n_pages(len(clusters), size)
    for p in range(1, count + 1):
        pages[clusters_page(p)] = out.render(
            "clusters.html.j2",
            f"Clusters, largest first ({p}/{count})",
            clusters=clusters[(p - 1) * size : p * size],
            pages=nav(p, count, clusters_page),
        )
    by_cluster: dict[int, Rows] = {}
    for r in rows.cluster_pairs:
        by_cluster.setdefault(r["cluster_id"], []).append(r)
    for c in clusters:
        _one_cluster(pages, out, c, by_cluster.get(c["cluster_id"], []), size)


def _one_cluster(
    pages: dict[str, str], out: Pages, cluster: dict[str, Any], pairs: Rows, size: int
) -> None:
    """A cluster's members, a page at a time; the first page also shows its strongest pairs."""
    cid, members = cluster["cluster_id"], cluster["members"]
    count = n_pages(len(members), size)
    lo = min((r["score"] for r in pairs), default=0.0)
    for p in range(1, count + 1):
        first = p == 1
        pages[cluster_page(cid, p)] = out.render(
            "cluster.html.j2",
            f"Cluster {cid}" + (f" ({p}/{count})" if count > 1 else ""),
            script=first,
            cluster=cluster,
            members=members[(p - 1) * size : p * size],
            pages=nav(p, count, lambda i: cluster_page(cid, i)),
            pairs=pairs if first else None,
            total=pairs[0]["n_in_cluster"] if pairs else 0,
            score_filter=score_filter(len(pairs), lo, 1.0, False),
        )


def metric_columns(ks: Sequence[int], precision: float) -> list[tuple[str, str]]:
    """The evaluation table's columns: (heading, key in metrics.json)."""
    pk = precision_key(precision)
    cols = [(f"P@{k}", f"precision@{k}") for k in ks] + [(f"R@{k}", f"recall@{k}") for k in ks]
    cols += [(f"F1@{k}", f"f1@{k}") for k in ks] + [(f"mAP@{k}", f"map@{k}") for k in ks]
    return [
        *cols,
        ("µAP", "micro_ap"),
        (f"R@P{precision:g}", f"recall@{pk}"),
        (f"threshold@P{precision:g}", f"threshold@{pk}"),
    ]


def evaluation_pages(
    pages: dict[str, str],
    out: Pages,
    ev: Evaluation | None,
    note: str,
    written: Sequence[Path],
    settings: Settings,
) -> None:
    """The evaluation page (or why there is none), the list of queries, and each query."""
    if ev is None:
        pages["evaluation.html"] = out.render(
            "evaluation.html.j2",
            "Evaluation",
            ev=None,
            note=note,
            plot_names=plots_shown(written, [plots.TRAIN_LOSS]),
        )
        return
    cfg, size = settings.evaluate, settings.report.page_size
    pages["evaluation.html"] = out.render(
        "evaluation.html.j2",
        "Evaluation",
        ev=ev,
        columns=metric_columns(sorted(set(cfg.ks)), cfg.precision_target),
        plot_names=plots_shown(
            written, [plots.PR_CURVE, plots.AT_K, plots.SCORES, plots.TRAIN_LOSS]
        ),
    )
    numbered = list(enumerate(ev.queries, start=1))
    count = n_pages(len(numbered), size)
    for p in range(1, count + 1):
        pages[queries_page(p)] = out.render(
            "queries.html.j2",
            f"Queries, worst first ({p}/{count})",
            k=ev.k,
            queries=numbered[(p - 1) * size : p * size],
            pages=nav(p, count, queries_page),
        )
    for i, q in numbered:
        pages[query_page(i)] = out.render("query.html.j2", f"Query {i}: {q['path']}", q=q, k=ev.k)


def index_page(
    pages: dict[str, str],
    out: Pages,
    settings: Settings,
    rows: ReportRows,
    pairs_pages: int,
    ev: Evaluation | None,
    written: Sequence[Path],
) -> None:
    """The overview: what the collection holds, at which thresholds, and where to look."""
    from ..calibrate import configured_thresholds

    pair_t, cluster_t = configured_thresholds(settings)
    pairs, size = rows.pairs, settings.report.page_size
    n_exact = sum(1 for r in pairs if r["kind"] == "exact")
    chunks = ((p, pairs[(p - 1) * size : p * size]) for p in range(1, pairs_pages + 1))
    pages["index.html"] = out.render(
        "index.html.j2",
        "Near-duplicate review",
        n_images=rows.n_images,
        n_near=len(pairs) - n_exact,
        n_exact=n_exact,
        n_shown=len(pairs),
        n_total=rows.n_pairs_total,
        pair_threshold=pair_t,
        cluster_threshold=cluster_t,
        n_clusters=len(rows.clusters),
        largest=rows.clusters[0]["size"] if rows.clusters else 0,
        n_queries=len(ev.queries) if ev else None,
        plot_names=plots_shown(written, [plots.TRAIN_LOSS]),
        page_scores=[(p, c[0]["score"], c[-1]["score"]) for p, c in chunks if c],
        checked=checked(pairs),
    )


def checked(pairs: Rows) -> dict[str, int] | None:
    """How many of `pairs` geometric verification found the same picture (`full`), a partial
    copy (`partial`) or did not confirm (`none`); None when it checked none."""
    out = {"full": 0, "partial": 0, "none": 0}
    for r in pairs:
        rel = r.get("relation")
        if rel is not None:
            out["partial" if rel in PARTIAL else "full" if rel in CONFIRMED else "none"] += 1
    return out if any(out.values()) else None
