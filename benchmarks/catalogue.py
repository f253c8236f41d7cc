"""The catalogue's queries at growing N, without the vectors: live joins against stored results.

Run by hand:

    nice -n 5 .venv/bin/python benchmarks/catalogue.py --out /tmp/cbir-catalogue --sizes 1e6,1e7

`benchmarks/scale.py` measures the README's catalogue queries in the state its pipeline leaves,
which at 10^7 takes hours of writing vectors, building the index and searching before the first
query. The queries read no vector: only the manifest, the pairs and the clusters. This script
writes those directly, in the shape scale.py's pipeline leaves them (its manifest rows, 10 % of
the items near-copies of another, a nightly run's 1,000 new items of which 200 are copies, in
the pairs' base and one nightly partition, and the clusters of all of them as
`clusters_from_pairs` makes them), then times each in a child process of its own (peak RSS its
own):

* `refresh`: computing the stored results of pair_report and cluster_report (what `cbir pairs`
  does after a change, or the first query after `cbir ingest`), before the night;
* the night lands (not timed): its items' manifest rows appended (ingest's epochs carried
  over), its pairs partition, the clusters of all pairs with pairs.json naming the changed ones;
* `grow`: the refresh after it, which grows the stored results (catalog._Growth);
* `whole`: the same computed whole, as before growing (and whether the rows are the same);
* each README query (scale.py's SQL) twice, side by side, each on the connection `cbir sql`
  opens (`cbir.store.catalog.connect`, timed with it): `live`, the two views replaced by their
  own SQL (what every query paid before their results were stored), and `stored`, as they are;
* the review queue's first page and the latest run's page (scale.py's child).

Run time (2 cores, load 2-3): --sizes 1e6,1e7 about 15 minutes, 11 of them writing the 10^7
workspace (Python lists of 10^7 paths).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUERIES = ("new", "largest", "accession")
NEW_ITEMS, NEW_COPIES = 1000, 200


@functools.cache
def _scale() -> Any:
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_workspace(ws: Path, n: int, seed: int) -> tuple[str, Callable[[], None]]:
    """The manifest, runs, base pairs and clusters of N items; and the night that follows (its
    items' manifest rows, its pairs partition, the clusters of all pairs, the changed clusters
    numbered as a night's update numbers them, as `cbir ingest` and `cbir pairs` leave them),
    written when called."""
    import pyarrow as pa

    from cbir.fsutil import write_parquet
    from cbir.steps.pairs import clusters_from_pairs
    from cbir.store.layout import layout
    from cbir.store.pairs import (
        CLUSTERS_SCHEMA,
        PAIRS_SCHEMA,
        TOKEN,
        ClusterIds,
        PairsState,
        new_token,
        write_state,
    )

    scale = _scale()
    scale._write_params(ws)
    s = scale._settings(ws)
    lay = layout(s)
    rng = np.random.default_rng(seed)
    ids = scale._ids(rng, n + NEW_ITEMS)
    first = scale._manifest(ids[:n], 0, 1)  # with ingest's epochs: the night carries them over
    files = pa.concat_tables([first, scale._manifest(ids[n:], n, 2)])
    write_parquet(first, lay.files)
    write_parquet(scale._runs(1), lay.runs)
    paths = files.column("path").to_pylist()

    def pairs(rows_a: np.ndarray, rows_b: np.ndarray, scores: np.ndarray) -> pa.Table:
        swap = [ids[i] > ids[j] for i, j in zip(rows_a.tolist(), rows_b.tolist(), strict=True)]
        a = np.where(swap, rows_b, rows_a).tolist()
        b = np.where(swap, rows_a, rows_b).tolist()
        m = len(a)
        cols: dict[str, Any] = {
            "image_a": [ids[i] for i in a], "image_b": [ids[i] for i in b],
            "path_a": [paths[i] for i in a], "path_b": [paths[i] for i in b],
            "score": scores.astype(np.float32), "rank": np.ones(m, np.int32), "kind": ["near"] * m}
        return pa.table({f.name: cols.get(f.name, pa.nulls(m, f.type)) for f in PAIRS_SCHEMA},
                        schema=PAIRS_SCHEMA)

    # 10 % of the items copy another (item 2k+1 copies item 2k); the night's copies copy old ones
    k = n // 10
    base = pairs(np.arange(0, 2 * k, 2), np.arange(1, 2 * k, 2), rng.uniform(0.9, 1.0, k))
    night = pairs(rng.choice(n, NEW_COPIES, replace=False), n + np.arange(NEW_COPIES),
                  rng.uniform(0.85, 1.0, NEW_COPIES))
    base_token, searched_token = new_token(), new_token()
    write_parquet(base.replace_schema_metadata({TOKEN: base_token}), lay.pairs)
    write_parquet(pa.table({"image_id": pa.array(ids[:n])})
                  .replace_schema_metadata({TOKEN: searched_token}), lay.searched)
    path_of = dict(zip(ids, paths, strict=True))

    lineage = new_token()

    def clusters_of(table: pa.Table, token: str,
                    was: dict[frozenset[str], int] | None = None) -> dict[frozenset[str], int]:
        """Clusters numbered by size from 1 (`was` None) or as an update numbers them: those
        of `was` under their ids, the others from its next id on."""
        found = dict(zip(zip(table["image_a"].to_pylist(), table["image_b"].to_pylist(),
                             strict=True), ((float(x), 1) for x in table["score"].to_pylist()),
                         strict=True))
        clusters = clusters_from_pairs(found, scale.PAIR_THRESHOLD)
        nxt = max(was.values(), default=0) + 1 if was else 1
        ids: dict[frozenset[str], int] = {}
        for members, _ in clusters:
            key = frozenset(members)
            if was and key in was:
                ids[key] = was[key]
            else:
                ids[key], nxt = nxt, nxt + 1
        sizes = [len(m) for m, _ in clusters]
        members = [m for ms, _ in clusters for m in ms]
        meta = {TOKEN: token, **ClusterIds(lineage, nxt).meta()}
        write_parquet(pa.table({
            "cluster_id": np.repeat(np.asarray([ids[frozenset(m)] for m, _ in clusters],
                                               np.int32), sizes),
            "image_id": members, "path": [path_of[m] for m in members],
            "size": np.repeat(np.asarray(sizes, np.int32), sizes),
            "weakest_link": np.repeat(np.asarray([w for _, w in clusters], np.float32), sizes),
        }, schema=CLUSTERS_SCHEMA).replace_schema_metadata(meta), lay.clusters)
        return ids

    before = clusters_of(base, "before")
    write_state(lay, PairsState(base=base_token, searched=searched_token, search={}, runs=[],
                                clusters="before:"))
    both = pa.concat_tables([base, night])

    def write_night() -> None:
        write_parquet(files.replace_schema_metadata(first.schema.metadata), lay.files)
        write_parquet(scale._runs(2), lay.runs)
        write_parquet(night, lay.run_pairs(1))
        write_parquet(pa.table({"image_id": pa.array(ids[n:])}), lay.run_searched(1))
        clusters_of(both, "after", before)
        write_state(lay, PairsState(base=base_token, searched=searched_token, search={},
                                    runs=[1], clusters="after:"))

    note = f"{n:,} + {NEW_ITEMS:,} items, {both.num_rows:,} pairs, {len(before):,} clusters"
    return note, write_night


def child(ws: Path, what: str) -> dict[str, Any]:
    """One measurement, in this process (run as a child of its own)."""
    import pyarrow.parquet as pq

    from cbir.store import catalog

    scale = _scale()
    s = scale._settings(ws)
    if what == "refresh":
        t0 = time.perf_counter()
        catalog.refresh_catalog(s)
        return {"seconds": time.perf_counter() - t0}
    if what == "grow":  # after the night: the stored results grow (catalog._Growth)
        grown, real = [], catalog._grow

        def spy(*a: Any) -> bool:
            grown.append(f"{a[1].name} {'grown' if (ok := real(*a)) else 'not grown'}")
            return ok

        catalog._grow = spy  # type: ignore[assignment]
        t0 = time.perf_counter()
        catalog.refresh_catalog(s)
        return {"seconds": time.perf_counter() - t0, "note": ", ".join(grown) or "not grown"}
    if what == "whole":  # the same computed whole, as before growing: the same rows?
        import duckdb

        def rows() -> dict[str, Any]:  # each stored view as queries see it (`alive` applied)
            con = catalog.connect(s, refresh=False)
            try:
                return {v: con.execute(f"SELECT * FROM {v}").to_arrow_table()
                        for v in ("pair_report", "cluster_report")}
            finally:
                con.close()

        stored = [v.stored for v in catalog.views(s) if v.stored is not None]
        grown_rows = rows()
        for f in (f for p in stored for f in catalog.stored_files(p) or []):
            f.unlink()
        t0 = time.perf_counter()
        catalog.refresh_catalog(s)
        seconds = time.perf_counter() - t0
        con = duckdb.connect()
        same = True
        for name, table in rows().items():
            con.register("w", table)
            con.register("g", grown_rows[name])
            same &= all(con.execute(f"SELECT count(*) FROM ({x} EXCEPT ALL {y})").fetchall()
                        == [(0,)] for x, y in (("FROM g", "FROM w"), ("FROM w", "FROM g")))
        return {"seconds": seconds, "note": f"same rows as grown {same}"}
    if what == "review":
        return dict(scale.child_review(ws, {"run": 2}))
    mode, query = what.split(":")
    sql = {"new": scale.NEW_PAIRS_SQL, "largest": scale.LARGEST_CLUSTERS_SQL,
           "accession": scale.ACCESSION_SQL}[query]
    params = []
    if query == "accession":  # an image with a copy
        params = [pq.read_table(ws / "data" / "pairs" / "pairs.parquet",
                                columns=["path_a"]).column(0)[0].as_py()]
    catalog.refresh_catalog(s)  # current already (the refresh step): not what is measured
    t0 = time.perf_counter()
    con = catalog.connect(s)  # what `cbir sql` opens, guards and all
    try:
        if mode == "live":  # the two views as their own SQL again, as before they were stored
            for view in catalog.views(s):
                if view.stored is not None:
                    con.execute(f'CREATE OR REPLACE TEMP VIEW "{view.name}" AS '
                                f"{view.live(None)}")
        rows = con.execute(sql, params).fetchall()
    finally:
        con.close()
    return {"seconds": time.perf_counter() - t0, "note": f"{len(rows)} rows"}


def measure(ws: Path, what: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--ws", str(ws)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-catalogue"))
    ap.add_argument("--sizes", default="1e6,1e7", help="item counts, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep each size's workspace")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ws", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        info = child(a.ws, a.child)
        # VmHWM, not ru_maxrss: that keeps the parent's high-water mark across fork and exec
        info["rss_mib"] = _scale()._vm_hwm_kib() / 1024
        print(json.dumps(info))
        return
    print("| N | step | seconds | peak RSS MiB | note |\n|---|---|---|---|---|", flush=True)
    for n in (int(float(x)) for x in a.sizes.split(",") if x):
        ws = a.out / f"catalogue-{n}"
        shutil.rmtree(ws, ignore_errors=True)
        t0 = time.perf_counter()
        note, night = write_workspace(ws, n, a.seed)
        print(f"| {n:.0e} | write (not timed) | {time.perf_counter() - t0:.0f} | | {note} |",
              flush=True)
        steps = ["refresh", "night", "grow", "whole"]
        steps += [f"{m}:{q}" for q in QUERIES for m in ("live", "stored")]
        times: dict[str, float] = {}
        for what in [*steps, "review"]:
            if what == "night":  # its arrivals and pairs land (not timed)
                night()
                continue
            r = measure(ws, what)
            times[what] = r["seconds"]
            print(f"| {n:.0e} | {what} | {r['seconds']:.2f} | {r['rss_mib']:.0f} | "
                  f"{r.get('note', '')} |", flush=True)
        ratios = ", ".join(f"{q} {times[f'live:{q}'] / times[f'stored:{q}']:.1f}x"
                           for q in QUERIES)
        print(f"| {n:.0e} | live / stored | | | {ratios} |", flush=True)
        if not a.keep:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
