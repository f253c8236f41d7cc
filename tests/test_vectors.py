"""cbir.store.vectors: the memory-mapped float16 vector file beside the embedding shards -
appended shard by shard, rebuilt when a shard goes, read back sorted, and never trusted past
its commit."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pyarrow as pa
import pytest

from cbir.errors import CbirError
from cbir.fsutil import write_parquet
from cbir.steps.embed import _subset_name, _vector_table
from cbir.store.embeddings import load_embeddings
from cbir.store.layout import VECTOR_DATA_GLOB, VECTOR_ROWS
from cbir.store.manifest import hex_keys, keys_in, sorted_runs
from cbir.store.vectors import (
    DTYPE,
    RowReader,
    Vectors,
    _latest_rows,
    open_vectors,
    shard_sizes,
    sync_vectors,
    to_float32,
)

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _shard(folder, ids: list[str], vectors: np.ndarray) -> str:
    name = _subset_name("shard-", ids)
    write_parquet(_vector_table(ids, vectors, None), folder / name)
    return name


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{x:016x}" for x in rng.integers(1, 1 << 62, size=n)]


def _same(folder, only=None) -> tuple[list[str], Vectors]:
    """open_vectors agrees with the shards as load_embeddings reads them (float16 apart)."""
    ids, vec = open_vectors(folder, None if only is None else pa.array(sorted(only)))
    want_ids, want = load_embeddings(folder, only)
    assert ids == want_ids
    got = vec[:]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3)
    return ids, vec


def test_sync_appends_new_shards_and_reads_back_sorted_and_filtered(tmp_path):
    rng = np.random.default_rng(0)
    a_ids, b_ids = _ids(rng, 7), _ids(rng, 5)
    _shard(tmp_path, a_ids, _unit(rng, 7))
    assert sync_vectors(tmp_path) == 7
    data = list(tmp_path.glob(VECTOR_DATA_GLOB))
    assert len(data) == 1 and data[0].stat().st_size == 7 * DIM * DTYPE.itemsize
    ids, _ = _same(tmp_path)
    assert ids == sorted(a_ids)
    assert sync_vectors(tmp_path) == 0  # nothing new: nothing written
    _shard(tmp_path, b_ids, _unit(rng, 5))
    assert sync_vectors(tmp_path) == 5
    assert list(tmp_path.glob(VECTOR_DATA_GLOB)) == data  # appended, not rebuilt
    assert data[0].stat().st_size == 12 * DIM * DTYPE.itemsize
    ids, _ = _same(tmp_path)
    assert ids == sorted(a_ids + b_ids)
    some = set(a_ids[:3] + b_ids[:2])
    assert _same(tmp_path, some)[0] == sorted(some)


def test_a_removed_shard_means_a_new_generation_and_the_old_file_goes(tmp_path):
    rng = np.random.default_rng(1)
    first = _shard(tmp_path, _ids(rng, 4), _unit(rng, 4))
    kept = _ids(rng, 3)
    _shard(tmp_path, kept, _unit(rng, 3))
    sync_vectors(tmp_path)
    old = list(tmp_path.glob(VECTOR_DATA_GLOB))
    (tmp_path / first).unlink()
    assert sync_vectors(tmp_path) == 3
    new = list(tmp_path.glob(VECTOR_DATA_GLOB))
    assert len(new) == 1 and new != old
    assert _same(tmp_path)[0] == sorted(kept)


def test_rows_past_the_commit_are_ignored_and_overwritten(tmp_path):
    """A kill while appending leaves bytes past the recorded rows: they are not read, and the
    next sync writes over them."""
    rng = np.random.default_rng(2)
    _shard(tmp_path, _ids(rng, 6), _unit(rng, 6))
    sync_vectors(tmp_path)
    data = next(tmp_path.glob(VECTOR_DATA_GLOB))
    with open(data, "ab") as fh:  # half a night's rows, never committed
        fh.write(b"\xff" * (3 * DIM * DTYPE.itemsize + 5))
    ids, vec = _same(tmp_path)
    assert len(ids) == 6 and np.isfinite(vec[:]).all()
    _shard(tmp_path, _ids(rng, 2), _unit(rng, 2))
    assert sync_vectors(tmp_path) == 2
    assert data.stat().st_size == 8 * DIM * DTYPE.itemsize  # the garbage is gone
    _same(tmp_path)


def test_shards_newer_than_the_file_are_read_in_memory(tmp_path):
    """An older workspace, or shards written without `cbir embed`: the reader builds the rows
    itself and never writes (the vector file is embed's output)."""
    rng = np.random.default_rng(3)
    _shard(tmp_path, _ids(rng, 5), _unit(rng, 5))
    ids, vec = _same(tmp_path)  # no file at all
    assert vec._mapped is None and not (tmp_path / VECTOR_ROWS).exists()
    sync_vectors(tmp_path)
    assert open_vectors(tmp_path)[1]._mapped is not None
    _shard(tmp_path, _ids(rng, 3), _unit(rng, 3))
    ids, vec = _same(tmp_path)
    assert len(ids) == 8 and vec._mapped is None


def test_an_image_in_two_shards_keeps_its_last_row(tmp_path):
    rng = np.random.default_rng(4)
    ids = _ids(rng, 3)
    v1, v2 = _unit(rng, 3), _unit(rng, 1)
    _shard(tmp_path, ids, v1)
    sync_vectors(tmp_path)
    _shard(tmp_path, [ids[1]], v2)
    sync_vectors(tmp_path)
    got_ids, vec = open_vectors(tmp_path)
    assert got_ids == sorted(ids)
    np.testing.assert_allclose(vec[got_ids.index(ids[1])], v2[0], atol=1e-3)


def _latest_rows_as_strings(ids: list[str], only: set[str] | None) -> list[int]:
    """What _latest_rows means, one Python row at a time: ids sorted, the last row of each."""
    last = {i: row for row, i in enumerate(ids)}
    return [last[i] for i in sorted(last) if only is None or i in only]


def test_hex_ids_are_sorted_and_matched_as_integers_exactly_as_strings():
    """The integer path (cbir's 16-hex ids) and the string path (other ids) agree with the
    plain definition: repeated ids, ids sharing prefixes, filters with absent ids."""
    rng = np.random.default_rng(7)
    for case in range(200):
        n = int(rng.integers(0, 60))
        pool = [f"{x:016x}" for x in rng.integers(0, 1 << 63, size=max(1, n // 2))]
        pool += ["0" * 15 + "1", "f" * 16, "0" * 16, "00000000000000a0"]
        ids = [pool[j] for j in rng.integers(0, len(pool), size=n)]
        only = None if case % 3 == 0 else set(rng.choice(pool + ["ffffffff00000000"], 5))
        arr = pa.array(ids, pa.string())
        only_arr = None if only is None else pa.array(sorted(only), pa.string())
        want = _latest_rows_as_strings(ids, only)
        assert hex_keys(arr) is not None
        assert _latest_rows(arr, only_arr).tolist() == want
        odd = [i.upper() if k % 2 else i for k, i in enumerate(ids)]  # not cbir's form
        assert hex_keys(pa.array(odd, pa.string())) is None or not any(
            i != i.lower() for i in odd
        )
        odd_only = None if only is None else {i.upper() for i in only} | only
        got = _latest_rows(pa.array(odd, pa.string()), None if odd_only is None
                           else pa.array(sorted(odd_only), pa.string()))
        assert got.tolist() == _latest_rows_as_strings(odd, odd_only)
    assert hex_keys(pa.array(["abc", "0123456789abcdeg"])) is None
    assert hex_keys(pa.array(["0123456789abcdeg"])) is None


@pytest.mark.parametrize("read", ["mapped", "pread"])
def test_rows_index_like_a_float32_array_and_read_again_after_release(tmp_path, monkeypatch, read):
    """Mapped (a file that fits MAP_MAX_BYTES) or read row by row (a larger one): the same rows
    for an int, a slice, repeated rows, a mask, rows of any shape, none, and the whole."""
    if read == "pread":
        monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    rng = np.random.default_rng(5)
    ids, v = _ids(rng, 20), _unit(rng, 20)
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    got_ids, vec = open_vectors(tmp_path)
    assert (vec._mapped is None) == (read == "pread")
    assert isinstance(vec._base, RowReader) == (read == "pread")
    want = v[np.argsort(ids)]
    assert vec.shape == (20, DIM) and len(vec) == 20 and vec.dtype == np.float32
    np.testing.assert_allclose(vec[3], want[3], atol=1e-3)
    np.testing.assert_allclose(vec[2:9:3], want[2:9:3], atol=1e-3)
    np.testing.assert_allclose(vec[np.array([5, 0, 5])], want[[5, 0, 5]], atol=1e-3)
    mask = np.arange(20) % 3 == 0
    np.testing.assert_allclose(vec[mask], want[mask], atol=1e-3)
    np.testing.assert_allclose(np.asarray(vec), want, atol=1e-3)
    assert [s for s, _ in vec.chunks(8)] == [0, 8, 16]
    grid = np.array([[19, 0, 4], [4, 4, 18]])  # the candidates of two queries
    np.testing.assert_allclose(vec[grid], want[grid], atol=1e-3)
    assert vec[np.zeros(0, np.int64)].shape == (0, DIM)
    vec.release()
    np.testing.assert_allclose(vec[:], want, atol=1e-3)
    np.testing.assert_array_equal(vec[:], open_vectors(tmp_path)[1][:])


def test_rows_of_a_large_file_are_read_not_mapped(tmp_path, monkeypatch):
    """Past MAP_MAX_BYTES the process maps nothing of the file, reads runs of consecutive rows
    in one call, refuses rows past the recorded ones and says so when the file is cut short."""
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    rng = np.random.default_rng(8)
    ids, v = _ids(rng, 30), _unit(rng, 30)
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    _, vec = open_vectors(tmp_path)
    reader = vec._base
    assert isinstance(reader, RowReader)
    calls: list[int] = []
    real = os.preadv
    monkeypatch.setattr("cbir.store.vectors.NOWAIT", 0)  # every read counted, cached or not
    monkeypatch.setattr("cbir.store.vectors.os.preadv",
                        lambda fd, bufs, at: calls.append(at) or real(fd, bufs, at))
    rows = reader.read(np.array([7, 3, 4, 5, 20, 4]))
    assert calls == [3 * reader.row_bytes, 7 * reader.row_bytes, 20 * reader.row_bytes]
    assert rows.shape == (6, DIM)
    with pytest.raises(IndexError):
        reader.read(np.array([30]))
    data = next(tmp_path.glob(VECTOR_DATA_GLOB))
    with open(data, "r+b") as fh:  # cut short behind the reader's back
        fh.truncate(10 * reader.row_bytes)
    with pytest.raises(CbirError, match="ends before its recorded rows"):
        reader.read(np.array([25]))


def test_rows_the_page_cache_holds_are_read_first_the_rest_after(tmp_path, monkeypatch):
    """With RWF_NOWAIT the runs the page cache holds are read at once, and only the others (not
    cached, or read in part) are read again, waiting for the disk; a file system that cannot
    tell gets every run read as before. The rows are the same every way, row 2's run read in
    part continues from row 3, and a file cut short still fails with its one line."""
    import errno

    import cbir.store.vectors as vectors

    rng = np.random.default_rng(10)
    ids, v = _ids(rng, 1000), _unit(rng, 1000)
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    _, vec = open_vectors(tmp_path)
    reader = vec._base
    assert isinstance(reader, RowReader)
    asked = np.r_[rng.integers(0, 1000, size=400), 2, 3]  # a run from row 2: read in part
    monkeypatch.setattr(vectors, "NOWAIT", 0)
    want = reader.read(asked)
    rb = reader.row_bytes
    real = os.preadv
    calls: list[tuple[int, bool]] = []

    def cold_odd_rows(fd, bufs, at, *flags):  # odd rows "not cached"; row 2's run only in part
        nowait = bool(flags and flags[0])
        calls.append((at // rb, nowait))
        if nowait and (at // rb) % 2:
            raise BlockingIOError(errno.EAGAIN, "would block")
        if nowait and at // rb == 2 and len(bufs[0]) > rb:
            return real(fd, [bufs[0][:rb]], at)
        return real(fd, bufs, at)

    monkeypatch.setattr(vectors, "NOWAIT", 8)
    monkeypatch.setattr("cbir.store.vectors.os.preadv", cold_odd_rows)
    np.testing.assert_array_equal(reader.read(asked), want)
    tried = {row for row, nowait in calls if nowait}
    later = [row for row, nowait in calls if not nowait]
    assert all(row % 2 for row in later)  # only what the cache lacked, row 3 the part left
    assert 3 in later and 2 in tried and 2 not in later
    assert len(later) == sum(1 for row in tried if row % 2) + 1
    calls.clear()

    def cannot_tell(fd, bufs, at, *flags):
        calls.append((at // rb, bool(flags and flags[0])))
        if flags and flags[0]:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real(fd, bufs, at)

    monkeypatch.setattr("cbir.store.vectors.os.preadv", cannot_tell)
    np.testing.assert_array_equal(reader.read(asked), want)
    assert sum(nowait for _, nowait in calls) == 1  # asked once, then every run read plainly
    monkeypatch.setattr("cbir.store.vectors.os.preadv", real)
    data = next(tmp_path.glob(VECTOR_DATA_GLOB))
    with open(data, "r+b") as fh:  # cut short behind the reader's back
        fh.truncate(500 * rb)
    with pytest.raises(CbirError, match="ends before its recorded rows"):
        reader.read(asked)


def test_float16_rows_convert_to_exactly_what_numpy_gives():
    """to_float32 (FAISS's conversion) is bit for bit astype(float32), for every float16 value
    (subnormals, signed zeros, infinities, NaNs), any shape, and rows that are not contiguous."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    for h in (every, every[5], every[::3, 1::2], every[:0], every[[7, 2, 7]][:, None]):
        got = to_float32(h)
        assert got.dtype == np.float32 and got.shape == h.shape
        np.testing.assert_array_equal(got.view(np.uint32), h.astype(np.float32).view(np.uint32))
    assert not np.array_equal(to_float32(every[1:]), every[:-1].astype(np.float32))


def test_reading_releases_pages_once_it_has_read_enough(tmp_path, monkeypatch):
    """The resident set stays bounded: after RELEASE_BYTES read, the pages are given back."""
    rng = np.random.default_rng(6)
    _shard(tmp_path, _ids(rng, 64), _unit(rng, 64))
    sync_vectors(tmp_path)
    _, vec = open_vectors(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr("cbir.store.vectors.RELEASE_BYTES", 10 * DIM * DTYPE.itemsize)
    real = mmap.mmap.madvise
    assert vec._mapped is not None
    monkeypatch.setattr(vec, "_mapped", _Spy(vec._mapped, calls, real))
    vec[:8]
    assert calls == []
    vec[:8]  # 16 rows read: past the 10-row budget
    assert calls == [mmap.MADV_DONTNEED]


class _Spy:
    def __init__(self, mapped, calls, real):
        self._mapped, self._calls, self._real = mapped, calls, real

    def madvise(self, option):
        self._calls.append(option)
        return self._real(self._mapped, option)


def test_a_dimension_that_differs_is_refused(tmp_path):
    rng = np.random.default_rng(7)
    _shard(tmp_path, _ids(rng, 2), _unit(rng, 2))
    _shard(tmp_path, _ids(rng, 2), _unit(rng, 2))
    sync_vectors(tmp_path)
    ids = _ids(rng, 2)
    write_parquet(_vector_table(ids, np.ones((2, DIM + 1), np.float32), None),
                  tmp_path / _subset_name("shard-", ids))
    for read in (sync_vectors, open_vectors):  # the writer, and a reader out of step
        with pytest.raises(CbirError, match="is damaged .*dimension 9.*run `cbir embed`"):
            read(tmp_path)


def test_candidates_of_a_large_file_are_scored_reading_it_in_order(tmp_path, monkeypatch):
    """Re-ranking a large file: where a segment holds one wanted row in STREAM_EVERY it is read
    whole, in order, and its candidates scored; sparser segments are read a row at a time;
    either way every query gets, bit for bit, the inner products that fetching its candidates
    and scoring them gives (-inf where it has none), and a batch too sparse for any segment is
    left to the fetching (None)."""
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    rng = np.random.default_rng(11)
    ids, v = sorted(_ids(rng, 400)), _unit(rng, 400)  # sorted: a row is its place in the file
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    _, vec = open_vectors(tmp_path)
    reader = vec._base
    assert isinstance(reader, RowReader)
    seg = 40  # rows a segment: 10 segments, dense where 3 or more distinct rows are wanted
    monkeypatch.setattr("cbir.store.vectors.SEGMENT_BYTES", seg * reader.row_bytes)
    monkeypatch.setattr("cbir.store.vectors.STREAM_EVERY", 16)
    queries = _unit(rng, 6)
    cand = np.full((6, 7), -1, np.int64)
    cand[:4, :5] = np.array([[3, 41, 85, 3, 50], [10, 60, 99, 119, 0],  # segments 0-2: dense
                             [44, 81, 17, 17, 70], [5, 45, 90, 115, 28]])
    cand[4, :3] = [399, 399, 250]  # one row twice, in sparse segments
    cand[5, :] = [0, 1, 2, 3, 4, 5, 360]  # a dense segment and a sparse one
    calls: list[int] = []
    real = os.preadv
    monkeypatch.setattr("cbir.store.vectors.NOWAIT", 0)  # every read counted, cached or not
    monkeypatch.setattr("cbir.store.vectors.os.preadv",
                        lambda fd, bufs, at: calls.append(at) or real(fd, bufs, at))
    got = vec.inner_products(queries, cand)
    assert got is not None and got.dtype == np.float32 and got.shape == cand.shape
    # the dense segments each in one read, in order; the sparse ones' rows one by one
    assert [a // reader.row_bytes for a in calls] == [0, 40, 80, 250, 360, 399]
    rows = vec[np.maximum(cand, 0)]
    want = np.where(cand >= 0, np.einsum("qd,qcd->qc", queries, rows), -np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.isinf(got), cand < 0)
    from cbir.faiss_index import _rerank_rows

    base = np.ascontiguousarray(vec[:])
    scores, top = _rerank_rows(queries, np.sort(cand, axis=1)[:, ::-1].copy(), base, 7)
    for q in range(6):  # the same scores as the fetching path's kernel, bit for bit
        mine = np.sort(got[q][np.isfinite(got[q])])[::-1]
        assert np.array_equal(mine, scores[q][np.isfinite(scores[q])])
    sparse = np.full((2, 3), -1, np.int64)
    sparse[0, 0], sparse[1, :2] = 7, [200, 330]
    assert vec.inner_products(queries[:2], sparse) is None
    with pytest.raises(IndexError):
        reader.inner_products(queries[:1], np.array([[400]]))
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 2 << 30)
    assert open_vectors(tmp_path)[1].inner_products(queries, cand) is None  # mapped: fetched


def test_all_pairs_of_a_large_file_equal_those_of_a_mapped_one(tmp_path, monkeypatch):
    """knn_pairs over a file read with pread, its batches scored a segment at a time, finds the
    pairs, scores and ranks that the mapped file gives."""
    from cbir.faiss_index import build_index, faiss_ids
    from cbir.steps.pairs import knn_pairs
    from cbir.store.index import Searcher

    rng = np.random.default_rng(12)
    ids, v = _ids(rng, 12_000), _unit(rng, 12_000)
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    sorted_ids, mapped = open_vectors(tmp_path)
    index, info = build_index(mapped, faiss_ids(sorted_ids))
    assert info.params.refine
    want = knn_pairs(Searcher.of(index, info, "fp", sorted_ids, mapped, {}), 5, 0.5)
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    monkeypatch.setattr("cbir.store.vectors.SEGMENT_BYTES", 256 * DIM * DTYPE.itemsize)
    _, read = open_vectors(tmp_path)
    assert isinstance(read._base, RowReader)
    scored: list[bool] = []
    real = RowReader.inner_products

    def spy(self: RowReader, q: np.ndarray, r: np.ndarray) -> np.ndarray | None:
        out = real(self, q, r)
        scored.append(out is not None)
        return out

    monkeypatch.setattr(RowReader, "inner_products", spy)
    got = knn_pairs(Searcher.of(index, info, "fp", sorted_ids, read, {}), 5, 0.5)
    assert scored and all(scored) and len(want) > 1000
    assert got == want
    assert read._base._ahead is not None  # the search of many batches read the file ahead
    read._base.wait_ahead()


def test_a_large_file_is_read_ahead_once_and_only_where_it_fits_in_memory(tmp_path, monkeypatch):
    """RowReader.read_ahead: a background read of the whole file, once a reader, only where the
    file takes at most READ_AHEAD_SHARE of the memory available (else its end would push its
    start out of the page cache); dropping the reader stops it. Reading is unchanged by it."""
    import cbir.store.vectors as vectors

    rng = np.random.default_rng(4)
    ids, v = _ids(rng, 3000), _unit(rng, 3000)
    _shard(tmp_path, ids, v)
    sync_vectors(tmp_path)
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 0)
    size = 3000 * DIM * DTYPE.itemsize
    sorted_ids, read = open_vectors(tmp_path)
    want = read[:]
    reader = read._base
    assert isinstance(reader, RowReader)
    monkeypatch.setattr(vectors, "available_memory", lambda: None)  # not Linux: no read ahead
    assert read.read_ahead() is False
    monkeypatch.setattr(vectors, "available_memory", lambda: int(size / 0.61))
    assert read.read_ahead() is False  # the file would take over 60 % of what is free
    monkeypatch.setattr(vectors, "available_memory", lambda: int(size / 0.6) + 1)
    assert read.read_ahead() is True
    assert read.read_ahead() is False  # once
    reader.wait_ahead()
    np.testing.assert_array_equal(read[:], want)
    stop = reader._stop
    assert not stop.is_set()
    del read, reader
    assert stop.is_set()  # a thread still reading would stop at its next segment
    assert vectors.available_memory() is None or vectors.available_memory() > 0
    # mapped files (up to MAP_MAX_BYTES) are small enough to stay cached: nothing to read ahead
    monkeypatch.setattr("cbir.store.vectors.MAP_MAX_BYTES", 2 << 30)
    assert open_vectors(tmp_path)[1].read_ahead() is False


def test_sorted_runs_sorts_any_keys_and_merges_a_few_sorted_runs():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 1 << 63, size=5000, dtype=np.uint64)
    runs = np.concatenate([np.sort(keys[:4000]), np.sort(keys[4000:4010]), np.sort(keys[4010:])])
    for given in (keys, runs, np.sort(keys), keys[:1], keys[:0], np.repeat(keys[:50], 3)):
        np.testing.assert_array_equal(sorted_runs(given.copy()), np.sort(given))
    among = np.concatenate([runs[::2], runs[1::2]])  # two runs: found as a sort would find them
    np.testing.assert_array_equal(keys_in(keys, among), np.isin(keys, among))
    np.testing.assert_array_equal(keys_in(keys[::-1], keys[:10]), np.isin(keys[::-1], keys[:10]))


def test_shard_sizes_lists_what_glob_and_stat_list(tmp_path):
    """One listing of the folder gives each shard's size, as pathlib's glob and a stat each did,
    in name order; other files, a folder named like a shard and no folder at all give none."""
    rng = np.random.default_rng(7)
    for n in (3, 5, 2):
        _shard(tmp_path, _ids(rng, n), _unit(rng, n))
    (tmp_path / "shard-x.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "regions-x.parquet").write_bytes(b"other")
    (tmp_path / "shard-dir.parquet").mkdir()
    got = shard_sizes(tmp_path)
    want = {p.name: p.stat().st_size
            for p in sorted(tmp_path.glob("shard-*.parquet")) if p.is_file()}
    assert len(got) == 3 and got == want
    assert list(got) == sorted(got)
    assert all(size > 0 for size in got.values())
    assert shard_sizes(tmp_path / "gone") == {}
