"""The current model's vectors in one memory-mapped file beside its Parquet shards, so that
searching a collection of 10^7 images never loads 20 GB of float32 into RAM.

`<fingerprint>/vectors-<generation>.f16` holds the rows, float16 (half the disk and page cache
of float32; re-ranking scores move by at most about 5e-5), appended shard by shard;
`<fingerprint>/vectors.parquet` says what each row is (image_id, shard) and, in its metadata,
which data file and dimension. It is the commit: `cbir embed` appends a night's shards past
the recorded rows, fsyncs, then replaces vectors.parquet, so a kill leaves the recorded rows
intact (the bytes past them are overwritten next time). The metadata also records each shard's
size: a shard gone or rewritten since means a rebuild, which writes a new generation and
removes the old one after the commit. (Not the modification time: `dvc checkout` restores
shards with new ones, and the file then still holds what they hold.)

Only `cbir embed` writes them (they are its DVC output). A reader that finds them out of step
with the shards (an older workspace, shards written by hand) builds the same rows in memory.
`current_embeddings` finds the present images' rows through the order kept by
`store.vector_order` (in the cache, not here: readers keep it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import faults
from ..arrays import found_at
from ..errors import CbirError
from ..fsutil import (
    APPENDED_ROW_GROUP,
    DiskFull,
    ReadOnly,
    Stamp,
    disk_full,
    file_stamps,
    is_disk_full,
    write_parquet,
)
from ..progress import bar as progress_bar
from ..scoring import grouped_inner_products
from . import reuse
from .embeddings import check_dimensions, read_shard, shard_vectors
from .fingerprint import current_fingerprint
from .layout import SHARD_GLOB, VECTOR_DATA_GLOB, VECTOR_DATA_PREFIX, VECTOR_ROWS, layout
from .manifest import (
    FILES_SCHEMA,
    ROWS_EPOCH,
    ImageIds,
    canonical_ids,
    canonical_mask,
    hex_keys,
    ids_in,
    keys_in,
    why_no_images,
)
from .tables import rows_from, schema_problem
from .vector_order import VectorOrder, latest

if TYPE_CHECKING:
    from ..config import Settings

DTYPE = np.dtype(np.float16)
ROWS_SCHEMA = pa.schema([("image_id", pa.string()), ("shard", pa.string())])
#: A process gives the pages it has read back to the page cache after this many bytes, so that
#: its resident set stays bounded while it scans or re-ranks a large file.
RELEASE_BYTES = 256 << 20
#: A vector file larger than this is read row by row (pread) instead of memory-mapped. Rows are
#: read scattered (in id order, or a query's candidates), and the kernel maps the cached pages
#: around every page a mapping faults in: measured on a 10 GB file, 134-144 KiB mapped per
#: random row read, so scans and re-ranking mapped the whole file into the process (the index
#: step at 10^7 passed 12.9 GB). Bounding that by unmapping costs 7-8 us a row for the fault
#: plus 4 for the unmapping, against 3 us for pread; a mapping that stays populated (0.6 us a
#: row) is kept where the file is small enough to be resident (10^6 images: 1 GB).
MAP_MAX_BYTES = 2 << 30
#: Re-ranking a large file (RowReader.inner_products) reads it in order, this many bytes at a
#: time, where a segment holds at least one wanted row in STREAM_EVERY: copying a 16 MiB segment
#: from the page cache costs about what 1/16 of its rows read one by one do (3-4 us a row).
SEGMENT_BYTES = 16 << 20
STREAM_EVERY = 16
#: Rows read one by one (a night's candidates, an index's training sample) are first asked of
#: the page cache alone (pread with RWF_NOWAIT, Linux): a cached run is read at once, and one
#: that is not fails at once, its read from the disk started in the background. The runs that
#: failed are then read as usual, by when most have arrived: the disk serves many at a time. At
#: 10^7, 100,000 rows out of the page cache took 17-18 us a row against 73-88 read one after
#: the other, and cached ones about 5 us either way (benchmarks/rerank.py --fetch).
NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)  # 0: not offered here, each run read in turn
#: An all-pairs search reads a large file ahead (RowReader.read_ahead) only where it takes at
#: most this share of the memory available: beyond, its end would push its start (and other
#: programs' files) out of the page cache before the search wanted them.
READ_AHEAD_SHARE = 0.6


def available_memory() -> int | None:
    """Bytes of memory available to new work, page cache included (Linux), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_through(path: Path, size: int, stop: threading.Event) -> None:
    """Read `path` in order into one reused buffer, so that the page cache holds it; stop early
    when asked (the reader closed) or on any error (reading ahead is only a hint)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        buf = bytearray(SEGMENT_BYTES)
        at = 0
        while at < size and not stop.is_set():
            got = os.preadv(fd, [buf], at)
            if got <= 0:
                return
            at += got
    except OSError:
        return
    finally:
        os.close(fd)


class RowReader:
    """Rows of a vector file read with pread into memory of their own: only the page cache
    holds the file, not the process. Consecutive rows are read in one call."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.n, self.dim = path, n, dim
        self.row_bytes = dim * DTYPE.itemsize
        self._fd = os.open(path, os.O_RDONLY)
        self._stop = threading.Event()
        self._ahead: threading.Thread | None = None

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def read_ahead(self) -> bool:
        """Read the whole file once in a background thread, in order, while the caller works
        (an all-pairs search's first batch runs its IVF search meanwhile), so that re-ranking
        finds it in the page cache: a file left out of it by other work was otherwise read by
        the first batch's segments (at 10^7, 10 GB at about 150 MB/s against 430 MB/s read in
        order, benchmarks/rerank.py --cold). Only where the file fits in READ_AHEAD_SHARE of
        the memory available; once a reader. Returns whether it started."""
        if self._ahead is not None:
            return False
        size = self.n * self.row_bytes
        free = available_memory()
        if free is None or size > READ_AHEAD_SHARE * free:
            return False
        # the thread holds the path and the event, not the reader: dropping the reader stops it
        self._ahead = threading.Thread(
            target=_read_through, args=(self.path, size, self._stop), daemon=True
        )
        self._ahead.start()
        return True

    def wait_ahead(self) -> None:
        """Wait for a read ahead started to finish (tests, benchmarks)."""
        if self._ahead is not None:
            self._ahead.join()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The float16 rows `rows` (any shape) as an array of shape rows.shape + (dim,)."""
        shape = np.shape(rows)
        flat = np.asarray(rows, np.int64).reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.n):
            raise IndexError(f"row out of range of the {self.n} rows of {self.path}")
        wanted, back = np.unique(flat, return_inverse=True)  # forward through the file, once
        buf = bytearray(len(wanted) * self.row_bytes)
        view = memoryview(buf)
        # runs of consecutive rows: one pread each
        cuts = np.flatnonzero(np.diff(wanted) != 1) + 1
        starts = np.r_[0, cuts].astype(np.int64) if len(wanted) else np.zeros(0, np.int64)
        ends = np.r_[cuts, len(wanted)].astype(np.int64) if len(wanted) else starts
        rb = self.row_bytes
        at = (wanted[starts] * rb).tolist()
        runs = list(zip((starts * rb).tolist(), (ends * rb).tolist(), at, strict=True))
        for lo, hi, offset in self._from_cache(view, runs):
            self._pread(view[lo:hi], offset)
        out = np.frombuffer(buf, DTYPE).reshape(len(wanted), self.dim)[back]
        return out.reshape(*shape, self.dim)

    def _from_cache(
        self, view: memoryview, runs: list[tuple[int, int, int]]
    ) -> list[tuple[int, int, int]]:
        """Read the runs (view's byte range, file offset) the page cache holds, without waiting
        for the disk, which starts reading the others meanwhile; return what is left to read
        (all of it where the system cannot say)."""
        if not NOWAIT:
            return runs
        left = []
        for i, (lo, hi, offset) in enumerate(runs):
            try:
                got = os.preadv(self._fd, [view[lo:hi]], offset, NOWAIT)
            except BlockingIOError:  # not cached: for the disk
                left.append((lo, hi, offset))
                continue
            except OSError:  # a file system that cannot tell: read them all as they come
                return left + runs[i:]
            if got < hi - lo:  # in part, or past the end of a file cut short: _pread says so
                left.append((lo + got, hi, offset + got))
        return left

    def _pread(self, part: memoryview, at: int) -> None:
        while len(part):  # pread may return less than asked
            got = os.preadv(self._fd, [part], at)
            if got <= 0:
                raise CbirError(f"{self.path} ends before its recorded rows; run `cbir embed`")
            part, at = part[got:], at + got

    def inner_products(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """Each query's inner product with each of its candidate rows (shape of `rows`, one row
        of candidates a query; -1 = none, scored -inf), or None where the candidates are too
        sparse in the file for anything but fetching them (`read`).

        An all-pairs search's batch wants a good part of the file: reading it in order, a
        segment at a time, and scoring the candidates each segment holds, replaces a pread a
        row (10^7 images, 110 candidates a query). Segments holding few candidates are still
        read a row at a time."""
        if rows.ndim != 2 or rows.shape[0] != len(queries):
            raise ValueError(f"need a row of candidates a query, got {rows.shape}")
        queries = np.ascontiguousarray(queries, np.float32)  # scored in place, segment by segment
        nc = rows.shape[1]
        flat = rows.reshape(-1)
        pos = np.flatnonzero(flat >= 0)
        pos = pos[np.argsort(flat[pos])]  # by row; any order among a row's pairs scores alike
        wanted = flat[pos].astype(np.int64)
        if len(wanted) and wanted[-1] >= self.n:
            raise IndexError(f"row out of range of the {self.n} rows of {self.path}")
        seg_rows = max(1, SEGMENT_BYTES // self.row_bytes)
        segment = wanted // seg_rows
        cuts = np.flatnonzero(np.diff(segment)) + 1
        starts = np.r_[0, cuts].astype(np.int64) if len(wanted) else np.zeros(0, np.int64)
        new_row = np.r_[True, wanted[1:] != wanted[:-1]] if len(wanted) else np.zeros(0, bool)
        distinct = np.add.reduceat(new_row, starts) if len(starts) else np.zeros(0, np.int64)
        whole = distinct * STREAM_EVERY >= seg_rows
        if not whole.any():
            return None
        out = np.full(flat.shape, -np.inf, np.float32)
        ends = np.r_[starts[1:], len(wanted)]
        buf = bytearray(seg_rows * self.row_bytes)
        block = np.frombuffer(buf, DTYPE).reshape(seg_rows, self.dim)
        for a, b, read_whole in zip(starts.tolist(), ends.tolist(), whole.tolist(), strict=True):
            # each distinct row read and converted once (a segment's first row is always new)
            distinct, at = wanted[a:b][new_row[a:b]], pos[a:b]
            if read_whole:
                lo = int(distinct[0]) // seg_rows * seg_rows
                hi = min(self.n, lo + seg_rows)
                self._pread(memoryview(buf)[: (hi - lo) * self.row_bytes], lo * self.row_bytes)
                got = block[distinct - lo]
            else:
                got = self.read(distinct)
            group = np.cumsum(new_row[a:b]) - 1
            out[at] = grouped_inner_products(to_float32(got), group, queries, at // nc)
        return out.reshape(rows.shape)


@functools.cache
def _fp16_decoder(dim: int) -> faiss.ScalarQuantizer:
    return faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)


def to_float32(rows: np.ndarray) -> np.ndarray:
    """float16 rows as float32, bit for bit what `astype` gives but about twice as fast (FAISS's
    vectorised conversion; numpy converts one value at a time): re-ranking converts a hundred
    rows per query."""
    rows = np.ascontiguousarray(rows, DTYPE)
    if not rows.size:
        return np.empty(rows.shape, np.float32)
    dim = rows.shape[-1]
    codes = rows.reshape(-1, dim).view(np.uint8)
    return _fp16_decoder(dim).decode(codes).reshape(rows.shape)


class Vectors:
    """Rows of a vector file (memory-mapped, or an array in memory) in a chosen order: indexing
    returns float32 copies, like indexing a float32 array, without ever loading the file."""

    def __init__(
        self,
        base: np.ndarray | RowReader,
        rows: np.ndarray,
        mapped: mmap.mmap | None = None,
        stamp: dict[str, Any] | None = None,
    ):
        self._base, self._rows, self._mapped = base, rows, mapped
        self._touched = 0
        #: what the rows were opened from (the kept VectorOrder's stamp: the manifest's and
        #: the vector file's rows), for `added_between`; None where opened otherwise
        self.stamp = stamp

    @property
    def shape(self) -> tuple[int, int]:
        dim = self._base.dim if isinstance(self._base, RowReader) else self._base.shape[1]
        return (len(self._rows), int(dim))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(self._base, RowReader):
            return to_float32(self._base.read(self._rows[key]))
        out = to_float32(self._base[self._rows[key]])
        self._touched += out.size * self._base.itemsize
        if self._touched > RELEASE_BYTES:
            self.release()
        return out

    def inner_products(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """Each query's inner product with its candidates (positions among these rows, -1 =
        none) where the file is read row by row and reading it in order costs less
        (RowReader.inner_products); None where fetching them does."""
        if not isinstance(self._base, RowReader) or not len(self._rows):
            return None
        file_rows = np.where(rows >= 0, self._rows[np.maximum(rows, 0)], -1)
        return self._base.inner_products(queries, file_rows)

    def read_ahead(self) -> bool:
        """A large file (read by pread) read into the page cache in the background for a search
        that will want most of it (RowReader.read_ahead); whether that started. A mapped file
        is small enough to stay cached."""
        return isinstance(self._base, RowReader) and self._base.read_ahead()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row in memory (small collections: evaluation, tests)."""
        return self[:] if dtype is None else self[:].astype(dtype, copy=False)

    def release(self) -> None:
        """Unmap the pages read so far (the page cache keeps them: a new read is cheap)."""
        self._touched = 0
        if self._mapped is not None:
            self._mapped.madvise(mmap.MADV_DONTNEED)

    def chunks(self, size: int = 65536) -> Any:
        """(start, float32 rows) in order, `size` rows at a time."""
        for start in range(0, len(self), size):
            yield start, self[start : start + size]


