"""Self-calibration against the truth: how close does `search.pair_threshold: auto` come to the
target precision on collections whose duplicates are known?

Run by hand (about 30 minutes on 2 idle cores; --epochs/--reuse shorten it):
    .venv/bin/python benchmarks/calibration.py [--out /tmp/cbir-calibration] [--reuse]

For each ground-truth collection - the demo collection, and the real photographs of
../shared/data with near-duplicates made by the quality benchmark's own generator plus paintings
as distractors - it trains the default model (and a model cut short after --short-epochs, as a
busy machine or an impatient user leaves it), hides the ground truth, lets `cbir calibrate`
choose the threshold from held-out synthetic copies alone, runs `cbir pairs`, and then scores the
pairs against the ground truth: the real precision and recall at the chosen threshold, beside the
best threshold in hindsight (the most recall at the target precision, over the same candidate
pairs). The real photographs without any copies (an archive with no duplicates at all) show how
many pairs are reported where there should be none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from cbir.steps.calibrate import run_calibrate  # noqa: E402
from cbir.config import Settings, load_settings  # noqa: E402
from cbir.steps.demo import generate_demo_collection  # noqa: E402
from cbir.steps.embed import run_embed  # noqa: E402
from cbir.store.labels import read_ground_truth  # noqa: E402
from cbir.steps.index import run_index  # noqa: E402
from cbir.steps.ingest import run_ingest  # noqa: E402
from cbir.steps.pairs import knn_pairs, run_pairs  # noqa: E402
from cbir.store.index import open_searcher
from cbir.steps.train import run_train  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def pair_truth(settings: Settings, gt_csv: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Every candidate pair `cbir pairs` could report (each image's top search.k, any score):
    (scores, is_duplicate), and the number of duplicate pairs in the ground truth. Pairs with
    an unlabelled side are left out."""
    gt_settings = settings.model_copy(update={"data": settings.data.model_copy(
        update={"ground_truth": gt_csv})})
    group_of = read_ground_truth(gt_settings).group_of
    s = open_searcher(settings)
    pairs = knn_pairs(s, settings.search.k, -1.0)
    scores, same = [], []
    for (a, b), (score, _) in pairs.items():
        if a in group_of and b in group_of:
            scores.append(score)
            same.append(group_of[a] == group_of[b])
    present = set(s.image_ids)
    sizes: dict[str, int] = {}
    for image_id, g in group_of.items():
        if image_id in present:
            sizes[g] = sizes.get(g, 0) + 1
    total = sum(n * (n - 1) // 2 for n in sizes.values())
    return np.array(scores), np.array(same, bool), total


def at(scores: np.ndarray, same: np.ndarray, total: int, t: float) -> tuple[float, float, int]:
    keep = scores >= t
    tp = int((keep & same).sum())
    return (tp / keep.sum() if keep.sum() else 1.0), (tp / total if total else 0.0), \
        int(keep.sum())


def hindsight(scores: np.ndarray, same: np.ndarray, total: int, target: float) -> float:
    """The lowest threshold whose pairs reach the target precision: the most recall."""
    best = float("inf")
    for t in np.unique(scores)[::-1]:
        p, _, _ = at(scores, same, total, float(t))
        if p >= target:
            best = float(t)
    return best


def workspace(out: Path, name: str, scans: Path, extra: dict[str, Any]) -> Settings:
    ws = out / name
    ws.mkdir(parents=True, exist_ok=True)
    params = {"data": {"scans_dir": str(scans), "ground_truth": None},
              "evaluate": {"baselines": False}, **extra}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_settings(ws / "params.yaml")


def build(settings: Settings, epochs: int, minutes: float, reuse: bool) -> float:
    """ingest, train, embed, index; returns training seconds (0 when reused)."""
    run_ingest(settings)
    t0 = time.perf_counter()
    if not (reuse and settings.path(settings.model.checkpoint).is_file()):
        run_train(settings, log=lambda line: print(f"    {line}", flush=True),
                  max_epochs=epochs)
    seconds = time.perf_counter() - t0
    run_embed(settings)
    run_index(settings)
    return seconds


def measure(settings: Settings, gt_csv: Path | None, target: float) -> dict[str, Any]:
    cal = run_calibrate(settings, precision=target)
    pairs = run_pairs(settings)
    row: dict[str, Any] = {"threshold": cal.pair_threshold,
                           "est_precision": cal.self_calibration.precision,
                           "est_recall": cal.self_calibration.recall,
                           "pairs": pairs.n_near_pairs, "images": pairs.n_images,
                           "largest_cluster": pairs.largest_cluster,
                           "warnings": pairs.warnings()}
    if gt_csv is not None:
        scores, same, total = pair_truth(settings, gt_csv)
        row["precision"], row["recall"], _ = at(scores, same, total, cal.pair_threshold)
        best = hindsight(scores, same, total, target)
        row["best_threshold"] = best
        row["best_precision"], row["best_recall"], row["best_pairs"] = \
            at(scores, same, total, best)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-calibration"))
    ap.add_argument("--epochs", type=int, default=25, help="the default model's epochs")
    ap.add_argument("--short-epochs", type=int, default=3, help="the model cut short")
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per model")
    ap.add_argument("--targets", default="0.9,0.95,0.99")
    ap.add_argument("--reuse", action="store_true", help="keep trained models found in --out")
    args = ap.parse_args()
    if not (SHARED / "photos").is_dir():
        raise SystemExit(f"skipped: {SHARED / 'photos'} is absent (real photographs needed)")
    from quality import build_benchmark  # the quality benchmark's own copy generator

    t0 = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    demo = out / "demo-collection"
    if not (demo / "ground_truth.csv").is_file():
        generate_demo_collection(demo, n_groups=150, n_distractors=150, max_copies=4,
                                 size=512, seed=0)
    shared_scans, shared_gt, _ = (build_benchmark(out / "shared-collection", 3, 0)
                                  if not (out / "shared-collection" / "ground_truth.csv").is_file()
                                  else (out / "shared-collection" / "scans",
                                        out / "shared-collection" / "ground_truth.csv", None))
    archive = out / "archive-scans"  # the real photographs and paintings, no copies
    if not archive.is_dir():
        shutil.copytree(shared_scans / "originals", archive / "photos")
        shutil.copytree(shared_scans / "distractors", archive / "paintings")
    collections = [("demo", demo / "scans", demo / "ground_truth.csv"),
                   ("shared photos + copies", shared_scans, shared_gt),
                   ("shared photos, no copies", archive, None)]
    targets = [float(x) for x in args.targets.split(",")]
    budget = {"train": {"time_budget_minutes": args.minutes}}
    results = []
    for label, scans, gt in collections:
        for model, epochs in (("default", args.epochs), ("cut short", args.short_epochs)):
            if gt is None and model == "cut short":
                continue
            name = f"{label.split()[0]}-{model.replace(' ', '-')}"
            print(f"== {label}, {model} model ({epochs} epochs)", flush=True)
            settings = workspace(out, name, scans, budget)
            train_s = build(settings, epochs, args.minutes, args.reuse)
            for target in targets:
                row = measure(settings, gt, target)
                row.update(collection=label, model=model, target=target, train_s=train_s)
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "warnings"},
                                 default=float), flush=True)
    print()
    print("| collection | model | target | threshold | real precision | real recall | "
          "estimated precision / recall | best threshold in hindsight | its precision | "
          "its recall | pairs | largest cluster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        est = f"{_f(r['est_precision'])} / {_f(r['est_recall'])}"
        print(f"| {r['collection']} | {r['model']} | {r['target']:g} | {r['threshold']:.4f} | "
              f"{_f(r.get('precision'))} | {_f(r.get('recall'))} | {est} | "
              f"{_f(r.get('best_threshold'))} | {_f(r.get('best_precision'))} | "
              f"{_f(r.get('best_recall'))} | {r['pairs']} | {r['largest_cluster']} |")
    (out / "calibration.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; rows in {out / 'calibration.json'}")


def _f(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


if __name__ == "__main__":
    main()
