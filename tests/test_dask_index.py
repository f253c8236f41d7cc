"""cbir.steps.index_dask: `cbir index` with orchestration.dask_address trains the IVF-PQ index on
one Dask task and encodes its vectors on others (a LocalCluster of separate worker processes,
each reading the memory-mapped vector file), and builds or updates exactly the index one
process builds; a killed run's parts are never merged and its folder goes."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import benchmark, write_params
from tiny_workspace import TINY

import cbir
from cbir.config import Settings, load_settings
from cbir.errors import CbirError
from cbir.faiss_index import FLAT_MAX_N, build_index, choose_params, faiss_ids, ivf_part, search
from cbir.fsutil import write_parquet
from cbir.model import retrieval_model
from cbir.steps import index_dask
from cbir.steps.embed import EmbedPlan, write_model_card
from cbir.steps.index import run_index
from cbir.store.index import load_index
from cbir.store.layout import layout
from cbir.store.vectors import current_embeddings, sync_vectors

# A loaded 2-core machine starts worker processes slowly: generous limits, nothing timed.
TIMEOUTS = {"distributed.comm.timeouts.connect": "300s", "distributed.comm.timeouts.tcp": "300s"}
N = FLAT_MAX_N + 1500  # just IVF-PQ: the smallest collection choose_params trains
SHARD = 2000
PART = 3000  # rows a task here (PART_ROWS: 262,144): four parts, the last one shorter


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


def _clustered(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add_images(s: Settings, ids: list[str], x: np.ndarray, run: int) -> None:
    """What ingest run `run` and `cbir embed` leave for these new images (benchmarks/scale.py's
    way: the manifest's schema, embed's shards and vector file)."""
    scale = benchmark("scale")
    lay = layout(s)
    model, _, fp, source = retrieval_model(s)
    folder = lay.embeddings(fp)
    if not folder.is_dir():
        folder.mkdir(parents=True)
        write_model_card(s, EmbedPlan(fp, source, folder, [], 0), model)
    scale._write_shards(folder, ids, x, SHARD)
    sync_vectors(folder)
    had = pq.read_table(lay.files) if run > 1 else None
    rows = scale._manifest(ids, had.num_rows if had is not None else 0, run)
    lay.manifest_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.concat_tables([had, rows]) if had is not None else rows, lay.files)
    write_parquet(scale._runs(run), lay.runs)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Settings:
    """A workspace of N synthetic embeddings (the tiny untrained model's fingerprint and
    dimension), 8-byte PQ codes (fast to train), not yet indexed."""
    root = tmp_path_factory.mktemp("dask-index")
    (root / "scans").mkdir()
    params = {"data": {"scans_dir": "scans", "ground_truth": None},
              "embed": {**TINY["embed"], "shard_size": SHARD},
              "index": {"bytes_per_vector": 8}}
    s = load_settings(write_params(root, params))
    dim = current_dim(s)
    rng = np.random.default_rng(0)
    _add_images(s, benchmark("scale")._ids(rng, N), _clustered(rng, N, dim), 1)
    return s


def current_dim(s: Settings) -> int:
    return int(retrieval_model(s)[0].dim)


def _with_dask(s: Settings, address: str | None) -> Settings:
    params = yaml.safe_load(s.params_path.read_text())
    params.setdefault("orchestration", {})["dask_address"] = address
    return load_settings(write_params(s.root, params))


def _saved(s: Settings) -> tuple[bytes, dict]:
    """The saved index's bytes and its info (but the seconds it took)."""
    index, info = load_index(layout(s).index_dir)
    d = info.to_dict()
    d.pop("build_seconds")
    return faiss.serialize_index(index).tobytes(), d


def _answers(s: Settings) -> tuple[np.ndarray, np.ndarray]:
    index, info = load_index(layout(s).index_dir)
    _, _, vectors, _ = current_embeddings(s)
    queries = np.asarray(vectors[::97], np.float32)
    return search(index, info, queries, 10)  # the codes' own scores: no re-ranking to hide them


