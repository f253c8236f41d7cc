"""Geometric verification of two pictures: is one a copy of the other, or of a detail of it?

A global descriptor summarises a whole picture, so a detail cut from a print (a face from a group
portrait, one building from a street view) lands far from its original. Local features see it:
the detail's corners, edges and blobs are the original's, at another scale and place. This module
matches them and fits one geometric transform; enough consistent matches (inliers) confirm the
two pictures show the same thing, and the transform says where the smaller lies on the larger.

Choices, and why:

- **SIFT, not ORB.** Crops are rescaled (a detail printed or scanned larger), and archive copies
  add grain, halftone and JPEG noise. SIFT's scale space finds the same points over a factor of
  ten in scale and its float descriptor survives noise; ORB's binary tests on a blurred patch
  lose most matches on greyscale, grainy prints and its pyramid covers a narrower range of scale.
  SIFT costs more (about 0.1 s a picture at 512 px on one core), which the cache of features
  (cbir.store.features: extracted once per picture) and the cap on keypoints bound. Descriptors
  are RootSIFT (L1-normalised, square-rooted, hence of unit length): Euclidean distance then
  compares them as the Hellinger kernel does, which matches better at no cost.
- **Matching**: exact nearest neighbours (deterministic, unlike randomised kd-trees) with Lowe's
  ratio test, as one matrix product of the descriptors: for unit vectors the squared distance is
  2 - 2 x their dot product, so the two nearest are the two largest products (one matrix product
  per candidate, OpenCV's gemm on one thread). 20 OpenCV BFMatcher calls took 0.5 s for 20
  candidates of 1,000 keypoints; the products take 20-40 ms on a busy machine.
- **What a picture keeps** (measured on details of the real photographs of ../shared/data, each
  against its original and 19 other pictures, benchmarks/partial.py for the descriptor's
  top 20): the working side (512 px) and the keypoint cap (1,000, the strongest) of a
  collection picture, and the query's own strongest 300 keypoints (`QUERY_KEYPOINTS`), set the
  cost, which grows with keypoints(query) x keypoints(candidate). A detail of 5-10 % of an
  original holds about that share of the original's keypoints: a cap of 500 verified 65 % of
  them, 1,000 84 %, 2,000 92 % (at 2x to 4x the time); a query cap of 300 instead of 1,000
  lost none (a detail's keypoints all lie in the matched region) at a third of the time. A
  1024 px working side found no more than 512 px (the SIFT pyramid starts at twice the size).
- **A similarity transform (`estimateAffinePartial2D`, 4 degrees of freedom), not a homography.**
  A crop and a rescan differ from their original by scale, a shift and at most a slight turn on
  the scanner bed: a similarity. A homography (8 degrees of freedom, 4-point samples) also fits
  that, but given a handful of chance matches between unrelated pictures it finds a wild warp
  that collects them as "inliers", so it needs a higher inlier threshold to reject the same
  chance; its 4-point samples also need far more RANSAC draws at a low inlier ratio (a detail's
  few true matches among many false ones) than the similarity's 2-point samples. OpenCV's
  MAGSAC++ (USAC_MAGSAC) fits homographies and full affine maps but not the similarity
  (estimateAffinePartial2D refuses it in 5.1); RANSAC with a Levenberg-Marquardt refinement on
  the inliers is enough for 2-point samples. A re-photograph
  at a slant (a perspective copy) is what the similarity misses; it still verifies when its
  slant is slight (the inlier tolerance absorbs a few pixels).
- **Mirrored copies** (a print made from the flipped negative, a flopped newspaper reprint): no
  similarity maps a picture onto its mirror image, so where the direct fit confirms nothing
  b's keypoints are mirrored (x from the right edge) and their descriptors permuted as SIFT's
  would be on the mirrored picture (`Features.mirrored`: the 4 x 4 grid's rows reversed in the
  keypoint's frame, each orientation bin o to 8 - o; on real photographs and their mirror images
  this matches 280-710 inliers where the direct fit finds 3-4), and fitted again. A confirmed
  mirror says so (`Match.mirrored`); its box is on b as b is. Unrelated pictures get a second
  chance at chance matches, which stays far below MIN_INLIERS (tests/test_verify.py).
- **Determinism**: RANSAC draws from OpenCV's RNG, seeded before each fit (`cv2.setRNGSeed`).
- **Threads**: one OpenCV thread (`cv2.setNumThreads(1)`, set on first use). The work per picture
  is short (a SIFT pass, a match, a fit), the pipeline parallelises across pictures or processes
  when it does, and on a busy two-core machine OpenCV's own thread pool (one thread per core in
  every process) only contends with torch and the other processes for the same cores.

Nothing here raises on a degenerate picture (blank, tiny, empty, no keypoints): it is not
verified, relation `none` with 0 inliers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import cv2
import numpy as np
from PIL import Image

Relation = Literal["full", "a_in_b", "b_in_a", "none"]
Picture = Image.Image | np.ndarray

#: Long side a picture is brought down to before SIFT (never up): bounds the cost of a scan of
#: any size; details of an original keep enough keypoints at this scale (SIFT's pyramid starts
#: at twice it).
MAX_SIDE = 512
#: At most this many keypoints per picture (the strongest): bounds matching, O(n_a * n_b).
MAX_KEYPOINTS = 1000
#: A query's strongest keypoints matched against its candidates (`verify_many`): a detail's
#: keypoints all lie on the region it shares with its original, so a few hundred suffice.
QUERY_KEYPOINTS = 300
#: Keypoints of each side in the first pass of `verify_pair`: copies of a whole picture share
#: their strongest keypoints, so 300 x 300 (a tenth of the products of 1,000 x 1,000) confirm
#: them; only what this pass leaves unconfirmed (a detail, an unrelated neighbour) pays for all.
QUICK_KEYPOINTS = 300
#: Lowe's ratio: a match is kept when its nearest neighbour is clearly nearer than the second.
RATIO = 0.8
#: Distinct inliers needed to call two pictures verified. Among 136 pairs of unrelated real
#: photographs (../shared/data) chance reached at most 4 under a similarity with this ratio and
#: tolerance; details of 5-10 % of a photograph, rescanned, reached 20 or more.
MIN_INLIERS = 12
#: RANSAC inlier tolerance in pixels of the working scale (long side <= MAX_SIDE).
TOLERANCE = 5.0
#: When the smaller picture maps onto at least this fraction of the larger one, and the larger
#: onto as much of the smaller, the two show the same picture (a rescan, a slightly cropped copy).
FULL = 0.8
#: What a picture adds around the other is a blank margin (a mount, the scanner bed around a
#: small print, a border added to a copy) when at most this share of its keypoints lie more
#: than TOLERANCE outside the region the other maps onto: the two show the same picture
#: (`full`), not a detail and the print it was cut from. On photographs of ../shared/data:
#: copies on a plain 60-120 px margin had none of 574-1,000 keypoints outside; crops to 64-75 %
#: of the area 75-283; a line typed on the mount 2-10 (0.2-1.3 %).
BLANK_MARGIN = 0.01
#: The rules that read a relation off a fit: part of what a recorded verification depends on.
RULES = "margin-v1"
#: The relations an earlier version of RULES may have read otherwise, which `cbir pairs` checks
#: again: margin-v1 reads `full` where the area alone read a detail; a `full` stands.
REVISED = ("a_in_b", "b_in_a")
_SEED = 12345
_NO_TERM = np.zeros((0, 0), np.float32)  # gemm's added term, unused (beta 0)
_threads_set = False


@dataclass(frozen=True, eq=False)
class Features:
    """Local features of one picture: keypoints in pixels of the working scale, strongest
    first, their SIFT descriptors, and the size of the picture they came from."""

    points: np.ndarray  # float32 [n, 2] (x, y) at the working scale
    sift: np.ndarray  # uint8 [n, 128]: OpenCV's SIFT descriptors are whole numbers <= 255
    width: int  # the picture's size in its own pixels
    height: int
    scale: float  # working pixels per picture pixel (<= 1)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @cached_property
    def descriptors(self) -> np.ndarray:
        """RootSIFT, float32 [n, 128], each of unit length (computed once, on first use)."""
        d = self.sift.astype(np.float32)
        d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
        return np.sqrt(d, out=d)

    def mirrored(self) -> Features:
        """The features of this picture's mirror image (left and right swapped), made from
        these rather than extracted again: each keypoint at the mirrored place, its descriptor
        as SIFT describes the mirrored patch (_MIRROR)."""
        points = self.points.copy()
        points[:, 0] = (_working(self.width, self.scale) - 1) - points[:, 0]
        return Features(points, self.sift[:, _MIRROR], self.width, self.height, self.scale)


def _working(side: int, scale: float) -> int:
    """A picture side at the working scale, in whole pixels (as `features` resizes it)."""
    return max(1, round(side * scale))


def _mirror_permutation() -> np.ndarray:
    """Which element of a SIFT descriptor holds each element of the mirrored patch's: OpenCV
    lays a descriptor out as 4 x 4 cells (rows along the keypoint frame's y axis) of 8
    orientation bins; mirroring the picture turns the frame's y axis over (rows reversed) and
    each gradient's angle to the frame's x axis into its negative (bin o to 8 - o)."""
    r, c, o = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
    return (((3 - r) * 4 + c) * 8 + (8 - o) % 8).reshape(-1)


_MIRROR = _mirror_permutation()


@dataclass(frozen=True)
class Match:
    """The outcome of verifying picture a against picture b.

    relation: `full` (the same picture), `a_in_b` (a is a detail of b), `b_in_a`, or `none`
    (not verified). covered: the fraction of the larger picture's area (b for a_in_b, a for
    b_in_a, b for full) that the other maps onto; a `full` match below FULL is a picture on a
    blank margin (BLANK_MARGIN), the box on the one that adds it. box: that region on the
    larger picture, (x0, y0, x1, y1) in its own pixels; `box_on` names the picture ("a" or
    "b"; "" for none). mirrored: a matched b's mirror image (the box is on the picture as it is).
    """

    inliers: int = 0
    matches: int = 0  # tentative matches that passed the ratio test
    relation: Relation = "none"
    covered: float = 0.0
    box: tuple[int, int, int, int] | None = None
    box_on: Literal["a", "b", ""] = ""
    scale: float = 0.0  # picture-b pixels per picture-a pixel of the fitted similarity
    mirrored: bool = False  # confirmed on b's mirror image: one is the other flipped left-right

    @property
    def verified(self) -> bool:
        return self.relation != "none"

    @property
    def on_margin(self) -> bool:
        """One picture shows the other on a blank margin (BLANK_MARGIN): the same picture,
        covering less than FULL of it (cbir.store.pairs.on_margin, as recorded)."""
        return self.relation == "full" and self.covered < FULL


def _one_thread() -> None:
    global _threads_set
    if not _threads_set:
        cv2.setNumThreads(1)
        _threads_set = True


def _grey(picture: Picture) -> np.ndarray:
    """An 8-bit greyscale array of a PIL picture or a numpy array (HxW, HxWx1/3/4; uint8, or
    float in 0..1, or other integers clipped to 0..255). An empty array when unusable."""
    if isinstance(picture, Image.Image):
        if picture.width == 0 or picture.height == 0:
            return np.zeros((0, 0), np.uint8)
        return np.asarray(picture.convert("L"))
    a = np.asarray(picture)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., 0] if a.shape[2] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2 or a.size == 0:
        return np.zeros((0, 0), np.uint8)
    if a.dtype != np.uint8:
        a = np.asarray(a, np.float64)
        if np.issubdtype(np.asarray(picture).dtype, np.floating) and np.nanmax(a) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _empty(width: int = 0, height: int = 0, scale: float = 1.0) -> Features:
    return Features(
        np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), width, height, scale
    )


def working_side(width: int, height: int, max_side: int = MAX_SIDE) -> int:
    """The long side a picture of this size is analysed at (what a reduced decode needs)."""
    return min(max(width, height), max_side)


def features(
    picture: Picture,
    max_side: int = MAX_SIDE,
    max_keypoints: int = MAX_KEYPOINTS,
    *,
    size: tuple[int, int] | None = None,
) -> Features:
    """SIFT keypoints and descriptors of one picture, strongest first (extract once, verify
    many). `size`: the picture's own (width, height) when `picture` is a reduced decode of it
    (a JPEG's draft): keypoints, scale and boxes then refer to the picture's own pixels."""
    _one_thread()
    grey = _grey(picture)
    h, w = grey.shape[:2] if grey.ndim == 2 else (0, 0)
    own_w, own_h = size if size is not None and min(h, w) > 0 else (w, h)
    if min(h, w) < 16 or min(own_w, own_h) < 16:  # nothing a detector can use
        return _empty(own_w, own_h)
    scale = min(1.0, max_side / max(own_w, own_h))
    tw, th = _working(own_w, scale), _working(own_h, scale)
    if (tw, th) != (w, h):
        grey = cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA)
    sift = cv2.SIFT.create(nfeatures=max_keypoints)
    kps, desc = sift.detectAndCompute(grey, None)
    if desc is None or len(kps) == 0:
        return _empty(own_w, own_h, scale)
    # strongest first (stable for ties), so that a prefix is the strongest keypoints
    order = np.argsort(-np.array([kp.response for kp in kps], np.float32), kind="stable")
    points = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
    sift_u8 = np.clip(np.rint(np.asarray(desc, np.float32)[order]), 0, 255).astype(np.uint8)
    return Features(points, sift_u8, own_w, own_h, scale)


def _as_features(x: Features | Picture) -> Features:
    return x if isinstance(x, Features) else features(x)


def _matches(
    a: Features, b: Features, a_keypoints: int | None = None, b_keypoints: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test matches from a (its strongest `a_keypoints`) to b (its strongest
    `b_keypoints`): (points of a, points of b), working scale. One matrix product: for unit
    vectors |x - y|^2 = 2 - 2 x.y, so Lowe's test d1 < RATIO d2 reads 1 - s1 < RATIO^2 (1 - s2)
    on the two largest products."""
    na = len(a) if a_keypoints is None else min(len(a), a_keypoints)
    nb = len(b) if b_keypoints is None else min(len(b), b_keypoints)
    if na < 2 or nb < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    # OpenCV's product (one thread, cv2.setNumThreads), not numpy's: OpenBLAS starts a thread
    # per core for every product, and on a busy two-core machine those small products took
    # 10x longer (17 ms instead of 1-4 ms for 300 x 1,000 keypoints)
    s = np.asarray(
        cv2.gemm(a.descriptors[:na], b.descriptors[:nb], 1.0, _NO_TERM, 0.0, flags=cv2.GEMM_2_T)
    )
    rows = np.arange(na)
    best = s.argmax(axis=1)
    s1 = s[rows, best]
    s[rows, best] = -1.0  # below any product of non-negative vectors
    s2 = s.max(axis=1)
    keep = (1.0 - s1) < RATIO * RATIO * (1.0 - s2)
    return a.points[:na][keep], b.points[best[keep]]


def _distinct(pa: np.ndarray, pb: np.ndarray) -> int:
    """Inliers counted by place: SIFT gives one point several orientations (several
    descriptors), which would otherwise count one chance match several times."""
    if len(pa) == 0:
        return 0
    qa = np.unique(np.rint(pa).astype(np.int64), axis=0)
    qb = np.unique(np.rint(pb).astype(np.int64), axis=0)
    return int(min(len(qa), len(qb)))


def _rect(w: float, h: float) -> np.ndarray:
    return np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)


