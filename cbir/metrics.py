"""Near-duplicate retrieval metrics: pure numpy, no I/O.

Conventions (the project's evaluation contract):

* A *query* is an item whose ground-truth group has at least 2 members. The query is removed from
  its own result list and ``n_relevant(q) = group size - 1``.
* Rank metrics for a cut-off K, averaged over queries:
  ``P@K = hits@K / K`` (divided by K even when fewer than K results came back),
  ``R@K = hits@K / n_relevant``, ``F1@K`` = mean of the per-query harmonic mean of P@K and R@K
  (0 when both are 0; *not* the F1 of the averaged P and R), and
  ``mAP@K`` = mean of ``AP@K = sum_{k<=K} P@k * rel_k / min(K, n_relevant)``.
* Pair metrics (µAP, recall at a precision, PR curve) pool every returned (query, neighbour, score)
  pair of every query into one list sorted by score, descending; the number of positives is
  ``sum_q n_relevant(q)``, so relevant items that were never retrieved count as misses. This is the
  micro average precision of the DISC21 / SSCD copy-detection evaluation.
* Ties in score are broken pessimistically, as in DISC21: among pairs with equal scores the
  non-relevant ones come first. The result is deterministic, independent of input order, and a
  constant score cannot inflate µAP. Scores are similarities: higher means more alike (negate
  distances before building :class:`RankedResults`).
* With no queries every averaged metric is ``nan``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .safetext import md_cell

__all__ = [
    "RankedResults",
    "build_ranked_results",
    "evaluate",
    "f1_at_k",
    "map_at_k",
    "markdown_table",
    "micro_ap",
    "pr_curve",
    "precision_at_k",
    "precision_key",
    "recall_at_k",
    "recall_at_precision",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

# Slack for "precision >= target" so that e.g. 9/10 >= 0.9 never fails on rounding.
_PRECISION_EPS = 1e-12


@dataclass(frozen=True)
class RankedResults:
    """Ranked neighbour lists of the evaluated queries, one row per query.

    Attributes:
        relevance: bool ``[n_queries, max_k]``; True where the neighbour at that rank (column) is
            relevant. Padding (fewer than ``max_k`` results) is False.
        scores: float ``[n_queries, max_k]``; similarity of each neighbour (higher = more alike);
            ``nan`` marks padding. Only non-padding entries enter the pair metrics.
        n_relevant: int ``[n_queries]``; number of relevant items of each query (group size - 1,
            >= 1).
        query_ids: optional ``[n_queries]`` ids of the queries, for reporting only.
    """

    relevance: np.ndarray
    scores: np.ndarray
    n_relevant: np.ndarray
    query_ids: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        rel = np.asarray(self.relevance, dtype=bool)
        scores = np.asarray(self.scores, dtype=np.float64)
        n_rel = np.asarray(self.n_relevant, dtype=np.int64)
        if rel.ndim == 1 and rel.size == 0:  # allow empty [] inputs
            rel = rel.reshape(0, 0)
        if scores.ndim == 1 and scores.size == 0:
            scores = scores.reshape(rel.shape)
        if rel.ndim != 2 or scores.shape != rel.shape:
            raise ValueError(
                "relevance and scores must be 2-D of the same shape, "
                f"got {rel.shape} and {scores.shape}"
            )
        if n_rel.shape != (rel.shape[0],):
            raise ValueError(f"n_relevant must have shape ({rel.shape[0]},), got {n_rel.shape}")
        if np.any(n_rel < 1):
            raise ValueError("every query needs n_relevant >= 1 (group size >= 2)")
        if np.any(rel & np.isnan(scores)):
            raise ValueError("padding entries (nan score) cannot be relevant")
        if np.any(rel.sum(axis=1) > n_rel):
            raise ValueError(
                "a query has more relevant results than n_relevant (duplicate neighbours?)"
            )
        object.__setattr__(self, "relevance", rel)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "n_relevant", n_rel)
        if self.query_ids is not None:
            qids = np.asarray(self.query_ids)
            if qids.shape != (rel.shape[0],):
                raise ValueError(f"query_ids must have shape ({rel.shape[0]},), got {qids.shape}")
            object.__setattr__(self, "query_ids", qids)

    @property
    def n_queries(self) -> int:
        return int(self.relevance.shape[0])


def build_ranked_results(
    query_ids: Sequence[int] | np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_scores: np.ndarray,
    group_of: Mapping[Any, Hashable | None],  # Any: Mapping is invariant in its key type
) -> RankedResults:
    """Turn raw k-NN output into :class:`RankedResults`.

    Args:
        query_ids: ``[n]`` id of the item searched in each row.
        neighbour_ids: int ``[n, max_k]`` neighbour ids, best first, ``-1`` for "no result". Same id
            space as ``query_ids`` and the keys of ``group_of``.
        neighbour_scores: float ``[n, max_k]`` similarity of each neighbour (higher = more alike).
        group_of: ground truth, item id -> group label. Items missing from it (or mapped to None)
            have no ground truth: they are never queries and never relevant.

    Rows whose query is in a group of size < 2 (or has no group) are dropped. In each kept row the
    query itself and repeated neighbour ids (after their first occurrence) are removed and the
    remaining results shifted up, so the output keeps width ``max_k`` with padding at the end:
    search ``K + 1`` neighbours to get K results once the query is removed.
    """
    qids = np.asarray(query_ids)
    nids = np.asarray(neighbour_ids)
    scores = np.asarray(neighbour_scores, dtype=np.float64)
    if nids.ndim != 2 or scores.shape != nids.shape or qids.shape != (nids.shape[0],):
        raise ValueError(
            "expected query_ids [n], neighbour_ids and neighbour_scores [n, max_k]; got "
            f"{qids.shape}, {nids.shape}, {scores.shape}"
        )
    if np.unique(qids).size != qids.size:
        raise ValueError("query_ids must be unique")

    # Group label -> small int code; -1 = no ground truth.
    labels = {
        g: i for i, g in enumerate(dict.fromkeys(g for g in group_of.values() if g is not None))
    }
    sizes = Counter(labels[g] for g in group_of.values() if g is not None)
    group_size = np.array([sizes[i] for i in range(len(labels))], dtype=np.int64)

    def codes(ids: np.ndarray) -> np.ndarray:
        # Look each distinct id up once (k-NN output repeats ids a lot).
        uniq, inverse = np.unique(ids, return_inverse=True)
        keys = [u.item() if isinstance(u, np.generic) else u for u in uniq]
        lut = np.array([labels.get(group_of.get(key), -1) for key in keys], dtype=np.int64)
        return lut[inverse].reshape(ids.shape)

    q_code = codes(qids)
    is_query = q_code >= 0
    is_query[is_query] = group_size[q_code[is_query]] >= 2
    qids, nids, scores, q_code = qids[is_query], nids[is_query], scores[is_query], q_code[is_query]
    n_rows, max_k = nids.shape

    keep = (nids != -1) & (nids != qids[:, None])
    # Drop repeated neighbour ids within a row (keep the best-ranked occurrence).
    if max_k > 1 and n_rows:
        order = np.argsort(nids, axis=1, kind="stable")
        sorted_ids = np.take_along_axis(nids, order, axis=1)
        dup_sorted = np.zeros_like(keep)
        dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
        dup = np.zeros_like(keep)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        keep &= ~dup
    if np.any(keep & np.isnan(scores)):
        raise ValueError("a returned neighbour has a nan score")

    # Shift kept entries to the front of each row, preserving their order.
    front = np.argsort(~keep, axis=1, kind="stable")
    keep = np.take_along_axis(keep, front, axis=1)
    nids = np.take_along_axis(nids, front, axis=1)
    scores = np.where(keep, np.take_along_axis(scores, front, axis=1), np.nan)

    n_code = codes(nids)
    relevance = keep & (n_code == q_code[:, None])
    return RankedResults(
        relevance=relevance,
        scores=scores,
        n_relevant=group_size[q_code] - 1,
        query_ids=qids,
    )


# ------------------------------------------------------------ rank metrics (per query, averaged)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _hits(r: RankedResults, k: int) -> np.ndarray:
    """Per-query number of relevant results in the top k (ranks beyond max_k count as misses)."""
    return r.relevance[:, : _check_k(k)].sum(axis=1)


def _per_query_precision(r: RankedResults, k: int) -> np.ndarray:
    return _hits(r, k) / k


def _per_query_recall(r: RankedResults, k: int) -> np.ndarray:
    return _hits(r, k) / r.n_relevant


def precision_at_k(r: RankedResults, k: int) -> float:
    """Mean over queries of (#relevant in top k) / k."""
    return _mean(_per_query_precision(r, k))


def recall_at_k(r: RankedResults, k: int) -> float:
    """Mean over queries of (#relevant in top k) / n_relevant."""
    return _mean(_per_query_recall(r, k))


def f1_at_k(r: RankedResults, k: int) -> float:
    """Mean over queries of the per-query F1 of P@k and R@k (0 where both are 0)."""
    p, rec = _per_query_precision(r, k), _per_query_recall(r, k)
    denom = p + rec
    f1 = np.divide(2 * p * rec, denom, out=np.zeros_like(denom), where=denom > 0)
    return _mean(f1)


def map_at_k(r: RankedResults, k: int) -> float:
    """Mean over queries of AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)."""
    rel = r.relevance[:, : _check_k(k)]
    prec_at_i = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    ap = (prec_at_i * rel).sum(axis=1) / np.minimum(k, r.n_relevant)
    return _mean(ap)


# ------------------------------------------------------------ pair metrics (pooled over queries)


def _pooled(r: RankedResults) -> tuple[np.ndarray, np.ndarray]:
    """All returned pairs as (scores, is_relevant), sorted by score descending, negatives first on
    ties."""
    valid = ~np.isnan(r.scores)
    scores, rel = r.scores[valid], r.relevance[valid]
    # lexsort: last key is primary. -score ascending = score descending; then False before True.
    order = np.lexsort((rel, -scores))
    return scores[order], rel[order]


def _pair_curve(r: RankedResults) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, score and relevance after each pair of the pooled, sorted list."""
    scores, rel = _pooled(r)
    tp = np.cumsum(rel)
    precision = tp / np.arange(1, rel.size + 1)
    recall = tp / r.n_relevant.sum()
    return precision, recall, scores, rel


def micro_ap(r: RankedResults) -> float:
    """Micro average precision (µAP) over the pooled pair list.

    ``µAP = sum_i P(i) * rel_i / sum_q n_relevant(q)`` where i runs over the pooled pairs in score
    order; equal to DISC21's ``sum (R_i - R_{i-1}) * P_i``. ``nan`` when there are no queries.
    """
    if r.n_queries == 0:
        return float("nan")
    precision, _, _, rel = _pair_curve(r)
    return float((precision * rel).sum() / r.n_relevant.sum())


def pr_curve(r: RankedResults) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve of the pooled pairs, one point per distinct score.

    Returns ``(precision, recall, thresholds)``, ordered by decreasing threshold (so increasing
    recall). Point i is what you get by accepting every pair with ``score >= thresholds[i]``; tied
    pairs are accepted together. Empty arrays when no pair was returned.
    """
    if r.n_queries == 0:
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    precision, recall, scores, _ = _pair_curve(r)
    # Last pair of each run of equal scores = the point reached by thresholding at that score.
    last = np.ones(scores.size, dtype=bool)
    last[:-1] = scores[1:] != scores[:-1]
    return precision[last], recall[last], scores[last]


def recall_at_precision(r: RankedResults, precision: float = 0.9) -> tuple[float, float]:
    """Highest pooled-pair recall at any score threshold whose precision is >= ``precision``.

    Returns ``(recall, threshold)``: accept pairs with ``score >= threshold``. Among thresholds
    reaching that recall the highest is returned. If no threshold reaches the precision, returns
    ``(0.0, inf)`` (accept nothing). ``(nan, nan)`` when there are no queries.
    """
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], got {precision!r}")
    if r.n_queries == 0:
        return float("nan"), float("nan")
    prec, rec, thr = pr_curve(r)
    ok = prec >= precision - _PRECISION_EPS
    if not ok.any():
        return 0.0, float("inf")
    rec_ok = np.where(ok, rec, -1.0)
    best = int(np.argmax(rec_ok))  # first maximum = highest threshold
    return float(rec[best]), float(thr[best])


