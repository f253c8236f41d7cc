"""What the evaluation pages show: the model's ranking of the ground-truth queries (the same
ranking `cbir evaluate` scores), worst first, and the evaluation plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import plots
from ...config import Settings
from ...errors import CbirError
from ...store.decisions import labels
from ...store.layout import layout

if TYPE_CHECKING:
    from ..evaluate import ModelRanking


@dataclass
class Evaluation:
    """The ranked queries of the model, with the metrics `cbir evaluate` wrote (if any)."""

    label: str
    k: int
    queries: list[dict[str, Any]]  # path, neighbours [(path, rank, score, correct)], missed, n_rel
    metrics: dict[str, dict[str, float | None]] | None
    metrics_note: str = ""  # why metrics.json holds no metrics, where it holds none


def evaluation(settings: Settings, plots_dir: Path) -> tuple[Evaluation | None, str, list[Path]]:
    """The model's ranking of the ground-truth queries, and its plots; or why there is none."""
    if settings.data.ground_truth is None and not labels(layout(settings).decisions_dir):
        return None, "no ground truth configured (data.ground_truth) and no decisions", []
    from ..evaluate import rank_model  # torch and faiss load only when there is ground truth

    try:
        model = rank_model(settings)
    except CbirError as exc:
        return None, str(exc), []
    k = max(settings.evaluate.ks)
    written = _plots(settings, model, k, plots_dir)
    table, why = _metrics(layout(settings).metrics_json)
    ev = Evaluation(model.label, k, _queries(model), metrics=table, metrics_note=why)
    return ev, "", written


def _metrics(path: Path) -> tuple[dict[str, dict[str, float | None]] | None, str]:
    """The models' rows of metrics.json (not the count of labels they rest on), and why there
    are none where it holds none: written when nothing was labelled (a note, and no figures),
    and decisions labelling images since; or not JSON. None, "": no file yet."""
    if not path.is_file():
        return None, ""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, f"{path} cannot be read"
    if not isinstance(raw, dict):
        return None, f"{path} holds no metrics"
    rows = {k: v for k, v in raw.items() if k != "labels" and isinstance(v, dict) and v}
    if rows:
        return rows, ""
    note = raw.get("note")
    return None, f"the last `cbir evaluate` had nothing to evaluate ({note})" if note else (
        f"{path} holds no metrics"
    )


def _plots(settings: Settings, model: ModelRanking, k: int, plots_dir: Path) -> list[Path]:
    """The precision-recall curve, P/R at k and the score histogram, at the configured and
    the calibrated thresholds."""
    from ..calibrate import calibrate, configured_thresholds

    cfg = settings.evaluate
    cal = calibrate(model.ranked, cfg.precision_target)
    pair_threshold, _ = configured_thresholds(settings)
    return (
        plots.pr_curve(
            model.ranked, plots_dir, threshold=pair_threshold, target_precision=cfg.precision_target
        )
        + plots.at_k(model.ranked, k, plots_dir)
        + plots.score_histogram(
            model.ranked,
            plots_dir,
            threshold=pair_threshold,
            calibrated=cal.threshold if cal.reached else None,
            target_precision=cfg.precision_target,
        )
    )


def _queries(model: ModelRanking) -> list[dict[str, Any]]:
    """Each query with its neighbours and the true duplicates it missed, worst first: these
    are the queries worth looking at."""
    by_query: dict[str, list[tuple[str, int, float, bool]]] = {}
    for r in model.neighbours:
        by_query.setdefault(r["query_path"], []).append(
            (r["neighbor_path"], r["rank"], r["score"], r["correct"])
        )
    members: dict[str, list[str]] = {}
    for row, g in model.group_of.items():
        members.setdefault(g, []).append(model.path_of.get(model.image_ids[row], "?"))
    queries: list[dict[str, Any]] = []
    for q, n_rel in zip(model.query_rows, model.ranked.n_relevant, strict=True):
        path = model.path_of.get(model.image_ids[q], "?")
        nbrs = by_query.get(path, [])
        found = {p for p, _, _, ok in nbrs if ok}
        missed = sorted(p for p in members[model.group_of[int(q)]] if p != path and p not in found)
        queries.append(
            {
                "path": path,
                "neighbours": nbrs,
                "missed": missed,
                "n_rel": int(n_rel),
                "hits": len(found),
            }
        )
    queries.sort(key=lambda x: (x["hits"] / x["n_rel"], x["path"]))
    return queries