def _overlap(poly: np.ndarray, w: float, h: float) -> tuple[float, np.ndarray]:
    """Area of a convex polygon inside the rectangle 0..w x 0..h, and that intersection."""
    area, inter = cv2.intersectConvexConvex(poly.astype(np.float32), _rect(w, h))
    if inter is None or area <= 0:
        return 0.0, np.zeros((0, 2), np.float32)
    return float(area), inter.reshape(-1, 2)


def _box(poly: np.ndarray, scale: float, w: int, h: int) -> tuple[int, int, int, int]:
    """The bounding box of a polygon at the working scale, in the picture's own pixels."""
    p = poly / scale
    x0, y0 = np.floor(p.min(axis=0)).astype(int)
    x1, y1 = np.ceil(p.max(axis=0)).astype(int)
    return (max(0, int(x0)), max(0, int(y0)), min(w, int(x1)), min(h, int(y1)))


def verify(
    a: Features | Picture,
    b: Features | Picture,
    min_inliers: int = MIN_INLIERS,
    *,
    a_keypoints: int | None = None,
    b_keypoints: int | None = None,
    mirror: bool = True,
) -> Match:
    """Whether a and b show the same picture or one is a detail of the other, and where.
    `a_keypoints`, `b_keypoints`: match only that side's strongest keypoints (a query's,
    `verify_many`; both, `verify_pair`'s first pass). `mirror`: where the two do not match as
    they are, match a with b's mirror image."""
    fa, fb = _as_features(a), _as_features(b)
    found = _fit(fa, fb, min_inliers, a_keypoints, b_keypoints)
    if found.verified or not mirror or not len(fb):
        return found
    flipped = _fit(fa, fb.mirrored(), min_inliers, a_keypoints, b_keypoints)
    if not flipped.verified:
        return found
    box = flipped.box
    if box is not None and flipped.box_on == "b":  # on the mirror image: on b as it is
        box = (fb.width - box[2], box[1], fb.width - box[0], box[3])
    return dataclasses.replace(flipped, box=box, mirrored=True)