# ---------------------------------------------------------------- summary


def precision_key(precision: float) -> str:
    """Suffix used in :func:`evaluate` keys: 0.9 -> ``"p90"``, 0.95 -> ``"p95"``,
    0.999 -> ``"p99.9"``."""
    return f"p{round(precision * 100, 6):g}"


def evaluate(
    r: RankedResults, ks: Sequence[int] = DEFAULT_KS, precision: float = 0.9
) -> dict[str, float]:
    """All metrics in one flat dict.

    Keys: ``precision@K``, ``recall@K``, ``f1@K``, ``map@K`` for each K in ``ks``, ``micro_ap``,
    ``recall@p90`` and ``threshold@p90`` (suffix from :func:`precision_key`), ``n_queries``.
    """
    out: dict[str, float] = {}
    for k in ks:
        out[f"precision@{k}"] = precision_at_k(r, k)
        out[f"recall@{k}"] = recall_at_k(r, k)
        out[f"f1@{k}"] = f1_at_k(r, k)
        out[f"map@{k}"] = map_at_k(r, k)
    out["micro_ap"] = micro_ap(r)
    rec, thr = recall_at_precision(r, precision)
    pk = precision_key(precision)
    out[f"recall@{pk}"] = rec
    out[f"threshold@{pk}"] = thr
    out["n_queries"] = r.n_queries
    return out


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    ks: Sequence[int] = DEFAULT_KS,
    extra: bool = True,
    precision: float = 0.9,
) -> str:
    """Render :func:`evaluate` dicts as a markdown table, one row per model, 4 decimals.

    Columns: ``Precision@K | Recall@K`` for K = 1, ``Precision@K | Recall@K | F1@K`` for each
    K >= 2, then ``mAP@K`` for each K >= 2, then (``extra``) ``µAP | R@P0.9``. Missing or nan
    values show as ``n/a``. Ends with a newline.
    """
    cols: list[tuple[str, str]] = []  # (header, key)
    for k in ks:
        cols += [(f"Precision@{k}", f"precision@{k}"), (f"Recall@{k}", f"recall@{k}")]
        if k >= 2:
            cols.append((f"F1@{k}", f"f1@{k}"))
    cols += [(f"mAP@{k}", f"map@{k}") for k in ks if k >= 2]
    if extra:
        cols += [("µAP", "micro_ap"), (f"R@P{precision:g}", f"recall@{precision_key(precision)}")]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"

    lines = [
        "| Model | " + " | ".join(h for h, _ in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, metrics in rows:
        cells = [md_cell(name)] + [fmt(metrics.get(key)) for _, key in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
