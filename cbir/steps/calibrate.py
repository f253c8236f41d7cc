"""The pair threshold: calibrated to a target precision, with or without ground truth.

`search.pair_threshold: auto` (the default) asks for the threshold at which `cbir pairs` reaches
`search.precision_target`. `cbir calibrate` estimates it two ways and records both in
`data/reports/calibration.json` (a DVC metric), with the estimated precision/recall curve in
`calibration_curve.csv` (a DVC plot):

* **on the ground truth** (`data.ground_truth` and the reviewers' decisions:
  `cbir.store.labels.read_labels`), read off the ranking `cbir evaluate` scores
  (:func:`cbir.steps.evaluate.rank_model`), so it equals metrics.json's `threshold@pNN`, except
  for a CSV that labels part of the collection: evaluate ranks its images among themselves,
  which sees none of the unlabelled images that make most false matches (two labelled pairs
  chose 0.9926 in a trial, and one cluster of all 388 scans followed), so calibrate searches
  its queries among all images, an unlabelled neighbour counting as a wrong match. Where
  there is ground truth, this one is used;
* **self-calibrated** (:mod:`cbir.selfcal`): how non-duplicates score, from the neighbours of a
  sample of the collection's images; how duplicates score, from held-out synthetic copies of
  another sample (:mod:`cbir.heldout`, processes the training never saw).

A fixed `search.pair_threshold` (e.g. 0.87) is used as it is, with its estimated precision and
recall shown beside it. `--write` puts the calibrated value into the params file as a fixed one.

Longer than 400 lines: the two estimates (ground truth, held-out copies) and the record they make
are one concern; the estimators are in cbir/selfcal.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics, selfcal
from ..config import Settings
from ..errors import CbirError
from ..fsutil import write_json, write_text
from ..paramsfile import set_params
from ..safetext import counted
from ..store.decisions import labels
from ..store.layout import layout

if TYPE_CHECKING:  # evaluate loads torch and faiss: imported where there is ground truth
    from .evaluate import ModelRanking

#: A calibration stays current for the nightly run until the collection has grown this much.
GROWTH = 1.5
GROUND_TRUTH = "ground truth"
SELF = "held-out copies"


# --------------------------------------------------------------------------- on ground truth


@dataclass
class Calibration:
    target_precision: float
    threshold: float  # accept pairs scored >= this; inf when the target cannot be reached
    recall: float
    precision: float  # reached at `threshold` (the best precision seen when unreachable)
    n_queries: int
    n_pairs: int  # pooled (query, neighbour) pairs the curve was computed from

    @property
    def reached(self) -> bool:
        return math.isfinite(self.threshold)


def calibrate(ranked: metrics.RankedResults, precision: float = 0.9) -> Calibration:
    """The highest-recall threshold whose precision over pooled pairs is >= `precision`."""
    recall, threshold = metrics.recall_at_precision(ranked, precision)
    prec, _, thr = metrics.pr_curve(ranked)
    if math.isfinite(threshold):
        reached = float(prec[np.nonzero(thr == threshold)[0][0]])
    else:
        reached = float(prec.max()) if prec.size else float("nan")
    return Calibration(
        target_precision=precision,
        threshold=threshold,
        recall=recall,
        precision=reached,
        n_queries=ranked.n_queries,
        n_pairs=int((~np.isnan(ranked.scores)).sum()),
    )


def param_value(threshold: float) -> float:
    """The threshold as written to params: 6 decimals, rounded down so that no pair the
    calibration accepted falls below it."""
    return math.floor(threshold * 1e6) / 1e6


# --------------------------------------------------------------------------- the estimates


@dataclass
class Estimate:
    """One way of choosing the threshold, and what it expects there."""

    method: str  # GROUND_TRUTH | SELF
    threshold: float | None  # None: the target precision is out of reach
    precision: float | None
    recall: float | None
    basis: str  # what it rests on, for people
    no_duplicates: bool = False  # self-calibration: every neighbour looks like a stranger
    labels: dict[str, int] | None = None  # ground truth: what its labels rest on
    # ground truth: (unlabelled image, the labelled one it matches, score) above a labelled
    # copy of the latter, best first: the false matches of a partial ground truth, or copies
    # it does not name yet
    outscoring: list[tuple[str, str, float]] = field(default_factory=list)
    # ground truth: for each labelled image of `outscoring`, its lowest-scoring labelled copy
    # among its neighbours (None: none of its copies among them)
    weakest: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "precision": _r(self.precision),
            "recall": _r(self.recall),
        }
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


#: Labels from decisions alone (no CSV) decide the threshold only from this many pairs decided
#: same and this many different: reviewers decide pairs near the threshold, and a handful of
#: confirmed pairs with no rejected one would pull it down to their lowest score.
MIN_DECISIONS = 10


def _ground_truth_estimate(
    settings: Settings, target: float, notes: list[str] | None = None
) -> Estimate | None:
    """The ground-truth calibration, or None when there is no usable ground truth (`notes`
    hears why decisions alone do not decide yet)."""
    from ..store.labels import NoLabels
    from .evaluate import rank_model

    if settings.data.ground_truth is None and not labels(layout(settings).decisions_dir):
        return None
    try:
        # a partial CSV among all images; decisions alone among the decided ones (their wrong
        # matches are the pairs decided different: MIN_DECISIONS of them)
        ranking = rank_model(settings, csv_among_all=True)
    except NoLabels:
        return None
    lab = ranking.labels
    if (
        lab is not None
        and not lab.csv_images
        and (lab.decided_same < MIN_DECISIONS or lab.decided_different < MIN_DECISIONS)
    ):
        if notes is not None:
            notes.append(
                f"the decisions ({counted(lab.decided_same, 'pair')} decided same, "
                f"{lab.decided_different} different) decide the threshold from "
                f"{MIN_DECISIONS} of each; until then the self-calibration does"
            )
        return None
    cal = calibrate(ranking.ranked, target)
    rests = f"; {ranking.labels.basis()}" if ranking.labels is not None else ""
    n, m = len(ranking.image_ids), len(ranking.group_of)
    among = (
        f"all {n} images labelled"
        if m == n
        else f"ranked among the {m} labelled images"
        if ranking.candidates is not None
        else f"searched among all {n} images, the {n - m} unlabelled ones counting as wrong matches"
    )
    outscoring, weakest = _outscoring(ranking)
    return Estimate(
        method=GROUND_TRUTH,
        outscoring=outscoring,
        weakest=weakest,
        threshold=param_value(cal.threshold) if cal.reached else None,
        precision=cal.precision,
        recall=cal.recall,
        basis=f"{cal.n_queries} labelled queries, {cal.n_pairs} scored pairs, {among}{rests}",
        labels=ranking.labels.to_json() if ranking.labels is not None else None,
    )


def _outscoring_note(gt: Estimate, csv: str, examples: int = 3, many: int = 5) -> str:
    """What calibrate says of the unlabelled neighbours that outscore a labelled copy: examples
    of different labelled images, best first, and the labelled images with `many` or more of
    them: those whose copy the model scores low (every image above it counts), which more
    labels would not mend."""
    shown: list[tuple[str, str, float]] = []
    for t in gt.outscoring:  # the best of each labelled image first, then the rest
        if len(shown) < examples and all(t[1] != u[1] for u in shown):
            shown.append(t)
    shown += [t for t in gt.outscoring if t not in shown][: examples - len(shown)]
    text = (
        f"{len(gt.outscoring)} unlabelled neighbours of labelled images score above a "
        f"labelled copy of them, counted as wrong matches: any that is a copy belongs in {csv} "
        f"with its group, e.g. " + "; ".join(f"{a} ({sc:.4f} to {b})" for a, b, sc in shown)
    )
    per_query = Counter(query for _, query, _ in gt.outscoring)
    crowded = sorted((q for q, n in per_query.items() if n >= many), key=lambda q: -per_query[q])
    for query in crowded[:examples]:
        low = gt.weakest.get(query)
        copy = (
            f"its labelled copy scores only {low:.4f}"
            if low is not None
            else "none of its labelled copies is among its nearest"
        )
        text += (
            f". {per_query[query]} of them are neighbours of {query}: {copy}, a copy the model "
            f"places low rather than {per_query[query]} copies missing from {csv}"
        )
    return text


def _outscoring(
    ranking: ModelRanking,
) -> tuple[list[tuple[str, str, float]], dict[str, float | None]]:
    """The unlabelled neighbours of each labelled query that score above its lowest-scoring
    labelled copy among its neighbours (all of them when its copies rank below its top k),
    best first (see Estimate.outscoring); and that lowest score of each such query."""
    labelled = {ranking.path_of.get(ranking.image_ids[r]) for r in ranking.group_of}
    by_query: dict[str, list[dict[str, Any]]] = {}
    for row in ranking.neighbours:
        by_query.setdefault(row["query_path"], []).append(row)
    out = []
    weakest: dict[str, float | None] = {}
    for query, rows in by_query.items():
        lowest = min((r["score"] for r in rows if r["correct"]), default=-math.inf)
        above = [
            (r["neighbor_path"], query, r["score"])
            for r in rows
            if r["neighbor_path"] not in labelled and r["score"] > lowest
        ]
        if above:
            weakest[query] = None if lowest == -math.inf else float(lowest)
        out += above
    return sorted(out, key=lambda t: (-t[2], t[0], t[1])), weakest


@dataclass
class SelfCalibration:
    estimate: Estimate
    curve: selfcal.Curve | None
    sampled: int
    copies: int
    failed: int  # copies that could not be made (unreadable originals)


def _self_estimate(
    settings: Settings, searcher: Any, target: float, *, progress: bool = False
) -> SelfCalibration:
    cfg, k = settings.calibrate, settings.search.k
    n = len(searcher.image_ids)
    rng = np.random.default_rng([cfg.seed, 0])
    copy_rows = np.sort(rng.choice(n, size=min(n, cfg.copies), replace=False))
    scores, found, failed = _copy_scores(settings, searcher, copy_rows, k, progress=progress)
    if n < selfcal.MIN_IMAGES:  # too few neighbours to see how non-duplicates score
        t = selfcal.recall_quantile_threshold(scores, 0.95)
        est = Estimate(
            method=SELF,
            threshold=t,
            precision=None,
            recall=float((scores[found] >= t).sum() / max(1, len(scores))),
            basis=f"{len(scores)} held-out copies only: {n} images are too few "
            f"to estimate how non-duplicates score (the threshold keeps 95 % "
            f"of the copies)",
        )
        return SelfCalibration(
            estimate=est, curve=None, sampled=0, copies=len(scores), failed=failed
        )
    rows = np.sort(
        np.random.default_rng([cfg.seed, 1]).choice(n, size=min(n, cfg.images), replace=False)
    )
    depth = selfcal.ANCHORS[1]
    neighbours = _neighbour_scores(searcher, rows, max(depth, k))
    curve = selfcal.estimate(neighbours, k, scores, found)
    i = curve.choose(target)
    basis = f"neighbours of {len(rows)} images, {len(scores)} held-out copies" + (
        f" ({failed} originals unreadable)" if failed else ""
    )
    basis += f"; about {curve.duplicate_links:.0f} of their links join duplicates"
    if i is None:
        est = Estimate(
            method=SELF,
            threshold=None,
            precision=None,
            recall=0.0,
            basis=basis,
            no_duplicates=not curve.duplicates_expected,
        )
    else:
        est = Estimate(
            method=SELF,
            threshold=float(curve.thresholds[i]),
            precision=float(curve.precision[i]),
            recall=float(curve.recall[i]),
            basis=basis,
        )
    return SelfCalibration(
        estimate=est, curve=curve, sampled=len(rows), copies=len(scores), failed=failed
    )


def _copy_scores(
    settings: Settings, searcher: Any, rows: np.ndarray, k: int, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """Make one held-out copy of each image in `rows`, embed it like the collection, and score
    it: (similarity to its original, whether the original is among its k nearest, failures)."""
    from .. import heldout, imaging
    from ..model import retrieval_model
    from ..progress import bar as progress_bar
    from ..store.manifest import canonical_images
    from .embed import embed_pictures

    model, pp, fp, _ = retrieval_model(settings)
    if fp != searcher.fingerprint:
        raise CbirError(
            f"the model changed ({searcher.fingerprint} -> {fp}) since the index was "
            f"built: run `cbir embed` and `cbir index` first"
        )
    path_of = {r["image_id"]: r["path_raw"] for r in canonical_images(settings)}
    scans = os.fsencode(layout(settings).scans)
    size = 2 * max(pp.sizes)  # copies are made at twice the input size, then embedded as scans
    pictures, originals, failed = [], [], 0
    bar = progress_bar(len(rows), "held-out copies", "img", progress)
    for row in rows:
        image_id = searcher.image_ids[row]
        try:
            rgb = imaging.load_rgb(
                os.fsdecode(os.path.join(scans, path_of[image_id])),
                size,
                max_pixels=settings.ingest.max_pixels,
            )
        except (imaging.ImageRejected, OSError, KeyError):
            failed += 1  # moved or damaged since ingest: the others still make an estimate
            bar.update(1)
            continue
        rgb.thumbnail((size, size))
        rng = np.random.default_rng([settings.calibrate.seed, 2, int(row)])
        pictures.append(heldout.held_out_copy(rgb, rng))
        originals.append(int(row))
        bar.update(1)
    bar.close()
    if not pictures:
        return np.zeros(0, np.float32), np.zeros(0, bool), failed
    vectors = embed_pictures(model, pictures, pp, batch_size=settings.embed.batch_size)
    sims = np.einsum("ij,ij->i", vectors, searcher.vectors[originals])
    _, ids = searcher.search(vectors, k)
    found = np.array([searcher.image_ids[o] in row for o, row in zip(originals, ids, strict=True)])
    return sims.astype(np.float32), found, failed


def _neighbour_scores(searcher: Any, rows: np.ndarray, depth: int) -> np.ndarray:
    """[len(rows), depth] neighbour scores of each image, best first, itself left out (-1 pads
    where the index returns fewer)."""
    out = np.full((len(rows), depth), -1.0, np.float32)
    for start in range(0, len(rows), 1024):
        sel = rows[start : start + 1024]
        scores, ids = searcher.search(searcher.vectors[sel], depth + 1)
        for r, row in enumerate(sel):
            me = searcher.image_ids[row]
            vals = [s for s, x in zip(scores[r], ids[r], strict=True) if x is not None and x != me][
                :depth
            ]
            out[start + r, : len(vals)] = vals
    return out


# --------------------------------------------------------------------------- the step


@dataclass
class CalibrateResult:
    fingerprint: str
    n_images: int
    target: float
    pair_threshold: float
    cluster_threshold: float
    source: str  # where pair_threshold comes from: GROUND_TRUTH, SELF or "params"
    self_calibration: Estimate | None = None
    ground_truth: Estimate | None = None
    at_threshold: tuple[float | None, float | None] = (None, None)  # self-estimated P, R there
    file: Path | None = None
    seconds: float = 0.0
    written: dict[str, float] | None = None
    params_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def calibration(self) -> Estimate | None:
        """The estimate that decides (ground truth where there is one)."""
        return self.ground_truth or self.self_calibration

    def lines(self) -> list[str]:
        out = [
            f"calibrate: pair threshold {self.pair_threshold:.4f} ({self.source}); "
            f"{self.n_images} images, model {self.fingerprint}; {self.seconds:.1f} s"
        ]
        for est in (self.ground_truth, self.self_calibration):
            if est is None:
                continue
            if est.no_duplicates:
                out.append(
                    f"  {est.method}: no near-duplicates expected: the neighbours of "
                    f"every sampled image look like other photographs ({est.basis})"
                )
            elif est.threshold is None:
                out.append(
                    f"  {est.method}: no threshold reaches precision {self.target:g}; {est.basis}"
                )
            else:
                out.append(
                    f"  {est.method}: threshold {est.threshold:.4f} for precision "
                    f"{self.target:g}: precision {_fmt(est.precision)}, recall "
                    f"{_fmt(est.recall)} ({est.basis})"
                )
        p, r = self.at_threshold
        if self.source == "params" and p is not None:
            out.append(
                f"  at the fixed search.pair_threshold {self.pair_threshold:g} the "
                f"self-calibration expects precision {p:.3f}, recall {_fmt(r)}"
            )
        out += [f"  {n}" for n in self.notes]
        if self.written:
            out += [
                f"  wrote {key}: {value:g} in {self.params_path}"
                for key, value in self.written.items()
            ]
            out.append("  run `cbir pairs` to apply it")
        if self.file:
            out.append(f"  {self.file}")
        return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _state(settings: Settings, fingerprint: str) -> dict[str, Any]:
    """What a calibration depends on besides the collection's size."""
    gt = settings.data.ground_truth
    gt_path = settings.path(gt) if gt is not None else None
    digest = (
        hashlib.sha256(gt_path.read_bytes()).hexdigest()[:16]
        if gt_path is not None and gt_path.is_file()
        else None
    )
    return {
        "fingerprint": fingerprint,
        "k": settings.search.k,
        "precision_target": settings.search.precision_target,
        "calibrate": settings.calibrate.model_dump(mode="json"),
        "ground_truth_sha256": digest,
        "decisions": labels(layout(settings).decisions_dir).digest(),
    }


