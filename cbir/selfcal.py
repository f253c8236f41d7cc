"""Self-calibration of the pair threshold, without ground truth: the estimators.

`cbir pairs` keeps a pair (a, b) when b is among a's `k` nearest neighbours (or a among b's)
with cosine similarity >= t. Its precision at t is the share of those neighbour links that join
duplicates. Without labels no single link can be told true or false, but their mixture can be
taken apart (a two-component mixture, fitted by EM, and the "local false discovery rate" it
gives each link):

* **Duplicates** score like held-out synthetic copies of the collection's own images
  (`cbir.heldout`, made by processes the training never saw) score against their originals: a
  kernel density of those scores, held at its peak above it (a copy closer to its original than
  the typical test copy is no less a duplicate).
* **Non-duplicates** depend on where an image lives: a portrait among hundreds of portraits has
  closer strangers than a unique scene. Each image's neighbours at ranks `ANCHORS` (past any usual
  group of copies) are taken as strangers; they set its level A (the score at the first anchor
  rank) and spread W (down to the last). A stranger at rank j < the first anchor scores
  A + W*u with u ~ Normal(mu_j, sigma_j), the same for every image, learnt by EM together with the
  share of duplicates at each rank.
* **Precision** at t: the mean posterior probability of being a duplicate over the top-k links
  scoring >= t. **Recall** at t: the share of held-out copies that score >= t and find their
  original among their k nearest neighbours.

The threshold is the lowest t at which the estimated precision, and that at every higher t,
reaches the target: the most recall the target allows. Links at anchor ranks count as
non-duplicates, so groups of more than ANCHORS[0] - 1 copies of one photograph make the estimate
err on the side of precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Neighbour ranks (1-based) taken as non-duplicates: they fix each image's level and spread.
ANCHORS = (6, 40)
#: Fewer present images than this: too few neighbours to see how non-duplicates score.
MIN_IMAGES = ANCHORS[1] + 2
GRID_STEP = 1e-4
#: Fewer estimated duplicate links than this share of the sampled images: no duplicates at all.
DUPLICATE_SHARE = 0.01
#: A threshold can veto lower ones only when it keeps this many of the sampled links.
MIN_LINKS = 10
_EM_ITERATIONS = 60
_MIN_SIGMA = 0.02  # in units of an image's spread


@dataclass(frozen=True)
class Mixture:
    """The fitted mixture: per top-k link, the posterior probability that it joins duplicates."""

    posterior: np.ndarray  # [images, k]
    mu: np.ndarray  # per rank below the anchors: mean of a stranger's standardised score
    sigma: np.ndarray
    prior: np.ndarray  # per rank: share of links that join duplicates


def _duplicate_density(copy_scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(scores, bandwidth, peak density) of the copies' kernel density."""
    cs = copy_scores[np.isfinite(copy_scores)].astype(np.float64)
    bw = max(1.06 * float(np.std(cs)) * len(cs) ** -0.2, 1e-3) if len(cs) > 1 else 0.01
    grid = np.linspace(float(cs.min()) - 3 * bw, 1.0, 512)
    dens = _kde(grid, cs, bw)
    i = int(np.argmax(dens))
    return cs, bw, float(grid[i]) if dens[i] > 0 else 1.0


def _kde(x: np.ndarray, points: np.ndarray, bw: float, chunk: int = 4096) -> np.ndarray:
    flat = np.asarray(x, np.float64).ravel()
    out = np.empty(flat.shape)
    for s in range(0, len(flat), chunk):
        d = (flat[s : s + chunk, None] - points[None, :]) / bw
        out[s : s + chunk] = np.exp(-0.5 * d * d).sum(axis=1)
    return (out / (len(points) * bw * math.sqrt(2 * math.pi))).reshape(np.shape(x))


def fit_mixture(
    scores: np.ndarray, k: int, copy_scores: np.ndarray, anchors: tuple[int, int] = ANCHORS
) -> Mixture:
    """EM fit of duplicates vs strangers over each image's top-k links.

    `scores`: [images, depth >= anchors[1]] neighbour scores, best first, the image itself left
    out. `copy_scores`: held-out copies' similarities to their originals (the duplicates' shape).
    """
    lo, hi = anchors
    if scores.shape[1] < max(hi, k):
        raise ValueError(f"need {max(hi, k)} neighbours per image, got {scores.shape[1]}")
    if not len(copy_scores):
        raise ValueError("no held-out copies to tell how duplicates score")
    top = scores[:, :k].astype(np.float64)
    level = scores[:, lo - 1].astype(np.float64)
    spread = np.maximum(level - scores[:, hi - 1], 1e-4)
    u = (top - level[:, None]) / spread[:, None]
    cs, bw, peak = _duplicate_density(copy_scores)
    dup = np.where(top >= peak, float(_kde(np.array([peak]), cs, bw)[0]), _kde(top, cs, bw))
    m = lo - 1  # ranks below the anchors: duplicates or strangers
    mu = np.median(u[:, :m], axis=0)
    sigma = np.maximum(1.4826 * np.median(np.abs(u[:, :m] - mu), axis=0), _MIN_SIGMA)
    prior = np.full(m, 0.5)
    post = np.zeros_like(top)
    for _ in range(_EM_ITERATIONS):
        z = (u[:, :m] - mu) / sigma
        stranger = np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi) * spread[:, None])
        num = prior * dup[:, :m]
        den = num + (1 - prior) * stranger
        post[:, :m] = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
        w = 1.0 - post[:, :m]
        total = np.maximum(w.sum(axis=0), 1e-9)
        mu_new = (w * u[:, :m]).sum(axis=0) / total
        sigma = np.maximum(np.sqrt((w * (u[:, :m] - mu_new) ** 2).sum(axis=0) / total), _MIN_SIGMA)
        done = np.allclose(mu_new, mu, atol=1e-6)
        mu = mu_new
        prior = np.clip(post[:, :m].mean(axis=0), 1e-4, 0.999)
        if done:
            break
    return Mixture(posterior=post, mu=mu, sigma=sigma, prior=prior)