Signature = dict[str, int]  # shard name -> size


_SHARD_NAME = re.compile(fnmatch.translate(SHARD_GLOB))


def shard_sizes(folder: Path) -> Signature:
    """What the folder's shards are on disk, each one's size by name, sorted (a shard rewritten
    or damaged since no longer matches), from one listing of the folder: a night's opening at
    10^7 images lists 10^4 shards (pathlib's glob, then a stat each: 72 ms against 25 ms on a
    quiet machine, 0.17 s under cProfile on a busy one)."""
    sizes: Signature = {}
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if _SHARD_NAME.match(e.name) and e.is_file():
                    sizes[e.name] = e.stat().st_size
    except FileNotFoundError:  # as glob: no folder, no shards
        return {}
    return dict(sorted(sizes.items()))


def _footer(
    folder: Path, meta: pq.FileMetaData | None = None
) -> tuple[Path, int, Signature, int] | None:
    """(data file, dimension, the shards it holds, rows) as last committed, from the rows
    table's footer alone (`meta`: that of a file the caller opened); None where there is no
    whole commit."""
    try:
        meta = pq.read_metadata(folder / VECTOR_ROWS) if meta is None else meta
        kv = meta.metadata or {}
        data = folder / kv[b"data"].decode()
        dim = int(kv[b"dim"])
        shards = json.loads(kv[b"shards"])
        if not meta.schema.to_arrow_schema().equals(ROWS_SCHEMA):
            return None
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    n = meta.num_rows
    if not data.is_file() or not isinstance(shards, dict):
        return None
    if data.stat().st_size < n * dim * DTYPE.itemsize:
        return None
    return data, dim, shards, n


