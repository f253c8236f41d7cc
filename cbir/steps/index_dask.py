"""`cbir index`'s IVF-PQ build (and a large update) on a Dask cluster (orchestration.dask_address).

A build: the driver draws the training sample as build_index draws it (same seed, same rows),
one Dask task trains the empty index on it and writes it (`trained.faiss`) into this run's
folder under `data.index_dir/parts/`, then each part of the rows is a Dask task that opens the
workspace from its params file (a worker needs the params file and the data folder at the same
paths: a shared file system), reads its rows from the memory-mapped vector file
(store.vectors.current_embeddings), encodes them into a copy of the trained index and writes it
atomically as a part file. The driver merges the parts into the trained index in row order
(IndexIVF.merge_from appends each part's inverted lists: the lists hold the vectors in the
order one process adds them), tunes nprobe/k_factor as build_index does (from the generator as
the sample left it) and returns it for save_index: the index a single process builds.

Parts start at multiples of ADD_CHUNK, so every FAISS add call encodes the rows one process
encodes in one call. An update (new images added without retraining) does the same with a copy
of the current index emptied in place of the trained one, when it adds at least DASK_ADD_MIN
vectors; fewer (a night's few thousand) are added in-process: a task's start-up, the vector
file's id list on every worker and the parts' round trip cost more than encoding them.

The regional descriptors' index (embed.regions) is built in-process: its vectors are not in a
memory-mapped file. A folder left by a killed run is removed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..config import Settings, load_settings
from ..errors import CbirError
from ..faiss_index import (
    ADD_CHUNK,
    IndexInfo,
    IndexParams,
    Rows,
    add_rows,
    build_input,
    faiss_ids,
    finish_build,
    fits,
    trained_index,
    training_rows,
)
from ..fsutil import atomic_path
from ..parallel import dask_client
from ..store.layout import layout
from ..store.vectors import current_embeddings

#: Rows per Dask task: a multiple of ADD_CHUNK (the same FAISS add calls as one process);
#: at d=512 a task reads 256 MiB of float16 and writes a part of about 19 MB (72 B a vector).
PART_ROWS = 4 * ADD_CHUNK
#: An update adding fewer vectors stays in-process (see the module's docstring).
DASK_ADD_MIN = PART_ROWS


@dataclass(frozen=True)
class Job:
    """One Dask task over `rows` (indices into the sorted current embeddings): train the empty
    index on them (`start` is None), or encode them into a copy of the index at `trained`."""

    params_path: str
    fingerprint: str
    fids_digest: str  # the driver's FAISS ids, in order: rows index the same list
    rows: np.ndarray | None  # None: every row (a training sample as large as the collection)
    target: str
    trained: str = ""  # add: the empty index to encode into
    params: dict[str, Any] | None = None  # train: the layout (IndexParams.to_dict) and seed
    seed: int = 0
    threads: int = 0  # train: the driver's OpenMP threads (see train_part)


def fids_digest(fids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(fids, np.int64).tobytes()).hexdigest()


# A worker process keeps the vectors it opened for the tasks of the same run that follow (the
# id list of 10^7 images takes seconds to read); the driver drops them at the end of the run.
_cached: tuple[tuple[str, str, str], tuple[np.ndarray, Rows]] | None = None


def _worker_vectors(job: Job) -> tuple[np.ndarray, Rows]:
    global _cached
    key = (job.params_path, job.fingerprint, job.fids_digest)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    _cached = None
    settings = load_settings(job.params_path)
    _, ids, vectors, _ = current_embeddings(settings, job.fingerprint)
    fids = faiss_ids(ids)
    if fids_digest(fids) != job.fids_digest:
        raise CbirError(
            f"a Dask worker finds other embeddings than `cbir index` did in {settings.root} "
            f"(the workers need the data folder at the same path, on a shared file system)"
        )
    _cached = (key, (fids, vectors))
    return fids, vectors


def _forget() -> None:
    global _cached
    _cached = None


class _Selected:
    """Rows `rows` of `base`, read a slice at a time (add_rows reads ADD_CHUNK rows a call)."""

    def __init__(self, base: Rows, rows: np.ndarray):
        self._base, self._rows = base, rows

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._rows), int(self._base.shape[1]))

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._base[self._rows[key]], np.float32)


def _write(index: faiss.Index, target: str) -> str:
    with atomic_path(target) as tmp:
        faiss.write_index(index, str(tmp))
    return target


def train_part(job: Job) -> str:
    """A Dask task: the empty index trained on the job's rows, written to its target.

    It trains with the driver's OpenMP thread count: FAISS's k-means depends on it (measured:
    the same sample trained with 1 and 2 threads gave other centroids; encoding does not), and
    a Dask worker runs with one (distributed sets OMP_NUM_THREADS=1 in its workers)."""
    assert job.params is not None
    _, vectors = _worker_vectors(job)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(job.threads)
    try:
        index = trained_index(vectors, IndexParams.from_dict(job.params), job.seed, job.rows)
    finally:
        faiss.omp_set_num_threads(before)
    return _write(index, job.target)


def add_part(job: Job) -> str:
    """A Dask task: the job's rows encoded into a copy of the empty index, written."""
    assert job.rows is not None
    fids, vectors = _worker_vectors(job)
    index = faiss.read_index(job.trained)
    add_rows(index, _Selected(vectors, job.rows), fids[job.rows])
    return _write(index, job.target)


