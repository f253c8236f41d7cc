"""Evaluation against a `path,group` ground truth and the reviewers' decisions (`read_labels`),
with baselines scored on the same queries.

Queries are the images whose group has two or more members; each query is left out of its own
results. The current model is searched through the FAISS index (what users get); two baselines
are ranked exactly over the same collection: the untrained backbone (the configured init, no
training) and Hamming distance between the manifest's perceptual hashes.

The labels (the CSV and the decisions, made into groups) are read by `cbir.store.labels`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import metrics
from ..config import Settings
from ..errors import CbirError
from ..faiss_index import Rows
from ..fsutil import clean_stale_tmp, write_json, write_parquet, write_text
from ..store.embeddings import load_embeddings
from ..store.index import open_searcher
from ..store.labels import GroundTruth, NoLabels, read_labels
from ..store.layout import Layout, layout
from ..store.manifest import load_manifest
from .embed import run_embed

NEIGHBORS_SCHEMA = pa.schema(
    [
        ("query_path", pa.string()),
        ("neighbor_path", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("correct", pa.bool_()),
    ]
)


# --------------------------------------------------------------------------- rankings


def exact_topk(
    vectors: Rows,
    rows: np.ndarray,
    k: int,
    batch: int = 1024,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of vectors[rows] against all vectors, or only against the rows
    in `candidates`: (row indices, scores)."""
    cand = None if candidates is None else np.asarray(candidates, np.int64)
    # the pool in memory (evaluation ranks the labelled images: a small set)
    pool = np.asarray(vectors[:] if cand is None else vectors[cand], np.float32)
    k = min(k, pool.shape[0])
    out_i = np.empty((len(rows), k), np.int64)
    out_s = np.empty((len(rows), k), np.float32)
    for s in range(0, len(rows), batch):
        sims = np.asarray(vectors[rows[s : s + batch]], np.float32) @ pool.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sims, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, 1)
        out_i[s : s + batch] = idx if cand is None else cand[idx]
        out_s[s : s + batch] = np.take_along_axis(ps, order, 1)
    return out_i, out_s