def _recorded(
    folder: Path, columns: list[str] | None = None
) -> tuple[pa.Table, Path, int, Signature] | None:
    """(rows table, data file, dimension, the shards it holds) as last committed, or None.
    `columns`: read only these of the rows table (a reader wants the ids alone, not 10^7 shard
    names: 0.3-0.4 s against 1.1 s at 10^7)."""
    footer = _footer(folder)
    if footer is None:
        return None
    data, dim, shards, n = footer
    try:
        table = pq.read_table(folder / VECTOR_ROWS, columns=columns)
    except (OSError, pa.ArrowException):
        return None
    if table.num_rows != n:  # replaced since its footer was read
        return None
    return table, data, dim, shards


def _shard_rows(shard: Path) -> tuple[list[str], np.ndarray]:
    t = read_shard(shard)
    return t.column("image_id").to_pylist(), shard_vectors(t).astype(DTYPE)


def _append(fh: Any, shards: list[Path], dim: int, progress: bool) -> tuple[list[str], list[str]]:
    """Write the shards' rows at fh's position; their (image ids, shard names)."""
    ids: list[str] = []
    names: list[str] = []
    bar = progress_bar(len(shards), "vector file", "shard", progress and len(shards) > 1)
    try:
        for shard in shards:
            shard_ids, vec = _shard_rows(shard)  # of dimension dim: check_dimensions saw to it
            fh.write(np.ascontiguousarray(vec).tobytes())
            ids += shard_ids
            names += [shard.name] * len(shard_ids)
            bar.update(1)
    finally:
        bar.close()
    return ids, names