def _fit(
    fa: Features,
    fb: Features,
    min_inliers: int,
    a_keypoints: int | None,
    b_keypoints: int | None,
) -> Match:
    """`verify` of a and b as they are: match, fit a similarity, read the relation off it."""
    pa, pb = _matches(fa, fb, a_keypoints, b_keypoints)
    n = len(pa)
    if n < max(3, min_inliers):
        return Match(matches=n)
    cv2.setRNGSeed(_SEED)
    m, mask = cv2.estimateAffinePartial2D(
        pa,
        pb,
        method=cv2.RANSAC,
        ransacReprojThreshold=TOLERANCE,
        maxIters=5000,
        confidence=0.999,
        refineIters=10,
    )
    if m is None or mask is None:
        return Match(matches=n)
    keep = mask.ravel().astype(bool)
    inliers = _distinct(pa[keep], pb[keep])
    s = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # working-b px per working-a px
    if inliers < min_inliers or not np.all(np.isfinite(m)) or not 0.02 < s < 50.0:
        return Match(inliers=inliers, matches=n)
    # a's frame on b, and b's frame on a (working scales)
    wa, ha = fa.width * fa.scale, fa.height * fa.scale
    wb, hb = fb.width * fb.scale, fb.height * fb.scale
    a_on_b = cv2.transform(_rect(wa, ha)[None], m)[0]
    inv = cv2.invertAffineTransform(m)
    b_on_a = cv2.transform(_rect(wb, hb)[None], inv)[0]
    area_in_b, poly_b = _overlap(a_on_b, wb, hb)  # the part of b that a shows
    area_in_a, poly_a = _overlap(b_on_a, wa, ha)  # the part of a that b shows
    frac_b = area_in_b / max(wb * hb, 1e-9)
    frac_a = area_in_a / max(wa * ha, 1e-9)
    # picture scale: b-own px per a-own px
    scale = s * fa.scale / fb.scale
    if len(poly_b) == 0 or len(poly_a) == 0:
        return Match(inliers=inliers, matches=n, scale=scale)
    if frac_a >= FULL and frac_b >= FULL:
        return Match(
            inliers, n, "full", frac_b, _box(poly_b, fb.scale, fb.width, fb.height), "b", scale
        )
    if frac_a >= frac_b:  # all of a (or the most of it) is found on b: a is b's detail
        # unless what b adds around it is blank: then b is a on a margin, the same picture
        relation: Relation = "full" if _blank_outside(fb, poly_b) else "a_in_b"
        return Match(
            inliers, n, relation, frac_b, _box(poly_b, fb.scale, fb.width, fb.height), "b", scale
        )
    relation = "full" if _blank_outside(fa, poly_a) else "b_in_a"
    return Match(
        inliers, n, relation, frac_a, _box(poly_a, fa.scale, fa.width, fa.height), "a", scale
    )


