"""Cost of every step at growing collection size N: seconds, peak RSS, and how they grow.

Run by hand, on a quiet machine or under `nice` (each N is removed from --out once measured;
the results accumulate in --out/results.json, so sizes can be run one invocation at a time and
the table covers them all):

    nice -n 10 .venv/bin/python benchmarks/scale.py --out /tmp/cbir-scale \\
        --ingest-sizes 1e4,1e5,1e6 --sizes 1e5,1e6,1e7 [--skip-largest] [--max-rss-gib 12]

Run time after the memory-mapped vectors (load 3-6, nice -n 5): `--ingest-sizes "" --sizes
1e5,1e6 --kill-sizes 1e6`: 34 minutes - 10^5 vectors 3.5 min, 10^6 21 min (writing 2.5, index 6.5,
pairs 11.5, nightly 0.5), five kills of the 10^6 nightly run and their reruns 8 min.
Before it, `--ingest-sizes 1e4,1e5 --sizes 1e5,1e6`: 43 minutes - ingest 10^4 and 10^5 files 8
min (writing the files 2 of them), 10^5 vectors 5 min, 10^6 vectors 30 min (index 9.5, pairs
10, nightly 3). `--sizes 1e7` (20 GB of shards on disk): 28 min - writing the vectors 23,
then the index step holds about 3 bytes of RAM per byte of float32 vectors (7.2 GB at 10^6)
and the watchdog stopped it at 12.9 GB after 4.4 min; the steps after it do not run.

`--sizes 1e7 --keep` with the vector file read by pread (load 1-2): writing the vectors 27
min (20 GB of shards, a 10 GB vector file), index 36 min (5.7 GB); then `--resume-from pairs
--pairs-sample 100000`: 13 min (pairs 3 min, arrivals 1, nightly 1.5, the queries 1 min).
At 10^7 the all-pairs search alone takes hours at the measured rates. `--pairs-sample Q`
measures its rate on Q random queries (rounded down to whole batches of the step's) and
projects the step's time from it (the state after it is then the planted pairs, run through
`run_pairs`: `_sampled_pairs`); `--keep` then `--resume-from STEP` continues a kept size from
a step (the rows before it stay), e.g. `--sizes 1e7 --keep` killed in its pairs step, then
`--sizes 1e7 --keep --resume-from pairs --pairs-sample 100000`. `--night-rounds R` then runs
R more nights at the smallest and the largest size kept, alternately (about 40 s a round at
10^5 and 10^7, quiet), and the nightly target takes the median of the rounds' ratios (each
round's two nights minutes apart): each size's one night is measured an hour apart, under
whatever else the shared machine did meanwhile (a 10^5 night of 2.28 s beside the test suite
once made 3.91 s at 10^7 a PASS; 0.80 s quiet). The load before each night is in its note;
beside heavy work no statistic saves the ratio (the 10^7 file leaves the page cache).

Every step runs in a child process of its own (this script again, with --child), so its peak
RSS is its own: the larger of the child's VmHWM (/proc/self/status, read by the child at its
end) and the largest sum of RSS over the child and its descendants (ingest's decode workers:
their PSS, so that a page shared by forked processes counts once)
sampled every 0.1 s by the parent. The sampling is also a watchdog: a step whose tree exceeds
--max-rss-gib is killed, and the table says so - the measured reason a size cannot run here
(the machine has 24 GB and is shared). Seconds are measured in the child around the library
call (interpreter start and imports excluded).

Parts:

* ingest, on real files: --ingest-sizes small JPEGs (about 1.5 KB, 64x48 px, every one
  different) are written under --out, then timed: the I/O floor (os.scandir + stat + SHA-256
  of every file's bytes, one process), the decode floor (the same, and the decode and perceptual
  hash ingest owes every new file, made as its workers make them, one process: with W cores
  ingest cannot reach more than W times its throughput), `run_ingest` first run, an unchanged
  rerun, and a rerun after 1,000 new files arrive (the ingest of a nightly run). The files
  were just written, so all read from the page cache.
* the steps after embedding, on synthetic clustered descriptors (benchmarks/index.py's
  `Synth`: topics, clusters, anisotropic noise) with planted near-duplicate groups (10 % of
  the items are near-copies of other items of their 100,000-row chunk; a source may have
  several), written as the pipeline's own embedding shards (shard-*.parquet of
  `embed.shard_size` rows, the current model's fingerprint folder and model.json) beside a
  manifest with the data layer's schema, so the real steps read them: `run_index`, `run_pairs`
  (full; it also computes clusters and refreshes the catalogue), clusters (`clusters_from_pairs`
  over the recorded pairs: run_pairs computes them inside, there is no step to call on its own),
  then a nightly run adding --new items (1,000): its start is recorded (`begin_nightly`, before
  ingest as the flow does), then the items' manifest rows (a new ingest run; a fifth are
  near-copies of items already there, of another shard of the build each night, so that nights
  run in place with --resume-from stay alike) and embedding shard are written by this script - not
  timed: embedding them is the same work at every N, and ingest's cost at N is measured in the
  ingest part - and timed, in one child: `run_index` (update), `run_pairs(...,
  incremental=True)`, `nightly_report`. Then the README's catalogue queries through
  `cbir.store.catalog.query` (what `cbir sql` runs), each in its own child: last night's pairs
  above 0.9, the largest clusters, one accession's duplicates; and the review queue
  (`cbir.review.queue.Queue`, what `cbir review` serves): preparing it with its first page,
  then the page of the latest run.
  search.verify is off (no pictures) and search.pair_threshold is fixed at 0.9 (planted copies
  score about 0.99, cluster mates about 0.6), so no calibration runs.

Printed: a markdown table (N, step, seconds, peak RSS MiB, note), the growth exponent of each
step (least-squares slope of log seconds and of log RSS against log N over the sizes run; RSS
includes the interpreter, torch and FAISS, about 0.5 GB, so its exponent is low at small N),
and pass/fail against each target of issue 16 that the sizes run can measure ('not run' for
the others, with the measured value at the largest size run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
MIB = 2**20
TARGET_RSS = 8 * GB  # issue 16: every step at 10^7 images within 8 GB
#: The last night's run numbers in a kept workspace (its arrivals step writes them).
NIGHT_FILE = "night.json"
#: the embedding shards the build wrote, sorted: each night copies items of the next one
SOURCES_FILE = "source-shards.json"
INGEST_STEPS = ["write files", "I/O floor", "decode floor", "ingest first", "ingest rerun",
                "ingest +new"]
VECTOR_STEPS = ["write vectors", "index", "pairs", "clusters", "nightly arrivals", "nightly",
                "query: new > 0.9", "query: largest clusters", "query: one accession",
                "review queue"]
NOT_STEPS = {"write files", "write vectors", "nightly arrivals"}  # set-up, not pipeline steps
#: --night-rounds: nights at the smallest and the largest kept size, alternately; their medians
SIDE_BY_SIDE = "nightly, side by side"
# where --kill-sizes kills the nightly run: the index update's save and commit, the pairs
# search, between the night's partition of pairs and its commit (pairs.json), after the report
KILL_POINTS = ["index.save:1", "index.commit:1", "pairs.batch:1", "pairs.searched:1",
               "write.pair_report.parquet:1", "write.cluster_report.parquet:1",
               "nightly.reported:1"]
PAIR_THRESHOLD = 0.9
NEW_PAIRS_SQL = """
SELECT new_path, match_path, round(score, 3) AS score, master_path
FROM new_pairs
WHERE new_run = (SELECT max(run_id) FROM ingest_runs) AND score > 0.9
ORDER BY score DESC"""
LARGEST_CLUSTERS_SQL = """
SELECT cluster_id, size, round(weakest_link, 3) AS weakest_link, master_path, members
FROM cluster_report ORDER BY size DESC LIMIT 10"""
ACCESSION_SQL = """
SELECT CASE WHEN path_a = q.path THEN path_b ELSE path_a END AS duplicate,
       round(score, 3) AS score, kind, master_path, master_reason