def _commit(folder: Path, table: pa.Table, data: Path, dim: int, shards: Signature) -> None:
    faults.point("vectors.commit")  # the rows are written, not yet committed
    meta = {"data": data.name, "dim": str(dim), "shards": json.dumps(shards, sort_keys=True)}
    write_parquet(table.replace_schema_metadata(meta), folder / VECTOR_ROWS, APPENDED_ROW_GROUP)


def sync_vectors(folder: Path, *, progress: bool = False) -> int:
    """Bring the vector file of a fingerprint folder in step with its shards (the writer: `cbir
    embed`). Appends the shards it lacks, or rebuilds it when a recorded shard is gone; returns
    the rows written."""
    sig = shard_sizes(folder)
    shards = [folder / name for name in sig]
    if not shards:
        return 0
    dim = check_dimensions(folder, shards)
    rec = _recorded(folder)
    if rec is not None:
        table, data, recorded_dim, have = rec
        still = all(sig.get(name) == what for name, what in have.items())
        if still and recorded_dim == dim:  # every recorded shard is still there
            new = [s for s in shards if s.name not in have]
            if not new:
                return 0
            _drop_others(folder, data)  # a rebuild killed before its commit
            ids, shard_names = _write(
                data, "r+b", table.num_rows * dim * DTYPE.itemsize, new, dim, progress
            )
            added = pa.table({"image_id": ids, "shard": shard_names}, schema=ROWS_SCHEMA)
            table = pa.concat_tables([table.replace_schema_metadata(None), added])
            _commit(folder, table, data, dim, sig)
            return len(ids)
    # (re)build: a new generation, committed before the old one is removed
    data = folder / f"{VECTOR_DATA_PREFIX}{secrets.token_hex(4)}.f16"
    ids, shard_names = _write(data, "wb", 0, shards, dim, progress)
    table = pa.table({"image_id": ids, "shard": shard_names}, schema=ROWS_SCHEMA)
    _commit(folder, table, data, dim, sig)
    _drop_others(folder, data)
    return len(ids)