@dataclass(frozen=True)
class Curve:
    """Estimated precision and recall of `cbir pairs` at each threshold (descending)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    links: np.ndarray  # observed top-k links >= t, per sampled image (mean)
    false_links: np.ndarray  # of which expected to be false (mean per sampled image)
    n_images: int = 1  # sampled images
    duplicate_links: float = 0.0  # estimated duplicate links among all sampled top-k links

    @property
    def duplicates_expected(self) -> bool:
        """Whether the collection seems to hold near-duplicates at all: an estimated duplicate
        link for at least one sampled image in DUPLICATE_SHARE (else every neighbour looks like
        a stranger, and no threshold is needed to keep them apart)."""
        return self.duplicate_links >= max(1.0, DUPLICATE_SHARE * self.n_images)

    def at(self, t: float) -> tuple[float, float]:
        """(precision, recall) estimated at threshold t (the nearest grid point at or above)."""
        i = int(np.searchsorted(-self.thresholds, -t, side="right")) - 1
        if i < 0:
            return 1.0, 0.0
        return float(self.precision[i]), float(self.recall[i])

    def choose(self, target: float) -> int | None:
        """Index of the lowest threshold whose estimated precision reaches the target while no
        higher threshold falls clearly short of it; None when none does.

        "Clearly": by more than two binomial standard errors of a precision measured on that
        many links, and on at least MIN_LINKS of them, so that a handful of links at the very
        top cannot veto the threshold on their own.
        """
        n = self.links * self.n_images
        margin = 2.0 * np.sqrt(target * (1.0 - target) / np.maximum(n, 1.0))
        short = (n >= MIN_LINKS) & (self.precision + margin < target)
        vetoed = np.logical_or.accumulate(short)  # short here or at a higher threshold
        ok = np.nonzero((n >= 1) & (self.precision >= target) & ~vetoed)[0]
        return int(ok[-1]) if len(ok) else None


def estimate(
    scores: np.ndarray,
    k: int,
    copy_scores: np.ndarray,
    copy_found: np.ndarray,
) -> Curve:
    """The estimated precision/recall curve of `cbir pairs` over thresholds.

    scores: [images, depth >= ANCHORS[1]] sampled images' neighbour scores (best first, self
    left out). copy_scores: each held-out copy's similarity to its original; copy_found: whether
    the original is among the copy's k nearest neighbours.
    """
    mix = fit_mixture(scores, k, copy_scores)
    top = scores[:, :k].astype(np.float64)
    order = np.argsort(-top, axis=None, kind="stable")
    flat, post = top.ravel()[order], mix.posterior.ravel()[order]
    values = np.concatenate([flat, copy_scores]).astype(np.float64)
    # a grid of GRID_STEP: finer than any threshold worth telling apart, and bounded in size
    grid = np.unique(np.floor(values[np.isfinite(values)] / GRID_STEP) * GRID_STEP)[::-1]
    n_links = np.searchsorted(-flat, -grid, side="right")  # links scoring >= each t
    dup_links = np.concatenate([[0.0], np.cumsum(post)])[n_links]
    hits = np.sort(copy_scores[copy_found])[::-1]
    n_hits = np.searchsorted(-hits, -grid, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(n_links > 0, dup_links / np.maximum(n_links, 1), 1.0)
    n = max(1, len(scores))
    return Curve(
        thresholds=grid,
        precision=prec,
        recall=n_hits / max(1, len(copy_scores)),
        links=n_links / n,
        false_links=(n_links - dup_links) / n,
        n_images=n,
        duplicate_links=float(post.sum()),
    )


def recall_quantile_threshold(copy_scores: np.ndarray, recall: float) -> float:
    """The threshold that keeps `recall` of the copies (for collections too small for tails)."""
    if not len(copy_scores):
        return 1.0
    return float(np.quantile(copy_scores, 1.0 - recall, method="lower"))