FROM pair_report, (SELECT ? AS path) AS q
WHERE q.path IN (path_a, path_b)
ORDER BY score DESC"""


# --------------------------------------------------------------------------- growth exponents


def exponent(ns: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(N): the growth exponent (None below two
    sizes or for a value that is not positive)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def project(ns: Sequence[float], values: Sequence[float], n: float) -> float | None:
    """The value at `n` on the fitted power law (None where no exponent can be fitted)."""
    k = exponent(ns, values)
    if k is None:
        return None
    i = int(np.argmax(ns))
    return values[i] * (n / ns[i]) ** k


# --------------------------------------------------------------------------- the children

def _settings(ws: Path) -> Any:
    from cbir.config import load_settings

    return load_settings(ws / "params.yaml")


def _write_params(ws: Path, extra: dict[str, Any] | None = None) -> None:
    import yaml

    (ws / "scans").mkdir(parents=True, exist_ok=True)
    params = {"data": {"scans_dir": "scans", "ground_truth": None},
              "search": {"pair_threshold": PAIR_THRESHOLD, "verify": False},
              "orchestration": {"lock_timeout": 0, "dvc_commit": False}, **(extra or {})}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def _synth_module() -> Any:
    spec = importlib.util.spec_from_file_location("index_benchmark",
                                                  REPO / "benchmarks" / "index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synth(n: int, dim: int, seed: int) -> Any:
    """The generator of the collection's descriptors: the same clusters whenever it is made
    again with the same arguments (the nightly arrivals come from the same collection)."""
    return _synth_module().Synth(dim, max(10, n // 50), seed)


# ingest part ---------------------------------------------------------------


def child_write_files(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """N small JPEGs, every one different, 1,000 to a folder; and the arrivals beside scans/."""
    from PIL import Image

    _write_params(ws)
    rng = np.random.default_rng(a["seed"])
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float32)
    total = 0

    def write(folder: Path, count: int, tag: str) -> None:
        nonlocal total
        for i in range(count):
            if i % 1000 == 0:
                box = folder / f"{tag}-{i // 1000:05d}"
                box.mkdir(parents=True, exist_ok=True)
            c = rng.uniform(0, 255, 6).astype(np.float32)
            pic = np.stack([c[0] + xx * c[3] / 64, c[1] + yy * c[4] / 48,
                            c[2] + (xx + yy) * c[5] / 112], axis=-1)
            pic[4:12, 4:12] = rng.integers(0, 256, 3)  # a block of its own colour
            path = box / f"img-{i:07d}.jpg"
            Image.fromarray(np.clip(pic, 0, 255).astype(np.uint8)).save(path, quality=85)
            total += path.stat().st_size

    write(ws / "scans", a["n"], "box")
    write(ws / "arrivals", a["new"], "new")
    return {"note": f"{total / (a['n'] + a['new']) / 1e3:.1f} KB a file"}


def _walk_floor(folder: Path, then: Callable[[bytes], object] | None = None) -> tuple[int, int]:
    """Walk `folder` with os.scandir, stat every file and SHA-256 its bytes, then hand them to
    `then`; (files, bytes)."""
    n, size = 0, 0

    def walk(at: str) -> None:
        nonlocal n, size
        with os.scandir(at) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    walk(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat()
                    with open(e.path, "rb") as fh:
                        data = fh.read()
                    hashlib.sha256(data).hexdigest()
                    if then is not None:
                        then(data)
                    n, size = n + 1, size + st.st_size

    walk(str(folder))
    return n, size


def child_floor(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The I/O floor: walk the scans folder, stat and SHA-256 every file (one process)."""
    n, size = _walk_floor(ws / "scans")
    return {"note": f"{n} files, {size / 1e6:.0f} MB", "files": n}