def _write(
    data: Path, mode: str, at: int, shards: list[Path], dim: int, progress: bool
) -> tuple[list[str], list[str]]:
    """Write the shards' rows into `data` from byte `at`, durably; their (ids, shard names)."""
    try:
        with open(data, mode) as fh:
            fh.seek(at)
            out = _append(fh, shards, dim, progress)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if is_disk_full(exc):  # the recorded rows are intact: one line, not a traceback
            raise disk_full(data) from exc
        raise
    return out


def _drop_others(folder: Path, keep: Path) -> None:
    for other in folder.glob(VECTOR_DATA_GLOB):
        if other != keep:
            other.unlink(missing_ok=True)


def _latest_rows(
    ids: pa.Array, only: pa.Array | None, keys: np.ndarray | None = None
) -> np.ndarray:
    """The rows of `ids` ordered by id, the last row of each id, only ids among `only`. cbir's
    hex ids are sorted and matched as integers (10^6: 0.7 s against 3.4 s for strings); `keys`:
    their hex_keys, where the caller has made them."""
    keys = hex_keys(ids) if keys is None else keys
    if keys is None:  # ids of another form: sorted as strings
        order = pc.sort_indices(
            pa.table({"id": ids, "pos": np.arange(len(ids), dtype=np.int64)}),
            sort_keys=[("id", "ascending"), ("pos", "descending")],
        )
        rows = np.asarray(order, np.int64)
        sorted_ids = pc.take(ids, order)
        keep = np.ones(len(rows), bool)
        if len(rows) > 1:
            keep[1:] = np.asarray(pc.not_equal(sorted_ids[1:], sorted_ids[:-1]), bool)
        rows = rows[keep]
    else:
        rows = latest(keys)
    if only is None or not len(rows):
        return rows
    among = hex_keys(only) if keys is not None else None
    if keys is None or among is None:
        return rows[ids_in(pc.take(ids, pa.array(rows)), only)]
    return rows[keys_in(keys[rows], among)]  # the keys made above, not made again


