"""`cbir pairs`' all-pairs search on a Dask cluster (orchestration.dask_address).

The driver splits the query rows into parts; each part is a Dask task that, in a worker
process, opens the workspace from its params file (a worker needs the params file, the data
folder and the index at the same paths: a shared file system), maps the FAISS index instead of
reading it (`load_index(mmap=True)`: the workers of a machine share its pages), runs the pairs
step's `knn_pairs` on its rows and writes its pairs as a Parquet part, atomically, into this
run's folder under `data.pairs_dir/parts/`. The driver merges the parts with DuckDB by
knn_pairs' own rule (per unordered pair its best score and best rank), so the result is the one
a single process finds, then removes the folder; a folder left by a killed run is removed by
the next. run_pairs passes knn_pairs in (it imports this module, which cannot import it back);
the function reaches the workers by reference, as cbir.steps.pairs.knn_pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from ..config import Settings, load_settings
from ..errors import CbirError
from ..fsutil import write_parquet
from ..parallel import dask_client
from ..progress import bar as progress_bar
from ..store.index import Searcher, open_searcher
from ..store.layout import SIDECAR_FILE, layout

#: Query rows per Dask task: about 10 s of searching at 5,000 queries/s, a part of ~1 MB.
PART_ROWS = 50_000

PART_SCHEMA = pa.schema(
    [
        ("image_a", pa.string()),
        ("image_b", pa.string()),
        ("score", pa.float64()),  # knn_pairs' Python float, kept exactly
        ("rank", pa.int32()),
    ]
)

Pairs = dict[tuple[str, str], tuple[float, int]]
#: cbir.steps.pairs.knn_pairs: (searcher, k, threshold, rows=...) -> pairs
Search = Callable[..., Pairs]


@dataclass(frozen=True)
class PartJob:
    """One Dask task: search `rows` (indices into the searcher's image ids) and write `target`."""

    search: Search
    params_path: str
    fingerprint: str  # the driver's model: the worker builds none to find it
    ids_digest: str  # the driver's image ids, in order: rows index the same list
    k: int
    threshold: float
    rows: np.ndarray
    target: str


def ids_digest(image_ids: Sequence[str]) -> str:
    """SHA-256 of the image ids in order (in chunks: no one string of them all)."""
    h = hashlib.sha256()
    for start in range(0, len(image_ids), 100_000):
        h.update("\n".join(image_ids[start : start + 100_000]).encode())
        h.update(b"\n")
    return h.hexdigest()


# A worker process keeps the searcher it opened for the tasks of the same run that follow (a
# searcher holds every vector: opening one per part would cost more than the search); the
# driver drops it at the end of the run (_forget).
_cached: tuple[tuple[object, ...], Searcher] | None = None


def _worker_searcher(job: PartJob) -> Searcher:
    global _cached
    settings = load_settings(job.params_path)
    try:  # a new index since (same model, same images) is opened anew: every save, of the
        # whole index or of its delta, replaces the sidecar
        st = (layout(settings).index_dir / SIDECAR_FILE).stat()
        key: tuple[object, ...] = (
            job.params_path,
            job.fingerprint,
            job.ids_digest,
            st.st_ino,
            st.st_mtime_ns,
        )
    except OSError:
        key = ()
    if key and _cached is not None and _cached[0] == key:
        return _cached[1]
    _cached = None  # the previous run's searcher goes before this one is opened
    s = open_searcher(settings, job.fingerprint, with_regions=False, mmap=True)
    if ids_digest(s.image_ids) != job.ids_digest:
        raise CbirError(
            f"a Dask worker finds other embeddings than `cbir pairs` did in {settings.root} "
            f"(the workers need the data folder at the same path, on a shared file system)"
        )
    _cached = (key, s)
    return s


def _forget() -> None:
    global _cached
    _cached = None


def search_part(job: PartJob) -> str:
    """A Dask task: knn_pairs over the job's rows, written as a Parquet part; its path."""
    found = job.search(_worker_searcher(job), job.k, job.threshold, rows=job.rows)
    keys = list(found)
    table = pa.table(
        {
            "image_a": [a for a, _ in keys],
            "image_b": [b for _, b in keys],
            "score": [found[key][0] for key in keys],
            "rank": [found[key][1] for key in keys],
        },
        schema=PART_SCHEMA,
    )
    write_parquet(table, job.target)
    return job.target


def merge_parts(parts: list[Path]) -> Pairs:
    """The parts' pairs, one per unordered pair: its best score and best rank (knn_pairs'
    rule, which merges a pair found from both of its images the same way)."""
    if not parts:
        return {}
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(
            "SELECT image_a, image_b, max(score), min(rank) FROM read_parquet(?) "
            "GROUP BY image_a, image_b ORDER BY image_a, image_b",
            [[str(p) for p in parts]],
        ).fetchall()
    finally:
        con.close()
    return {(a, b): (float(score), int(rank)) for a, b, score, rank in rows}


def split_rows(order: np.ndarray, part_rows: int = PART_ROWS) -> list[np.ndarray]:
    """Consecutive parts of at most `part_rows` rows; at least two when there are two rows (a
    tiny collection still goes through the merge)."""
    n_parts = max(-(-len(order) // max(1, part_rows)), min(2, len(order)))
    return [p for p in np.array_split(order, n_parts) if len(p)] if len(order) else []


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def dask_knn_pairs(
    settings: Settings,
    k: int,
    threshold: float,
    rows: np.ndarray | None,
    address: str,
    *,
    search: Search,
    searcher: Searcher | None = None,
    progress: bool = False,
    part_rows: int = PART_ROWS,
) -> Pairs:
    """What `search(open_searcher(settings), k, threshold, rows=rows)` returns (`search`:
    cbir.steps.pairs.knn_pairs), searched by Dask tasks on the cluster at `address`,
    `part_rows` query rows each.

    `searcher`: the caller's (run_pairs has one open): its model and image ids are those the
    workers must find; without it, one is opened here (which also checks the index file's
    checksum, which the workers do not)."""
    s = searcher if searcher is not None else open_searcher(settings, with_regions=False)
    order = np.arange(len(s.image_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    parts = split_rows(order, part_rows)
    lay = layout(settings)
    _remove(lay.pairs_parts)  # a killed run's parts: never merged into this one
    if not parts:
        return {}
    run, digest = uuid.uuid4().hex[:12], ids_digest(s.image_ids)
    jobs = [
        PartJob(
            search=search,
            params_path=str(settings.params_path),
            fingerprint=s.fingerprint,
            ids_digest=digest,
            k=k,
            threshold=float(threshold),
            rows=part,
            target=str(lay.pairs_part(run, i)),
        )
        for i, part in enumerate(parts)
    ]
    from distributed import as_completed  # only with a cluster: slow to import

    written: list[Path] = []
    bar = progress_bar(len(order), "search pairs on Dask", "image", progress)
    try:
        client = dask_client(address)
        with client, contextlib.closing(bar):
            futures = {
                client.submit(search_part, job, key=f"pairs-part-{i:05d}-{run}", pure=False): job
                for i, job in enumerate(jobs)
            }
            # this client's loop: the process may have no default client (a Prefect flow)
            for future in as_completed(futures, loop=client.loop):
                written.append(Path(future.result()))  # a task's error is raised here
                bar.update(len(futures[future].rows))
                bar.set_postfix_str(f"{len(written)}/{len(jobs)} parts")
            with contextlib.suppress(Exception):  # a worker gone since: nothing to drop there
                client.run(_forget)
        return merge_parts(written)
    finally:
        _remove(lay.pairs_parts)
