"""Regional descriptors: where a cropped detail finds the picture it was cut from.

A global descriptor of a whole picture is weakest for a detail of it (a face cut from a group
portrait): the detail's descriptor lands far from the whole's. So each picture of the collection
also gets descriptors of a few of its regions, overlapping windows at one or more sizes, and a
query's candidates are the union of its global neighbours and the pictures owning its nearest
regions. A query itself is always described the normal, global way: it is an arbitrary file.

A region is described as the detail it stands for would be: the window is cut out of the picture
and embedded as a picture of its own (squashed to the input square, the same trunk, GeM and
output). Pooling windows of one feature map of the whole picture (R-MAC) costs far less, but
measured on benchmarks/partial.py with the heritage model it found no more originals than the
global descriptor alone (a window's features see their surroundings; a cut detail's do not).

Boxes are fractions of the picture's width and height, (x0, y0, x1, y1) in [0, 1], so they hold
at any decoded size. A scheme's `key` (its name and a hash of what defines it) names the folder
its vectors are stored in and is recorded in its index: vectors of two schemes never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

#: What `found_by` says of a candidate: which search found it among its top k (LOCAL: only
#: the local-feature votes, cbir.votes; a candidate they found too has `votes`).
GLOBAL, REGIONS, BOTH, LOCAL = "global", "regions", "both", "local"


@dataclass(frozen=True)
class RegionScheme:
    """Square grids of overlapping windows (in the picture's own proportions)."""

    name: str
    sides: tuple[float, ...]  # window side, as a fraction of the picture's width and height
    overlap: float = 0.5  # of a window's side shared with the next one
    # the scales a window is embedded at (x embed.resolution): (1.0,) costs one network pass
    # per window at the input size, where the global descriptor's [1.0, 1.25] cost 2.56
    scales: tuple[float, ...] = (1.0,)

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"

    def boxes(self) -> np.ndarray:
        """The windows, float32 [n, 4] of (x0, y0, x1, y1) fractions, largest windows first."""
        out = []
        for side in self.sides:
            step = side * (1.0 - self.overlap)
            n = max(1, math.ceil((1.0 - side) / step - 1e-9) + 1)
            starts = np.linspace(0.0, 1.0 - side, n) if n > 1 else np.zeros(1)
            out += [(x, y, x + side, y + side) for y in starts for x in starts]
        return np.asarray(out, np.float32)

    @property
    def count(self) -> int:
        return len(self.boxes())

    def decode_size(self, input_size: int) -> int:
        """The size to decode a picture at so that its smallest window still fills the input."""
        return math.ceil(input_size / min(self.sides))


#: The choices of `embed.regions` ("none": global descriptors only).
SCHEMES: dict[str, RegionScheme] = {
    s.name: s
    for s in (
        RegionScheme("halves", (0.5,)),  # 3 x 3 windows of half the side: 9 regions
        RegionScheme("thirds", (0.5, 1 / 3)),  # and 5 x 5 of a third: 34 regions
    )
}
NONE = "none"


def scheme(name: str) -> RegionScheme | None:
    """The scheme `embed.regions` names, None for "none"."""
    if name == NONE:
        return None
    return SCHEMES[name]


def crops(rgb: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    """The windows of a picture (at least one pixel each way)."""
    w, h = rgb.size
    out = []
    for x0, y0, x1, y1 in boxes:
        left, top = min(w - 1, round(x0 * w)), min(h - 1, round(y0 * h))
        out.append(rgb.crop((left, top, max(left + 1, round(x1 * w)), max(top + 1, round(y1 * h)))))
    return out


# --------------------------------------------------------------------------- the union


@dataclass(frozen=True)
class Candidate:
    """One image a query may be a copy or a detail of."""

    image_id: str
    score: float  # the better of its global and best-region similarity to the query
    found_by: str  # GLOBAL, REGIONS, BOTH or LOCAL: which search had it among its top k
    global_score: float | None = None  # when the global search returned it
    region_score: float | None = None  # its best region's, when the regional search found it
    box: tuple[float, float, float, float] | None = None  # that region, as fractions
    votes: int | None = None  # the query's keypoints that voted for it (search.local_candidates)
    turned: int = 0  # the query turned by this many quarter turns anticlockwise found it best


def best_regions(
    scores: np.ndarray, owners: list[str | None], boxes: list[np.ndarray | None]
) -> list[tuple[str, float, np.ndarray]]:
    """One query's regional hits (score order) reduced to each image's best region."""
    seen: set[str] = set()
    out = []
    for score, owner, box in zip(scores, owners, boxes, strict=True):
        if owner is None or owner in seen or box is None:
            continue
        seen.add(owner)
        out.append((owner, float(score), box))
    return out


def union(
    global_hits: list[tuple[str, float]],
    region_hits: list[tuple[str, float, np.ndarray]],
    k: int,
    local_hits: Sequence[tuple[str, int]] = (),
    local_scores: Mapping[str, float] | None = None,
) -> list[Candidate]:
    """The union of one query's global top k, regional top k (images, best region each) and
    the pictures its keypoints voted for (`local_hits`: image_id, votes; best first).

    Ranked by the better of the two similarities: a region that holds the detail scores as
    high as the whole picture does for a full copy; a picture only the votes found ranks by
    its global similarity to the query (`local_scores`, else last). At most k are kept: every
    voted one (up to k), and of the other places at least half for the global top and half for
    the regional top (so no search can crowd another out).
    """
    g = dict(global_hits[:k])
    r = {i: (s, b) for i, s, b in region_hits[:k]}
    v = dict(local_hits[:k])
    cands = []
    for image_id in dict.fromkeys([*g, *r, *v]):
        gs, rb = g.get(image_id), r.get(image_id)
        rs = rb[0] if rb is not None else None
        found = BOTH if gs is not None and rs is not None else GLOBAL if rs is None else REGIONS
        if gs is None and rs is None:
            found, gs = LOCAL, (local_scores or {}).get(image_id)
        box = tuple(float(v) for v in rb[1]) if rb is not None else None
        cands.append(
            Candidate(
                image_id=image_id,
                score=max((s for s in (gs, rs) if s is not None), default=-1.0),
                found_by=found,
                global_score=gs,
                region_score=rs,
                box=box,  # type: ignore[arg-type]  # four floats
                votes=v.get(image_id),
            )
        )
    cands.sort(key=lambda c: -c.score)
    half = max(0, k - len(v)) // 2
    keep = set(v) | {i for i, _ in global_hits[:half]} | {i for i, _, _ in region_hits[:half]}
    chosen = [c for c in cands if c.image_id in keep]
    rest = [c for c in cands if c.image_id not in keep]
    chosen += rest[: max(0, k - len(chosen))]
    chosen.sort(key=lambda c: -c.score)
    return chosen[:k]