def _fixed(value: float | str) -> float | None:
    return None if value == "auto" else float(value)


def run_calibrate(
    settings: Settings,
    precision: float | None = None,
    write: bool = False,
    *,
    progress: bool = False,
    searcher: Any = None,
) -> CalibrateResult:
    """Calibrate the pair threshold for the current model; record it; optionally write it to
    the params file as a fixed value."""
    from ..store.index import open_searcher

    t0 = time.perf_counter()
    target = settings.search.precision_target if precision is None else precision
    if not 0.0 < target < 1.0:
        raise CbirError(f"--precision must be between 0 and 1 (exclusive), got {target}")
    s = searcher if searcher is not None else open_searcher(settings)
    waiting: list[str] = []
    gt = _ground_truth_estimate(settings, target, waiting)
    own = _self_estimate(settings, s, target, progress=progress)
    chosen = gt or own.estimate
    auto = 1.0 if chosen.threshold is None else chosen.threshold  # unreachable: nothing passes
    fixed = _fixed(settings.search.pair_threshold)
    pair = fixed if fixed is not None else auto
    cluster = _fixed(settings.search.cluster_threshold)
    result = CalibrateResult(
        fingerprint=s.fingerprint,
        n_images=len(s.image_ids),
        target=target,
        pair_threshold=pair,
        cluster_threshold=cluster or pair,
        source="params" if fixed is not None else chosen.method,
        self_calibration=own.estimate,
        ground_truth=gt,
        notes=waiting,
    )
    if own.curve is not None:
        result.at_threshold = own.curve.at(pair)
    if gt is not None and own.estimate.threshold is not None and gt.threshold is not None:
        result.notes.append(
            f"the ground truth decides; self-calibration alone would have "
            f"chosen {own.estimate.threshold:.4f}"
        )
    if gt is not None and gt.outscoring:
        result.notes.append(_outscoring_note(gt, str(settings.data.ground_truth)))
    if cluster is not None and cluster < pair:
        raise CbirError(
            f"search.cluster_threshold ({cluster:g}) must not be below the pair "
            f"threshold ({pair:g})"
        )
    lay = layout(settings)
    record = {
        "pair_threshold": pair,
        "cluster_threshold": result.cluster_threshold,
        "precision_target": target,
        "source": result.source,
        "reached": chosen.threshold is not None,
        "estimated_precision": _r(result.at_threshold[0]),
        "estimated_recall": _r(result.at_threshold[1]),
        "self": {
            **own.estimate.to_json(),
            "sampled_images": own.sampled,
            "copies": own.copies,
            "copies_failed": own.failed,
            "duplicate_links": round(own.curve.duplicate_links, 1)
            if own.curve is not None
            else None,
            "no_duplicates": own.estimate.no_duplicates,
        },
        "ground_truth": gt.to_json() if gt else None,
    }
    write_text(_curve_csv(own.curve), lay.calibration_curve)
    write_json(
        {
            **_state(settings, s.fingerprint),
            "images": len(s.image_ids),
            "self_basis": own.estimate.basis,
            "ground_truth_basis": gt.basis if gt else None,
        },
        lay.calibration_state,
    )
    write_json(record, lay.calibration)  # last: the commit point
    result.file = lay.calibration
    if write:
        if chosen.threshold is None:
            raise CbirError(
                f"no score threshold reaches precision {target:g}: params left unchanged"
            )
        updates: dict[str, Any] = {"search.pair_threshold": chosen.threshold}
        if cluster is not None and cluster < chosen.threshold:  # pairs refuses that
            updates["search.cluster_threshold"] = chosen.threshold
        set_params(settings.params_path, updates)
        result.written, result.params_path = updates, settings.params_path
    result.seconds = time.perf_counter() - t0
    return result


