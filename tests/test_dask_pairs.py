"""cbir.steps.pairs_dask: `cbir pairs` with orchestration.dask_address searches as Dask tasks
on a LocalCluster of separate worker processes, each mapping the index from disk, and finds
exactly what one process finds; an index mapped from disk answers as the one read whole."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny_workspace
import yaml
from conftest import photo, save, write_params

import cbir
from cbir.config import Settings, load_settings
from cbir.errors import CbirError
from cbir.faiss_index import IndexParams, build_index, choose_params, search
from cbir.steps.pairs import knn_pairs, run_pairs
from cbir.steps.pairs_dask import PART_SCHEMA, dask_knn_pairs, split_rows
from cbir.store.index import load_index, open_searcher, save_index
from cbir.store.layout import layout

# A loaded 2-core machine starts worker processes slowly: generous limits, nothing timed.
TIMEOUTS = {"distributed.comm.timeouts.connect": "300s", "distributed.comm.timeouts.tcp": "300s"}
EXTRA_PHOTOS = 8  # besides the tiny workspace's: more rows, more parts, more pairs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import dask
    from distributed import Client, LocalCluster

    # the workers' scratch folder under the test's, not dask-scratch-space in the machine's /tmp
    scratch = str(tmp_path_factory.mktemp("dask"))
    with dask.config.set({**TIMEOUTS, "temporary-directory": scratch}), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            Client(c, timeout=300, set_as_default=False) as client:  # as in a flow: none
        yield c, client


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Settings:
    """The tiny workspace with more photos (and a near copy of each), ingested, embedded and
    indexed (flat: a few dozen vectors)."""
    root = tmp_path_factory.mktemp("dask-pairs")
    tiny_workspace.make(root, steps=())
    for i in range(EXTRA_PHOTOS):
        save(photo(100 + i), root / "scans" / "more" / f"m{i}.png")
        save(photo(100 + i).resize((72, 48)), root / "scans" / "more" / f"m{i}-small.png")
    return tiny_workspace.make(root)


def _with_dask(s: Settings, address: str | None) -> Settings:
    """The workspace's params with orchestration.dask_address set (None: unset)."""
    params = yaml.safe_load(s.params_path.read_text())
    params.setdefault("orchestration", {})["dask_address"] = address
    return load_settings(write_params(s.root, params))


def _outputs(s: Settings) -> tuple[list[dict], list[dict]]:
    lay = layout(s)
    return pq.read_table(lay.pairs).to_pylist(), pq.read_table(lay.clusters).to_pylist()


def test_pairs_on_a_dask_cluster_equal_the_single_process_run(cluster, ws):
    from distributed import get_task_stream

    c, client = cluster
    lay = layout(ws)
    # the workers import this cbir (PYTHONPATH reaches the spawned processes), not another copy
    assert set(client.run(lambda: cbir.__file__).values()) == {cbir.__file__}
    alone = _with_dask(ws, None)
    run_pairs(alone)
    pairs, clusters = _outputs(alone)
    assert sum(r["kind"] == "near" for r in pairs) >= 3  # something to compare
    for path in (lay.pairs, lay.clusters, lay.searched):
        path.unlink()
    on_dask = _with_dask(ws, c.scheduler_address)
    with get_task_stream(client) as stream:
        summary = run_pairs(on_dask)
    assert summary.searched == len(open_searcher(on_dask).image_ids)
    assert _outputs(on_dask) == (pairs, clusters)  # same rows, scores, ranks, clusters
    tasks = [t for t in stream.data if str(t["key"]).startswith("pairs-part-")]
    assert len(tasks) >= 2 and {t["worker"] for t in tasks} <= set(c.scheduler_info["workers"])
    assert not lay.pairs_parts.exists()