def split_rows(rows: np.ndarray, part_rows: int | None = None) -> list[np.ndarray]:
    """Consecutive parts of `part_rows` rows (PART_ROWS, a multiple of ADD_CHUNK: the same
    FAISS add calls as one process), the last one shorter."""
    size = max(1, part_rows or PART_ROWS)
    return [rows[s : s + size] for s in range(0, len(rows), size)]


def merge_parts(index: faiss.Index, parts: list[Path]) -> None:
    """Append the parts' vectors to `index`, in the parts' order (that of the rows)."""
    for part in parts:
        index.merge_from(faiss.read_index(str(part)), 0)


class _Run:
    """This run's folder and the client that runs its tasks."""

    def __init__(self, settings: Settings, fingerprint: str, fids: np.ndarray):
        self.settings, self.fingerprint = settings, fingerprint
        self.digest = fids_digest(fids)
        self.folder = layout(settings).index_parts
        self.name = uuid.uuid4().hex[:12]
        self.client: Any = None

    def job(self, rows: np.ndarray | None, part: int | None, **kw: Any) -> Job:
        return Job(
            params_path=str(self.settings.params_path),
            fingerprint=self.fingerprint,
            fids_digest=self.digest,
            rows=rows,
            target=str(layout(self.settings).index_part(self.name, part)),
            **kw,
        )

    def run(self, fn: Any, jobs: list[Job], what: str) -> list[Path]:
        """The jobs' targets, once every task is done (a task's error is raised here)."""
        futures = [
            self.client.submit(fn, job, key=f"index-{what}-{i:05d}-{self.name}", pure=False)
            for i, job in enumerate(jobs)
        ]
        return [Path(p) for p in self.client.gather(futures)]

    def add(self, empty: str, rows: np.ndarray, part_rows: int | None) -> list[Path]:
        jobs = [self.job(p, i, trained=empty) for i, p in enumerate(split_rows(rows, part_rows))]
        return self.run(add_part, jobs, "add")


@contextlib.contextmanager
def _cluster(
    settings: Settings, fingerprint: str, fids: np.ndarray, address: str
) -> Iterator[_Run]:
    run = _Run(settings, fingerprint, fids)
    shutil.rmtree(run.folder, ignore_errors=True)  # a killed run's parts: never merged
    try:
        with dask_client(address) as client:
            run.client = client
            yield run
            with contextlib.suppress(Exception):  # a worker gone since: nothing to drop there
                client.run(_forget)
    finally:
        shutil.rmtree(run.folder, ignore_errors=True)


def dask_build_index(
    settings: Settings,
    fingerprint: str,
    vectors: Rows,
    fids: np.ndarray,
    params: IndexParams,
    address: str,
    *,
    target_recall: float | None,
    seed: int,
    k: int = 10,
    part_rows: int | None = None,
) -> tuple[faiss.Index, IndexInfo]:
    """What build_index(vectors, fids, params, ...) returns, trained and encoded by Dask tasks
    on the cluster at `address` (`vectors`, `fids`: current_embeddings' of model
    `fingerprint`, which the workers open themselves), `part_rows` rows a task."""
    t0 = time.perf_counter()
    x, fids = build_input(vectors, fids)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    sample = training_rows(n, params, rng)  # as build_index draws it: its tuning draws next
    with _cluster(settings, fingerprint, fids, address) as run:
        threads = faiss.omp_get_max_threads()
        train = run.job(sample, None, params=params.to_dict(), seed=seed, threads=threads)
        (trained,) = run.run(train_part, [train], "train")
        index = faiss.read_index(str(trained))
        merge_parts(index, run.add(str(trained), np.arange(n), part_rows))
    return index, finish_build(index, x, fids, params, rng, target_recall, k, t0)


def wants_dask_add(info: IndexInfo, n_new: int) -> bool:
    """Whether an update adding `n_new` vectors to this index adds them on Dask."""
    return info.params.kind == "ivfpq" and n_new >= DASK_ADD_MIN


def dask_add_vectors(
    settings: Settings,
    fingerprint: str,
    index: faiss.Index,
    info: IndexInfo,
    vectors: Rows,
    fids: np.ndarray,
    rows: np.ndarray,
    address: str,
    *,
    rebuild_factor: float,
    part_rows: int | None = None,
) -> bool:
    """add_vectors(index, info, vectors[rows], fids[rows], rebuild_factor=...) with the rows
    encoded by Dask tasks (`vectors`, `fids`: every current embedding's, of model
    `fingerprint`; the workers open them themselves)."""
    if not fits(index, info, len(rows), rebuild_factor):
        return False
    if not len(rows):
        return True
    build_input(_Selected(vectors, rows), fids[rows])  # add_vectors' checks, on a sample
    with _cluster(settings, fingerprint, fids, address) as run:
        # the trained quantiser and codebooks, no vectors (a moment's copy of the whole index:
        # FAISS copies an IVF index with its lists)
        empty = faiss.clone_index(index)
        empty.reset()
        trained = _write(empty, str(layout(settings).index_part(run.name, None)))
        merge_parts(index, run.add(trained, np.asarray(rows, np.int64), part_rows))
    info.n_vectors = int(index.ntotal)
    return True