def _base(data: Path, n: int, dim: int) -> tuple[np.ndarray | RowReader, mmap.mmap | None]:
    """The first `n` rows of a vector file: mapped where it is small, else read by pread."""
    if n * dim * DTYPE.itemsize > MAP_MAX_BYTES:
        return RowReader(data, n, dim), None
    if not n:
        return np.zeros((0, dim), DTYPE), None
    with open(data, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), n * dim * DTYPE.itemsize, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, DTYPE).reshape(n, dim), mapped


def open_vectors(folder: Path, only: pa.Array | None = None) -> tuple[ImageIds, Vectors]:
    """The vectors of a fingerprint folder, memory-mapped: (image ids sorted, their rows). `only`
    (strings): keep these ids. An image held by two shards keeps its last row. Where the file is
    out of step with the shards, the rows are built in memory from the shards instead."""
    sizes = shard_sizes(folder)
    rec = _recorded(folder, ["image_id"])
    mapped = None
    base: np.ndarray | RowReader
    if rec is not None and rec[3] == sizes:
        table, data, dim, _ = rec
        ids = table.column("image_id")
        base, mapped = _base(data, table.num_rows, dim)
    else:
        shards = [folder / name for name in sizes]
        check_dimensions(folder, shards)  # a shard of another model's: named, not a traceback
        parts = [_shard_rows(s) for s in shards]
        ids = pa.array([i for p in parts for i in p[0]], pa.string())
        dim = parts[0][1].shape[1] if parts else 0
        base = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, dim), DTYPE)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    keys = hex_keys(ids)
    rows = _latest_rows(ids, only, keys)
    kept = ImageIds(pc.take(ids, pa.array(rows)), None if keys is None else keys[rows])
    return kept, Vectors(base, rows, mapped)


def current_embeddings(
    settings: Settings,
    fingerprint: str | None = None,
) -> tuple[str, ImageIds, Vectors, int]:
    """The current model's embeddings of the present canonical images, memory-mapped.

    Pass `fingerprint` when the caller has already built the model (it saves building it again).
    Returns (fingerprint, ids sorted, their vectors, number of present images without one).
    """
    if fingerprint is None:
        fingerprint = current_fingerprint(settings)  # remembered: no torch
    lay = layout(settings)
    folder = lay.embeddings(fingerprint)
    # within a flow run, the opening of the step before while the files are as they were
    key = (fingerprint, _inputs_stamp(lay.files, folder))
    kept = reuse.get("embeddings", key)
    if kept is not None:
        return kept
    ids, vectors, n_missing = open_present(settings, folder, fingerprint)
    if not len(ids):
        why = why_no_images(settings)
        raise CbirError(
            f"no images: {why}"
            if why
            else f"no embeddings for the current model {fingerprint}: run `cbir embed` first"
        )
    out = (fingerprint, ids, vectors, n_missing)
    reuse.put("embeddings", key, out)
    return out


def open_present(
    settings: Settings, folder: Path, fingerprint: str
) -> tuple[ImageIds, Vectors, int]:
    """The vectors of the present canonical images in `folder`: (ids sorted, their rows,
    number of present images without one). Through the kept VectorOrder where it applies."""
    opened = _open_ordered(settings, folder, fingerprint) if folder.is_dir() else None
    if opened is not None:
        return opened
    # ids not of cbir's form, a vector file out of step with its shards, no rows epoch
    present = canonical_ids(settings)
    if not folder.is_dir():
        nothing = np.zeros(0, np.int64)
        return ImageIds(pa.array([], pa.string())), Vectors(nothing, nothing), len(present)
    ids, vectors = open_vectors(folder, present)
    return ids, vectors, len(present) - len(ids)


_PRESENT_COLUMNS = ["image_id", "status", "is_canonical"]