def phash_topk(
    hashes: np.ndarray, rows: np.ndarray, k: int, candidates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Hamming ranking of 64-bit perceptual hashes (against all rows, or only `candidates`);
    score = 1 - distance / 64."""
    h = hashes.astype(np.uint64)
    cand = np.arange(len(h)) if candidates is None else np.asarray(candidates, np.int64)
    pool = h[cand]
    k = min(k, len(cand))
    out_i = np.empty((len(rows), k), np.int64)
    out_s = np.empty((len(rows), k), np.float32)
    for j, r in enumerate(rows):
        d = np.bitwise_count(pool ^ h[r]).astype(np.int32)
        order = np.argsort(d, kind="stable")[:k]
        out_i[j], out_s[j] = cand[order], 1.0 - d[order] / 64.0
    return out_i, out_s


# --------------------------------------------------------------------------- the step


@dataclass
class EvaluationResult:
    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    table: str = ""
    n_queries: int = 0
    metrics_file: Path | None = None
    neighbors_file: Path | None = None
    seconds: float = 0.0
    n_labelled: int = 0  # images the ground truth labels (and that are ingested)
    n_images: int = 0
    note: str = ""  # why nothing was evaluated
    labels: GroundTruth | None = None  # what the figures rest on

    def coverage(self) -> str:
        if self.n_labelled == self.n_images:
            return f"all {self.n_images} images labelled"
        return (
            f"{self.n_labelled} of {self.n_images} images labelled; the others are left "
            f"out of the rankings"
        )

    def lines(self) -> list[str]:
        if self.note:
            return [f"evaluate: nothing to evaluate: {self.note}", f"metrics: {self.metrics_file}"]
        return [
            f"evaluate: {self.n_queries} queries ({self.coverage()}); {self.seconds:.1f} s",
            *([f"  labels: {self.labels.basis()}"] if self.labels is not None else []),
            "",
            self.table,
            f"metrics: {self.metrics_file}",
            f"neighbours: {self.neighbors_file}",
        ]


def _model_label(settings: Settings) -> str:
    m = settings.model
    if layout(settings).checkpoint.is_file():  # what retrieval_model loads when it exists
        return f"SimCLR {m.backbone} ({m.descriptor} descriptor, trained)"
    return f"{m.backbone} init={m.init} (no training checkpoint)"


@dataclass
class ModelRanking:
    """The current model's top k for every evaluation query, searched through the index."""

    label: str
    image_ids: Sequence[str]  # row -> image id
    path_of: Mapping[str, str]  # image id -> canonical path
    group_of: dict[int, str]  # row -> ground-truth group
    query_rows: np.ndarray
    ranked: metrics.RankedResults
    neighbours: list[dict[str, Any]]  # NEIGHBORS_SCHEMA rows: the top k of each query
    candidates: np.ndarray | None = None  # rows ranked (labelled images); None: all of them
    labels: GroundTruth | None = None  # what the groups came from (the CSV, decisions)


def rank_model(
    settings: Settings, k: int | None = None, *, csv_among_all: bool = False
) -> ModelRanking:
    """Search every query of the ground truth with the current model (k: max of evaluate.ks).

    The one place that ranks the evaluation queries: evaluate scores it, calibrate picks a
    threshold from it, report plots it. A partial ground truth is ranked among the labelled
    images only, unless `csv_among_all` and a CSV labels some: then through the index over
    every image, as a complete one, an unlabelled neighbour counting as a wrong match
    (calibrate: a CSV group names every copy one knows of, and a threshold's false matches are
    mostly unlabelled images; decisions alone say nothing of a decided image's other copies).
    """
    k = k or max(settings.evaluate.ks)
    searcher = open_searcher(settings)
    ids = searcher.image_ids
    gt = read_labels(settings, set(ids))
    row_of = {image_id: i for i, image_id in enumerate(ids)}
    group_of = {row_of[i]: g for i, g in gt.group_of.items() if i in row_of}
    sizes: dict[str, int] = {}
    for g in group_of.values():
        sizes[g] = sizes.get(g, 0) + 1
    query_rows = np.array(sorted(r for r, g in group_of.items() if sizes[g] >= 2), np.int64)
    if len(query_rows) == 0:
        raise NoLabels(f"{_label_source(settings)} label any group of two or more ingested images")
    if len(group_of) == len(ids) or (csv_among_all and gt.csv_images):  # as users get
        candidates = None
        s, found = searcher.search(searcher.vectors[query_rows], k + 1)
        nbr = np.array(
            [[row_of[x] if x is not None else -1 for x in row] for row in found], np.int64
        )
    else:  # a partial ground truth: rank among the labelled images only (exactly)
        candidates = np.array(sorted(group_of), np.int64)
        nbr, s = exact_topk(searcher.vectors, query_rows, k + 1, candidates=candidates)
    ranked = metrics.build_ranked_results(query_rows, nbr, s, group_of)
    neighbours = _neighbour_rows(ranked, query_rows, nbr, s, ids, searcher.path_of, group_of, k)
    return ModelRanking(
        label=_model_label(settings),
        image_ids=ids,
        path_of=searcher.path_of,
        group_of=group_of,
        query_rows=query_rows,
        ranked=ranked,
        neighbours=neighbours,
        candidates=candidates,
        labels=gt,
    )


def _label_source(settings: Settings) -> str:
    gt = settings.data.ground_truth
    return f"neither {gt} nor the decisions" if gt is not None else "the decisions do not"


def run_evaluate(
    settings: Settings, *, progress: bool = False, log: Callable[[str], None] | None = None
) -> EvaluationResult:
    """Score the current model, and the baselines, on the ground truth's labelled images.

    `log` hears what each long part is about to do (the CLI prints it on stderr)."""
    t0 = time.perf_counter()
    say = log or (lambda _: None)
    cfg = settings.evaluate
    ks = sorted(set(cfg.ks))
    kmax = max(ks)
    lay = layout(settings)
    clean_stale_tmp(lay.reports_dir)  # left by a killed run
    say("evaluate: ranking the labelled queries with the model")
    try:
        model = rank_model(settings, kmax)
    except NoLabels as exc:
        return _nothing_labelled(settings, lay, str(exc), t0)
    ids, query_rows, group_of = model.image_ids, model.query_rows, model.group_of

    def score(label: str, nbr: np.ndarray, sc: np.ndarray) -> metrics.RankedResults:
        r = metrics.build_ranked_results(query_rows, nbr, sc, group_of)
        result.rows.append((label, metrics.evaluate(r, ks, precision=cfg.precision_target)))
        return r

    result = EvaluationResult(
        n_queries=len(query_rows), n_labelled=len(group_of), n_images=len(ids), labels=model.labels
    )
    result.rows.append(
        (model.label, metrics.evaluate(model.ranked, ks, precision=cfg.precision_target))
    )
    neighbours = model.neighbours

    if cfg.baselines:
        # The untrained backbone, ranked exactly (its embeddings are cached under their own
        # fingerprint; without a checkpoint they are the model's own, so nothing is recomputed).
        say(
            "evaluate: baseline 1/2, the untrained backbone (embeds the collection once, then "
            "reuses it)"
        )
        base = run_embed(settings, progress=progress, baseline=True)
        b_ids, b_vec = load_embeddings(base.folder, set(ids))
        if b_ids != ids:
            raise CbirError("the untrained-backbone embeddings do not cover the collection")
        bi, bs = exact_topk(b_vec, query_rows, kmax + 1, candidates=model.candidates)
        score(f"{settings.model.backbone} init={settings.model.init} (untrained)", bi, bs)
        say("evaluate: baseline 2/2, perceptual hashes")
        manifest = (
            load_manifest(settings)
            .select(["image_id", "phash", "is_canonical", "status"])
            .to_pylist()
        )
        ph = {r["image_id"]: r["phash"] for r in manifest if r["is_canonical"]}
        hashes = np.array([ph[i] for i in ids], dtype=np.uint64)
        hi, hs = phash_topk(hashes, query_rows, kmax + 1, candidates=model.candidates)
        score("perceptual hash (Hamming)", hi, hs)

    result.table = metrics.markdown_table(result.rows, ks, precision=cfg.precision_target)
    names = ["model"] + [_short(label) for label, _ in result.rows[1:]]
    figures: dict[str, Any] = {
        name: _finite(vals) for name, (_, vals) in zip(names, result.rows, strict=True)
    }
    if model.labels is not None:  # how many labelled pairs each figure rests on
        figures["labels"] = {**model.labels.to_json(), "queries": result.n_queries}
    write_json(figures, lay.metrics_json)
    write_parquet(pa.Table.from_pylist(neighbours, schema=NEIGHBORS_SCHEMA), lay.neighbors)
    write_text(
        f"# Retrieval quality\n\n{result.n_queries} queries; labels: "
        f"{_label_source(settings).removeprefix('neither ').replace(' nor ', ' and ')} "
        f"({result.coverage()}; {model.labels.basis() if model.labels else ''})"
        f"\n\n{result.table}",
        lay.metrics_md,
    )
    result.metrics_file = lay.metrics_json
    result.neighbors_file = lay.neighbors
    result.seconds = time.perf_counter() - t0
    return result


def _nothing_labelled(settings: Settings, lay: Layout, why: str, t0: float) -> EvaluationResult:
    """No labelled group to score (an archive's empty labels file): say so in every output, so
    the pipeline (and `dvc repro`) goes on."""
    result = EvaluationResult(note=why)
    write_json({"model": {}, "note": why}, lay.metrics_json)
    write_parquet(pa.Table.from_pylist([], schema=NEIGHBORS_SCHEMA), lay.neighbors)
    write_text(
        f"# Retrieval quality\n\nNothing to evaluate: {why}. Label near-duplicates "
        f"in {settings.data.ground_truth} (columns path,group), or decide pairs (`cbir "
        f"review`, `cbir decide`), to measure the model.\n",
        lay.metrics_md,
    )
    result.metrics_file = lay.metrics_json
    result.neighbors_file = lay.neighbors
    result.seconds = time.perf_counter() - t0
    return result


def _short(label: str) -> str:
    return "phash" if label.startswith("perceptual") else "untrained"


def _finite(vals: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in vals.items()}


def _neighbour_rows(
    ranked: metrics.RankedResults,
    query_rows: np.ndarray,
    nbr: np.ndarray,
    scores: np.ndarray,
    ids: Sequence[str],
    path_of: Mapping[str, str],
    group_of: dict[int, str],
    k: int,
) -> list[dict[str, Any]]:
    """The top k of every query (itself left out), with paths and whether each is correct."""
    out = []
    for q, row, srow in zip(query_rows, nbr, scores, strict=True):
        rank = 0
        for n, sc in zip(row, srow, strict=True):
            if n < 0 or n == q:
                continue
            rank += 1
            if rank > k:
                break
            out.append(
                {
                    "query_path": path_of.get(ids[q]),
                    "neighbor_path": path_of.get(ids[n]),
                    "rank": rank,
                    "score": float(sc),
                    "correct": group_of.get(int(n)) == group_of[int(q)],
                }
            )
    return out
