"""Re-ranking from a large vector file: candidates fetched row by row against the file read in
order, side by side in one run.

Run by hand on a workspace `benchmarks/scale.py --keep` left (its index built):

    .venv/bin/python benchmarks/rerank.py /tmp/scale/vectors-1000000 [--queries 60000]

A vector file over `cbir.store.vectors.MAP_MAX_BYTES` (2 GiB, about 2 million images) is read
with pread, never mapped. Re-ranking an all-pairs batch then either fetches each distinct
candidate (a pread a row, 3-4 us) or, where the batch's candidates want at least one row in
STREAM_EVERY of a segment, reads the file in order a segment at a time and scores the
candidates each segment holds (`RowReader.inner_products`). This script opens the workspace's
searcher with the file read by pread whatever its size (so that 10^6 images, a 1 GB file,
stand in for 10^7), and times `knn_pairs` over the same random queries both ways, alternately,
`--rounds` times: queries a second each way, their ratio, and whether the pairs, scores and
ranks agree. Ranks can differ where two candidates score exactly the same.

Run time: about 2 minutes at 10^6 with 60,000 queries (2 cores).

`--cold` compares instead a search begun with the vector file out of the page cache (evicted
with posix_fadvise, as other work leaves it on a busy machine), with and without reading it
ahead (`RowReader.read_ahead`: the whole file read in order in a background thread while the
first batch runs its IVF search), alternately, each with a searcher opened afresh; the file is
read by pread in both. At 10^7 run it with the file's size in mind: 10 GB read per search.

`--fetch` times what a nightly run's re-ranking does instead: --queries x 100 scattered rows
(about a night's candidates) read one by one (RowReader.read), with the page cache asked first
(RWF_NOWAIT, where the system offers it) and without, alternately, each from a cold page cache
and then again from a warm one.

`--batches 78125,131072` times instead the all-pairs search (`knn_pairs`, the vector file as the
step opens it) in batches of each size, alternately: each size searches a whole number of its
batches of random queries (at least --queries; the first of one random order a round), as the
step's batches are whole but its last, so that no size is charged for a part batch; queries a
second, and whether sizes that searched the same queries found the same pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cbir.store.vectors as vectors  # noqa: E402
from cbir.config import load_settings  # noqa: E402
from cbir.steps.pairs import knn_pairs, search_batch  # noqa: E402
from cbir.store.index import Searcher, open_searcher  # noqa: E402
from scale import evict  # noqa: E402  (beside this script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path, help="a size's folder that scale.py --keep left")
    ap.add_argument("--queries", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--cold", action="store_true",
                    help="from a cold page cache, with and without reading the file ahead")
    ap.add_argument("--fetch", action="store_true",
                    help="scattered rows read with the page cache asked first and without")
    ap.add_argument("--batches", help="comma-separated batch sizes: all-pairs rate by batch size")
    args = ap.parse_args()
    if args.batches:
        batches(args, [int(float(b)) for b in args.batches.split(",")])
        return
    if args.cold:
        cold(args)
        return
    if args.fetch:
        fetch(args)
        return

    vectors.MAP_MAX_BYTES = 0  # read with pread, as a file over 2 GiB is
    settings = load_settings(args.workspace / "params.yaml")
    searcher = open_searcher(settings)
    n = len(searcher.image_ids)
    rows = np.sort(np.random.default_rng(args.seed).choice(n, min(n, args.queries), False))
    # the step's batch: its candidates want about a third of the file at 10^6 as at 10^7
    batch = search_batch(n)
    info = searcher.info
    how = (f"nprobe {info.nprobe}, {args.k + 1} x {info.k_factor} candidates a query"
           if info.params.refine else "an exact (flat) index: nothing is re-ranked")
    print(f"{n:,} images, {len(rows):,} queries in batches of {batch:,}, {how}")
    in_order = Searcher.inner_products
    rates: dict[str, list[float]] = {"fetched": [], "in order": []}
    found = {}
    for r in range(args.rounds):
        for way in rates:
            Searcher.inner_products = (  # type: ignore[method-assign]
                in_order if way == "in order" else (lambda self, q, f: None)
            )
            t0 = time.perf_counter()
            found[way] = knn_pairs(searcher, args.k, 0.5, batch=batch, rows=rows)
            seconds = time.perf_counter() - t0
            rates[way].append(len(rows) / seconds)
            print(f"  round {r + 1} {way:>8}: {len(rows) / seconds:7,.0f} queries/s "
                  f"({seconds:.1f} s)", flush=True)
    Searcher.inner_products = in_order  # type: ignore[method-assign]
    a, b = found["fetched"], found["in order"]
    ranks = sum(a[p][1] != b[p][1] for p in a if p in b)
    low = min(rates["in order"]) / max(rates["fetched"])
    high = max(rates["in order"]) / min(rates["fetched"])
    same = all(a[p][0] == b[p][0] for p in a if p in b)
    print(f"in order / fetched: {low:.2f}-{high:.2f}x; same pairs {a.keys() == b.keys()}, "
          f"same scores {same}, {ranks} of {len(a):,} ranks differ")


def batches(args: argparse.Namespace, sizes: list[int]) -> None:
    settings = load_settings(args.workspace / "params.yaml")
    searcher = open_searcher(settings)
    searcher.map_lists()  # once a search, as the step does before its first batch
    n = len(searcher.image_ids)
    rng = np.random.default_rng(args.seed)
    print(f"{n:,} images; the step's batch here {search_batch(n):,}")
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    same, diff, ranks = True, 0.0, 0
    for r in range(args.rounds):
        found, asked = {}, {}
        order = rng.permutation(n)  # each size searches the first of these: some the same
        for b in sizes:
            count = min(n, -(-args.queries // b) * b)
            rows = np.sort(order[:count])
            t0 = time.perf_counter()
            found[b] = knn_pairs(searcher, args.k, 0.5, batch=b, rows=rows)
            seconds = time.perf_counter() - t0
            rates[b].append(count / seconds)
            print(f"  round {r + 1} batch {b:>7,}: {count:,} queries, {count / seconds:7,.0f} "
                  f"queries/s ({seconds:.1f} s), {len(found[b]):,} pairs", flush=True)
            asked[b] = count
        # sizes that searched the same queries: the same pairs? (an exact (flat) index scores
        # a batch by one matrix product, whose last bits depend on its shape: scores can differ
        # by an ulp, and ranks where two are that close; re-ranked scores do not)
        for b, c in [(b, c) for b in sizes for c in sizes if b < c and asked[b] == asked[c]]:
            x, y = found[b], found[c]
            same = same and x.keys() == y.keys()
            diff = max([diff, *(abs(x[p][0] - y[p][0]) for p in x if p in y)])
            ranks += sum(x[p][1] != y[p][1] for p in x if p in y)
    for b in sizes:
        print(f"batch {b:>7,}: {min(rates[b]):,.0f}-{max(rates[b]):,.0f} queries/s")
    print(f"where the queries were the same: same pairs {same}, scores apart by at most "
          f"{diff:.2g}, {ranks} ranks differ")


def cold(args: argparse.Namespace) -> None:
    vectors.MAP_MAX_BYTES = 0  # read with pread, as a file over 2 GiB is
    settings = load_settings(args.workspace / "params.yaml")
    searcher = open_searcher(settings)
    n = len(searcher.image_ids)
    base = searcher.vectors._base  # the file behind the rows
    assert isinstance(base, vectors.RowReader)
    data, size = base.path, base.n * base.row_bytes
    del searcher, base
    rows = np.sort(np.random.default_rng(args.seed).choice(n, min(n, args.queries), False))
    print(f"{n:,} images, {len(rows):,} queries from a cold page cache; {data.name} "
          f"{size / 1e9:.1f} GB")
    ahead = vectors.Vectors.read_ahead
    rates: dict[str, list[float]] = {"read ahead": [], "not read ahead": []}
    found = {}
    for r in range(args.rounds):
        for way in rates:
            vectors.Vectors.read_ahead = (  # type: ignore[method-assign]
                ahead if way == "read ahead" else (lambda self: False)
            )
            searcher = open_searcher(settings)
            evict(data)
            t0 = time.perf_counter()
            found[way] = knn_pairs(searcher, args.k, 0.5, rows=rows)
            seconds = time.perf_counter() - t0
            rates[way].append(len(rows) / seconds)
            print(f"  round {r + 1} {way:>14}: {len(rows) / seconds:7,.0f} queries/s "
                  f"({seconds:.1f} s)", flush=True)
            del searcher
    vectors.Vectors.read_ahead = ahead  # type: ignore[method-assign]
    low = min(rates["read ahead"]) / max(rates["not read ahead"])
    high = max(rates["read ahead"]) / min(rates["not read ahead"])
    a, b = found["read ahead"], found["not read ahead"]
    print(f"read ahead / not: {low:.2f}-{high:.2f}x; same pairs and scores {a == b}")


def fetch(args: argparse.Namespace) -> None:
    vectors.MAP_MAX_BYTES = 0  # read with pread, as a file over 2 GiB is
    _, vec = vectors.open_vectors(_folder(args.workspace))
    reader = vec._base  # the file behind the rows
    assert isinstance(reader, vectors.RowReader)
    rng = np.random.default_rng(args.seed)
    nowait = vectors.NOWAIT
    ways = {"cache first": nowait, "in turn": 0}
    print(f"{reader.n:,} rows, {args.queries * 100:,} scattered rows a read; {reader.path.name}"
          f"{'' if nowait else ' (no RWF_NOWAIT here: both ways the same)'}")
    us: dict[tuple[str, str], list[float]] = {}
    same = True
    for r in range(args.rounds):
        rows = rng.integers(0, reader.n, size=args.queries * 100)
        got = []
        for way, flag in ways.items():
            vectors.NOWAIT = flag
            evict(reader.path)
            for cache in ("cold", "warm"):
                t0 = time.perf_counter()
                got.append(reader.read(rows))
                seconds = time.perf_counter() - t0
                us.setdefault((cache, way), []).append(seconds / len(rows) * 1e6)
                print(f"  round {r + 1} {way:>11}, {cache}: "
                      f"{seconds / len(rows) * 1e6:5.1f} us a row ({seconds:.2f} s)", flush=True)
        same = same and all(np.array_equal(got[0], g) for g in got[1:])
    vectors.NOWAIT = nowait
    for cache in ("cold", "warm"):
        first, turn = us[(cache, "cache first")], us[(cache, "in turn")]
        print(f"{cache}: cache first / in turn: {min(turn) / max(first):.1f}-"
              f"{max(turn) / min(first):.1f}x faster")
    print(f"same rows {same}")


def _folder(workspace: Path) -> Path:
    """The fingerprint folder of a workspace's embeddings (scale.py writes one)."""
    return next(workspace.glob("data/embeddings/*/vectors.parquet")).parent


if __name__ == "__main__":
    main()
