"""Evaluation and training plots: matplotlib PNGs, plus the CSVs that `dvc plots` draws.

Every plot is computed from a :class:`cbir.metrics.RankedResults` (the model's ranking of the
evaluation queries, from :func:`cbir.steps.evaluate.rank_model`) or from the training history, and
written atomically. matplotlib is used through `Figure` objects (no pyplot global state), so this
works in threads and on machines without a display.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import metrics
from .fsutil import atomic_path, write_text

PR_CURVE = "pr_curve"
AT_K = "precision_recall_at_k"
SCORES = "score_histogram"
TRAIN_LOSS = "train_loss"
NAMES = (PR_CURVE, AT_K, SCORES, TRAIN_LOSS)  # each written as .png (and some as .csv)


def _save(fig: Figure, target: Path) -> Path:
    with atomic_path(target) as tmp:
        # No "Software" stamp: the same inputs give the same bytes, so DVC sees no change.
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return target


def _csv(header: list[str], rows: list[tuple[float | int, ...]], target: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_text(buf.getvalue(), target)
    return target


def _operating_point(
    prec: np.ndarray, rec: np.ndarray, thr: np.ndarray, threshold: float
) -> tuple[float, float] | None:
    """(recall, precision) when accepting every pair scored >= threshold; None if none is."""
    ok = np.nonzero(thr >= threshold)[0]
    return (float(rec[ok[-1]]), float(prec[ok[-1]])) if ok.size else None


def pr_curve(
    ranked: metrics.RankedResults, out: Path, *, threshold: float | None, target_precision: float
) -> list[Path]:
    """Precision against recall over pooled pairs, with the pair threshold's operating point."""
    prec, rec, thr = metrics.pr_curve(ranked)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.step(rec, prec, where="post", label="model")
    ax.axhline(
        target_precision, color="grey", ls=":", lw=1, label=f"target precision {target_precision:g}"
    )
    point = None if threshold is None else _operating_point(prec, rec, thr, threshold)
    if point is not None:
        ax.plot(*point, "o", color="C3", label=f"pair threshold {threshold:.4f}")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title=f"Precision-recall over pooled pairs ({ranked.n_queries} queries)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return [
        _save(fig, out / f"{PR_CURVE}.png"),
        _csv(
            ["threshold", "precision", "recall"],
            [(float(t), float(p), float(r)) for p, r, t in zip(prec, rec, thr, strict=True)],
            out / f"{PR_CURVE}.csv",
        ),
    ]


def at_k(ranked: metrics.RankedResults, kmax: int, out: Path) -> list[Path]:
    """P@K and R@K for K = 1..kmax."""
    ks = list(range(1, kmax + 1))
    p = [metrics.precision_at_k(ranked, k) for k in ks]
    r = [metrics.recall_at_k(ranked, k) for k in ks]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.plot(ks, p, "o-", label="precision@K")
    ax.plot(ks, r, "s-", label="recall@K")
    ax.set(
        xlabel="K",
        ylabel="mean over queries",
        ylim=(0, 1.02),
        xticks=ks,
        title="Precision@K and recall@K",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return [
        _save(fig, out / f"{AT_K}.png"),
        _csv(["k", "precision", "recall"], list(zip(ks, p, r, strict=True)), out / f"{AT_K}.csv"),
    ]


def score_histogram(
    ranked: metrics.RankedResults,
    out: Path,
    *,
    threshold: float | None,
    calibrated: float | None = None,
    target_precision: float = 0.9,
) -> list[Path]:
    """Scores of returned true duplicates against non-duplicates, thresholds marked."""
    valid = ~np.isnan(ranked.scores)
    scores, rel = ranked.scores[valid], ranked.relevance[valid]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    if scores.size:
        edges = np.histogram_bin_edges(scores, bins=50)
        for mask, label, color in ((rel, "true duplicates", "C2"), (~rel, "not duplicates", "C1")):
            if mask.any():
                ax.hist(
                    scores[mask],
                    bins=edges.tolist(),
                    density=True,
                    alpha=0.55,
                    color=color,
                    label=f"{label} (n={int(mask.sum())})",
                )
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if threshold is None:
        pass  # not calibrated yet: nothing to mark
    elif lo <= threshold <= hi or not scores.size:
        ax.axvline(threshold, color="C3", lw=1.5, label=f"pair threshold {threshold:.4f}")
    else:  # a line far off would squash the histogram into a sliver: name it instead
        where = "below" if threshold < lo else "above"
        ax.plot([], [], " ", label=f"pair threshold {threshold:.4f} ({where} every score)")
    if calibrated is not None and math.isfinite(calibrated):
        ax.axvline(
            calibrated,
            color="k",
            ls="--",
            lw=1,
            label=f"precision {target_precision:g} at {calibrated:.4f}",
        )
    ax.set(
        xlabel="cosine similarity",
        ylabel="density",
        title="Scores of the top K neighbours of each query",
    )
    ax.legend(loc="upper left", fontsize="small")
    return [_save(fig, out / f"{SCORES}.png")]


def read_history(path: Path) -> list[dict[str, float]]:
    """Training history rows (epoch, step, loss, lr, seconds) from history.csv; [] if absent."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = []
        for r in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in r.items() if k and v not in (None, "")})
            except ValueError:
                continue  # a malformed line must not cost the whole report
    return [r for r in rows if "epoch" in r and "loss" in r]


def training_loss(history: list[dict[str, float]], out: Path) -> list[Path]:
    """Loss per epoch (learning rate on the right axis when recorded)."""
    if not history:
        return []
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.plot(epochs, [r["loss"] for r in history], "o-", color="C0", label="loss")
    ax.set(xlabel="epoch", ylabel="contrastive loss", title="Training loss")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [r["lr"] for r in history], color="C7", lw=1, ls="--")
        ax2.set_ylabel("learning rate (dashed)")
    return [_save(fig, out / f"{TRAIN_LOSS}.png")]
