"""Partial copies: finding the print a detail was cut from, by the global descriptor alone, by
the union of global and regional candidates (embed.regions, cbir.regions), by the union of
global candidates and local-feature votes (search.local_candidates, cbir.votes), by all three,
and with geometric verification (cbir.verify) re-ranking each union's top candidates.

Run by hand:
    .venv/bin/python benchmarks/partial.py [--out /tmp/cbir-partial] [--photos 194] [--per-band 1]
        [--checkpoint MODEL.pt | --minutes 5 | --init IMAGENET1K_V1] [--top 20]
        [--regions halves|thirds|none] [--local 10] [--pairs [--pairs-every 4]]

Run time (2 busy cores, with --checkpoint): --photos 48 --regions halves --local 10 took 27
minutes (192 details and 48 whole copies; 16 of them embedding the halves regions, 1.5
extracting the collection's local features, half a minute for the local index, 4 arms of
queries at 0.4-0.7 s each); --photos 194 --regions halves with --minutes 12 and --pairs, 34
minutes; --regions thirds embeds 34 windows a picture (17 minutes for the collection). --reuse
keeps the workspace of an earlier run (then --no-queries --pairs takes 9 minutes, most of it
embedding the added details). A smaller --photos takes every n-th photograph. Training here
(--minutes) adds its budget.

The collection is the real photographs of ../shared/data/photos with the paintings of
../shared/data/distractors (copied into a throw-away folder under --out, never into the
repository). The queries are details of the photographs made by cbir.partial_copies (an
independent generator: nothing from the training's augmentations), --per-band per photograph in
each area band (5-10 %, 10-20 %, 20-40 %, 40-50 % of the photograph), lightly rescanned, and
a lightly rescanned whole copy of each (the "whole copy" band: what helps details must not
hurt full-image near-duplicates). Each
query has one right answer: the photograph it was cut from.

Everything runs through the real pipeline as benchmarks/quality.py does (ingest, train, embed,
index in a throw-away workspace): first embed and index with embed.regions: none, then with
--regions (which computes only the regional descriptors and their index), each timed and sized;
then the local descriptors' index (--local, search.local_candidates; built after the
collection's features are extracted, so that its time is the index's own); queries go through
`cbir query`'s code (`query_images`) under each setting (--regions none: the arms without
regions only). The model is
--checkpoint (e.g. the heritage model quality.py trained, at
/tmp/cbir-quality/heritage/data/models/model.pt after its run), or one trained here for
--minutes, or else the untrained --init. Figures per band (one relevant item, so R@10 is whether
the original is in the top 10): how often the original is among the top --top candidates (the
ceiling of re-ranking), P@1 and R@10, for the global search alone and for the union; how often
the original was found by the regions only; then the union's top --top re-ranked by
verification (verified candidates first, most inliers first, the others after in the union's
order): P@1, R@10, wrong candidates verified, whether the verified box on the original overlaps
the true box (IoU >= 0.5), and the verification time per query.
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
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from cbir import partial_copies, regions, verify  # noqa: E402
from cbir.config import load_settings  # noqa: E402
from cbir.imaging import load_rgb  # noqa: E402
from cbir.steps.embed import run_embed  # noqa: E402
from cbir.steps.index import run_index  # noqa: E402
from cbir.steps.ingest import run_ingest  # noqa: E402
from cbir.steps.pairs import run_pairs  # noqa: E402
from cbir.steps.query import query_images  # noqa: E402
from cbir.steps.train import run_train  # noqa: E402
from cbir.store.features import RECIPE, extract_missing, feature_cache  # noqa: E402
from cbir.store.layout import REGIONS_PREFIX, layout  # noqa: E402
from cbir.store.manifest import canonical_images  # noqa: E402


#: The band of whole-picture copies (a light rescan of each detailed photograph).
WHOLE = "whole copy"
ALL_BANDS = [*partial_copies.BANDS, WHOLE]


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / area if area else 0.0


def build(out: Path, n_photos: int, per_band: int, seed: int,
          reuse: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """scans/{originals,distractors} and queries/<band>/ under `out`; the queries' truth.
    `reuse`: keep the scans an earlier run copied (without the details --pairs added)."""
    photos = sorted((SHARED / "photos").rglob("*.jpg"))
    paintings = sorted((SHARED / "distractors").rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"skipped: {SHARED / 'photos'} is absent (real photographs needed)")
    scans, queries = out / "scans", out / "queries"
    reuse = reuse and (scans / "originals").is_dir()
    for d in (scans / "details", queries) if reuse else (scans, queries):
        if d.exists():
            shutil.rmtree(d)
    for folder, files in (("originals", photos), ("distractors", paintings)):
        if reuse:
            break
        (scans / folder).mkdir(parents=True)
        for f in files:  # into the throw-away benchmark folder, not the repository
            shutil.copyfile(f, scans / folder / f.name)
    step = max(1, len(photos) // max(1, n_photos))
    chosen = photos[::step][:n_photos]
    truth = []
    for i, photo in enumerate(chosen):
        original = load_rgb(photo)
        for b, (band, area) in enumerate(partial_copies.BANDS.items()):
            for k in range(per_band):
                crop = partial_copies.detail_crop(original, np.random.default_rng([seed, i, b, k]),
                                                  area)
                path = queries / band / f"{photo.stem}-{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                crop.picture.save(path, quality=92)
                truth.append({"query": path, "band": band, "original": photo.name,
                              "box": crop.box, "area": crop.area})
        # a whole copy too: full-image near-duplicates must not suffer from what helps details
        copy, _ = partial_copies.rescan(original, np.random.default_rng([seed, i, 99]))
        path = queries / WHOLE / f"{photo.stem}-0.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        copy.save(path, quality=92)
        truth.append({"query": path, "band": WHOLE, "original": photo.name,
                      "box": (0, 0, original.width, original.height), "area": 1.0})
    return scans, truth


def workspace(out: Path, scans: Path, args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Ingest, train (or take --checkpoint, or the untrained --init), embed, index: first
    without regions, then with --regions (only the regional descriptors are computed then), so
    that the costs of each are measured in the same run; then the local descriptors' index.
    Returns the settings of each arm (by name), the model, and the costs."""
    ws = out / "ws"
    reuse = args.reuse and (ws / "params.yaml").is_file()
    if ws.exists() and not reuse:
        shutil.rmtree(ws)
    ws.mkdir(parents=True, exist_ok=True)
    params = {"data": {"scans_dir": str(scans)},
              "model": {"init": args.init},
              "train": {"resolution": args.resolution, "batch_size": 64, "epochs": args.epochs,
                        "time_budget_minutes": args.minutes, "seed": args.seed,
                        "augmentation": "heritage"},
              "embed": {"resolution": "train", "regions": "none"}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings = load_settings(ws / "params.yaml")
    run_ingest(settings)
    ckpt = settings.path(settings.model.checkpoint)
    if reuse and ckpt.is_file():  # embedding and indexing below then only catch up
        model = f"the model of the reused workspace {ws}"
    elif args.checkpoint:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.checkpoint, ckpt)
        model = f"checkpoint {args.checkpoint}"
    elif args.minutes > 0:
        run_train(settings, log=lambda line: print(f"  [train] {line}", flush=True))
        model = f"heritage SimCLR trained here ({args.minutes} min budget, {args.epochs} epochs)"
    else:
        model = f"untrained resnet18 init={args.init}"
    lay = layout(settings)
    t0 = time.perf_counter()
    run_embed(settings)
    costs: dict[str, float] = {"embed_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    run_index(settings)
    costs["index_s"] = time.perf_counter() - t0
    costs["index_bytes"] = _bytes(lay.index_dir, recursive=False)
    costs["vector_bytes"] = _bytes(lay.embeddings_dir, recursive=False, deep=1)
    arms = {"global": settings}
    if args.regions != regions.NONE:
        params["embed"]["regions"] = args.regions
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        with_regions = load_settings(ws / "params.yaml")
        t0 = time.perf_counter()
        run_embed(with_regions)
        costs["region_embed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_index(with_regions)
        costs["region_index_s"] = time.perf_counter() - t0
        costs["region_index_bytes"] = _bytes(lay.region_index_dir)
        costs["region_vector_bytes"] = sum(
            _bytes(d) for d in lay.embeddings_dir.glob(f"*/{REGIONS_PREFIX}*")
        )
        arms[f"global + regions ({args.regions})"] = with_regions
    # the collection's features, extracted once into the workspace's cache (as `cbir pairs`
    # does), so that the queries time what a query costs (its own features, then the cache),
    # and the local index's build its own work
    t0 = time.perf_counter()
    cache = feature_cache(settings)
    extract_missing(settings, cache)
    costs["extract_s"] = time.perf_counter() - t0
    costs["features"] = len(cache)
    if args.local:
        for name, base in list(arms.items()):
            on = base.model_copy(update={"search": base.search.model_copy(
                update={"local_candidates": args.local})})
            arms[f"{name} + local votes"] = on
        t0 = time.perf_counter()
        summary = run_index(arms["global + local votes"])
        costs["local_index_s"] = time.perf_counter() - t0
        costs["local_index_bytes"] = _bytes(lay.local_index_dir)
        costs["local_descriptors"] = summary.local.info.n_vectors if summary.local else 0
    return arms, model, costs


def _bytes(folder: Path, *, recursive: bool = True, deep: int = 0) -> int:
    """Bytes of the files in `folder` (recursive, or only `deep` folders down)."""
    files = folder.rglob("*") if recursive else (
        folder.glob("*/*") if deep == 1 else folder.glob("*"))
    return sum(f.stat().st_size for f in files if f.is_file())


def time_pairs(settings: Any, with_regions: Any, truth: list[dict[str, Any]], scans: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    """`cbir pairs` on the collection with every --pairs-every-th detail added to it, side by
    side: verification off, then on with search.verify_rank 0 (only pairs above the threshold),
    3 (the default) with an empty features cache and with it full, 3 with the regional index,
    and search.k (every neighbour down to the floor: before verify_rank). For each: seconds,
    pairs checked, and per area band how many details are paired with their original and how
    many of those pairs verification confirms as a detail (a_in_b / b_in_a)."""
    chosen = truth[:: max(1, args.pairs_every)]
    folder = scans / "details"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for t in chosen:
        shutil.copyfile(t["query"], folder / f"{t['band']}-{Path(t['query']).name}")
    t0 = time.perf_counter()
    run_ingest(with_regions)  # the details join the collection: embedded with their regions
    run_embed(with_regions)
    run_index(with_regions)
    print(f"\npairs: {len(chosen)} details added to the collection "
          f"({time.perf_counter() - t0:.0f} s to ingest, embed and index them)", flush=True)
    id_of = {r["path"]: r["image_id"] for r in canonical_images(settings)}
    wanted = {}
    for t in chosen:
        d = id_of.get(f"details/{t['band']}-{Path(t['query']).name}")
        o = id_of.get(f"originals/{t['original']}")
        if d and o:
            wanted[(d, o) if d < o else (o, d)] = t["band"]

    def run(s: Any, verify_on: bool, rank: int) -> tuple[Any, float]:
        s = s.model_copy(update={"search": s.search.model_copy(
            update={"verify": verify_on, "verify_floor": args.floor, "verify_rank": rank})})
        t = time.perf_counter()
        summary = run_pairs(s)
        return summary, time.perf_counter() - t

    run(settings, False, 0)  # calibration (untimed): the same for every run
    run(with_regions, False, 0)
    out = {}
    cache = layout(settings).features(RECIPE)
    k = settings.search.k
    print(f"\n| cbir pairs on {len(id_of)} pictures | Seconds | Pairs verified | ms a pair | "
          f"Near pairs | Confirmed below the threshold | Contradicted | "
          + " | ".join(f"{b}: paired / confirmed" for b in ALL_BANDS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(ALL_BANDS))
    for name, s, on, rank, empty in (
        ("verification off", settings, False, 0, False),
        ("verify_rank 0 (above the threshold only)", settings, True, 0, True),
        ("verify_rank 3, empty features cache", settings, True, 3, True),
        ("verify_rank 3", settings, True, 3, False),
        (f"verify_rank 3 + regions ({args.regions})", with_regions, True, 3, False),
        (f"verify_rank {k} (every neighbour down to the floor)", settings, True, k, False),
    ):
        if empty and cache.exists():
            shutil.rmtree(cache)
        summary, secs = run(s, on, rank)
        vs = summary.verification
        rows = pq.read_table(layout(settings).pairs).to_pylist()
        rel = {(r["image_a"], r["image_b"]): r["relation"] for r in rows if r["kind"] == "near"}
        bands: dict[str, list[int]] = {b: [0, 0, 0] for b in ALL_BANDS}
        for key, band in wanted.items():
            bands[band][0] += 1
            bands[band][1] += int(key in rel)
            bands[band][2] += int(rel.get(key) in (
                ("full",) if band == WHOLE else ("a_in_b", "b_in_a")))
        out[name] = {"seconds": secs, "near_pairs": summary.n_near_pairs,
                     "checked": vs.checked if vs else 0,
                     "per_pair_ms": vs.seconds / max(1, vs.checked) * 1000 if vs else 0.0,
                     "confirmed_below": vs.confirmed_below if vs else 0,
                     "contradicted": vs.contradicted if vs else 0,
                     "extracted": vs.extracted if vs else 0, "bands": bands}
        r = out[name]
        print(f"| {name} | {secs:.1f} | {r['checked']} | {r['per_pair_ms']:.1f} | "
              f"{r['near_pairs']} | {r['confirmed_below']} | {r['contradicted']} | "
              + " | ".join(f"{n and p / n:.2f} / {n and c / n:.2f}" for n, p, c in bands.values())
              + " |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-partial"))
    ap.add_argument("--photos", type=int, default=194, help="photographs detailed (every n-th)")
    ap.add_argument("--per-band", type=int, default=1, help="details per photograph and band")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained cbir model.pt")
    ap.add_argument("--minutes", type=float, default=0.0, help="train here for this long")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--init", default="none", help="model.init of an untrained model")
    ap.add_argument("--resolution", type=int, default=112, help="training and embedding px")
    ap.add_argument("--top", type=int, default=20, help="candidates verified per query")
    ap.add_argument("--regions", default="halves", choices=[*sorted(regions.SCHEMES), "none"],
                    help="embed.regions scheme measured against global descriptors alone")
    ap.add_argument("--local", type=int, default=10,
                    help="search.local_candidates of the arms with local votes (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true",
                    help="keep --out's workspace (model, embeddings, regions) from an earlier run")
    ap.add_argument("--no-queries", action="store_true",
                    help="skip the query tables (with --pairs: only the pairs step)")
    ap.add_argument("--pairs-every", type=int, default=4,
                    help="--pairs adds every n-th detail to the collection")
    ap.add_argument("--pairs", action="store_true",
                    help="also time `cbir pairs` with and without verification")
    ap.add_argument("--floor", type=float, default=0.5, help="search.verify_floor for --pairs")
    args = ap.parse_args()

    t_start = time.perf_counter()
    scans, truth = build(args.out, args.photos, args.per_band, args.seed, args.reuse)
    arms, model, costs = workspace(args.out, scans, args)
    settings = arms["global"]
    with_regions = arms.get(f"global + regions ({args.regions})", settings)
    print(f"collection embedded and indexed ({time.perf_counter() - t_start:.0f} s); model: "
          f"{model}", flush=True)
    tables: dict[str, Any] = {}
    # side by side: the global candidates alone, then its unions with the others
    for label, s in ({} if args.no_queries else arms).items():
        print(f"\ncandidates: {label}")
        vset = s.model_copy(update={"search": s.search.model_copy(
            update={"verify": True, "verify_top": args.top})})
        t0 = time.perf_counter()
        results = query_images(vset, [t["query"] for t in truth], k=args.top)
        arm_s = time.perf_counter() - t0
        rows: dict[str, dict[str, list[float]]] = {}
        for t, res in zip(truth, results, strict=True):
            if res.error:
                raise SystemExit(f"query {t['query']}: {res.error}")
            # the descriptor's order: by score (query_images returns the re-ranked one)
            ranked = sorted(zip(res.neighbours, res.verification, strict=True),
                            key=lambda nv: -nv[0][2])
            names = [Path(p).name for (_, p, _), _ in ranked]
            found = [m or verify.Match() for _, m in ranked]
            reranked = [Path(p).name for _, p, _ in res.neighbours]
            right = t["original"]
            top = (res.verification[0] or verify.Match()) if res.verification else verify.Match()
            score_of = {Path(p).name: sc for _, p, sc in res.neighbours}
            r = rows.setdefault(t["band"], {k: [] for k in (
                "g_p1", "g_r10", "v_p1", "v_r10", "ceiling", "false", "box", "secs", "qsecs",
                "score", "local_only")})
            by = {Path(p).name: c for (_, p, _), c in zip(res.neighbours, res.candidates,
                                                           strict=True)}
            r["local_only"].append(float(right in by and by[right].found_by == regions.LOCAL))
            r["g_p1"].append(float(names[:1] == [right]))
            r["g_r10"].append(float(right in names[:10]))
            r["v_p1"].append(float(reranked[:1] == [right]))
            r["v_r10"].append(float(right in reranked[:10]))
            r["ceiling"].append(float(right in names))
            r["false"].append(float(sum(m.verified and n != right for m, n in zip(found, names))))
            r["box"].append(float(reranked[:1] == [right] and top.box is not None
                                  and iou(top.box, t["box"]) >= 0.5))
            r["secs"].append(res.verify_seconds)
            r["qsecs"].append(res.features_seconds)
            if right in score_of:
                r["score"].append(score_of[right])

        print()
        print(f"| Area of the original | Queries | Descriptor P@1 | Descriptor R@10 | Verified P@1 | "
              f"Verified R@10 | Original in top {args.top} | Found by votes only | "
              f"Wrong candidates verified / query | "
              f"Box IoU >= 0.5 at rank 1 | Verification ms / query (median, p90) | "
              f"Query's own features ms (median) | Original's score (median, p10) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        table = {}
        for band in ALL_BANDS:
            if band not in rows:
                continue
            raw = rows[band]
            r = {k: float(np.mean(v)) if v else float("nan") for k, v in raw.items()}
            r["secs_median"] = float(np.median(raw["secs"]))
            r["secs_p90"] = float(np.percentile(raw["secs"], 90))
            r["qsecs_median"] = float(np.median(raw["qsecs"]))
            sc = raw["score"] or [float("nan")]
            r["score_median"], r["score_p10"] = float(np.median(sc)), float(np.percentile(sc, 10))
            table[band] = {**r, "queries": len(raw["g_p1"])}
            print(f"| {band} | {len(raw['g_p1'])} | {r['g_p1']:.3f} | {r['g_r10']:.3f} | "
                  f"{r['v_p1']:.3f} | {r['v_r10']:.3f} | {r['ceiling']:.3f} | "
                  f"{r['local_only']:.3f} | {r['false']:.3f} | "
                  f"{r['box']:.3f} | {r['secs_median'] * 1000:.0f}, {r['secs_p90'] * 1000:.0f} | "
                  f"{r['qsecs_median'] * 1000:.0f} | {r['score_median']:.3f}, "
                  f"{r['score_p10']:.3f} |")
        print(f"{arm_s:.1f} s for {len(truth)} queries: {arm_s / len(truth) * 1000:.0f} ms a "
              f"query (embedding, search, features, votes, verification)")
        tables[label] = {"bands": table, "seconds_per_query": arm_s / len(truth)}
    pairs = time_pairs(settings, with_regions, truth, scans, args) if args.pairs else {}
    total = time.perf_counter() - t_start
    n = len(list(scans.rglob("*.jpg")))
    mib = 1 / 2**20
    print()
    print(f"| Collection of {n} pictures | Embedding s | Index s | Index MiB | Vectors MiB |")
    print("|---|---|---|---|---|")
    print(f"| global only | {costs['embed_s']:.0f} | {costs['index_s']:.1f} | "
          f"{costs['index_bytes'] * mib:.2f} | {costs['vector_bytes'] * mib:.2f} |")
    if "region_embed_s" in costs:
        print(f"| + regions ({args.regions}, {regions.SCHEMES[args.regions].count} a picture) | "
              f"+{costs['region_embed_s']:.0f} | +{costs['region_index_s']:.1f} | "
              f"+{costs['region_index_bytes'] * mib:.2f} | "
              f"+{costs['region_vector_bytes'] * mib:.2f} |")
    if "local_index_s" in costs:
        per = costs["local_index_bytes"] / max(1, costs["features"])
        print(f"| + local votes ({settings.index.local_keypoints} descriptors a picture, "
              f"{costs['local_descriptors']} in all; {per / 1000:.1f} kB a picture) | +0 | "
              f"+{costs['local_index_s']:.1f} | +{costs['local_index_bytes'] * mib:.2f} | - |")
    print()
    print(f"model: {model}; {len(truth)} queries of {args.photos} photographs; the local "
          f"features of the {costs['features']} collection pictures extracted once, "
          f"{costs['extract_s']:.1f} s on {settings.decode_workers} processes; run time "
          f"{total / 60:.1f} min")
    (args.out / "partial.json").write_text(json.dumps(
        {"tables": tables, "costs": costs, "model": model, "run_seconds": total,
         "pairs": pairs, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
