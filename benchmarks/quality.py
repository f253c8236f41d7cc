"""Retrieval quality on real archive photographs: heritage vs simclr SimCLR vs baselines.

Run by hand (about 30 minutes on 2 otherwise idle cores):
    .venv/bin/python benchmarks/quality.py [--out /tmp/cbir-quality] [--minutes 20] [--epochs 25]

Builds a near-duplicate benchmark from ../shared/data/photos with two kinds of copies: the
benchmark's own seeded degradation generator (built on cbir.degrade, like the training
augmentations, but with other parameter ranges and combinations) and the independent held-out
generator of cbir.heldout (processes the training never sees: microfilm, photocopies, thumbnails,
palettes, dye fading, lens distortion, shake, printed pages, watermarks, torn corners, grain,
WebP). A figure on the first kind says how the model treats archive-like copies; one on the
second, how it generalises to copies made by code it was not trained with. The paintings in
../shared/data/distractors are distractors that match nothing. It trains and evaluates, in one
run: SimCLR with the heritage augmentations, SimCLR with the original simclr augmentations, the
untrained backbone, and perceptual-hash ranking. Each kind of copies has its own (partial) ground
truth, so each figure counts only its own copies and their originals among the distractors.
Everything goes through the real pipeline (ingest, train, embed, index, evaluate) in throw-away
workspaces; each training run gets --minutes (train.time_budget_minutes).

Targets: heritage SimCLR P@1 >= 0.95 and mAP@10 >= 0.90, above simclr, far above phash.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cbir import degrade, heldout, metrics
from cbir.config import load_settings
from cbir.steps.embed import run_embed
from cbir.steps.evaluate import run_evaluate
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.train import run_train

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- the benchmark's copies

def benchmark_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One archival near-duplicate with the benchmark's own ranges (2-4 processes).

    Deliberately unlike the training recipe: harsher rescans and JPEG, off-centre crops, other
    toning strengths and different combinations.
    """
    img = img.convert("RGB")
    ops = ["crop", "tone", "fade", "halftone", "rephoto", "mount", "damage", "marks", "mirror",
           "rescan", "jpeg"]
    p = np.array([0.6, 0.4, 0.3, 0.12, 0.25, 0.35, 0.3, 0.2, 0.12, 0.5, 0.6])
    chosen = set(rng.choice(ops, size=int(rng.integers(2, 5)), replace=False,
                            p=p / p.sum()).tolist())
    out = img
    if "crop" in chosen:
        w = float(rng.uniform(0.7, 0.95))
        h = float(rng.uniform(0.7, 0.95))
        x0, y0 = float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h))
        out = degrade.crop_fraction(out, (x0, y0, x0 + w, y0 + h))
    if "mirror" in chosen:
        out = degrade.mirror(out)
    if "halftone" in chosen:
        out = degrade.halftone(out, cell=float(rng.uniform(2.0, 3.5)))
    if "tone" in chosen:
        kind = str(rng.choice(["sepia", "selenium", "cyan", "grey"]))
        out = degrade.tone(out, kind, float(rng.uniform(0.3, 0.9)))
    if "fade" in chosen:
        out = degrade.fade(out, float(rng.uniform(0.1, 0.45)))
    if "damage" in chosen:
        out = degrade.scratches(out, rng, int(rng.integers(1, 6)))
        out = degrade.dust(out, rng, int(rng.integers(10, 80)))
        if rng.random() < 0.5:
            out = degrade.foxing(out, rng, int(rng.integers(3, 15)))
    if "mount" in chosen:
        colour = str(rng.choice(["white", "cream", "grey", "black"]))
        out = degrade.mount_border(out, rng, float(rng.uniform(0.03, 0.1)), colour,
                                   float(rng.uniform(-3, 3)))
    if "marks" in chosen:
        out = degrade.stamp(out, rng) if rng.random() < 0.5 else degrade.handwriting(out, rng)
    if "rephoto" in chosen:
        out = degrade.rephotograph(out, rng, float(rng.uniform(0.2, 0.6)))
    if "rescan" in chosen:
        out = degrade.rescan(out, float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.75, 1.3)),
                             float(rng.uniform(0.7, 1.4)))
    if "jpeg" in chosen:
        out = degrade.jpeg_recompress(out, int(rng.integers(20, 70)))
    return out


def build_benchmark(out: Path, copies: int, seed: int, held_out: int = 0,
                    ) -> tuple[Path, Path, dict[str, int]]:
    """scans/{originals,copies,distractors} and ground_truth.csv under `out`; with `held_out`,
    also scans/heldout/ (1..held_out copies per photograph from cbir.heldout) and
    ground_truth_heldout.csv (originals, held-out copies and distractors)."""
    photos = sorted((SHARED / "photos").rglob("*.jpg"))
    paintings = sorted((SHARED / "distractors").rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"skipped: {SHARED / 'photos'} is absent (real photographs needed)")
    scans = out / "scans"
    if scans.exists():
        shutil.rmtree(scans)
    rows = ["path,group"]
    held_rows = ["path,group"]
    rng = np.random.default_rng(seed)
    for i, photo in enumerate(photos):
        group = f"p{i:04d}"
        dst = scans / "originals" / photo.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, dst)  # into the throw-away benchmark folder, not the repository
        rows.append(f"scans/originals/{photo.name},{group}")
        held_rows.append(f"scans/originals/{photo.name},{group}")
        with Image.open(photo) as im:
            im.load()
            for c in range(int(rng.integers(1, copies + 1))):
                copy = benchmark_copy(im, np.random.default_rng([seed, i, c]))
                name = f"{photo.stem}-copy{c}.jpg"
                (scans / "copies").mkdir(parents=True, exist_ok=True)
                copy.save(scans / "copies" / name, quality=90)
                rows.append(f"scans/copies/{name},{group}")
            for c in range(int(np.random.default_rng([seed, i, 99]).integers(1, held_out + 1))
                           if held_out else 0):
                copy = heldout.held_out_copy(im.convert("RGB"),
                                             np.random.default_rng([seed, i, 100 + c]))
                name = f"{photo.stem}-heldout{c}.jpg"
                (scans / "heldout").mkdir(parents=True, exist_ok=True)
                copy.save(scans / "heldout" / name, quality=90)
                held_rows.append(f"scans/heldout/{name},{group}")
    for j, painting in enumerate(paintings):
        dst = scans / "distractors" / painting.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(painting, dst)
        rows.append(f"scans/distractors/{painting.name},d{j:04d}")
        held_rows.append(f"scans/distractors/{painting.name},d{j:04d}")
    gt = out / "ground_truth.csv"
    gt.write_text("\n".join(rows) + "\n")
    if held_out:
        (out / "ground_truth_heldout.csv").write_text("\n".join(held_rows) + "\n")
    n = {"photos": len(photos), "copies": len(rows) - 1 - len(photos) - len(paintings),
         "distractors": len(paintings),
         "held-out copies": len(held_rows) - 1 - len(photos) - len(paintings)}
    return scans, gt, n