def _open_ordered(
    settings: Settings, folder: Path, fingerprint: str
) -> tuple[ImageIds, Vectors, int] | None:
    """current_embeddings' opening through the kept VectorOrder (grown from the rows appended
    since, else matched whole and kept); None where it does not apply."""
    lay = layout(settings)
    try:  # each file opened once: its footer and its rows are of one commit
        manifest = pq.ParquetFile(lay.files)
        vector_rows = pq.ParquetFile(folder / VECTOR_ROWS)
    except (OSError, pa.ArrowException):
        return None
    footer = _footer(folder, vector_rows.metadata)
    if footer is None or footer[2] != shard_sizes(folder):
        return None
    data, dim, _, n = footer
    if schema_problem(manifest.schema_arrow, FILES_SCHEMA, _PRESENT_COLUMNS) is not None:
        return None  # the whole reading names the problem
    epoch = (manifest.metadata.metadata or {}).get(ROWS_EPOCH.encode())
    if not epoch:
        return None
    where = {
        "manifest": [epoch.decode(), manifest.metadata.num_rows],
        "vectors": [data.name, dim, n],
    }
    path = lay.vector_order(fingerprint)
    before = VectorOrder.load(path)
    try:
        order = grown = _grow_order(before, where, manifest, vector_rows)
        if order is None:
            order = _whole_order(where, manifest, vector_rows)
    except (OSError, pa.ArrowException):
        return None
    if order is None:
        return None
    if before is None or grown is None or _appended(before, order) >= ORDER_SAVE_ROWS:
        # a cache: a read-only workspace or a full disk goes without (a reader racing another
        # at its temporary file loses its write, never the other's)
        with contextlib.suppress(OSError, ReadOnly, DiskFull):
            for other in path.parent.glob("*"):
                if other != path:  # another model's, or the temporary file of a killed save
                    other.unlink(missing_ok=True)
            order.save(path)
    keys, rows = order.kept()
    base, mapped = _base(data, n, dim)
    vectors = Vectors(base, rows, mapped, order.stamp)
    return ImageIds.from_keys(keys), vectors, len(order.waiting)


#: Rows appended since the kept order was saved past which a grown order is saved again. Below
#: it the order kept is grown from those rows each time (at 10^7, saving its 160 MB cost
#: 0.3-0.7 s a night; growing from 65,536 rows instead of 1,000 costs a few hundredths).
ORDER_SAVE_ROWS = APPENDED_ROW_GROUP


def _appended(before: VectorOrder, order: VectorOrder) -> int:
    """Rows of the manifest and the vector file appended between two orders' stamps."""
    manifest = order.stamp["manifest"][1] - before.stamp["manifest"][1]
    vectors = order.stamp["vectors"][2] - before.stamp["vectors"][2]
    return int(max(manifest, vectors))


def _stamp(where: dict[str, list[Any]], manifest_last: str, vectors_last: str) -> dict[str, Any]:
    return {
        "manifest": [*where["manifest"], manifest_last],
        "vectors": [*where["vectors"], vectors_last],
    }


@dataclass
class _Appended:
    """What the manifest and the vector file appended past a stamp."""

    present: np.ndarray  # hex_keys of the new present canonical images (the manifest's rows)
    vector_keys: np.ndarray  # hex_keys of the vector file's new rows, in file order
    first_row: int  # the vector file's row of the first of them
    stamp: dict[str, Any]  # the stamp after them
    none: bool  # nothing appended


def _appended_since(
    stamp: dict[str, Any],
    where: dict[str, list[Any]],
    manifest: pq.ParquetFile,
    vector_rows: pq.ParquetFile,
) -> _Appended | None:
    """The rows the files (`where`: their rows epoch, generation and row counts now) appended
    after those `stamp` was made from; None where more than appending happened since (a row
    changed, another generation, other rows where its last ones were) or the ids are not
    cbir's. Reads only the row groups past the stamp's rows."""
    try:
        epoch, m_rows, m_last = stamp["manifest"]
        data, dim, v_rows, v_last = stamp["vectors"]
    except (KeyError, TypeError, ValueError):
        return None
    if [epoch, data, dim] != [where["manifest"][0], *where["vectors"][:2]]:
        return None
    if not (isinstance(m_rows, int) and isinstance(v_rows, int)):
        return None
    m_now, v_now = where["manifest"][1], where["vectors"][2]
    if not (0 < m_rows <= m_now and 0 < v_rows <= v_now):
        return None
    m_tail = rows_from(manifest, m_rows - 1, _PRESENT_COLUMNS)
    v_tail = rows_from(vector_rows, v_rows - 1, ["image_id"])
    m_ids, v_ids = m_tail.column("image_id"), v_tail.column("image_id")
    if m_ids[0].as_py() != m_last or v_ids[0].as_py() != v_last:
        return None  # other rows than those it was made from (another branch's files)
    m_tail = m_tail.slice(1)
    present = hex_keys(m_tail.column("image_id").filter(canonical_mask(m_tail)).combine_chunks())
    vector_keys = hex_keys(v_ids.slice(1).combine_chunks())
    if present is None or vector_keys is None:
        return None
    after = _stamp(where, m_ids[-1].as_py(), v_ids[-1].as_py())
    return _Appended(present, vector_keys, v_rows, after, (m_rows, v_rows) == (m_now, v_now))


