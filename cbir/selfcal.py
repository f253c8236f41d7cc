"""Self-calibration of the pair threshold, without ground truth: the estimators.

`cbir pairs` keeps a pair (a, b) when b is among a's `k` nearest neighbours (or a among b's)
with cosine similarity >= t. Its precision at t is the share of those neighbour links that join
duplicates. Without labels we cannot tell them apart one by one, but we can estimate how many
of them are false:

* **Non-duplicates**: an image's neighbour scores, ranked, fall smoothly with the rank once its
  duplicates (a handful at most) are behind: the top of a similarity distribution has an
  exponential-type tail, so the j-th best non-duplicate score is about a - b*log(j). Fitting a
  and b per image on the ranks `TAIL_RANKS` (beyond any usual group of copies) and reading the
  line back at ranks 1, 2, ... gives the number of non-duplicate neighbours the image is expected
  to have above t: E(t) = exp((a - t) / b). The fit leans on ranks where the tail is steeper
  than at the top, so it over-estimates the false links a little: the threshold errs on the
  side of precision.
* **Precision** at t: 1 - sum(min(E_i(t), O_i(t))) / sum(O_i(t)), over sampled images i, where
  O_i(t) counts i's observed top-k links scoring >= t. Duplicates need no model: they are what
  the observed links hold beyond the expected false ones, so their number may be anything.
* **Recall** at t: the share of held-out synthetic copies (`cbir.heldout`, processes the
  training never saw) that score >= t with their original and find it among their k nearest
  neighbours.

The threshold is the lowest t at which the estimated precision, and the precision at every
higher t, reaches the target: the most recall the target allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Neighbour ranks (1-based) the non-duplicate tail is fitted on: past a group of copies.
TAIL_RANKS = (6, 40)
GRID_STEP = 1e-4
#: Fewer present images than this: no tail can be fitted (too few neighbours).
MIN_IMAGES = TAIL_RANKS[1] + 2


@dataclass(frozen=True)
class Tails:
    """Per sampled image, its non-duplicate tail: expected links above t = exp((a - t) / b)."""

    a: np.ndarray
    b: np.ndarray

    def expected_above(self, t: float, k: int) -> np.ndarray:
        """Expected non-duplicate links >= t per image, among its top k."""
        with np.errstate(over="ignore"):
            return np.minimum(np.exp((self.a - t) / self.b), float(k))


def fit_tails(scores: np.ndarray, ranks: tuple[int, int] = TAIL_RANKS) -> Tails:
    """Least-squares fit of score ~ a - b*log(rank) on `ranks` of each row of `scores`.

    `scores`: [images, depth] neighbour scores in descending order, the image itself left out
    (depth >= ranks[1]).
    """
    lo, hi = ranks
    if scores.shape[1] < hi:
        raise ValueError(f"need {hi} neighbours per image, got {scores.shape[1]}")
    x = np.log(np.arange(lo, hi + 1, dtype=np.float64))
    y = scores[:, lo - 1:hi].astype(np.float64)
    xc = x - x.mean()
    b = -(y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    b = np.maximum(b, 1e-4)  # a flat tail (identical scores): a steep, tiny exponential
    a = y.mean(axis=1) + b * x.mean()
    return Tails(a=a, b=b)


@dataclass(frozen=True)
class Curve:
    """Estimated precision and recall of `cbir pairs` at each threshold (descending)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    links: np.ndarray  # observed top-k links >= t, per sampled image (mean)
    false_links: np.ndarray  # of which expected to be false (mean per sampled image)

    def at(self, t: float) -> tuple[float, float]:
        """(precision, recall) estimated at threshold t (the nearest grid point at or above)."""
        i = int(np.searchsorted(-self.thresholds, -t, side="right")) - 1
        if i < 0:
            return 1.0, 0.0
        return float(self.precision[i]), float(self.recall[i])

    def choose(self, target: float) -> int | None:
        """Index of the lowest threshold whose precision, and that of every higher one, is >=
        target; None when not even the highest reaches it."""
        running = np.minimum.accumulate(self.precision)
        ok = np.nonzero(running >= target)[0]
        return int(ok[-1]) if len(ok) else None


def estimate(scores: np.ndarray, k: int, copy_scores: np.ndarray, copy_found: np.ndarray,
             tails: Tails | None = None) -> Curve:
    """The estimated precision/recall curve.

    scores: [images, depth >= k] sampled images' neighbour scores (descending, self left out).
    copy_scores: each held-out copy's similarity to its original; copy_found: whether the
    original is among the copy's k nearest neighbours.
    """
    tails = tails if tails is not None else fit_tails(scores)
    top = scores[:, :k]
    values = np.concatenate([top.ravel(), copy_scores]).astype(np.float64)
    # a grid of GRID_STEP: finer than any threshold worth telling apart, and bounded in size
    grid = np.unique(np.floor(values[np.isfinite(values)] / GRID_STEP) * GRID_STEP)[::-1]
    hits = copy_scores[copy_found]
    n_copies = max(1, len(copy_scores))
    prec, rec, links, false = (np.empty(len(grid)) for _ in range(4))
    for i, t in enumerate(grid):
        observed = (top >= t).sum(axis=1)
        expected = np.minimum(tails.expected_above(float(t), k), observed)
        total = observed.sum()
        prec[i] = 1.0 - expected.sum() / total if total else 1.0
        rec[i] = (hits >= t).sum() / n_copies
        links[i], false[i] = observed.mean(), expected.mean()
    return Curve(thresholds=grid, precision=prec, recall=rec, links=links, false_links=false)


def recall_quantile_threshold(copy_scores: np.ndarray, recall: float) -> float:
    """The threshold that keeps `recall` of the copies (for collections too small for tails)."""
    if not len(copy_scores):
        return 1.0
    return float(np.quantile(copy_scores, 1.0 - recall, method="lower"))