# --------------------------------------------------------------------------- one variant

def run_variant(out: Path, scans: Path, gt: Path, name: str, train: dict[str, Any],
                extra: dict[str, Any], held_gt: Path | None = None,
                ) -> tuple[list[tuple[str, dict[str, float]]], float,
                           list[tuple[str, dict[str, float]]]]:
    ws = out / name
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    params = {"data": {"scans_dir": str(scans), "ground_truth": str(gt)}, "train": train,
              **extra}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings = load_settings(ws / "params.yaml")
    run_ingest(settings)
    t0 = time.perf_counter()
    summary = run_train(settings, log=lambda line: print(f"  [{name}] {line}", flush=True))
    train_s = time.perf_counter() - t0
    print("\n".join(f"  [{name}] {ln}" for ln in summary.lines()), flush=True)
    run_embed(settings)
    run_index(settings)
    result = run_evaluate(settings)
    held: list[tuple[str, dict[str, float]]] = []
    if held_gt is not None:  # the same model on the held-out generator's copies
        other = settings.model_copy(update={"data": settings.data.model_copy(
            update={"ground_truth": held_gt})})
        held = run_evaluate(other).rows
    return result.rows, train_s, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-quality"))
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per variant")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--copies", type=int, default=3, help="near-duplicates per photo, at most")
    ap.add_argument("--held-out", type=int, default=2,
                    help="held-out generator copies per photo, at most (0: none)")
    ap.add_argument("--resolution", type=int, default=112, help="training resolution")
    ap.add_argument("--embed-resolution", default="train",
                    help="px, or 'train' (the training resolution, the params default)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    scans, gt, n = build_benchmark(args.out, args.copies, args.seed, args.held_out)
    held_gt = args.out / "ground_truth_heldout.csv" if args.held_out else None
    print(f"benchmark: {n['photos']} photographs with {n['copies']} near-duplicates and "
          f"{n['held-out copies']} held-out copies, {n['distractors']} distractors "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    base_train = {"resolution": args.resolution, "batch_size": args.batch,
                  "epochs": args.epochs, "time_budget_minutes": args.minutes,
                  "seed": args.seed}
    res = args.embed_resolution
    extra = {"embed": {"resolution": res if res == "train" else int(res)}}
    table: list[tuple[str, dict[str, float]]] = []
    held_table: list[dict[str, float]] = []
    times = {}
    for strategy in ("heritage", "simclr"):
        rows, secs, held = run_variant(args.out, scans, gt, strategy,
                                       {**base_train, "augmentation": strategy}, extra,
                                       held_gt)
        times[strategy] = secs
        table.append((f"SimCLR {strategy} augmentation", rows[0][1]))
        held_table.append(held[0][1] if held else {})
        if strategy == "heritage":
            baselines = rows[1:]
            held_baselines = [vals for _, vals in held[1:]]
    table += baselines
    held_table += held_baselines if held_gt else [{} for _ in baselines]
    print()
    print(metrics.markdown_table(table))
    if held_gt is not None:
        print()
        print("The same models on the held-out generator's copies (cbir.heldout):")
        print()
        print("| Model | Precision@1 (benchmark copies) | mAP@10 (benchmark copies) | "
              "Precision@1 (held-out copies) | mAP@10 (held-out copies) |")
        print("|---|---|---|---|---|")
        for (label, vals), hv in zip(table, held_table):
            print(f"| {label} | {vals['precision@1']:.4f} | {vals['map@10']:.4f} | "
                  f"{hv.get('precision@1', float('nan')):.4f} | "
                  f"{hv.get('map@10', float('nan')):.4f} |")
    (args.out / "quality.json").write_text(json.dumps(
        {"rows": [[label, vals] for label, vals in table],
         "held_out_rows": [[label, hv] for (label, _), hv in zip(table, held_table)],
         "train_seconds": times,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2, default=float))
    her, sim = table[0][1], table[1][1]
    ph = table[-1][1]
    checks = [("heritage P@1 >= 0.95", her["precision@1"] >= 0.95),
              ("heritage mAP@10 >= 0.90", her["map@10"] >= 0.90),
              ("heritage beats simclr (mAP@10)", her["map@10"] > sim["map@10"]),
              ("heritage beats phash by >= 0.2 (mAP@10)", her["map@10"] >= ph["map@10"] + 0.2)]
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    print("training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))


if __name__ == "__main__":
    main()