def _curve_csv(curve: selfcal.Curve | None, points: int = 400) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["threshold", "precision", "recall"])
    if curve is not None and len(curve.thresholds):
        idx = np.unique(np.linspace(0, len(curve.thresholds) - 1, points).astype(int))
        for i in idx:
            w.writerow(
                [
                    f"{curve.thresholds[i]:.4f}",
                    f"{curve.precision[i]:.4f}",
                    f"{curve.recall[i]:.4f}",
                ]
            )
    return buf.getvalue()


# --------------------------------------------------------------------------- for the pairs step


@dataclass(frozen=True)
class Thresholds:
    pair: float
    cluster: float
    source: str
    estimated_precision: float | None = None
    estimated_recall: float | None = None
    target: float = 0.95
    no_duplicates: bool = False  # the self-calibration expects none in this collection
    unreachable: bool = False  # `auto`, and no threshold reaches the target (nothing passes)


def recorded(settings: Settings) -> dict[str, Any] | None:
    """The last `cbir calibrate`'s figures with what they were computed from (None when
    absent or unreadable)."""
    lay = layout(settings)
    try:
        figures = json.loads(lay.calibration.read_text(encoding="utf-8"))
        state = json.loads(lay.calibration_state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(figures, dict) or not isinstance(state, dict):
        return None
    return {**state, **figures}


def configured_thresholds(settings: Settings) -> tuple[float | None, float | None]:
    """(pair, cluster) thresholds as configured: fixed values from params, `auto` ones from
    the recorded calibration (None where there is none yet)."""
    rec = recorded(settings) or {}
    pair = _fixed(settings.search.pair_threshold)
    if pair is None and rec.get("pair_threshold") is not None:
        pair = float(rec["pair_threshold"])
    cluster = _fixed(settings.search.cluster_threshold)
    return pair, cluster if cluster is not None else pair


def current_pair_threshold(
    settings: Settings, fingerprint: str, n_images: int
) -> tuple[float, str] | None:
    """(pair threshold, its source) as `cbir pairs` would use it now without calibrating: a
    fixed one from params, else the recorded calibration while it holds for this model and
    collection; None when `cbir calibrate` has not run for them."""
    fixed = _fixed(settings.search.pair_threshold)
    if fixed is not None:
        return fixed, "params"
    rec = recorded(settings)
    if rec is None or rec.get("pair_threshold") is None:
        return None
    if not is_current(rec, settings, fingerprint, n_images):
        return None
    source = str(rec["source"])
    if not rec.get("reached", True):
        source += (
            f"; no threshold reaches precision {settings.search.precision_target:g}: identical "
            f"pictures only"
        )
    return float(rec["pair_threshold"]), source


def is_current(
    record: dict[str, Any] | None, settings: Settings, fingerprint: str, n_images: int
) -> bool:
    """Whether a recorded calibration still holds: same model, params and ground truth, and a
    collection that has not grown by more than GROWTH since."""
    if not record:
        return False
    state = _state(settings, fingerprint)
    if any(record.get(key) != value for key, value in state.items()):
        return False
    before = int(record.get("images") or 0)
    return before > 0 and n_images <= GROWTH * before and n_images >= before / GROWTH


def thresholds(
    settings: Settings,
    searcher: Any,
    *,
    progress: bool = False,
) -> tuple[Thresholds, CalibrateResult | None]:
    """The thresholds `cbir pairs` uses: fixed ones from params as they are; `auto` ones from
    the current calibration, calibrating first when there is none for this model (or the
    collection grew by more than GROWTH since)."""
    pair, cluster = (
        _fixed(settings.search.pair_threshold),
        _fixed(settings.search.cluster_threshold),
    )
    rec = recorded(settings)
    ran = None
    if pair is None and not is_current(
        rec, settings, searcher.fingerprint, len(searcher.image_ids)
    ):
        ran = run_calibrate(settings, progress=progress, searcher=searcher)
        rec = recorded(settings)
    if pair is None:
        assert rec is not None
        pair = float(rec["pair_threshold"])
        source = str(rec["source"])
    else:
        source = "params"
    usable = (
        rec if is_current(rec, settings, searcher.fingerprint, len(searcher.image_ids)) else None
    )
    cluster = cluster if cluster is not None else pair
    if cluster < pair:
        raise CbirError(
            f"search.cluster_threshold ({cluster:g}) must not be below the pair "
            f"threshold ({pair:g})"
        )
    p = r = None
    if usable is not None and usable.get("pair_threshold") == pair:
        p, r = usable.get("estimated_precision"), usable.get("estimated_recall")
    none = bool(usable and (usable.get("self") or {}).get("no_duplicates"))
    unreachable = source != "params" and not (rec or {}).get("reached", True)
    return Thresholds(
        pair=pair,
        cluster=cluster,
        source=source,
        estimated_precision=p,
        estimated_recall=r,
        target=settings.search.precision_target,
        no_duplicates=none,
        unreachable=unreachable,
    ), ran