def child_decode_floor(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The I/O floor plus the decode ingest owes every new file (one process, no cbir run): the
    bytes read once, hashed, opened as ingest's workers open them (JPEG at reduced DCT scale,
    greyscale: `cbir.probe`'s call) and their perceptual hash. What ingest cannot go below but
    by spreading it over its workers (ingest.workers)."""
    from cbir.probe import decoded, properties

    def decode(data: bytes) -> None:
        properties(*decoded(data))

    t0 = time.perf_counter()
    n, _ = _walk_floor(ws / "scans", decode)
    return {"seconds": time.perf_counter() - t0, "note": f"{n} files decoded", "files": n}


def child_ingest(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    from cbir.steps.ingest import run_ingest

    if a.get("arrive"):  # the night's files land (not timed: moved before the clock starts)
        os.replace(ws / "arrivals", ws / "scans" / "arrivals")
    s = _settings(ws)
    t0 = time.perf_counter()
    out = run_ingest(s)
    seconds = time.perf_counter() - t0
    new = out.counts.get("new", 0)
    return {"seconds": seconds, "note": f"{new} new, {out.decoded} decoded",
            "new": new, "decoded": out.decoded}


# vector part ---------------------------------------------------------------


def _ids(rng: np.random.Generator, n: int, taken: set[str] | None = None) -> list[str]:
    """n distinct random image ids (16 hex digits, 63 bits: what ingest makes of a SHA-256)."""
    out: list[str] = []
    seen = set(taken or ())
    while len(out) < n:
        for v in rng.integers(0, 2**63 - 1, n - len(out), dtype=np.int64):
            h = f"{int(v):016x}"
            if h not in seen:
                seen.add(h)
                out.append(h)
    return out


def _manifest(ids: list[str], first: int, run: int) -> Any:
    import pyarrow as pa

    from cbir.store.manifest import CANONICAL_EPOCH, FILES_SCHEMA, ROWS_EPOCH

    n = len(ids)
    paths = [f"box-{(first + i) // 1000:05d}/scan-{first + i:08d}.jpg" for i in range(n)]
    now = datetime.now(UTC)
    return pa.table({
        "image_id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
        "path_raw": pa.array([p.encode() for p in paths], pa.binary()),
        "version": np.ones(n, np.int32), "status": pa.array(["ok"] * n, pa.string()),
        "is_canonical": np.ones(n, bool), "duplicate_of": pa.nulls(n, pa.string()),
        "sha256": pa.array([i * 4 for i in ids], pa.string()),
        "bytes": np.full(n, 2_000_000, np.int64),
        "mtime": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "mtime_ns": np.full(n, int(now.timestamp() * 1e9), np.int64),
        "width": np.full(n, 3000, np.int32), "height": np.full(n, 2000, np.int32),
        "mode": pa.array(["RGB"] * n, pa.string()), "format": pa.array(["JPEG"] * n, pa.string()),
        "pages": np.ones(n, np.int32), "phash": pa.array(np.zeros(n, np.uint64)),
        "first_run": np.full(n, run, np.int32), "last_run": np.full(n, run, np.int32),
    }, schema=FILES_SCHEMA.with_metadata({CANONICAL_EPOCH: f"scale-{first}",
                                           ROWS_EPOCH: f"scale-rows-{first}"}))


def _runs(n_runs: int) -> Any:
    import pyarrow as pa

    from cbir.store.manifest import RUNS_SCHEMA

    now = datetime.now(UTC)
    counts = ("files_seen", "new", "changed", "unchanged", "new_duplicates", "newly_missing",
              "quarantined", "decoded")
    return pa.table({
        "run_id": np.arange(1, n_runs + 1, dtype=np.int32),
        "started_at": pa.array([now] * n_runs, pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array([now] * n_runs, pa.timestamp("us", tz="UTC")),
        "scans_dir": ["scans"] * n_runs, **{k: np.zeros(n_runs, np.int64) for k in counts},
        "seconds": np.zeros(n_runs),
    }, schema=RUNS_SCHEMA)


def _write_shards(folder: Path, ids: list[str], x: np.ndarray, shard: int) -> None:
    """Embedding shards as `cbir embed` writes them (its table, its names, atomically)."""
    from cbir.fsutil import write_parquet
    from cbir.steps.embed import _subset_name, _vector_table

    for s in range(0, len(ids), shard):
        part = ids[s : s + shard]
        write_parquet(_vector_table(part, x[s : s + shard], None),
                      folder / _subset_name("shard-", part))


def child_write_vectors(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The collection after `cbir ingest` and `cbir embed`: manifest (one ingest run) and the
    current model's embedding shards of N synthetic descriptors with planted near-copies."""
    import pyarrow as pa

    from cbir.fsutil import APPENDED_ROW_GROUP, write_parquet
    from cbir.model import retrieval_model
    from cbir.steps.embed import EmbedPlan, write_model_card
    from cbir.store.fingerprint import ModelKey, remember_fingerprint
    from cbir.store.layout import SHARD_GLOB, layout
    from cbir.store.manifest import QUARANTINE_SCHEMA

    n, shard = a["n"], a["shard_size"]
    _write_params(ws, {"embed": {"shard_size": shard}})
    s = _settings(ws)
    lay = layout(s)
    key = ModelKey(s)
    model, _, fp, source = retrieval_model(s)  # the fingerprint the steps will look for
    remember_fingerprint(key, fp)  # as `cbir embed` does: the steps after it need no torch
    folder = lay.embeddings(fp)
    folder.mkdir(parents=True)
    write_model_card(s, EmbedPlan(fp, source, folder, [], 0), model)
    synth = _synth(n, model.dim, a["seed"])
    ids = _ids(np.random.default_rng(a["seed"] + 1), n)
    chunk = max(shard, 100_000 // shard * shard)
    src_rows, dup_rows = [], []
    for s0 in range(0, n, chunk):
        c = min(chunk, n - s0)
        x = synth.items(c)
        nd = int(a["dup_frac"] * c)
        if nd and c - nd > 0:  # the last nd rows are near-copies of the others (groups of 2+)
            src = synth.rng.integers(0, c - nd, nd)
            x[c - nd:] = synth.near_dups(x[src])
            src_rows.append(s0 + src)
            dup_rows.append(s0 + np.arange(c - nd, c))
        _write_shards(folder, ids[s0 : s0 + c], x, shard)
    (ws / SOURCES_FILE).write_text(json.dumps(sorted(p.name for p in folder.glob(SHARD_GLOB))))
    from cbir.store.vectors import sync_vectors

    t0 = time.perf_counter()
    sync_vectors(folder)  # the end of `cbir embed`: the memory-mapped vector file
    vector_file = time.perf_counter() - t0
    lay.manifest_dir.mkdir(parents=True)
    write_parquet(_manifest(ids, 0, 1), lay.files, APPENDED_ROW_GROUP)
    write_parquet(_runs(1), lay.runs)
    write_parquet(QUARANTINE_SCHEMA.empty_table(), lay.quarantine)  # as ingest leaves it
    sr = np.concatenate(src_rows) if src_rows else np.zeros(0, np.int64)
    dr = np.concatenate(dup_rows) if dup_rows else np.zeros(0, np.int64)
    arr = np.array(ids)
    pq_planted = pa.table({"a": arr[sr], "b": arr[dr]})
    write_parquet(pq_planted, ws / "planted.parquet")
    return {"note": f"{n} x {model.dim}, {len(sr)} planted copies; vector file written in "
                    f"{vector_file:.1f} s", "dim": model.dim}


def child_index(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    from cbir.steps.index import run_index

    s = _settings(ws)
    t0 = time.perf_counter()
    out = run_index(s)
    seconds = time.perf_counter() - t0
    p = out.info.params
    kind = f"IVF-PQ nlist {p.nlist} m {p.m}, nprobe {out.info.nprobe}" if p.kind == "ivfpq" \
        else "flat"
    how = f"rebuilt, recall@10 {out.info.recall_at_k:.3f}" if out.rebuilt \
        else f"updated +{out.added}"
    return {"seconds": seconds, "note": f"{kind}; {how}"}


def _planted_found(ws: Path, pairs: set[tuple[str, str]], which: str) -> tuple[int, int]:
    import pyarrow.parquet as pq

    t = pq.read_table(ws / which)
    planted = {(min(x, y), max(x, y)) for x, y in zip(t.column("a").to_pylist(),
                                                      t.column("b").to_pylist(), strict=True)}
    return len(planted & pairs), len(planted)


def _near_pairs(ws: Path) -> dict[tuple[str, str], tuple[float, int]]:
    """The recorded near pairs as run_pairs keeps them in memory."""
    from cbir.store.pairs import read_pairs

    t = read_pairs(_settings(ws), columns=["image_a", "image_b", "score", "rank", "kind"])
    return {(r["image_a"], r["image_b"]): (float(r["score"]), int(r["rank"]))
            for r in t.to_pylist() if r["kind"] == "near"}


def _sampled_pairs(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The all-pairs search of a collection too large to search whole in a sitting: its rate
    measured on a random sample of --pairs-sample queries, rounded down to whole batches of the
    step's where it holds one (search_batch; the same `knn_pairs` over the same searcher,
    against the whole index), then `run_pairs` run as usual with the search's answer taken to
    be the planted pairs (exact scores from the vector file), so that the steps after it
    (clusters, the nightly run, the catalogue, the review queue) find the state a full search
    would leave - less its few unplanted pairs (about 5 % at 10^5 and 10^6).

    The sample is searched twice over (other random queries the second time): first with the
    vector file dropped from the page cache, as a search may begin after other work (it then
    reads the file once, ahead or as the first batches want it), then with the file as that left
    it. Seconds: opening the searcher + mapping its lists (Searcher.map_lists, once a search) +
    the first sample's time + the other N - sample queries at the second's rate + run_pairs
    without the search, a projection."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cbir.steps.pairs as steps_pairs
    from cbir.store.index import open_searcher
    from cbir.store.manifest import sorted_keys

    s = _settings(ws)
    t0 = time.perf_counter()
    searcher = open_searcher(s)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    searcher.map_lists()  # set up once by a search of every image (cbir.probes), not a sample's
    mapped = time.perf_counter() - t0
    n = len(searcher.image_ids)
    rng = np.random.default_rng(a["seed"] + 2)
    # whole batches (the step's are whole but its last): a part batch pays a batch's re-ranking
    # read of the file for fewer queries. A sample under one batch is searched as one.
    batch = steps_pairs.search_batch(n)
    size = min(n, a["pairs_sample"] // batch * batch or a["pairs_sample"])
    rows = np.sort(rng.choice(n, size=size, replace=False))
    for data in ws.glob("data/embeddings/*/vectors-*.f16"):
        evict(data)
    t0 = time.perf_counter()
    found = steps_pairs.knn_pairs(searcher, s.search.k, PAIR_THRESHOLD, rows=rows)
    cold = time.perf_counter() - t0
    again = np.sort(rng.choice(n, size=len(rows), replace=False))
    t0 = time.perf_counter()
    steps_pairs.knn_pairs(searcher, s.search.k, PAIR_THRESHOLD, rows=again)
    rate = len(again) / (time.perf_counter() - t0)
    searching = cold + (n - len(rows)) / rate
    planted = pq.read_table(ws / "planted.parquet")
    ids = searcher.image_ids
    keys = sorted_keys(pa.array(ids, pa.string()))
    ia = np.searchsorted(keys, sorted_keys(planted.column("a").combine_chunks()))
    ib = np.searchsorted(keys, sorted_keys(planted.column("b").combine_chunks()))
    scores = np.concatenate([  # a chunk at a time: 10^6 pairs of rows are 4 GB of float32
        np.einsum("ij,ij->i", searcher.vectors[ia[c : c + 65536]],
                  searcher.vectors[ib[c : c + 65536]]) for c in range(0, len(ia), 65536)
    ]) if len(ia) else np.zeros(0, np.float32)
    answer = {(ids[min(x, y)], ids[max(x, y)]): (float(sc), 1)
              for x, y, sc in zip(ia.tolist(), ib.tolist(), scores.tolist(), strict=True)
              if sc >= PAIR_THRESHOLD and x != y}
    sampled = {ids[r] for r in rows.tolist()}
    in_sample = {k for k in answer if k[0] in sampled or k[1] in sampled}
    del searcher
    steps_pairs.knn_pairs = lambda *args, **kw: answer  # the search's answer, as above
    t0 = time.perf_counter()
    out = steps_pairs.run_pairs(s)
    rest = time.perf_counter() - t0
    return {"seconds": opened + mapped + searching + rest, "searched": n, "projected": True,
            "cold": len(rows) / cold, "warm": rate,
            "note": f"PROJECTED: {len(rows):,} of {n:,} searched at {len(rows) / cold:,.0f}/s "
                    f"from a cold page cache, then {len(again):,} more at {rate:,.0f}/s (planted "
                    f"pairs of the first sample's images found {len(in_sample & set(found))}/"
                    f"{len(in_sample)}); opening {opened:.1f} s + lists {mapped:.1f} s + "
                    f"{cold:.1f} s + {n - len(rows):,} / {rate:,.0f}/s + "
                    f"run_pairs on the planted pairs {rest:.1f} s; {out.n_near_pairs} pairs, "
                    f"{out.n_clusters} clusters"}


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (those no process maps), as other work would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child_pairs(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    from cbir.steps.pairs import run_pairs

    if a.get("pairs_sample") and a["n"] > a["pairs_sample"] and not a.get("incremental"):
        return _sampled_pairs(ws, a)
    s = _settings(ws)
    t0 = time.perf_counter()
    out = run_pairs(s, incremental=bool(a.get("incremental")))
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {"seconds": seconds, "searched": out.searched,
            "note": f"{out.searched} searched ({out.searched / seconds:.0f}/s), "
                    f"{out.n_near_pairs} pairs, {out.n_clusters} clusters"}
    if not a.get("incremental"):
        found, planted = _planted_found(ws, set(_near_pairs(ws)), "planted.parquet")
        info["note"] += f"; planted pairs found {found}/{planted}"
    return info


def child_clusters(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    from cbir.steps.pairs import clusters_from_pairs

    pairs = _near_pairs(ws)  # read before the clock starts: run_pairs has them in memory
    t0 = time.perf_counter()
    clusters = clusters_from_pairs(pairs, PAIR_THRESHOLD)
    seconds = time.perf_counter() - t0
    largest = max((len(m) for m, _ in clusters), default=0)
    return {"seconds": seconds,
            "note": f"{len(clusters)} clusters of {len(pairs)} pairs, largest {largest}"}


def child_arrivals(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """A night's new items land, as ingest and embed would leave them: the nightly start is
    recorded first (begin_nightly, as the flow does before its ingest), then a new ingest run's
    manifest rows and the items' embedding shard are written. Not a timed pipeline step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbir.fsutil import APPENDED_ROW_GROUP, write_parquet
    from cbir.model import retrieval_model
    from cbir.steps.nightly import begin_nightly
    from cbir.store.embeddings import read_shard
    from cbir.store.layout import SHARD_GLOB, layout

    s = _settings(ws)
    lay = layout(s)
    since = begin_nightly(s)
    model, _, fp, _ = retrieval_model(s)
    files = pq.read_table(lay.files)
    synth = _synth(files.num_rows, model.dim, a["seed"])
    new = a["new"]
    ids = _ids(np.random.default_rng(a["seed"] + 2), new,
               taken=set(files.column("image_id").to_pylist()))
    run = max(pq.read_table(lay.runs).column("run_id").to_pylist()) + 1
    # a fifth are near-copies of items already in the collection: of the first shard's on the
    # first night, of the next shard the build wrote on the next (SOURCES_FILE), so that nights
    # in place stay alike: copies of the same items every night pair with every earlier night's
    # copies (a workspace written before the file: the first shard every night, as then)
    folder = lay.embeddings(fp)
    names = json.loads((ws / SOURCES_FILE).read_text()) if (ws / SOURCES_FILE).is_file() else []
    source = read_shard(folder / names[(run - 2) % len(names)] if names
                        else sorted(folder.glob(SHARD_GLOB))[0])
    old_ids = source.column("image_id").to_pylist()
    col = source.column("vector").combine_chunks()
    old = col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    k = min(new // 5, len(old_ids))
    x = synth.items(new)
    x[:k] = synth.near_dups(old[:k])
    _write_shards(lay.embeddings(fp), ids, x, s.embed.shard_size)
    from cbir.store.vectors import sync_vectors

    t0 = time.perf_counter()
    sync_vectors(lay.embeddings(fp))  # the end of the night's `cbir embed`
    appended = time.perf_counter() - t0
    # new files move no canonical path and change no row: ingest would carry both epochs over
    added = pa.concat_tables(
        [files.replace_schema_metadata(None), _manifest(ids, files.num_rows, run)])
    write_parquet(added.replace_schema_metadata(files.schema.metadata), lay.files,
                  APPENDED_ROW_GROUP)
    write_parquet(_runs(run), lay.runs)
    write_parquet(pa.table({"a": old_ids[:k], "b": ids[:k]}), ws / "planted-new.parquet")
    (ws / NIGHT_FILE).write_text(json.dumps({"since": since, "run": run}))  # for --resume-from
    return {"since": since, "run": run, "note": f"{new} items in ingest run {run}, {k} copies; "
            f"appended to the vector file in {appended:.2f} s"}


def child_intact(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """After a kill: what readers open (the index with the vectors, pairs, clusters, the
    catalogue) opens, and says how much it holds."""
    from cbir.store.catalog import query
    from cbir.store.index import open_searcher
    from cbir.store.pairs import read_pairs

    s = _settings(ws)
    searcher = open_searcher(s)
    pairs = read_pairs(s)
    n = query(s, "SELECT count(*) FROM clusters")[1][0][0]
    reported = query(s, "SELECT count(*) FROM pair_report")[1][0][0]
    return {"note": f"index {searcher.index.ntotal} vectors, {pairs.num_rows} pairs, "
                    f"{n} cluster rows, {reported} pair_report rows"}


def child_nightly(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    """The nightly flow's steps after embedding: index update, incremental pairs, report."""
    from cbir.steps.index import run_index
    from cbir.steps.nightly import nightly_report
    from cbir.steps.pairs import run_pairs
    from cbir.store.reuse import sharing

    s = _settings(ws)
    times = {}
    t0 = time.perf_counter()
    with sharing():  # as in the flow, under its writer lock: pairs searches what index opened
        idx = run_index(s)
        times["index"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pairs = run_pairs(s, incremental=True)
        times["pairs"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        report = nightly_report(s, a["run"], a["since"])
        times["report"] = time.perf_counter() - t2
    seconds = time.perf_counter() - t0
    found, planted = _planted_found(ws, set(_near_pairs(ws)), "planted-new.parquet")
    split = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    return {"seconds": seconds, "parts": times,
            "note": f"{split}; index {'rebuilt' if idx.rebuilt else 'updated'}, "
                    f"{pairs.searched} searched, {len(report.pairs)} new pairs reported, "
                    f"planted found {found}/{planted}"}


def child_query(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cbir.store.catalog import query
    from cbir.store.layout import layout

    s = _settings(ws)
    sql = {"new": NEW_PAIRS_SQL, "largest": LARGEST_CLUSTERS_SQL, "accession": ACCESSION_SQL}
    params: list[Any] = []
    if a["query"] == "accession":  # the path of an image with planted copies
        planted = pq.read_table(ws / "planted.parquet").column("a")[0].as_py()
        files = pq.read_table(layout(s).files, columns=["image_id", "path"])
        row = pc.index(files.column("image_id"), planted).as_py()
        params = [files.column("path")[row].as_py()]
    t0 = time.perf_counter()
    _, rows = query(s, sql[a["query"]], params)
    return {"seconds": time.perf_counter() - t0, "note": f"{len(rows)} rows"}


def child_review(ws: Path, a: dict[str, Any]) -> dict[str, Any]:
    from cbir.review.queue import Filters, Queue
    from cbir.steps.calibrate import configured_thresholds

    s = _settings(ws)
    threshold = configured_thresholds(s)[0]
    assert threshold is not None
    q = Queue(s)
    t0 = time.perf_counter()
    first = q.page(threshold, Filters())
    t1 = time.perf_counter()
    night = q.page(threshold, Filters(run=a["run"]))
    t2 = time.perf_counter()
    q.close()
    return {"seconds": t2 - t0,
            "note": f"prepare + first page {t1 - t0:.2f} s ({len(first['rows'])} rows), "
                    f"run={a['run']} page {t2 - t1:.2f} s ({len(night['rows'])} rows)"}


CHILDREN: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "write files": child_write_files, "I/O floor": child_floor,
    "decode floor": child_decode_floor, "ingest first": child_ingest,
    "ingest rerun": child_ingest, "ingest +new": child_ingest,
    "write vectors": child_write_vectors, "index": child_index, "pairs": child_pairs,
    "clusters": child_clusters, "nightly arrivals": child_arrivals, "nightly": child_nightly,
    "intact": child_intact,
    "query: new > 0.9": child_query, "query: largest clusters": child_query,
    "query: one accession": child_query, "review queue": child_review,
}


def _vm_hwm_kib() -> int:
    """This process's peak resident set (VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child_main(step: str, ws: Path, args_json: str, result: Path) -> None:
    """Run one step and write its result (seconds, peak RSS, note) as JSON to `result`."""
    a = json.loads(args_json)
    t0 = time.perf_counter()
    try:
        out = CHILDREN[step](ws, a)
    except MemoryError:
        out = {"error": "MemoryError"}
    except Exception as exc:  # the step's failure is a measurement: report it, do not crash
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out.setdefault("seconds", time.perf_counter() - t0)
    out["hwm_kib"] = _vm_hwm_kib()
    result.write_text(json.dumps(out))
    sys.exit(1 if "error" in out else 0)


# --------------------------------------------------------------------------- the parent


def _tree(pid: int) -> list[int]:
    """Process `pid` and all its descendants (from /proc: each process's parent)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "(comm) state"
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_rss(pid: int) -> tuple[int, int]:
    """Bytes resident in process `pid` and all its descendants now: (all, anonymous). The
    anonymous part leaves out file pages (a memory-mapped file the kernel can drop). With
    descendants (ingest's forked decode workers) each page is counted once, shared among the
    processes that map it (PSS, /proc/PID/smaps_rollup): summed RSS counts a page the parent
    shares with each worker once per worker (ingest +new at 10^6: 3.0 GB summed, 1.2 GB)."""
    pids = _tree(pid)
    shared = len(pids) > 1  # a lone process: its status (smaps_rollup walks its page tables)
    name, keys = ("smaps_rollup", ("Pss:", "Pss_Anon:")) if shared else \
        ("status", ("VmRSS:", "RssAnon:"))
    total = anon = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):  # ended meanwhile
            for line in Path(f"/proc/{p}/{name}").read_text().splitlines():
                if line.startswith(keys):
                    kib = int(line.split()[1]) * 1024
                    total += kib if line.startswith(keys[0]) else 0
                    anon += kib if line.startswith(keys[1]) else 0
    return total, anon


def kill_tree(pid: int) -> None:
    """SIGKILL the step's process and its descendants (only what this script started)."""
    for p in reversed(_tree(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def run_step(step: str, ws: Path, a: dict[str, Any], max_rss: float, timeout: float,
             log: Path, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `step` in a child process under the RSS watchdog; its row of the table."""
    result = ws.parent / f".result-{os.getpid()}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--ws", str(ws),
           "--child-args", json.dumps(a), "--child-result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env_extra or {})}
    peak, peak_anon, killed = 0, 0, ""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n=== {step} {ws.name} {json.dumps(a)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while proc.poll() is None:
            rss, anon = tree_rss(proc.pid)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            wall = time.perf_counter() - t0
            if peak > max_rss:
                killed = f"killed: RSS {peak / GB:.1f} GB > watchdog {max_rss / GB:.1f} GB"
            elif wall > timeout:
                killed = f"killed: over the step timeout ({timeout:.0f} s)"
            if killed:
                kill_tree(proc.pid)
                proc.wait()
                break
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {}
    if result.is_file():
        out = json.loads(result.read_text())
        result.unlink()
    row: dict[str, Any] = {"step": step, "n": a["n"], "wall": wall, "anon": peak_anon}
    if killed:
        row.update(status=killed, seconds=wall, rss=peak)
    elif "error" in out or proc.returncode:
        row.update(status=f"failed: {out.get('error', f'exit {proc.returncode}')}",
                   seconds=out.get("seconds", wall), rss=max(peak, out.get("hwm_kib", 0) * 1024))
    else:
        row.update(status="ok", seconds=out["seconds"],
                   rss=max(peak, out.get("hwm_kib", 0) * 1024), note=out.get("note", ""),
                   out={k: v for k, v in out.items() if k not in ("note", "hwm_kib")})
    print(f"  N={a['n']:>9,} {step:<24} {row['seconds']:9.2f} s {row['rss'] / MIB:8.0f} MiB  "
          f"{row['status'] if row['status'] != 'ok' else row.get('note', '')}", flush=True)
    return row


def run_ingest_size(n: int, args: argparse.Namespace, max_rss: float) -> list[dict[str, Any]]:
    ws = args.out / f"ingest-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    a = {"n": n, "new": args.new, "seed": args.seed}
    plan = [("write files", a), ("I/O floor", a), ("decode floor", a), ("ingest first", a),
            ("ingest rerun", a), ("ingest +new", {**a, "arrive": True})]
    rows = _run_plan(plan, ws, args, max_rss)
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return rows


def run_vector_size(n: int, args: argparse.Namespace, max_rss: float) -> list[dict[str, Any]]:
    ws = args.out / f"vectors-{n}"
    if not args.resume_from:
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
    a = _vector_args(n, args)
    plan: list[tuple[str, dict[str, Any]]] = [
        ("write vectors", a), ("index", a), ("pairs", a), ("clusters", a),
        ("nightly arrivals", a), ("nightly", a),
        ("query: new > 0.9", {**a, "query": "new"}),
        ("query: largest clusters", {**a, "query": "largest"}),
        ("query: one accession", {**a, "query": "accession"}),
        ("review queue", a),
    ]
    if args.resume_from:  # the steps before it ran in an earlier invocation with --keep
        plan = plan[[step for step, _ in plan].index(args.resume_from):]
    snapshot = ws.parent / f"{ws.name}-before-night" if n in _sizes(args.kill_sizes) else None
    rows = _run_plan(plan, ws, args, max_rss, snapshot)
    if snapshot is not None and snapshot.is_dir():
        night = next((r["out"] for r in rows if r["step"] == "nightly arrivals"
                      and r["status"] == "ok"), None)
        if night is not None and _status(rows, "nightly", n)["status"] == "ok":
            rows += kill_checks(ws, snapshot, {**a, "since": night["since"],
                                               "run": night["run"]}, args, max_rss)
        shutil.rmtree(snapshot, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return rows


def _vector_args(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """What the steps of size `n` are run with (the children's --child-args)."""
    return {"n": n, "seed": args.seed, "shard_size": args.shard_size, "dup_frac": 0.1,
            "new": args.new, "pairs_sample": args.pairs_sample}


def _kept_sizes(out: Path) -> list[int]:
    """The sizes whose workspaces --keep left under `out` after their night, smallest first."""
    sizes = (ws.name.removeprefix("vectors-") for ws in out.glob("vectors-*")
             if (ws / NIGHT_FILE).is_file())
    return sorted(int(n) for n in sizes if n.isdigit())


def side_by_side_nights(args: argparse.Namespace, max_rss: float) -> list[dict[str, Any]]:
    """--night-rounds more nights (arrivals, then the night) at the smallest and the largest
    kept size, alternately: one row each, the median of its nights, which the nightly target
    compares. A night of each size measured once, an hour apart, compares two loads of a
    shared machine as much as two sizes."""
    kept = _kept_sizes(args.out)
    if len(kept) < 2:
        print(f"--night-rounds: needs two sizes kept after their night in {args.out} "
              f"(run them with --keep); found {len(kept)}", flush=True)
        return []
    sizes = (kept[0], kept[-1])
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    loads: dict[int, list[float]] = {n: [] for n in sizes}
    rss: dict[int, float] = dict.fromkeys(sizes, 0.0)
    for _ in range(args.night_rounds):
        for n in sizes:
            a = _vector_args(n, args)
            ws = args.out / f"vectors-{n}"
            night = _run_plan([("nightly arrivals", a)], ws, args, max_rss)[-1]
            if night["status"] == "ok":
                loads[n].append(os.getloadavg()[0])  # what else the machine was doing
                night = _run_plan([("nightly", a)], ws, args, max_rss)[-1]
            if night["status"] != "ok":
                return [{"step": SIDE_BY_SIDE, "n": m, "status": f"failed: a night at "
                         f"{_fmt_n(n)} {night['status']}"} for m in sizes]
            seconds[n].append(night["seconds"])
            rss[n] = max(rss[n], night["rss"])
    rows = []
    for n, other in zip(sizes, sizes[::-1], strict=True):
        each = ", ".join(f"{s:.2f}" for s in seconds[n])
        load = ", ".join(f"{x:.1f}" for x in loads[n])
        rows.append({"step": SIDE_BY_SIDE, "n": n, "status": "ok",
                     "seconds": statistics.median(seconds[n]), "rss": rss[n],
                     "rounds": seconds[n], "loads": loads[n],
                     "note": f"median of {len(seconds[n])} nights ({each} s; load {load}), "
                             f"alternating with {_fmt_n(other)}'s"})
    return rows




def _outputs(ws: Path) -> dict[str, Any]:
    """What a nightly run leaves, to compare: the pairs (all files that hold them), the
    clusters, the searched images, the index's size, and the catalogue's stored reports (their
    rows as queries read them, in whatever files and order: a multiset digest)."""
    import pyarrow.parquet as pq

    from cbir.store.catalog import connect
    from cbir.store.layout import layout
    from cbir.store.pairs import read_clusters, read_pairs, searched_files

    s = _settings(ws)
    lay = layout(s)
    searched = [pq.read_table(f).column("image_id") for f in searched_files(lay)]
    out: dict[str, Any] = {
        "pairs": read_pairs(s).replace_schema_metadata(None),
        "clusters": read_clusters(lay),
        "searched": sorted(x for col in searched for x in col.to_pylist()),
    }
    out["index"] = json.loads((ws / "data" / "index" / "index.json").read_text())["n_vectors"]
    con = connect(s, refresh=False)  # the stored results as queries read them (View.alive)
    for name in ("pair_report", "cluster_report"):
        out[name] = con.execute(  # (rows, sum of row hashes)
            f"SELECT count(*), sum(hash(t)::HUGEINT) FROM {name} t").fetchone()
    con.close()
    return out


_COMPARED_AS_VALUES = ("index", "searched", "pair_report", "cluster_report")


def _same_outputs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The names of the outputs that differ."""
    return [k for k in a
            if not (a[k] == b[k] if k in _COMPARED_AS_VALUES else a[k].equals(b[k]))]


def kill_checks(ws: Path, snapshot: Path, a: dict[str, Any], args: argparse.Namespace,
                max_rss: float) -> list[dict[str, Any]]:
    """Issue 16, nothing lost at scale: from the state before the nightly run (a hard-linked
    copy: every step replaces its files whole, so the copy keeps the old ones), kill the nightly
    run at each --kill-points point (SIGKILL, cbir.faults), check that readers still open what
    is there, rerun it, and compare its outputs with those of the undisturbed run."""
    reference = _outputs(ws)
    rows = []
    for point in [p for p in args.kill_points.split(",") if p]:
        wk = ws.parent / f"{ws.name}-kill"
        shutil.rmtree(wk, ignore_errors=True)
        subprocess.run(["cp", "-al", str(snapshot), str(wk)], check=True)
        log = args.out / "steps.log"
        killed = run_step("nightly", wk, a, max_rss, args.step_timeout, log,
                          {"CBIR_KILL_AT": point})
        intact = run_step("intact", wk, a, max_rss, args.step_timeout, log)
        rerun = run_step("nightly", wk, a, max_rss, args.step_timeout, log)
        died = killed["status"] == "failed: exit -9"
        differ = _same_outputs(reference, _outputs(wk)) if rerun["status"] == "ok" else ["rerun"]
        ok = died and intact["status"] == "ok" and not differ
        rows.append({
            "step": "nightly killed", "n": a["n"], "point": point,
            "status": "ok" if ok else "FAIL", "seconds": rerun.get("seconds", 0.0),
            "rss": max(killed.get("rss", 0), rerun.get("rss", 0)),
            "note": f"at {point}: {'killed by SIGKILL' if died else killed['status']}; after "
                    f"it {intact.get('note', intact['status'])}; the rerun "
                    + ("equals the undisturbed run" if not differ
                       else f"differs in {', '.join(differ)}"),
        })
        print(f"  kill check {point}: {'ok' if ok else 'FAIL'} - {rows[-1]['note']}", flush=True)
        shutil.rmtree(wk, ignore_errors=True)
    return rows


def _run_plan(plan: list[tuple[str, dict[str, Any]]], ws: Path, args: argparse.Namespace,
              max_rss: float, snapshot: Path | None = None) -> list[dict[str, Any]]:
    """Run the steps in order; after a failure the rest are 'not run' (they need its output)."""
    rows: list[dict[str, Any]] = []
    failed = ""
    # the night's run numbers: from its arrivals step, in this invocation or a kept earlier one
    kept = ws / NIGHT_FILE
    night: dict[str, Any] = json.loads(kept.read_text()) if kept.is_file() else {}
    for step, a in plan:
        if failed:
            rows.append({"step": step, "n": a["n"], "status": f"not run ({failed} failed)"})
            continue
        if step == "nightly" and snapshot is not None:  # the state a killed night must keep
            shutil.rmtree(snapshot, ignore_errors=True)
            subprocess.run(["cp", "-al", str(ws), str(snapshot)], check=True)
        row = run_step(step, ws, {**a, **night}, max_rss, args.step_timeout,
                       args.out / "steps.log")
        rows.append(row)
        if row["status"] != "ok":
            failed = step
        elif step == "nightly arrivals":  # the nightly and the queue need the run numbers
            night = {"since": row["out"]["since"], "run": row["out"]["run"]}
    return rows


# --------------------------------------------------------------------------- the report


def _fmt_n(n: float) -> str:
    e = math.log10(n)
    return f"10^{e:.0f}" if abs(e - round(e)) < 1e-9 else f"{n:,.0f}"


def _ok(rows: list[dict[str, Any]], step: str) -> dict[int, dict[str, Any]]:
    return {r["n"]: r for r in rows if r["step"] == step and r["status"] == "ok"}


def report(results: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = results["rows"]
    order = {s: i for i, s in enumerate(INGEST_STEPS + VECTOR_STEPS + [SIDE_BY_SIDE])}
    out = ["| N | step | seconds | peak RSS MiB | note |", "|---:|---|---:|---:|---|"]
    ing = [r for r in rows if r["step"] in INGEST_STEPS]
    vec = [r for r in rows if r["step"] in [*VECTOR_STEPS, SIDE_BY_SIDE]]
    for r in sorted(ing, key=lambda r: (r["n"], order[r["step"]])) + \
            sorted(vec, key=lambda r: (r["n"], order[r["step"]])):
        sec = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        rss = f"{r['rss'] / MIB:.0f}" if "rss" in r else "-"
        note = r.get("note", "") if r["status"] == "ok" else r["status"]
        out.append(f"| {_fmt_n(r['n'])} | {r['step']} | {sec} | {rss} | {note} |")

    out += ["", "Growth exponents (least-squares slope of log seconds, log peak RSS against "
            "log N, over the sizes where the step ran):", "",
            "| step | N | time exponent | RSS exponent | at 10^7: s on the time fit, MiB "
            "linear in N from the two largest sizes |",
            "|---|---|---:|---:|---|"]
    for step in INGEST_STEPS + VECTOR_STEPS:
        ok = _ok(rows, step)
        if not ok or step in NOT_STEPS:
            continue
        ns = sorted(ok)
        t = [ok[n]["seconds"] for n in ns]
        m = [ok[n]["rss"] for n in ns]
        kt, km = exponent(ns, t), exponent(ns, m)
        pt = project(ns, t, 1e7)
        # memory is a baseline plus so much per item: a power fit through the baseline would
        # understate it, so extrapolate the last increment linearly
        pm = m[-1] + (1e7 - ns[-1]) * (m[-1] - m[-2]) / (ns[-1] - ns[-2]) if len(ns) > 1 else None
        at = "-" if pt is None or pm is None or max(ns) >= 1e7 or step in INGEST_STEPS \
            else f"{pt:,.0f} s, {pm / MIB:,.0f} MiB"
        out.append(f"| {step} | {', '.join(_fmt_n(n) for n in ns)} | "
                   f"{'-' if kt is None else f'{kt:.2f}'} | {'-' if km is None else f'{km:.2f}'} "
                   f"| {at} |")
    kills = [r for r in rows if r["step"] == "nightly killed"]
    if kills:
        out += ["", "Nightly runs killed (SIGKILL at a cbir.faults point), then rerun:", "",
                "| N | killed at | verdict | rerun seconds | what happened |",
                "|---:|---|---|---:|---|"]
        out += [f"| {_fmt_n(r['n'])} | {r['point']} | {r['status']} | {r['seconds']:.1f} | "
                f"{r['note']} |" for r in kills]
    out += ["", "Targets of issue 16:", "", "| target | measured | verdict |", "|---|---|---|"]
    out += targets(rows)
    return "\n".join(out)


def _status(rows: list[dict[str, Any]], step: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["step"] == step and r["n"] == n), None)


def _verdict_not_ok(r: dict[str, Any] | None) -> str:
    """The verdict where a step did not succeed at 10^7: its failure, or why it did not run."""
    if r is None:
        return "not run"
    return r["status"] if r["status"].startswith("not run") else f"FAIL: {r['status']}"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    big = 10**7
    # 1. peak RSS at 10^7
    for step in ("index", "pairs", "clusters", "nightly", "query: new > 0.9",
                 "query: largest clusters", "query: one accession", "review queue"):
        r = _status(rows, step, big)
        ok = _ok(rows, step)
        what = f"{step}: peak RSS at 10^7 <= 8 GB"
        if r is None or "rss" not in r:
            top = max(ok) if ok else None
            seen = f"{ok[top]['rss'] / GB:.2f} GB at {_fmt_n(top)}" if top else "no size ran"
            out.append(f"| {what} | {seen} | {r['status'] if r is not None else 'not run'} |")
        elif r["status"] != "ok":
            out.append(f"| {what} | {r['status']} | FAIL |")
        else:
            out.append(f"| {what} | {r['rss'] / GB:.2f} GB | "
                       f"{'PASS' if r['rss'] <= TARGET_RSS else 'FAIL'} |")
    # vectors never loaded whole: what the peak anonymous RSS grows by, per byte of float32
    # vectors the collection grew by (1 or more: the step holds them all in its own memory)
    # The index step holds its k-means training sample as float32 by design (at most
    # MAX_TRAIN vectors: the whole collection up to 10^6): what it grows by beyond the sample.
    from cbir.faiss_index import MAX_TRAIN

    for step in ("index", "pairs", "nightly"):
        ok = _ok(rows, step)
        ns = sorted(ok)
        for lo, hi in itertools.pairwise(ns):
            grown = ok[hi].get("anon", 0) - ok[lo].get("anon", 0)
            beyond = ""
            if step == "index":
                grown -= (min(hi, MAX_TRAIN) - min(lo, MAX_TRAIN)) * 512 * 4
                beyond = " beyond its training sample of at most 2^20"
            per = grown / ((hi - lo) * 512 * 4)
            out.append(f"| {step}: vectors never loaded whole{beyond} (anonymous RSS grown per "
                       f"byte of float32 vectors, {_fmt_n(lo)} to {_fmt_n(hi)}, < 0.5) | "
                       f"{per:.2f} | {'PASS' if per < 0.5 else 'FAIL'} |")
    # 2. nightly at 10^7 <= 2x nightly at 10^5: the nights measured side by side where there
    # are (--night-rounds): the median of each round's ratio, its two nights minutes apart
    # (the machine's load and page cache change between rounds); else each size's one night
    what = "nightly adding 1,000 to 10^7 <= 2 x the same on 10^5 (embedding excluded)"
    side = _ok(rows, SIDE_BY_SIDE)
    night = side if len(side) >= 2 else _ok(rows, "nightly")
    if len(night) < 2:
        out.append(f"| {what} | - | not run |")
    else:
        lo, hi = (10**5, big) if 10**5 in night and big in night else (min(night), max(night))
        how = "one night each"
        ratio = night[hi]["seconds"] / night[lo]["seconds"]
        if night is side:
            ratios = sorted(h / low for low, h in zip(side[lo]["rounds"], side[hi]["rounds"],
                                                      strict=False))
            ratio = statistics.median(ratios)
            how = (f"median of {len(ratios)} rounds side by side: "
                   f"{', '.join(f'{x:.2f}' for x in ratios)}")
        if (lo, hi) == (10**5, big):
            out.append(f"| {what} | {ratio:.2f} x ({how}) | "
                       f"{'PASS' if ratio <= 2 else 'FAIL'} |")
        else:
            out.append(f"| {what} | {_fmt_n(hi)}: {night[hi]['seconds']:.1f} s, {_fmt_n(lo)}: "
                       f"{night[lo]['seconds']:.1f} s: {ratio:.2f} x ({how}) | not run |")
    # 3. ingest: rerun <= 1/20 of first at 10^6; first-run throughput >= 0.8 x the I/O floor
    first, rerun, floor = (_ok(rows, s) for s in ("ingest first", "ingest rerun", "I/O floor"))
    for n in sorted(set(first) & set(rerun)):
        ratio = rerun[n]["seconds"] / first[n]["seconds"]
        verdict = ("PASS" if ratio <= 0.05 else "FAIL") if n == 10**6 else \
            f"not run at 10^6 (here {'within' if ratio <= 0.05 else 'over'})"
        out.append(f"| ingest rerun of {_fmt_n(n)} unchanged files <= 1/20 of the first run "
                   f"(target at 10^6) | {ratio:.3f} | {verdict} |")
    if not set(first) & set(rerun):
        out.append("| ingest rerun <= 1/20 of the first run at 10^6 | - | not run |")
    for n in sorted(set(first) & set(floor)):
        ratio = floor[n]["seconds"] / first[n]["seconds"]
        out.append(f"| ingest first-run throughput at {_fmt_n(n)} >= 0.8 x the I/O floor "
                   f"(scandir + stat + SHA-256) | {ratio:.2f} x | "
                   f"{'PASS' if ratio >= 0.8 else 'FAIL'} |")
    if not set(first) & set(floor):
        out.append("| ingest first-run throughput >= 0.8 x the I/O floor | - | not run |")
    # why: ingest decodes every new file; the decode alone, in one plain process, bounds it
    decode = _ok(rows, "decode floor")
    for n in sorted(set(first) & set(floor) & set(decode)):
        alone = floor[n]["seconds"] / decode[n]["seconds"]
        out.append(f"| the decode ingest owes each new file, alone in one process, at "
                   f"{_fmt_n(n)} (ingest against it: "
                   f"{decode[n]['seconds'] / first[n]['seconds']:.2f} x) | {alone:.2f} x the "
                   f"I/O floor | bound: {alone * (os.cpu_count() or 1):.2f} x on "
                   f"{os.cpu_count()} cores |")
    # 4. pairs at 10^7: >= 5,000 queries/s
    pairs = _ok(rows, "pairs")
    what = "pairs at 10^7: all-pairs kNN >= 5,000 queries/s (whole step: N / seconds)"
    if big in pairs:
        qps = big / pairs[big]["seconds"]
        how = " (projected from a sample of queries)" if pairs[big].get("out", {}).get(
            "projected") else ""
        out.append(f"| {what} | {qps:,.0f}/s{how} | {'PASS' if qps >= 5000 else 'FAIL'} |")
    else:
        r = _status(rows, "pairs", big)
        seen = ", ".join(f"{_fmt_n(n)}: {n / p['seconds']:,.0f}/s"
                         for n, p in sorted(pairs.items()))
        out.append(f"| {what} | {seen or '-'} | "
                   f"{_verdict_not_ok(r)} |")
    # 5. catalogue queries <= 1 s at 10^7
    for step in ("query: new > 0.9", "query: largest clusters", "query: one accession"):
        q = _ok(rows, step)
        what = f"catalogue {step} <= 1 s at 10^7"
        if big in q:
            sec = q[big]["seconds"]
            out.append(f"| {what} | {sec:.2f} s | {'PASS' if sec <= 1 else 'FAIL'} |")
        else:
            r = _status(rows, step, big)
            seen = ", ".join(f"{_fmt_n(n)}: {x['seconds']:.2f} s" for n, x in sorted(q.items()))
            out.append(f"| {what} | {seen or '-'} | "
                       f"{_verdict_not_ok(r)} |")
    # the index step tunes nprobe on recall@10 of IVF-PQ with re-ranking from the float16
    # memory-mapped vectors (cbir.store.vectors) against exact search
    recalls = {n: float(m.group(1)) for n, r in _ok(rows, "index").items()
               if (m := re.search(r"recall@10 ([0-9.]+)", r.get("note", "")))}
    what = "re-ranking recall@10 >= 0.95 with float16 memory-mapped vectors"
    if recalls:
        seen = ", ".join(f"{_fmt_n(n)}: {x:.3f}" for n, x in sorted(recalls.items()))
        out.append(f"| {what} | {seen} | {'PASS' if min(recalls.values()) >= 0.95 else 'FAIL'} |")
    else:
        out.append(f"| {what} | - | not run |")
    return out


# --------------------------------------------------------------------------- main


def _sizes(text: str) -> list[int]:
    return sorted({int(float(x)) for x in text.split(",") if x.strip()})


def _mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cbir-scale"),
                    help="work folder (each size's data is removed once measured; "
                         "results.json and steps.log stay)")
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="vector counts, comma-separated")
    ap.add_argument("--ingest-sizes", default="1e4,1e5,1e6", help="file counts for ingest")
    ap.add_argument("--new", type=int, default=1000, help="items a nightly run adds")
    ap.add_argument("--shard-size", type=int, default=1000, help="embed.shard_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-gib", type=float, default=None,
                    help="watchdog: kill a step whose RSS exceeds this (default: 12 GiB, or "
                         "less when less memory is available)")
    ap.add_argument("--step-timeout", type=float, default=4 * 3600, help="seconds per step")
    ap.add_argument("--skip-largest", action="store_true",
                    help="skip a size whose float32 vectors exceed the available RAM (it would "
                         "be killed by the watchdog) instead of running it to that point")
    ap.add_argument("--kill-sizes", default="",
                    help="vector counts at which the nightly run is also killed at each of "
                    "--kill-points, checked and rerun (issue 16: nothing lost at scale)")
    ap.add_argument("--kill-points", default=",".join(KILL_POINTS),
                    help="cbir.faults points (name:n) where the nightly run is killed")
    ap.add_argument("--keep", action="store_true", help="keep each size's data")
    ap.add_argument("--resume-from", choices=VECTOR_STEPS[1:], default="",
                    help="continue a size kept by --keep from this step (the rows of the "
                         "steps before it stay as measured)")
    ap.add_argument("--pairs-sample", type=int, default=0,
                    help="at sizes above this, measure the pairs search's rate on this many "
                         "random queries (whole batches) and project the step's time (the "
                         "state after it is the planted pairs: see _sampled_pairs); 0: search "
                         "every image")
    ap.add_argument("--night-rounds", type=int, default=0,
                    help="then this many more nights at the smallest and the largest size kept "
                         "(--keep), alternately: the nightly target compares their medians, "
                         "measured side by side")
    ap.add_argument("--fresh", action="store_true", help="forget results of earlier runs")
    ap.add_argument("--report", action="store_true",
                    help="only print the tables of the results in --out/results.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ws", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    ap.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.ws, args.child_args, args.child_result)
        return

    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    avail = _mem_available()
    max_rss = (args.max_rss_gib * 2**30 if args.max_rss_gib
               else min(12 * 2**30, max(2 * 2**30, avail - 3 * 2**30)))
    store = args.out / "results.json"
    results: dict[str, Any] = {"rows": []}
    if store.is_file() and not args.fresh:
        results = json.loads(store.read_text())
    if args.report:
        print(report(results))
        return
    sizes, ingest_sizes = _sizes(args.sizes), _sizes(args.ingest_sizes)
    print(f"scale benchmark: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"{avail / GB:.1f} GB available, watchdog {max_rss / GB:.1f} GB per step; "
          f"work in {args.out}", flush=True)

    def keep(new_rows: list[dict[str, Any]], steps: list[str], n: int) -> None:
        results["rows"] = [r for r in results["rows"]
                           if not (r["n"] == n and r["step"] in steps)] + new_rows
        store.write_text(json.dumps(results, indent=1))

    for n in ingest_sizes:
        free = shutil.disk_usage(args.out).free
        need = (n + args.new) * 6e3  # files, blocks and the manifest, generously
        if need > free - 5 * GB:
            keep([{"step": s, "n": n, "status": f"not run: needs ~{need / GB:.0f} GB disk, "
                   f"{free / GB:.0f} GB free"} for s in INGEST_STEPS], INGEST_STEPS, n)
            continue
        keep(run_ingest_size(n, args, max_rss), INGEST_STEPS, n)
    for n in sizes:
        free = shutil.disk_usage(args.out).free
        vec = n * 512 * 4
        need = vec * 1.4 + n * 300  # shards, index, pairs, manifest
        why = ""
        if need > free - 5 * GB and not args.resume_from:
            why = f"not run: needs ~{need / GB:.0f} GB disk, {free / GB:.0f} GB free"
        elif args.skip_largest and vec > min(max_rss, _mem_available()):
            why = (f"not run (--skip-largest): its float32 vectors ({vec / GB:.0f} GB) exceed "
                   f"the memory this step may use ({min(max_rss, _mem_available()) / GB:.0f} GB)")
        if why:
            keep([{"step": s, "n": n, "status": why} for s in VECTOR_STEPS], VECTOR_STEPS, n)
            continue
        ran = VECTOR_STEPS[VECTOR_STEPS.index(args.resume_from):] if args.resume_from \
            else VECTOR_STEPS
        if args.resume_from and not (args.out / f"vectors-{n}").is_dir():
            sys.exit(f"--resume-from {args.resume_from}: no kept workspace "
                     f"{args.out / f'vectors-{n}'} (run with --keep first)")
        keep(run_vector_size(n, args, max_rss), [*ran, "nightly killed", SIDE_BY_SIDE], n)
    if args.night_rounds:
        side = side_by_side_nights(args, max_rss)
        for n in {r["n"] for r in side}:
            keep([r for r in side if r["n"] == n], [SIDE_BY_SIDE], n)

    results["command"] = " ".join(sys.argv)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    store.write_text(json.dumps(results, indent=1))
    print()
    print(report(results))


if __name__ == "__main__":
    main()
