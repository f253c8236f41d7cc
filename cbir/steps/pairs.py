"""`cbir pairs`: every near-duplicate pair of the collection, and clusters of them.

With search.verify, the pairs are checked with local features (cbir.verify; each picture's
extracted once into the features cache, cbir.store.features): the pairs above the threshold,
and each image's nearest search.verify_rank neighbours scoring between search.verify_floor and
the threshold, where a detail of a print lands beside its original; with embed.regions, also
the owners of the regions nearest to each image (the prints it may be a detail of). Each
checked pair gets its relation (`full`, `a_in_b`, `b_in_a`, or `none`), inliers, covered share
and matched box. A neighbour below the threshold that verification confirms is kept as a near
pair (a partial copy, or a copy the descriptor scored low); a pair above the threshold that it
does not confirm is kept and marked `none`. Most pairs above the threshold are copies of a
whole picture, which `verify.verify_pair` confirms from the strongest keypoints alone.

Clusters: a confirmed pair always links its two images, whatever its score (the local
features saw the same picture). A contradicted pair keeps its link: verification misses some
true copies (a re-photograph at a slant, a mirrored print, heavy halftone or damage), and the
threshold was calibrated to the precision asked for; the mark sends it to a reviewer, whose
`different` decision takes it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import faults, verify
from ..arrays import all_distinct
from ..config import Settings
from ..errors import CbirError
from ..faiss_index import faiss_ids
from ..fsutil import clean_stale_tmp, write_parquet
from ..linkage import link
from ..parallel import worker_map
from ..progress import bar as progress_bar
from ..safetext import counted
from ..store.catalog import REPORTED, clean_stale, refresh_catalog
from ..store.decisions import labels
from ..store.features import (
    RECIPE,
    FeatureCache,
    extract_missing,
    feature_cache,
    features_of,
)
from ..store.index import Searcher, open_searcher
from ..store.layout import Layout, layout
from ..store.manifest import (
    CanonicalPaths,
    ImageIds,
    ImageRows,
    canonical_epoch,
    exact_copies,
    ids_in,
    rows_of_images,
)
from ..store.pairs import (
    CHECK_COLUMNS,
    CLUSTER_IDS,
    CLUSTERS_SCHEMA,
    CONFIRMED,
    MAX_RUNS,
    PAIRS_FIX,
    PAIRS_SCHEMA,
    TOKEN,
    ClusterIds,
    PairsState,
    cluster_ids,
    current_cluster_ids,
    delta_file,
    dropped_mask,
    dropped_rows,
    file_token,
    finish_commit,
    new_token,
    pair_files,
    parse_cluster_ids,
    read_searched,
    read_state,
    searched_count,
    searched_files,
    searched_table,
    with_delta,
    write_state,
)
from ..store.tables import read_table
from ..store.vectors import added_between

#: Guard rails: a summary warns when the largest cluster holds more than this share of the
#: collection (and at least CLUSTER_WARN_MIN images), or pairs outnumber images this many times.
CLUSTER_WARN_SHARE = 0.05
CLUSTER_WARN_MIN = 20
PAIRS_PER_IMAGE_WARN = 3.0
# pairs above the threshold that geometric verification contradicted: at least this many and
# this share of the near pairs before a warning (a halftone or a heavy crop escapes it at times)
CONTRADICTED_WARN_MIN = 3
CONTRADICTED_WARN_SHARE = 0.2

Key = tuple[str, str]


@dataclass
class VerifySummary:
    """What the geometric verification of a `cbir pairs` run did."""

    checked: int = 0  # candidate pairs verified by this run
    kept: int = 0  # verifications kept from the recorded pairs (not checked again)
    below: int = 0  # candidates below the threshold that this run checked
    regional: int = 0  # of those, found by the regional index (embed.regions) only
    confirmed_below: int = 0  # of those, confirmed: added as near pairs
    contradicted: int = 0  # pairs above the threshold not confirmed (marked `none`)
    unreadable: int = 0  # pairs not checked: a picture could not be read
    extracted: int = 0  # pictures whose local features this run extracted
    floor: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        kept = f", {self.kept} kept from before" if self.kept else ""
        unread = f", {self.unreadable} not checked (unreadable)" if self.unreadable else ""
        regional = f", {self.regional} of them found by regions" if self.regional else ""
        return (
            f"  verified {counted(self.checked, 'candidate pair')} ({self.below} below the "
            f"threshold, "
            f"down to {self.floor:.4f}{regional}){kept}: {self.confirmed_below} confirmed "
            f"below the threshold, {self.contradicted} contradicted{unread}; local features of "
            f"{counted(self.extracted, 'picture')} extracted; {self.seconds:.1f} s"
        )


@dataclass
class PairsSummary:
    n_images: int = 0
    n_near_pairs: int = 0
    n_exact_pairs: int = 0
    n_clusters: int = 0
    largest_cluster: int = 0
    seconds: float = 0.0
    pairs_file: Path | None = None
    clusters_file: Path | None = None
    pairs_parts: int = 0  # the nightly runs' pairs files beside pairs_file (store.pairs)
    clusters_delta: Path | None = None  # the nightly runs' changes to clusters_file, if any
    searched: int = 0  # images whose neighbours were searched by this run
    searched_back: int = 0  # older images a night searched too: its pairs' other side
    added: int = 0  # near-duplicate pairs this run found that were not recorded before
    incremental: bool = False  # only images not searched before were searched
    thresholds: Any = None  # cbir.steps.calibrate.Thresholds used
    calibration: Any = None  # cbir.steps.calibrate.CalibrateResult when this run calibrated
    confirmed: int = 0  # pairs decided `same` (both images present): always in one cluster
    rejected: int = 0  # pairs decided `different`: never in one cluster
    verification: VerifySummary | None = None  # None: search.verify is off
    trained: bool = False  # the model is a training checkpoint (not the untrained init)

    def lines(self) -> list[str]:
        back = (
            f", and {counted(self.searched_back, 'older neighbour')} of them from the other "
            "side (as a full run searches them, for the checks below the threshold)"
            if self.searched_back
            else ""
        )
        how = (
            f"{counted(self.searched, 'new image')} searched against the collection{back}"
            if self.incremental
            else f"all {self.searched} images searched"
        )
        out = list(self.calibration.lines()) if self.calibration is not None else []
        out += [
            f"pairs: {counted(self.n_near_pairs, 'near-duplicate pair')} and "
            f"{counted(self.n_exact_pairs, 'exact duplicate')} among {self.n_images} images; "
            f"{counted(self.n_clusters, 'cluster')} (largest {self.largest_cluster}); "
            f"{self.seconds:.1f} s"
        ]
        th = self.thresholds
        if th is not None:
            expected = ""
            if th.estimated_precision is not None:
                expected = (
                    f"; expected precision {th.estimated_precision:.3f}, recall "
                    f"{th.estimated_recall:.3f} (self-calibration)"
                )
            out.append(
                f"  threshold {th.pair:.4f} ({th.source}), clusters at {th.cluster:.4f}{expected}"
            )
            if th.no_duplicates:
                out.append(
                    "  the self-calibration expects no near-duplicates in this "
                    "collection: its images' neighbours all look like other photographs"
                )
        if self.verification is not None:
            out.append(self.verification.line())
        if self.confirmed or self.rejected:
            out.append(
                f"  clusters follow {counted(self.confirmed, 'pair')} decided same and "
                f"{self.rejected} decided different (`cbir decide`, `cbir review`)"
            )
        out += [f"  {how}; {counted(self.added, 'new pair')}", *self._files()]
        return out + [f"  warning: {w}" for w in self.warnings()]

    def _files(self) -> list[str]:
        """Where the pairs and clusters are: with nightly runs' files beside the two, a reader
        of pairs.parquet or clusters.parquet alone would miss the nights, so say so."""
        pairs, clusters = f"  {self.pairs_file}", f"  {self.clusters_file}"
        if self.pairs_parts:
            pairs += f" and {counted(self.pairs_parts, 'nightly file')} beside it in runs/"
        if self.clusters_delta is not None:
            clusters += f" and the nights' changes to it in runs/{self.clusters_delta.name}"
        if not self.pairs_parts and self.clusters_delta is None:
            return [pairs, clusters]
        return [
            pairs,
            clusters,
            "  (`cbir sql`'s duplicate_pairs and clusters views read them together)",
        ]

    def warnings(self) -> list[str]:
        """What looks wrong, with its likely cause and the command that fixes it."""
        from .calibrate import GROUND_TRUTH

        out = []
        th, n = self.thresholds, max(1, self.n_images)
        fixed = th is not None and th.source == "params"
        # labels decided the threshold: the self-calibration's figures are a second opinion
        labelled = th is not None and th.source == GROUND_TRUTH
        fix = (
            "set search.pair_threshold: auto (calibrated to search.precision_target) and run "
            "`cbir calibrate`, then `cbir pairs`"
            if fixed
            else f"{self._train_advice()}, or raise search.cluster_threshold"
        )
        if self.largest_cluster >= max(CLUSTER_WARN_MIN, CLUSTER_WARN_SHARE * n):
            out.append(
                f"the largest cluster holds {self.largest_cluster} of {self.n_images} "
                f"images ({self.largest_cluster / n:.0%}): near-duplicate links chain "
                f"unrelated images together, so the threshold is too low for this "
                f"model; {fix}"
            )
        if self.n_near_pairs > max(50, PAIRS_PER_IMAGE_WARN * n):
            out.append(
                f"{self.n_near_pairs} pairs for {self.n_images} images "
                f"({self.n_near_pairs / n:.1f} per image): most are likely false; {fix}"
            )
        vs = self.verification
        if (
            vs is not None
            and vs.contradicted >= CONTRADICTED_WARN_MIN
            and vs.contradicted >= CONTRADICTED_WARN_SHARE * max(1, self.n_near_pairs)
        ):
            # the local features' word, whatever chose the threshold: labels too few or too
            # hard, a self-calibration or a fixed value off for this collection
            why = (
                "the labels that chose it may be too few, or name a copy the model scores low "
                "(`cbir calibrate` says which); label more groups, or raise "
                "search.precision_target"
                if labelled
                else fix
            )
            out.append(
                f"geometric verification contradicted {vs.contradicted} of the "
                f"{self.n_near_pairs} pairs above the threshold (kept as relation none, in "
                f"their clusters until a reviewer decides): the threshold is likely too low "
                f"for this collection; {why}"
            )
        if (
            th is not None
            and not labelled
            and not th.unreachable  # said below: no threshold to raise past identical pictures
            and th.estimated_precision is not None
            and th.estimated_precision < th.target - 0.05
        ):
            out.append(
                f"at threshold {th.pair:.4f} the self-calibration expects only "
                f"{th.estimated_precision:.0%} of the pairs to be duplicates (target "
                f"{th.target:.0%}); {fix}"
            )
        if th is not None and th.unreachable and not th.no_duplicates:
            confirmed = " and pairs geometric verification confirms" if self.verification else ""
            out.append(
                f"no threshold reaches precision {th.target:g} here: for this model, "
                f"near-duplicates and other photographs score alike, so only pairs scoring "
                f"{th.pair:.4f} (identical pictures){confirmed} are reported; "
                f"{self._train_advice()}, or lower search.precision_target"
            )
        elif (
            th is not None
            and not fixed
            and not labelled
            and not th.no_duplicates
            and th.estimated_recall is not None
            and th.estimated_recall < 0.5
        ):
            below = (
                f" (geometric verification added {vs.confirmed_below} pairs below it)"
                if vs is not None and vs.confirmed_below
                else ""
            )
            out.append(
                f"the calibrated threshold finds only {th.estimated_recall:.0%} of the "
                f"held-out test copies{below}: this model tells copies from other images "
                f"apart poorly; {self._train_advice()}"
            )
        return out

    def _train_advice(self) -> str:
        # Training again with the same params gives the same model: a trained one needs longer.
        if self.trained:
            return (
                "train the model longer (more train.epochs, within train.time_budget_minutes; "
                "then `cbir train`, `cbir embed`, `cbir index`, `cbir pairs`)"
            )
        return (
            "train the model on the collection (`cbir train`, then `cbir embed`, `cbir index`, "
            "`cbir pairs`)"
        )


def search_batch(n: int) -> int:
    """Queries a batch of the all-pairs search over `n` images: 4,096, or where more, enough
    that a batch's candidates (about fifty a query) want a good part of a large vector file,
    which re-ranking then reads in order (store.vectors.RowReader.inner_products) rather than a
    row at a time; 78,125 at 10^7 images. At 10^7, in alternating rounds, batches of 39,062,
    65,536 and 131,072 searched 3,947-4,936, 5,010-5,435 and 5,319-5,773 queries a second."""
    return int(min(1 << 17, max(4096, n // 128)))


def knn_pairs(
    s: Searcher,
    k: int,
    threshold: float,
    batch: int | None = None,
    rows: np.ndarray | None = None,
) -> dict[tuple[str, str], tuple[float, int]]:
    """Every unordered pair (a, b) found in each other's top k with score >= threshold.

    Value: (best score, best rank); ranks count from 1 after the image itself is left out.
    `rows` (indices into s.image_ids): search only these images, against the whole index.
    In arrays throughout (no Python work per neighbour): image_ids are sorted, so the smaller
    row is the smaller id.
    """
    batch = batch or search_batch(len(s.image_ids))
    order = np.arange(len(s.image_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(order) > batch:
        s.read_ahead()  # re-ranking will want most of the vector file
        s.map_lists()  # each image probes around its list (cbir.probes): all found at once
    found_a, found_b, found_s, found_r = [], [], [], []
    for start in range(0, len(order), batch):
        sel = order[start : start + batch]
        q = s.vectors[start : start + batch] if rows is None else s.vectors[sel]
        scores, hit = s.search_rows(q, k + 1, rows=sel)
        faults.point("pairs.batch")
        me = np.broadcast_to(sel[:, None], hit.shape)
        valid = (hit >= 0) & (hit != me)
        rank = np.cumsum(valid, axis=1)
        keep = valid & (rank <= k) & (scores >= threshold)
        a, b = me[keep], hit[keep]
        found_a.append(np.minimum(a, b))
        found_b.append(np.maximum(a, b))
        found_s.append(scores[keep])
        found_r.append(rank[keep])
    if not found_a or not sum(len(x) for x in found_a):
        return {}
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    sc, rk = np.concatenate(found_s), np.concatenate(found_r)
    key = a.astype(np.int64) * len(s.image_ids) + b
    by = np.argsort(key, kind="stable")
    key, a, b, sc, rk = key[by], a[by], b[by], sc[by], rk[by]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    best_s = np.maximum.reduceat(sc, first)
    best_r = np.minimum.reduceat(rk, first)
    left, right = s.image_ids.take(a[first]), s.image_ids.take(b[first])
    return {
        (i, j): (score, int(r))
        for i, j, score, r in zip(left, right, best_s.tolist(), best_r.tolist(), strict=True)
    }


def from_both_sides(
    s: Searcher,
    knn: dict[Key, tuple[float, int]],
    rows: np.ndarray,
    k: int,
    rank: int,
    floor: float,
    threshold: float,
) -> tuple[dict[Key, tuple[float, int]], int]:
    """A night's pairs (`knn`: each ranked in its new image's list; `rows`, the new images)
    with the ranks a full run gives them. A full run checks a neighbour below the threshold
    where either image has the other among its nearest `rank`, and a night searched only one
    side: the older image of each pair below the threshold that its new image ranks beyond
    `rank` is searched too, against the whole index as a full run searches it, and each pair
    keeps its better rank (a half-size copy arriving that is a crop's 2nd neighbour and has the
    crop 4th). Pairs of two older images met on the way were found by their own searches and
    are left out. Returns the pairs and how many older images were searched."""
    new = set(s.image_ids.take(rows))
    older = sorted(
        {b if a in new else a for (a, b), (sc, rk) in knn.items() if rk > rank and sc < threshold}
        - new
    )
    if not older:
        return knn, 0
    back = s.rows_of(faiss_ids(older))  # the searcher's own lookup of its ids
    out = dict(knn)
    for key, (sc, rk) in knn_pairs(s, k, floor, rows=np.sort(back[back >= 0])).items():
        if key[0] not in new and key[1] not in new:
            continue
        was = out.get(key)
        out[key] = (sc, rk) if was is None else (max(was[0], sc), min(was[1], rk))
    return out, len(older)


def region_pairs(
    s: Searcher, k: int, floor: float, batch: int = 4096, rows: np.ndarray | None = None
) -> dict[tuple[str, str], tuple[float, int]]:
    """Pairs (a, b) where b owns one of the regions nearest to a's whole picture: a may be a
    detail of b. Each image's k nearest owners besides itself; value (the two pictures' global
    score, the owner's rank among them), kept when the regional score is >= floor. Nothing
    without a regional index (embed.regions: none).

    `rows` (an incremental run: the new images): also the other way round, each new image's
    regions searched among the whole pictures, so that a new print finds the details of it
    that the collection already holds (their own searches are not run again)."""
    out: dict[tuple[str, str], tuple[float, int]] = {}
    if s.regions is None or k == 0:
        return out
    row_of = {image_id: i for i, image_id in enumerate(s.image_ids)}

    def add(me: str, found: list[tuple[str, float]]) -> None:
        hits = [(o, sc) for o, sc in found if o != me and o in row_of][:k]
        for rank, (other, region_score) in enumerate(hits, start=1):
            if region_score < floor:
                continue
            key = (me, other) if me < other else (other, me)
            score = float(
                np.dot(
                    np.asarray(s.vectors[row_of[me]], np.float32),
                    np.asarray(s.vectors[row_of[other]], np.float32),
                )
            )
            old = out.get(key)
            out[key] = (score, rank) if old is None else (old[0], min(old[1], rank))

    order = np.arange(len(s.image_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    for start in range(0, len(order), batch):
        sel = order[start : start + batch]
        q = np.asarray(s.vectors[sel], np.float32)
        for r, hits in zip(sel, s.regions.search(q, k + 1), strict=True):
            add(s.image_ids[r], [(o, sc) for o, sc, _ in hits])
    if rows is not None and len(rows):
        new = {s.image_ids[r] for r in rows}
        mine = np.array([i for i, o in enumerate(s.regions.owners) if o in new], np.int64)
        for start in range(0, len(mine), batch):
            sel = mine[start : start + batch]
            scores, ids = s.search(np.asarray(s.regions.vectors[sel], np.float32), k + 1)
            for r, sc_row, id_row in zip(sel, scores, ids, strict=True):
                found = [(o, float(sc)) for o, sc in zip(id_row, sc_row, strict=True) if o]
                add(s.regions.owners[r], found)
    return out


def clusters_from_pairs(
    pairs: dict[tuple[str, str], tuple[float, int]],
    threshold: float,
    *,
    same: Iterable[tuple[str, str]] = (),
    different: Iterable[tuple[str, str]] = (),
    verified: Iterable[tuple[str, str]] = (),
) -> list[tuple[list[str], float]]:
    """Connected components over pairs with score >= threshold, largest first.

    Each comes with its weakest link: the lowest similarity needed to keep it connected (the
    smallest edge of its maximum spanning tree), found by joining edges strongest first.

    Reviewers' decisions (pair keys, image_a < image_b) come first: a pair confirmed `same`
    always joins, whatever its score (it counts as a link of score 1: the weakest link is that
    of the links nobody confirmed); two images decided `different` never end up in one cluster
    (an edge that would join them, directly or through others, is left out). Pairs that
    geometric verification confirmed (`verified`) join whatever their score, as links of
    their score.
    """
    confirmed = sorted((1.0, a, b) for a, b in same)
    checked = set(verified)
    edges = sorted(
        ((sc, a, b) for (a, b), (sc, _) in pairs.items() if sc >= threshold or (a, b) in checked),
        key=lambda e: (-e[0], e[1], e[2]),
    )
    return link(confirmed + edges, different)


def exact_duplicate_pairs(
    settings: Settings, read: ImageRows | None = None
) -> list[dict[str, Any]]:
    """Byte-identical copies from the manifest, as pairs with score 1 (store.manifest.exact_copies:
    only the copies become rows; `read`: the manifest's rows read already)."""
    return [
        {
            "image_a": image_id,
            "image_b": image_id,
            "path_a": canonical,
            "path_b": copy,
            "score": 1.0,
            "rank": 0,
            "kind": "exact",
        }
        for image_id, canonical, copy in exact_copies(settings, read)
    ]


def _search_state(s: Searcher, cfg: Any, pair_threshold: float) -> dict[str, str]:
    """What the recorded pairs depend on besides the images: a change means searching all."""
    return {
        "fingerprint": s.fingerprint,
        "k": str(cfg.k),
        "pair_threshold": repr(float(pair_threshold)),
        # which neighbours were verified: turning verification on finds pairs below the
        # threshold among images searched before
        "verify": (
            f"{CHECKS} floor {float(cfg.verify_floor)!r} rank {cfg.verify_rank}"
            if cfg.verify
            else "off"
        ),
        "regions": str(s.regions is not None),
    }


#: What a recorded verification depends on: the local features (their recipe) and the rules
#: that read a relation off a fit (a verification by other ones is done again).
CHECKS = f"{RECIPE} rules {verify.RULES}"


def _recorded_recipe(lay: Layout) -> str | None:
    """The features recipe and rules the recorded pairs' verification used (None: none, or
    unknown)."""
    try:
        meta = pq.read_schema(lay.searched).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = meta.get(b"verify", b"off").decode("utf-8", "replace")
    return value.split(" floor ")[0] if value != "off" else None


def _checks_of(table: pa.Table, revised: Sequence[str] = ()) -> dict[Key, verify.Match]:
    """The verification recorded with each near pair that it confirmed. One that confirmed
    nothing is checked again: matching has learnt since (a mirrored copy, cbir.verify), and
    such pairs are few (the unconfirmed ones below the threshold are not recorded); so is one
    whose relation is among `revised` (verify.REVISED, after a change of verify.RULES)."""
    cols = ["image_a", "image_b", "kind", *CHECK_COLUMNS]
    out = {}
    for r in table.select(cols).to_pylist():
        if r["kind"] != "near" or r["relation"] in (None, "none", *revised):
            continue
        box = None
        if r["box_x0"] is not None:
            box = (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"])
        out[(r["image_a"], r["image_b"])] = verify.Match(
            inliers=int(r["inliers"] or 0),
            relation=r["relation"],
            covered=float(r["covered"] or 0.0),
            box=box,
            box_on=r["box_on"] or "",
        )
    return out


def _check_columns(m: verify.Match | None) -> dict[str, Any]:
    if m is None:
        return {}
    box = m.box or (None, None, None, None)
    return {
        "inliers": m.inliers,
        "relation": m.relation,
        "covered": m.covered,
        "box_on": m.box_on or None,
        "box_x0": box[0],
        "box_y0": box[1],
        "box_x1": box[2],
        "box_y1": box[3],
    }


#: Pairs of one picture handed to a verifying process at a time: its features are read once
#: for them, and the processes stay evenly loaded.
VERIFY_GROUP = 32
_verifier_cache: FeatureCache | None = None


def _init_verifier(folder: Path) -> None:
    """A verifying process's reader of the cache: the caller's, where the process has it (this
    process, or a forked one), else read from `folder` (a forkserver's worker)."""
    global _verifier_cache
    if _verifier_cache is None or _verifier_cache.folder != folder:
        _verifier_cache = FeatureCache(folder)


def _verify_group(group: tuple[str, list[str]]) -> list[tuple[Key, verify.Match | None, bool]]:
    """Verify picture a against each b from the cache: (key, match, True), or (key, None,
    False) where a picture's features are not in the cache (damaged since: the caller
    extracts them again)."""
    assert _verifier_cache is not None
    a, bs = group
    fa = _verifier_cache.get(a)
    out: list[tuple[Key, verify.Match | None, bool]] = []
    for b in bs:
        fb = _verifier_cache.get(b) if fa is not None else None
        if fa is None or fb is None:
            out.append(((a, b), None, False))
        else:
            out.append(((a, b), verify.verify_pair(fa, fb), True))
    return out


def verify_pairs(
    settings: Settings, keys: Iterable[Key], *, progress: bool = False
) -> tuple[dict[Key, verify.Match | None], int]:
    """Geometric verification of pairs (image_a, image_b): their features from the cache,
    extracted first where missing (in parallel, in atomic parts: a killed run keeps them),
    then the pairs checked in `decode_workers` processes, a picture's pairs together.
    Returns each pair's match (None: a picture could not be read) and how many pictures'
    features were extracted."""
    keys = sorted(set(keys))  # by image_a: its features are read once for all its pairs
    cache = feature_cache(settings)
    cache.clean()
    need = {i for key in keys for i in key}
    raw, failed, extracted = extract_missing(settings, cache, need, progress=progress)
    groups: list[tuple[str, list[str]]] = []
    for key in keys:
        if groups and groups[-1][0] == key[0] and len(groups[-1][1]) < VERIFY_GROUP:
            groups[-1][1].append(key[1])
        else:
            groups.append((key[0], [key[1]]))
    workers = max(1, min(settings.decode_workers, len(groups) // 4 or 1))
    out: dict[Key, verify.Match | None] = {}
    bar = progress_bar(len(keys), "verify pairs", "pair", progress)
    global _verifier_cache
    _verifier_cache = cache  # this process's (and, forked, its workers') reader
    with (
        contextlib.closing(bar),
        worker_map(
            _verify_group,
            groups,
            workers,
            preload=["cbir.steps.pairs"],
            initializer=_init_verifier,
            initargs=(cache.folder,),
            ordered=True,
            chunksize=1,
        ) as results,
    ):
        for group in results:
            for (a, b), match, read in group:
                if not read:  # damaged in the cache since: extracted again, checked here
                    fa, fb = features_of(cache, [a, b], raw, settings.ingest.max_pixels, failed)
                    match = None if fa is None or fb is None else verify.verify_pair(fa, fb)
                out[(a, b)] = match
                faults.point("pairs.verify")
                bar.update(1)
    return out, extracted


def _same_search(recorded: PairsState | None, state: dict[str, str]) -> bool:
    """Whether the recorded pairs were searched as this run searches (else: all again)."""
    return recorded is not None and all(recorded.search.get(k) == v for k, v in state.items())


def _unsearched_since(
    settings: Settings, s: Searcher, recorded: PairsState | None, state: dict[str, str]
) -> np.ndarray | None:
    """The rows of the images not searched yet, found among the rows the manifest and the
    vector file appended since the recorded search (store.vectors.added_between), without
    reading the 10^7 searched ids and looking every present image up among them (1.3-1.8 s
    at 10^7). It holds where the searched files list exactly the images present then, as
    every run leaves them, so that with only rows appended since, they and the new rows'
    present images make up the present ones: checked by count. None: compare every image."""
    if recorded is None or recorded.opened is None or not _same_search(recorded, state):
        return None
    now = getattr(s.vectors, "stamp", None)
    rows = added_between(settings, s.fingerprint, recorded.opened, now, s.image_ids)
    if rows is None:
        return None
    n = searched_count(searched_files(layout(settings)))
    if n is None or n + len(rows) != len(s.image_ids):
        return None  # an image searched then is gone, or one added then was searched
    return rows


def _searched_before(
    lay: Layout, recorded: PairsState | None, state: dict[str, str]
) -> ImageIds | None:
    """Ids whose neighbours the recorded pairs already hold: the base's and the committed
    partitions' (None: search everything again)."""
    if not _same_search(recorded, state):
        return None
    try:
        return read_searched(searched_files(lay))
    except (OSError, pa.ArrowException):
        return None


class _Present:
    """The searcher's images as a container (no set of 10^7 strings: Searcher.present)."""

    def __init__(self, s: Searcher):
        self.s = s

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self.s.present([image_id])[0])


#: What clustering reads of a pair (_edges): a night that folds nothing reads only these of the
#: recorded pairs (10^6 pairs at 10^7 images, their paths and checks left on disk).
LINKS = ["image_a", "image_b", "score", "kind", "relation"]


def _recorded_near(lay: Layout, columns: list[str] | None = None) -> pa.Table:
    """The near pairs of every committed file (the base and the partitions), their `columns`
    (all by default; `kind` among them); none when a file is unreadable (then everything is
    found again)."""
    empty = PAIRS_SCHEMA.empty_table()
    empty = empty if columns is None else empty.select(columns)
    try:
        tables = [
            read_table(f, PAIRS_SCHEMA, PAIRS_FIX, columns)
            for f in pair_files(lay)
            if f != lay.exact
        ]
    except CbirError:
        return empty
    if not tables:
        return empty
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    return table.filter(pc.equal(table.column("kind"), "near"))


def _near_table(
    pairs: dict[Key, tuple[float, int]],
    checks: dict[Key, verify.Match | None],
    s: Searcher,
    read: ImageRows | None = None,
) -> pa.Table:
    """The pairs as PAIRS_SCHEMA rows, strongest first; their paths from `read` (the manifest's
    rows of their images) where given, else looked up."""
    ids = {x for key in pairs for x in key}
    path = read.paths_of(ids) if read is not None else {}
    if missing := ids - path.keys():
        path.update(_paths_of(s.path_of, missing))
    rows = [
        {
            "image_a": a,
            "image_b": b,
            "path_a": path[a],
            "path_b": path[b],
            "score": sc,
            "rank": rk,
            "kind": "near",
            **_check_columns(checks.get((a, b))),
        }
        for (a, b), (sc, rk) in pairs.items()
    ]
    return _by_score(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))


def _paths_of(path_of: Mapping[str, str], ids: set[str]) -> dict[str, str | None]:
    """The canonical path of each of `ids`: a few looked up without sorting the whole manifest."""
    listed = sorted(ids)
    if isinstance(path_of, CanonicalPaths):
        return dict(zip(listed, path_of.paths(listed), strict=True))
    return {i: path_of.get(i) for i in listed}


def _path_column(path_of: Mapping[str, str], ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The canonical path of each of `ids` as a column (null: none): by bisection in arrays
    where the paths are the manifest's (CanonicalPaths; at 10^7 no join with its rows)."""
    if isinstance(path_of, CanonicalPaths):
        return path_of.path_array(ids)
    return pa.array([path_of.get(i) for i in ids.to_pylist()], pa.string())


def _by_score(table: pa.Table) -> pa.Table:
    """Strongest first, then by the pair's ids: the one order of every pairs file."""
    return table.sort_by(
        [("score", "descending"), ("image_a", "ascending"), ("image_b", "ascending")]
    )


def _moved(table: pa.Table, path_of: Mapping[str, str]) -> bool:
    """Whether a recorded pair names an image by a path that is no longer its canonical one (a
    file moved, or its copy became the canonical one)."""
    for side in "ab":
        ids = table.column(f"image_{side}").combine_chunks()
        paths = table.column(f"path_{side}").combine_chunks()
        if isinstance(path_of, CanonicalPaths):
            if path_of.moved(ids, paths):
                return True
        elif any(
            path_of.get(i) != p for i, p in zip(ids.to_pylist(), paths.to_pylist(), strict=True)
        ):
            return True
    return False


def _edges(table: pa.Table, threshold: float) -> list[tuple[float, str, str]]:
    """The near pairs that link their images in clusters, strongest first: score >= threshold,
    or confirmed by geometric verification whatever their score."""
    keep = pc.or_(
        pc.greater_equal(table.column("score"), threshold),
        pc.fill_null(pc.is_in(table.column("relation"), value_set=pa.array(CONFIRMED)), False),
    )
    t = table.filter(keep)
    edges = zip(
        t.column("score").to_pylist(),
        t.column("image_a").to_pylist(),
        t.column("image_b").to_pylist(),
        strict=True,
    )
    return sorted(edges, key=lambda e: (-e[0], e[1], e[2]))


def _cluster_table(
    clusters: list[tuple[list[str], float]],
    s: Searcher,
    known: Mapping[str, str | None] | None = None,
    start: int = 1,
) -> pa.Table:
    """The clusters' rows, numbered from `start` in their order, each member with its
    canonical path: from `known` (current paths the caller holds), else looked up."""
    known = known or {}
    path: dict[str, str | None] = {
        m: known[m] for members, _ in clusters for m in members if m in known
    }
    if wanted := {m for members, _ in clusters for m in members if m not in path}:
        path.update(_paths_of(s.path_of, wanted))
    rows = [
        {
            "cluster_id": cid,
            "image_id": m,
            "path": path[m],
            "size": len(members),
            "weakest_link": weak,
        }
        for cid, (members, weak) in enumerate(clusters, start=start)
        for m in members
    ]
    return pa.Table.from_pylist(rows, schema=CLUSTERS_SCHEMA)


def _inputs_digest(threshold: float, decided: Any) -> str:
    """What the clusters depend on besides the pairs: a change means clustering all again."""
    blob = json.dumps([repr(float(threshold)), sorted(decided.same), sorted(decided.different)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Clustered:
    """The clusters as recorded (store.pairs.clusters_files): the incremental runs' changes to
    clusters.parquet (`delta`, empty where none), and the clusters both make (`current`, in
    _MEMBERSHIP's columns)."""

    delta: pa.Table
    current: pa.Table
    ids: ClusterIds | None


#: What a night reads of clusters.parquet: which cluster each image is in and its size. Not
#: the paths (the manifest's rows read for the members hold them) nor the weakest links (those
#: of the clusters touched are found again): 10^7 images, 1.9 million rows, 0.24 s read whole.
_MEMBERSHIP = ["cluster_id", "image_id", "size"]


def _read_clusters(lay: Layout, state: PairsState) -> _Clustered | None:
    """The clusters `state` commits (None: a file unreadable, or not the one it names)."""
    path = delta_file(lay, state)
    if path is not None and file_token(path) != state.clusters_delta:
        return None
    try:
        base = read_table(lay.clusters, CLUSTERS_SCHEMA, PAIRS_FIX, _MEMBERSHIP)
        delta = (
            read_table(path, CLUSTERS_SCHEMA, PAIRS_FIX).replace_schema_metadata(None)
            if path is not None
            else CLUSTERS_SCHEMA.empty_table()
        )
    except CbirError:
        return None
    return _Clustered(
        delta,
        with_delta(base, delta.select(_MEMBERSHIP)),
        cluster_ids(path if path is not None else lay.clusters),
    )


@dataclass(frozen=True)
class _ClusterUpdate:
    """A night's clusters: the incremental runs' changes to clusters.parquet (`delta`; None:
    unchanged), their ids, and how many clusters there are now and the largest one's size."""

    delta: pa.Table | None
    ids: ClusterIds
    n_clusters: int
    largest: int

    def write(self, lay: Layout) -> str:
        """Write `delta` (not None) to a file of its own; its token, which names it."""
        assert self.delta is not None
        token = new_token()
        meta = {**self.ids.meta(), TOKEN: token}
        write_parquet(self.delta.replace_schema_metadata(meta), lay.run_clusters(token))
        return token


def _holding(clusters: pa.Table, ids: pa.Array) -> pa.Array:
    """Which rows of `clusters` are of a cluster holding any of `ids` (strings)."""
    hit = clusters.filter(pc.is_in(clusters.column("image_id"), value_set=ids))
    return pc.is_in(clusters.column("cluster_id"), value_set=pc.unique(hit.column("cluster_id")))


def _update_clusters(
    clustered: _Clustered,
    new: pa.Table,
    near: pa.Table,
    threshold: float,
    decided: Any,
    s: Searcher,
    paths_current: bool = False,
    read: ImageRows | None = None,
) -> _ClusterUpdate | None:
    """The clusters with this run's new pairs (`new`; `near`: all near pairs, new ones
    included), updated from the recorded ones (`clustered`) instead of clustered all again: the
    clusters the new links touch, and the new images, are clustered again from their own links
    (union-find, strongest first: their weakest links too); the others stay, under their ids.
    The clusters formed take new ids (CLUSTER_IDS). Only the incremental runs' changes are
    written again (_ClusterUpdate.delta: the clusters formed since clusters.parquet and the ids
    of its clusters they replace), not the clusters they leave (10^6 at 10^7 images: 0.7 s
    a night). None where that would not be what clustering everything gives: a reviewer's
    `different` decision involves an image of the touched clusters (it changes which links
    count). `paths_current`: the recorded paths are the canonical
    ones (the manifest's canonical epoch is theirs), so the new pairs' paths are taken as they
    are rather than looked up in the manifest (0.4 s at 10^7); `read`: the manifest's rows of
    the members (rows_of_images), whose paths are current (those not read are looked up)."""
    old, ids = clustered.current, clustered.ids
    if ids is None:  # written before ids were kept: numbered by size, 1 to the largest id
        top = pc.max(old.column("cluster_id")).as_py() if old.num_rows else 0
        ids = ClusterIds(new_token(), (top or 0) + 1)
    n_old = pc.count_distinct(old.column("cluster_id")).as_py() if old.num_rows else 0
    added = _edges(new, threshold)
    if not added:
        largest = pc.max(old.column("size")).as_py() if old.num_rows else 0
        return _ClusterUpdate(None, ids, n_old or 0, largest or 0)
    touched = pa.array(sorted({x for _, a, b in added for x in (a, b)}), pa.string())
    in_hit = _holding(old, touched)
    joined = old.filter(in_hit)  # the clusters the new links join, dropped
    group = pa.concat_arrays([touched, joined.column("image_id").combine_chunks()]).unique()
    members = set(group.to_pylist())
    if any(a in members or b in members for a, b in decided.different):
        return None
    same = sorted((1.0, a, b) for a, b in decided.same if a in members and b in members)
    if any((a in members) != (b in members) for a, b in decided.same):
        return None
    inside = pc.and_(
        pc.is_in(near.column("image_a"), value_set=group),
        pc.is_in(near.column("image_b"), value_set=group),
    )
    known = read.paths_of(members) if read is not None else {}
    if paths_current:
        for image_ids, paths in (
            (new.column("image_a"), new.column("path_a")),
            (new.column("image_b"), new.column("path_b")),
        ):
            known.update(
                (i, p)
                for i, p in zip(image_ids.to_pylist(), paths.to_pylist(), strict=True)
                if p is not None
            )
    # link() lists clusters by size and members sorted: each cluster led by its smallest
    # member; numbered in that order from the next id
    formed = link(same + _edges(near.filter(inside), threshold))
    regrouped = _with_firsts(_cluster_table(formed, s, known, start=ids.next))
    # the nights' file again: its clusters the new links leave, those formed, in the clusters'
    # order; then the clusters of clusters.parquet replaced, those before and those joined now
    hit = pc.unique(joined.column("cluster_id"))
    delta = clustered.delta
    gone = dropped_mask(delta)
    formed_before = delta.filter(pc.invert(gone))
    stays = pc.invert(pc.is_in(formed_before.column("cluster_id"), value_set=hit))
    kept = _with_firsts(formed_before.filter(stays))
    members = pa.concat_tables([kept, regrouped.cast(kept.schema)]).sort_by(_ORDER)
    replaced = pa.concat_arrays(
        [
            delta.filter(gone).column("cluster_id").combine_chunks(),
            hit.filter(pc.invert(pc.is_in(hit, value_set=formed_before.column("cluster_id")))),
        ]
    ).sort()
    out = pa.concat_tables(
        [members.drop_columns(["first"]).cast(CLUSTERS_SCHEMA), dropped_rows(replaced)]
    )
    sizes = np.asarray(old.column("size").to_numpy(zero_copy_only=False))
    left = sizes[~np.asarray(in_hit, bool)]
    largest = max([int(left.max()) if len(left) else 0, *(len(m) for m, _ in formed)])
    now = ClusterIds(ids.lineage, ids.next + len(formed))
    return _ClusterUpdate(out, now, (n_old or 0) - len(hit) + len(formed), largest)


def _numbered_whole(
    clusters: pa.Table, given: ClusterIds | None
) -> Callable[[dict[str, str] | None], dict[str, str]]:
    """The metadata of clusters numbered whole (by size from 1), given what the clusters file
    holds where it holds these very clusters (_write_tokened): their ids' lineage where they
    are the ids given so far (`given`: store.pairs.current_cluster_ids, no night's changes
    beside the file) and its next id shows no night numbered any since (a rerun that changes
    nothing rewrites nothing), else a new one, so that no id names two groups in one lineage."""
    n = pc.count_distinct(clusters.column("cluster_id")).as_py() if clusters.num_rows else 0

    def meta(held: dict[str, str] | None) -> dict[str, str]:
        was = parse_cluster_ids((held or {}).get(CLUSTER_IDS))
        if was is not None and was == given and was.next == n + 1:
            return was.meta()
        return ClusterIds(new_token(), n + 1).meta()

    return meta


_ORDER = [("size", "descending"), ("first", "ascending"), ("image_id", "ascending")]


def _with_firsts(clusters: pa.Table) -> pa.Table:
    """`clusters` with each row's cluster's smallest member id (`first`). A clusters file is
    in order (size, then the smallest member; members by id), so each cluster is a run of rows
    led by its smallest member: read off in one pass (10^6 clusters: grouping and joining them
    took 0.5-0.8 s). Rows in any other order are grouped."""
    cid = np.asarray(clusters.column("cluster_id").to_numpy(), np.int64)
    ids = clusters.column("image_id").combine_chunks()
    if len(cid):
        starts = np.r_[True, cid[1:] != cid[:-1]]
        lead = np.maximum.accumulate(np.where(starts, np.arange(len(cid)), 0))
        first = ids.take(pa.array(lead))
        runs = all_distinct(cid[starts])  # each cluster's rows together: no id heads two runs
        if runs and pc.all(pc.greater_equal(ids, first)).as_py():  # led by the smallest
            return clusters.append_column("first", first)
    firsts = clusters.group_by("cluster_id").aggregate([("image_id", "min")])
    joined = clusters.join(firsts, "cluster_id")
    return joined.rename_columns([*clusters.column_names, "first"])


def _write_tokened(
    table: pa.Table,
    target: Path,
    meta: dict[str, str] | Callable[[dict[str, str] | None], dict[str, str]],
    staged: Path | None = None,
) -> str:
    """Write `table` with `meta` and a new token, atomically, to `staged` (or `target`), and
    return the token; where `target` already holds this table and meta, leave it (DVC sees no
    change) and return its token. `meta` may be chosen by what `target` holds: given its
    metadata (token aside) where it holds this table, else None."""
    token = file_token(target)
    held = None
    if token is not None:
        try:  # another number of rows: changed, without reading it (10^6 rows: 0.1 s)
            same_rows = pq.read_metadata(target).num_rows == table.num_rows
            old = pq.read_table(target) if same_rows else None
        except (OSError, pa.ArrowException):
            old = None
        if old is not None and old.replace_schema_metadata(None).equals(table):
            held = {k.decode(): v.decode() for k, v in (old.schema.metadata or {}).items()}
            held.pop(TOKEN, None)
    meta = meta(held) if callable(meta) else meta
    if token is not None and held == meta:
        return token
    token = new_token()
    write_parquet(table.replace_schema_metadata({**meta, TOKEN: token}), staged or target)
    return token


def _write_if_changed(table: pa.Table, target: Path) -> None:
    """Write atomically unless the file already holds this table (DVC then sees no change)."""
    if target.is_file():
        try:
            old = pq.read_table(target)
        except (OSError, pa.ArrowException):
            old = None
        if (
            old is not None
            and old.schema.equals(table.schema, check_metadata=True)
            and old.equals(table)
        ):
            return
    write_parquet(table, target)


def run_pairs(
    settings: Settings, *, incremental: bool = False, progress: bool = False
) -> PairsSummary:
    """Write every near-duplicate pair and cluster to Parquet and the DuckDB catalogue.

    `incremental` (the nightly run): search only the images whose neighbours were never searched
    (those that arrived since) against the whole collection (and, with search.verify, the older
    side of their pairs below the threshold: from_both_sides), and write the pairs they add as
    the run's own partition (cbir.store.pairs): the recorded pairs are not rewritten, and
    neither are the clusters the new pairs do not touch (_update_clusters). One row per
    unordered pair: a new pair involves a new image, which no recorded pair does. When images
    were removed, recorded pairs name moved files, or MAX_RUNS partitions have piled up, the
    run folds the partitions into pairs.parquet (recorded pairs of images gone are dropped, as a
    full run would); moved files are looked for only when the manifest's canonical epoch
    (store.manifest.CANONICAL_EPOCH) is not the one the recorded paths were taken under. When
    the model, search.k or search.pair_threshold changed since the pairs were recorded, every
    image is searched again. `pairs.json`, the commit, is written last: a
    run killed before it leaves the recorded state as it was, and its partition is removed by
    the next run.

    The clusters follow the reviewers' current decisions (`clusters_from_pairs`), read afresh on
    every run, so a new decision changes them at the next run even when nothing else changed;
    the pairs files keep the pairs as found.
    """
    from .calibrate import thresholds

    t0 = time.perf_counter()
    cfg = settings.search
    s = open_searcher(settings)
    th, calibration = thresholds(settings, s, progress=progress)
    lay = layout(settings)
    clean_stale_tmp(lay.pairs_dir)  # left by a killed run
    clean_stale_tmp(lay.pairs_runs)
    clean_stale(settings)
    finish_commit(lay)  # what a killed run left: its commit completed, or its files removed
    state = _search_state(s, cfg, th.pair)
    recorded = read_state(lay)
    epoch = canonical_epoch(settings) or ""  # read before the paths are (the lock holds both)
    # verification is a property of the two pictures, not of the model: kept across runs
    recipe_before = _recorded_recipe(lay)
    reuse_checks = cfg.verify and (recipe_before or "").split(" rules ")[0] == RECIPE
    # what older rules decided and these may decide otherwise is checked again (verify.REVISED)
    revised = () if recipe_before == CHECKS else verify.REVISED
    floor = min(float(cfg.verify_floor), th.pair) if cfg.verify else th.pair
    old = PAIRS_SCHEMA.empty_table()
    fold = same = False
    rows = _unsearched_since(settings, s, recorded, state) if incremental else None
    gone = False
    if incremental and rows is None:
        before = _searched_before(lay, recorded, state)
        if before is not None:
            searched = ids_in(s.image_ids, before)
            rows = np.flatnonzero(~searched).astype(np.int64)
            # an image searched before and not among the present ones (the recorded ids are
            # distinct; were one recorded twice, this folds, which is always right)
            gone = int(searched.sum()) < len(before)
    if rows is not None:
        assert recorded is not None
        # the recorded paths are current while the manifest's canonical epoch is theirs
        same = bool(epoch) and recorded.epoch == epoch
        # their paths compared with the manifest's where the epoch is not theirs: read whole
        placed = None if same else _recorded_near(lay)
        fold = (
            gone
            or len(recorded.runs) >= MAX_RUNS
            or (placed is not None and _moved(placed, s.path_of))
        )
        # a night that folds nothing rewrites no recorded pair: it keeps what clustering reads
        old = placed if placed is not None else _recorded_near(lay, None if fold else LINKS)
        old = old if fold else old.select(LINKS)
    prior = _recorded_near(lay) if rows is None else old  # what was recorded before
    checks: dict[Key, verify.Match | None] = (
        dict(_checks_of(prior, revised)) if rows is None and reuse_checks else {}
    )
    pairs: dict[Key, tuple[float, int]] = {}
    below: dict[Key, tuple[float, int]] = {}
    searched_back = 0  # older images a night searched again (from_both_sides)
    regional: set[Key] = set()
    if rows is None or len(rows):
        if address := settings.orchestration.dask_address:  # the search as Dask tasks
            from .pairs_dask import dask_knn_pairs

            knn = dask_knn_pairs(
                settings,
                cfg.k,
                floor,
                rows,
                address,
                search=knn_pairs,
                searcher=s,
                progress=progress,
            )
        else:
            knn = knn_pairs(s, cfg.k, floor, rows=rows)
        if rows is not None and cfg.verify and cfg.verify_rank:
            knn, searched_back = from_both_sides(
                s, knn, rows, cfg.k, cfg.verify_rank, floor, th.pair
            )
        for key, (sc, rk) in knn.items():
            if sc < th.pair:
                if rk <= cfg.verify_rank:  # a candidate: kept only if verification confirms it
                    below[key] = (sc, rk)
                continue
            pairs[key] = (sc, rk)
        if cfg.verify:
            for key, v in region_pairs(s, cfg.verify_rank, floor, rows=rows).items():
                if key not in pairs and key not in below and v[0] < th.pair:
                    below[key] = v
                    regional.add(key)
    vs = None
    if cfg.verify:
        t1 = time.perf_counter()
        todo = [key for key in [*pairs, *below] if key not in checks]
        found, extracted = verify_pairs(settings, todo, progress=progress)
        checks.update(found)
        vs = VerifySummary(checked=len(todo), kept=len(pairs) + len(below) - len(todo))
        vs.below, vs.extracted, vs.floor = sum(k in below for k in todo), extracted, floor
        vs.regional = sum(k in regional for k in todo)
        for key, v in below.items():
            m = checks.get(key)
            if m is not None and m.relation in CONFIRMED:
                pairs[key] = v
                vs.confirmed_below += int(key in found)
        vs.contradicted = sum(
            1 for key, m in found.items() if key in pairs and m is not None and not m.verified
        )
        vs.unreadable = sum(1 for m in found.values() if m is None)
        vs.seconds = time.perf_counter() - t1
    present = _Present(s)
    decided = labels(lay.decisions_dir).only(present)
    digest = _inputs_digest(th.cluster, decided)
    clustered = None  # the recorded clusters, where this night updates them
    if rows is not None and not fold and recorded is not None:
        token, _, was = recorded.clusters.partition(":")
        if was == digest and file_token(lay.clusters) == token:
            clustered = _read_clusters(lay, recorded)
    read = None  # the manifest's rows of the new pairs' images and their clusters' members
    if rows is not None and not fold and pairs:
        images = {x for key in pairs for x in key}
        if clustered is not None:
            asked = pa.array(sorted(images), pa.string())
            now = clustered.current
            mates = now.filter(_holding(now, asked)).column("image_id")
            images |= set(mates.to_pylist())
        read = rows_of_images(settings, images, REPORTED)
    new = _near_table(pairs, checks, s, read)
    if fold:  # recorded pairs of images gone since are dropped; paths as they are now
        both = ids_in(old.column("image_a"), s.image_ids) & ids_in(
            old.column("image_b"), s.image_ids
        )
        kept = old.filter(pa.array(both))
        for side in "ab":
            now = _path_column(s.path_of, kept.column(f"image_{side}"))
            kept = kept.set_column(kept.column_names.index(f"path_{side}"), f"path_{side}", now)
        near = _by_score(
            pa.concat_tables([kept.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA), new])
        )
    elif rows is None:
        near = new
    else:
        near = pa.concat_tables([old, new.select(LINKS)])
    if vs is not None:  # the recorded pairs kept their verification, checked no more
        vs.kept += near.num_rows - new.num_rows
    exact = pa.Table.from_pylist(exact_duplicate_pairs(settings, read), schema=PAIRS_SCHEMA)
    updated = None
    if clustered is not None:
        updated = _update_clusters(
            clustered, new, near, th.cluster, decided, s, paths_current=same, read=read
        )
    clusters = None  # clustered whole
    if updated is not None:
        n_clusters, largest = updated.n_clusters, updated.largest
    else:
        clusters = _cluster_table(
            link(
                sorted((1.0, a, b) for a, b in decided.same) + _edges(near, th.cluster),
                decided.different,
            ),
            s,
        )
        n_clusters = pc.count_distinct(clusters.column("cluster_id")).as_py() or 0
        largest = pc.max(clusters.column("size")).as_py() or 0
    faults.point("pairs.write")
    _write_if_changed(exact, lay.exact)
    if rows is not None and not fold:  # the run's own partition; the base stays
        assert recorded is not None
        run = recorded.next_run()
        if len(rows):
            write_parquet(new, lay.run_pairs(run))
            write_parquet(searched_table(s.image_ids, rows), lay.run_searched(run))
            runs = [*recorded.runs, run]
        else:
            runs = list(recorded.runs)
        base, searched_token = recorded.base, recorded.searched
    else:
        # staged: the committed base stays in place until the commit
        base = _write_tokened(near, lay.pairs, {}, lay.pairs_next)
        ids = searched_table(s.image_ids)
        searched_token = _write_tokened(ids, lay.searched, state, lay.searched_next)
        runs = []
    if clusters is None:  # clusters.parquet stays; the nights' changes beside it
        assert updated is not None and recorded is not None
        clusters_token = recorded.clusters.partition(":")[0]
        delta = recorded.clusters_delta if updated.delta is None else updated.write(lay)
    else:
        meta = _numbered_whole(clusters, current_cluster_ids(lay))
        clusters_token = _write_tokened(clusters, lay.clusters, meta, lay.clusters_next)
        delta = ""  # the last whole clustering's file, no nights' changes
    faults.point("pairs.searched")
    write_state(
        lay,
        PairsState(
            base=base,
            searched=searched_token,
            search=state,
            runs=runs,
            clusters=f"{clusters_token}:{digest}",
            clusters_delta=delta,
            epoch=epoch,
            opened=getattr(s.vectors, "stamp", None),  # every image it holds now searched
        ),
    )
    finish_commit(lay)  # the staged base renamed into place; a fold's partitions removed
    refresh_catalog(settings, rows=read)  # the stored reports grow from the rows read
    pair = ["image_a", "image_b"]
    if rows is not None:  # the recorded pairs that could be new ones (none: each has a new image)
        prior = prior.filter(pc.is_in(prior.column("image_a"), value_set=new.column("image_a")))
    added = (near if rows is None else new).join(prior.select(pair), pair, join_type="left anti")
    return PairsSummary(
        n_images=len(s.image_ids),
        n_near_pairs=near.num_rows,
        n_exact_pairs=exact.num_rows,
        n_clusters=n_clusters,
        largest_cluster=largest,
        seconds=time.perf_counter() - t0,
        pairs_file=lay.pairs,
        clusters_file=lay.clusters,
        pairs_parts=len(runs),
        clusters_delta=lay.run_clusters(delta) if delta else None,
        searched=len(s.image_ids) if rows is None else len(rows),
        searched_back=searched_back,
        added=added.num_rows,
        incremental=rows is not None,
        thresholds=th,
        calibration=calibration,
        confirmed=len(decided.same),
        rejected=len(decided.different),
        verification=vs,
        trained=settings.path(settings.model.checkpoint).is_file(),
    )