def _grow_order(
    before: VectorOrder | None,
    where: dict[str, list[Any]],
    manifest: pq.ParquetFile,
    vector_rows: pq.ParquetFile,
) -> VectorOrder | None:
    """`before` grown by the rows appended since, where that is all that happened."""
    if before is None:
        return None
    got = _appended_since(before.stamp, where, manifest, vector_rows)
    if got is None:
        return None
    if got.none:
        return before  # nothing appended
    return before.grown(got.stamp, got.vector_keys, got.first_row, got.present)


def added_between(
    settings: Settings, fingerprint: str, before: Any, now: Any, ids: ImageIds
) -> np.ndarray | None:
    """The rows among `ids` (an opening's present images, sorted) of the images that may have
    become present with a vector between two openings of the current embeddings
    (`Vectors.stamp`: `before` recorded by an earlier step, `now` this one's): those of the
    manifest's and the vector file's rows appended between them. A night reads its own rows,
    not 10^7. None where more than appending happened between them, or either is unknown
    (then compare every image)."""
    keys = ids.hex_keys()
    if not isinstance(before, dict) or not isinstance(now, dict) or keys is None:
        return None
    lay = layout(settings)
    try:
        manifest = pq.ParquetFile(lay.files)
        vector_rows = pq.ParquetFile(lay.embeddings(fingerprint) / VECTOR_ROWS)
        where = {k: list(v[:-1]) for k, v in now.items()}
        if [manifest.metadata.num_rows, vector_rows.metadata.num_rows] != [
            where["manifest"][1],
            where["vectors"][2],
        ]:
            return None  # the files are no longer those `now` was made from
        got = _appended_since(before, where, manifest, vector_rows)
    except (OSError, pa.ArrowException, KeyError, TypeError, AttributeError):
        return None
    if got is None or got.stamp != now:  # the files are no longer those `now` was made from
        return None
    at = found_at(keys, np.union1d(got.present, got.vector_keys).astype(np.uint64))
    return at[at >= 0]


def _whole_order(
    where: dict[str, list[Any]], manifest: pq.ParquetFile, vector_rows: pq.ParquetFile
) -> VectorOrder | None:
    """Matched from every row; None where the ids are not all of cbir's form, or none."""
    files = manifest.read(columns=_PRESENT_COLUMNS)
    ids = vector_rows.read(columns=["image_id"]).column("image_id").combine_chunks()
    if not files.num_rows or not len(ids):
        return None
    vector_keys = hex_keys(ids)
    present = hex_keys(files.column("image_id").filter(canonical_mask(files)).combine_chunks())
    if vector_keys is None or present is None:
        return None
    stamp = _stamp(where, files.column("image_id")[-1].as_py(), ids[-1].as_py())
    return VectorOrder.whole(stamp, vector_keys, present)


def _inputs_stamp(manifest: Path, folder: Path) -> Stamp:
    """The files current_embeddings reads: the manifest, the vector rows and data, and the
    shards' folder itself rather than each shard (cbir writes a shard by renaming it into the
    folder, which changes the folder's time; 10^4 shards at 10^7 images took 0.2 s to stat,
    twice a night)."""
    files = [manifest, folder / VECTOR_ROWS, folder]
    if folder.is_dir():
        files += sorted(folder.glob(VECTOR_DATA_GLOB))
    return file_stamps(files)
