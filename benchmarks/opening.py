"""What a nightly run opens of the whole collection, the kept way and the way before, side by
side in one run.

Run by hand on a workspace `benchmarks/scale.py --keep` left (its index built, a night of
arrivals appended):

    .venv/bin/python benchmarks/opening.py /tmp/scale/vectors-1000000 [--appended 1000]

1. The present images' rows in the vector file (`current_embeddings`), three ways, alternately
   `--rounds` times: through the kept vector order as a night finds it (made before the last
   `--appended` rows of the manifest and of the vector file, then grown from them), matched
   whole (no order kept), and as before the order (`canonical_ids` and `open_vectors`: every
   id of both read, converted and sorted). The three must give the same ids and rows.
2. The index's ids, sorted, for the update's comparison: read from the file beside the index
   (`store.index.sorted_ids`) against gathered from its lists and sorted.

Prints seconds for each (the median of the rounds) and their ratios. It leaves the workspace's
kept order current. Run time: about a minute at 10^6 and 10 at 10^7 (2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cbir.store.vectors as vectors  # noqa: E402
from cbir.config import load_settings  # noqa: E402
from cbir.faiss_index import index_ids  # noqa: E402
from cbir.store.fingerprint import current_fingerprint  # noqa: E402
from cbir.store.index import load_index, sorted_ids  # noqa: E402
from cbir.store.layout import VECTOR_ROWS, layout  # noqa: E402
from cbir.store.manifest import ROWS_EPOCH, canonical_ids, canonical_mask, hex_keys  # noqa: E402
from cbir.store.vector_order import VectorOrder  # noqa: E402


def order_before(settings: Any, fingerprint: str, appended: int) -> VectorOrder:
    """The vector order as a run made it before the last `appended` rows of the manifest and
    of the vector file's rows table were appended (scale.py's nights append as many to each)."""
    folder = layout(settings).embeddings(fingerprint)
    manifest = pq.ParquetFile(layout(settings).files)
    files = manifest.read(columns=["image_id", "status", "is_canonical"])
    ids = pq.read_table(folder / VECTOR_ROWS, columns=["image_id"]).column(0).combine_chunks()
    footer = vectors._footer(folder)
    epoch = (manifest.metadata.metadata or {}).get(ROWS_EPOCH.encode())
    if footer is None or not epoch:
        sys.exit("the workspace's vector file is out of step, or its manifest has no rows epoch")
    m0, v0 = files.num_rows - appended, len(ids) - appended
    if m0 < 1 or v0 < 1:
        sys.exit(f"--appended {appended} is more than the workspace holds")
    head = files.slice(0, m0)
    present = hex_keys(head.column("image_id").filter(canonical_mask(head)).combine_chunks())
    keys = hex_keys(ids.slice(0, v0))
    if present is None or keys is None:
        sys.exit("ids not of cbir's form: the vector order does not apply")
    where = {"manifest": [epoch.decode(), m0], "vectors": [footer[0].name, footer[1], v0]}
    stamp = vectors._stamp(where, head.column("image_id")[-1].as_py(), ids[v0 - 1].as_py())
    return VectorOrder.whole(stamp, keys, present)


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path, help="a size's folder that scale.py --keep left")
    ap.add_argument("--appended", type=int, default=1000, help="the night's rows of each file")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    settings = load_settings(args.workspace / "params.yaml")
    fp = current_fingerprint(settings)
    lay = layout(settings)
    folder, path = lay.embeddings(fp), lay.vector_order(fp)
    before = order_before(settings, fp, args.appended)

    def grown() -> Any:
        before.save(path)
        return _timed(lambda: vectors._open_ordered(settings, folder, fp))

    def whole() -> Any:
        path.unlink(missing_ok=True)
        return _timed(lambda: vectors._open_ordered(settings, folder, fp))

    def kept() -> Any:  # the order grown and saved, nothing appended since
        saving = vectors.ORDER_SAVE_ROWS
        vectors.ORDER_SAVE_ROWS = 0  # saved whatever was appended (a night saves past 65,536)
        try:
            vectors._open_ordered(settings, folder, fp)
        finally:
            vectors.ORDER_SAVE_ROWS = saving
        return _timed(lambda: vectors._open_ordered(settings, folder, fp))

    def old() -> Any:
        def opened() -> Any:
            present = canonical_ids(settings)
            ids, rows = vectors.open_vectors(folder, present)
            return ids, rows, len(present) - len(ids)

        return _timed(opened)

    ways = {"grown": grown, "as kept": kept, "matched whole": whole, "before the order": old}
    times: dict[str, list[float]] = {name: [] for name in ways}
    same = True
    for _ in range(args.rounds):
        got = {}
        for name, way in ways.items():
            seconds, out = way()
            times[name].append(seconds)
            ids, rows, missing = out
            got[name] = (ids.hex_keys(), rows._rows, missing)
        first = next(iter(got.values()))
        for keys, rows, missing in got.values():
            same &= bool(np.array_equal(keys, first[0]) and np.array_equal(rows, first[1]))
            same &= missing == first[2]
    vectors._open_ordered(settings, folder, fp)  # the workspace's order left current
    n = len(first[0])
    print(f"{n:,} present images with a vector, the night's {args.appended:,} rows appended "
          f"({args.rounds} rounds, medians)")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in med.items():
        print(f"  {name:<18} {seconds:7.3f} s")
    print(f"  before the order / grown: {med['before the order'] / med['grown']:.1f}x; "
          f"matched whole / grown: {med['matched whole'] / med['grown']:.1f}x; "
          f"same ids and rows {same}")

    index, _ = load_index(lay.index_dir, mmap=True)
    kept_ids, gathered = [], []
    for _ in range(args.rounds):
        seconds, a = _timed(lambda: sorted_ids(lay.index_dir, index))
        kept_ids.append(seconds)
        seconds, b = _timed(lambda: np.sort(index_ids(index)))
        gathered.append(seconds)
    k, g = statistics.median(kept_ids), statistics.median(gathered)
    print(f"index ids ({index.ntotal:,}): kept sorted {k:.3f} s, gathered and sorted {g:.3f} s "
          f"({g / k:.1f}x), same {bool(np.array_equal(a, b))}")


if __name__ == "__main__":
    main()