def test_dask_knn_pairs_is_knn_pairs_whatever_the_parts(cluster, ws):
    c, _ = cluster
    s = open_searcher(ws)
    n = len(s.image_ids)
    # every top-3 neighbour (threshold -1): most pairs are found from both of their images,
    # in different parts and at different ranks, so the merge decides the rank kept
    whole = knn_pairs(s, 3, -1.0)
    halves = [knn_pairs(s, 3, -1.0, rows=p) for p in split_rows(np.arange(n), n // 2 + 1)]
    assert len(halves) == 2
    assert any(key in halves[1] and v[1] != halves[1][key][1] for key, v in halves[0].items())
    # a killed run's parts, left behind: never merged
    stale = layout(ws).pairs_parts / "0123456789ab" / "part-00000.parquet"
    stale.parent.mkdir(parents=True)
    pq.write_table(PART_SCHEMA.empty_table(), stale)
    load_settings(ws.params_path)  # the folder is cbir's own: the workspace still loads
    assert dask_knn_pairs(ws, 3, -1.0, None, c.scheduler_address, search=knn_pairs,
                          part_rows=3) == whole
    assert not layout(ws).pairs_parts.exists()
    some = np.array([1, 4, n - 1])  # an incremental run's rows
    got = dask_knn_pairs(ws, 3, 0.5, some, c.scheduler_address, search=knn_pairs, searcher=s,
                         part_rows=1)
    assert got == knn_pairs(s, 3, 0.5, rows=some) != {}
    assert dask_knn_pairs(ws, 3, 0.5, np.array([], np.int64), c.scheduler_address,
                          search=knn_pairs) == {}
    assert not layout(ws).pairs_parts.exists()


def test_parts_cover_the_rows_in_order():
    rows = np.arange(7)
    assert [p.tolist() for p in split_rows(rows, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert len(split_rows(rows, 50_000)) == 2  # a tiny collection still goes through the merge
    assert [p.tolist() for p in split_rows(np.array([5]), 3)] == [[5]]
    assert split_rows(np.array([], np.int64)) == []


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _maps(path: Path) -> bool:
    """Whether this process maps the file (Linux)."""
    return os.path.realpath(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("kind", ["ivfpq", "flat"])
def test_a_mapped_index_answers_as_the_one_read_whole(tmp_path, kind):
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((300, 64)))
    n = 10_500  # just above FLAT_MAX_N: the smallest set choose_params makes IVF-PQ
    x = _unit(centres[rng.integers(0, 300, n)] + 0.08 * rng.standard_normal((n, 64)))
    queries = _unit(centres[rng.integers(0, 300, 200)] + 0.08 * rng.standard_normal((200, 64)))
    # IVF-PQ on a small set: short codes train fast (as tests/test_index.py does it)
    params = choose_params(n, 64, bytes_per_vector=8) if kind == "ivfpq" else \
        IndexParams(kind="flat")
    index, info = build_index(x, np.arange(n), params, target_recall=None, seed=0)
    assert info.params.kind == kind
    save_index(index, info, tmp_path)
    read, info_read = load_index(tmp_path)
    mapped, info_mapped = load_index(tmp_path, mmap=True)
    assert info_mapped == info_read
    ivf = faiss.try_extract_index_ivf(mapped)
    if kind == "ivfpq":  # FAISS serves the inverted lists from the file
        assert type(faiss.downcast_InvertedLists(ivf.invlists)).__name__ == "OnDiskInvertedLists"
        assert ivf.nprobe == info.nprobe
    if Path("/proc/self/maps").exists():
        assert _maps(tmp_path / "index.faiss")
    for vectors in (x, None):  # re-ranked exactly, and the codes' own scores
        s1, i1 = search(read, info_read, queries, 10, vectors=vectors)
        s2, i2 = search(mapped, info_mapped, queries, 10, vectors=vectors)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
    # the size is checked (not the checksum: the caller checked it)
    with open(tmp_path / "index.faiss", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CbirError, match="size differs"):
        load_index(tmp_path, mmap=True)


def test_no_scheduler_at_the_address_is_one_clear_error(ws):
    import socket

    import dask

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the connection is refused at once; distributed retries it until this limit
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}), \
            pytest.raises(CbirError, match="cannot reach the Dask scheduler at tcp://127"):
        dask_knn_pairs(ws, 3, 0.5, None, f"tcp://127.0.0.1:{port}", search=knn_pairs)
    assert not layout(ws).pairs_parts.exists()