def _blank_outside(f: Features, poly: np.ndarray) -> bool:
    """Whether at most BLANK_MARGIN of f's keypoints lie more than TOLERANCE outside `poly` (a
    convex polygon at f's working scale): what f shows beyond it is blank. A point's largest
    signed distance beyond the polygon's edge lines is at most its distance to the polygon, so
    a point near a corner may count as inside: the margin is judged along its sides."""
    if len(f) == 0 or len(poly) < 3:
        return False
    p = poly.astype(np.float64)
    q = np.roll(p, -1, axis=0)
    edge = q - p
    # outward normals whatever the polygon's orientation (shoelace sign)
    turn = np.sign(np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1])) or 1.0
    normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1) * turn
    length = np.linalg.norm(normal, axis=1)
    keep = length > 1e-9
    normal, p = normal[keep] / length[keep, None], p[keep]
    beyond = ((f.points.astype(np.float64)[:, None, :] - p[None]) * normal[None]).sum(axis=2)
    outside = int((beyond.max(axis=1) > TOLERANCE).sum())
    return outside <= BLANK_MARGIN * len(f)


def verify_pair(
    a: Features | Picture, b: Features | Picture, min_inliers: int = MIN_INLIERS
) -> Match:
    """`verify` for two pictures of the collection (`cbir pairs`), in two passes: their
    strongest QUICK_KEYPOINTS each first, which confirms copies of a whole picture (most pairs
    above the descriptor's threshold) at a tenth of the cost; all keypoints only when that pass
    confirms nothing. A confirmation by the first pass has fewer inliers than the full match
    would; its transform, relation and box are the same picture's."""
    fa, fb = _as_features(a), _as_features(b)
    if len(fa) > QUICK_KEYPOINTS or len(fb) > QUICK_KEYPOINTS:
        # a mirrored copy is looked for in the second pass alone: it is rare, and every pair
        # the first pass leaves unconfirmed gets there
        first = verify(
            fa,
            fb,
            min_inliers,
            a_keypoints=QUICK_KEYPOINTS,
            b_keypoints=QUICK_KEYPOINTS,
            mirror=False,
        )
        if first.verified:
            return first
    return verify(fa, fb, min_inliers)


def verify_many(
    query: Features | Picture,
    candidates: Sequence[Features | Picture | None],
    min_inliers: int = MIN_INLIERS,
    query_keypoints: int | None = QUERY_KEYPOINTS,
) -> list[Match]:
    """The query (a, its strongest `query_keypoints`) against each candidate (b), its features
    extracted once. A candidate given as None (its picture could not be read) is not verified."""
    q = _as_features(query)
    return [
        Match() if c is None else verify(q, c, min_inliers, a_keypoints=query_keypoints)
        for c in candidates
    ]
