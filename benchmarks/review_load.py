"""How fast the review server pages a big queue: a workspace whose pairs table holds a million
pairs among 200,000 images, served by the real application (in process, over Starlette's test
client: the same routes, catalogue and SQL as `cbir review`, without the sockets).

Run by hand (a minute or two on 2 cores, most of it writing the tables):
    .venv/bin/python benchmarks/review_load.py [--out /tmp/cbir-review-load] [--pairs 1000000]

The manifest, runs, pairs and clusters are written directly as Parquet with the data layer's
schemas (what ingest and pairs would write for such a collection, without decoding 200,000
scans), and 20,000 decisions are recorded through the decisions log. Prints the time the
server takes to prepare the queue at start, then of the first queue page, a filtered page, a
`run=N` page, a page deep in the queue (after the 500,000th pair, by its keyset cursor), the
progress count, a cluster, and a decision and its undo.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cbir.config import load_settings  # noqa: E402
from cbir.review.app import ReviewConfig, build_app  # noqa: E402
from cbir.store import catalog  # noqa: E402
from cbir.store.decisions import Decision, record  # noqa: E402
from cbir.store.layout import layout  # noqa: E402
from cbir.store.manifest import FILES_SCHEMA, RUNS_SCHEMA  # noqa: E402
from cbir.store.pairs import CLUSTERS_SCHEMA, PAIRS_SCHEMA  # noqa: E402

RUNS = 3


def write_workspace(root: Path, n_images: int, n_pairs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "scans").mkdir(parents=True)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"scans_dir": "scans", "ground_truth": None},
                                      "search": {"pair_threshold": 0.85}}))
    lay = layout(load_settings(params))
    ids = np.array([f"{i:016x}" for i in rng.choice(2**62, n_images, replace=False)])
    paths = np.array([f"box-{i // 1000:03d}/scan-{i:06d}.tif" for i in range(n_images)])
    first_run = np.where(np.arange(n_images) < n_images * 0.9, 1,
                         np.where(np.arange(n_images) < n_images * 0.97, 2, 3)).astype(np.int32)
    now = datetime.now(UTC)
    mtime_ns = np.full(n_images, int(now.timestamp() * 1e9), np.int64)
    files = pa.table({
        "image_id": ids, "path": paths, "path_raw": pa.array([p.encode() for p in paths]),
        "version": np.ones(n_images, np.int32), "status": np.full(n_images, "ok"),
        "is_canonical": np.ones(n_images, bool), "duplicate_of": pa.nulls(n_images, pa.string()),
        "sha256": np.array([i * 4 for i in ids]),
        "bytes": rng.integers(200_000, 90_000_000, n_images),
        "mtime": pa.array(np.full(n_images, now), pa.timestamp("us", tz="UTC")),
        "mtime_ns": mtime_ns,
        "width": rng.integers(800, 9000, n_images).astype(np.int32),
        "height": rng.integers(600, 7000, n_images).astype(np.int32),
        "mode": np.full(n_images, "RGB"), "format": np.full(n_images, "TIFF"),
        "pages": np.ones(n_images, np.int32),
        "phash": pa.array(rng.integers(0, 2**63, n_images).astype(np.uint64)),
        "first_run": first_run, "last_run": np.full(n_images, RUNS, np.int32),
    }, schema=FILES_SCHEMA)
    lay.manifest_dir.mkdir(parents=True)
    pq.write_table(files, lay.files)
    runs = pa.table({
        "run_id": np.arange(1, RUNS + 1, dtype=np.int32),
        "started_at": pa.array([now] * RUNS, pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array([now] * RUNS, pa.timestamp("us", tz="UTC")),
        "scans_dir": ["scans"] * RUNS, **{k: np.zeros(RUNS, np.int64) for k in (
            "files_seen", "new", "changed", "unchanged", "new_duplicates", "newly_missing",
            "quarantined", "decoded")},
        "seconds": np.zeros(RUNS),
    }, schema=RUNS_SCHEMA)
    pq.write_table(runs, lay.runs)
    # a million pairs: each image's few nearest, scores above the pair threshold's range
    a = rng.integers(0, n_images, int(n_pairs * 1.05))
    b = (a + rng.integers(1, 50, a.size)) % n_images
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.unique(lo.astype(np.int64) * n_images + hi)[:n_pairs]
    rng.shuffle(key)
    ia, ib = key // n_images, key % n_images
    pairs = pa.table({
        "image_a": ids[ia], "image_b": ids[ib], "path_a": paths[ia], "path_b": paths[ib],
        "score": rng.uniform(0.7, 1.0, key.size).astype(np.float32),
        "rank": rng.integers(1, 10, key.size).astype(np.int32),
        "kind": np.full(key.size, "near"),
        # not verified (search.verify off): the verification columns are null
        **{f.name: pa.nulls(key.size, f.type) for f in PAIRS_SCHEMA
           if f.name in ("inliers", "covered", "relation") or f.name.startswith("box_")},
    }, schema=PAIRS_SCHEMA)
    lay.pairs_dir.mkdir(parents=True)
    pq.write_table(pairs, lay.pairs)
    # clusters: runs of three consecutive images, a third of the collection
    members = np.arange(0, n_images // 3)
    clusters = pa.table({
        "cluster_id": (members // 3).astype(np.int32), "image_id": ids[members],
        "path": paths[members], "size": np.full(members.size, 3, np.int32),
        "weakest_link": np.full(members.size, 0.9, np.float32),
    }, schema=CLUSTERS_SCHEMA)
    pq.write_table(clusters, lay.clusters)
    # 20,000 earlier decisions, in 20 parts (20 review sessions)
    decided = pairs.slice(0, 20_000).to_pylist()
    for part in range(20):
        record(lay.decisions_dir, [
            Decision(r["image_a"], r["image_b"], ("same", "different", "unsure")[i % 3],
                     r["path_a"], r["path_b"], source="review", score=r["score"])
            for i, r in enumerate(decided[part * 1000:(part + 1) * 1000])])
    return params


def timed(what: str, fn, repeat: int = 3):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    print(f"{what:<44} first {times[0] * 1000:8.0f} ms   then {min(times[1:]) * 1000:8.0f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-review-load"))
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    t = time.perf_counter()
    params = write_workspace(args.out, args.images, args.pairs)
    settings = load_settings(params)
    catalog.refresh_catalog(settings)
    print(f"workspace: {args.images:,} images, {args.pairs:,} pairs, 20,000 decisions written "
          f"in {time.perf_counter() - t:.1f} s ({args.out})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    app = build_app(settings, ReviewConfig("127.0.0.1", 8765, "bench", None))
    t = time.perf_counter()
    app.state.review.prepare()  # what `cbir review` does before it prints its URL
    print(f"{'preparing the queue (at start)':<44} {(time.perf_counter() - t) * 1000:8.0f} ms")
    c = TestClient(app, base_url="http://127.0.0.1:8765")

    def get(url: str) -> dict:
        r = c.get(url)
        assert r.status_code == 200, r.text
        return r.json()

    first = timed("first page (50 pairs)", lambda: get("/api/queue"))
    assert len(first["rows"]) == 50
    timed("next page (by its cursor)", lambda: get(f"/api/queue?after={first['next']}"))
    timed("filtered: score 0.84-0.86, folder box-01", lambda: get(
        "/api/queue?min=0.84&max=0.86&folder=box-01"))
    timed("run=3 (the nightly report's link)", lambda: get("/api/queue?run=3"))
    timed("decision=different", lambda: get("/api/queue?decision=different"))
    # a page deep in the queue: the cursor of the 500,000th pair in the queue's order
    con = catalog.connect(settings)
    deep = con.execute("""
        SELECT coalesce(new_run, 0), abs(score - 0.85), least(image_a, image_b),
               greatest(image_a, image_b)
        FROM pair_report WHERE kind = 'near'
        ORDER BY 1 DESC, 2, 3, 4 LIMIT 1 OFFSET ?""", [args.pairs // 2]).fetchone()
    con.close()
    assert deep is not None
    cursor = f"{deep[0]}~{float(deep[1])!r}~{deep[2]}~{deep[3]}"
    timed("deep page (after the 500,000th pair)", lambda: get(f"/api/queue?after={cursor}"))
    timed("progress (reviewed / remaining)", lambda: get("/api/progress"))
    timed("cluster view (cluster 100)", lambda: get("/api/cluster/100"))
    row = first["rows"][0]

    def decide_and_undo() -> None:
        r = c.post("/api/decide", json={"image_a": row["image_a"], "image_b": row["image_b"],
                                         "decision": "different"})
        assert r.status_code == 200, r.text
        assert c.post("/api/undo", json=r.json()).status_code == 200

    timed("a decision and its undo (two requests)", decide_and_undo)


if __name__ == "__main__":
    main()