def test_an_index_built_on_dask_is_the_single_process_one(cluster, ws, monkeypatch):
    from distributed import get_task_stream

    c, client = cluster
    lay = layout(ws)
    assert set(client.run(lambda: cbir.__file__).values()) == {cbir.__file__}
    alone = _with_dask(ws, None)
    summary = run_index(alone, rebuild=True)
    assert summary.info.params.kind == "ivfpq" and summary.info.n_vectors == N
    want, want_answers = _saved(alone), _answers(alone)
    monkeypatch.setattr(index_dask, "PART_ROWS", PART)
    on_dask = _with_dask(ws, c.scheduler_address)
    with get_task_stream(client) as stream:
        got = run_index(on_dask, rebuild=True)
    assert got.rebuilt and got.info.n_vectors == N
    # the same quantiser, codebooks, codes in the same list order, nprobe, k_factor and recall
    assert _saved(on_dask) == want
    for a, b in zip(_answers(on_dask), want_answers, strict=True):
        np.testing.assert_array_equal(a, b)
    keys = [str(t["key"]) for t in stream.data]
    assert sum(k.startswith("index-train-") for k in keys) == 1
    assert sum(k.startswith("index-add-") for k in keys) == -(-N // PART)
    workers = {t["worker"] for t in stream.data if str(t["key"]).startswith("index-")}
    assert workers <= set(c.scheduler_info["workers"])
    assert not lay.index_parts.exists()


def test_the_merge_keeps_the_rows_order(cluster, ws):
    """dask_build_index itself, whatever the parts: build_index's index, byte for byte."""
    c, _ = cluster
    fp, _, vectors, _ = current_embeddings(ws)
    fids = faiss_ids(current_embeddings(ws)[1])
    # trained on a sample (at this N choose_params trains on every row): the one one process draws
    params = dataclasses.replace(choose_params(N, vectors.shape[1], bytes_per_vector=8),
                                 train_size=N // 2)
    one, info = build_index(vectors, fids, params, target_recall=0.9, seed=3)
    for part_rows in (N // 2 + 1, 1000):
        many, minfo = index_dask.dask_build_index(ws, fp, vectors, fids, params,
                                                  c.scheduler_address, target_recall=0.9,
                                                  seed=3, part_rows=part_rows)
        assert np.array_equal(faiss.serialize_index(many), faiss.serialize_index(one))
        assert (minfo.nprobe, minfo.k_factor, minfo.recall_at_k) == \
            (info.nprobe, info.k_factor, info.recall_at_k)


def test_a_killed_runs_parts_are_never_merged_and_go(cluster, ws):
    c, _ = cluster
    lay = layout(ws)
    fp, ids, vectors, _ = current_embeddings(ws)
    fids = faiss_ids(ids)
    params = choose_params(N, vectors.shape[1], bytes_per_vector=8)
    stale = lay.index_part("0123456789ab", 0)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not an index")  # merged, it would fail to read
    load_settings(ws.params_path)  # the folder is cbir's own: the workspace still loads
    index, info = index_dask.dask_build_index(ws, fp, vectors, fids, params, c.scheduler_address,
                                              target_recall=None, seed=0, part_rows=N // 2 + 1)
    assert index.ntotal == info.n_vectors == N
    assert not lay.index_parts.exists()
    # a failed task (a worker finding other embeddings) fails the run, and its folder goes
    with pytest.raises(CbirError, match="finds other embeddings"):
        index_dask.dask_build_index(ws, fp, vectors, fids[::-1].copy(), params,
                                    c.scheduler_address, target_recall=None, seed=0)
    assert not lay.index_parts.exists()


def test_all_pairs_of_an_ivf_index_on_dask_are_the_single_process_ones(cluster, ws, monkeypatch):
    """Every image probes the lists around the one it lies in (cbir.probes): Dask workers, each
    mapping the index and searching a part of the rows, find exactly what one process finds."""
    from cbir.probes import NearLists
    from cbir.steps.pairs import knn_pairs
    from cbir.steps.pairs_dask import dask_knn_pairs
    from cbir.store.index import open_searcher

    c, _ = cluster
    run_index(_with_dask(ws, None), rebuild=True)
    s = open_searcher(ws)
    assert s.info.params.kind == "ivfpq" and s.info.nprobe <= NearLists(ivf_part(s.index)).m
    probed = []
    real = NearLists.probes
    monkeypatch.setattr(NearLists, "probes", lambda self, q, own, n: probed.append(len(q))
                        or real(self, q, own, n))
    whole = knn_pairs(s, 5, -1.0, batch=4096)
    assert sum(probed) == N  # every image searched around its own list
    got = dask_knn_pairs(ws, 5, -1.0, None, c.scheduler_address, search=knn_pairs,
                         part_rows=PART)
    assert got == whole and len(whole) >= N
    some = np.arange(0, N, 7)  # an incremental run's rows
    assert dask_knn_pairs(ws, 5, -1.0, some, c.scheduler_address, search=knn_pairs,
                          part_rows=PART) == knn_pairs(s, 5, -1.0, rows=some)


def test_a_large_update_on_dask_is_the_single_process_one(cluster, ws, monkeypatch):
    """Last here: it adds images to the module's workspace."""
    from distributed import get_task_stream

    c, client = cluster
    lay = layout(ws)
    alone, on_dask = _with_dask(ws, None), _with_dask(ws, c.scheduler_address)
    run_index(alone, rebuild=True)
    before = {p.name: p.read_bytes() for p in lay.index_dir.iterdir() if p.is_file()}
    rng = np.random.default_rng(1)
    new = 2500
    _add_images(ws, benchmark("scale")._ids(rng, new, set(current_embeddings(ws)[1])),
                _clustered(rng, new, current_dim(ws)), 2)
    updated = run_index(alone)
    assert not updated.rebuilt and updated.added == new
    want = _saved(alone)
    for name, data in before.items():  # the index before the night, again
        (lay.index_dir / name).write_bytes(data)
    monkeypatch.setattr(index_dask, "DASK_ADD_MIN", new)  # 262,144: not on a test's scale
    monkeypatch.setattr(index_dask, "PART_ROWS", 1000)
    with get_task_stream(client) as stream:
        got = run_index(on_dask)
    assert not got.rebuilt and got.added == new
    adds = [t for t in stream.data if str(t["key"]).startswith("index-add-")]
    assert len(adds) == -(-new // 1000)
    assert _saved(on_dask) == want
    assert not lay.index_parts.exists()
    # below DASK_ADD_MIN the update stays in-process
    _add_images(ws, benchmark("scale")._ids(rng, 10, set(current_embeddings(ws)[1])),
                _clustered(rng, 10, current_dim(ws)), 3)
    with get_task_stream(client) as stream:
        assert run_index(on_dask).added == 10
    assert not [t for t in stream.data if str(t["key"]).startswith("index-")]
