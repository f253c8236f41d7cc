"""cbir.faiss_index, cbir.store.index, cbir.steps.index: layout choice, recall against exact search, updates, persistence and its failures.

Recall is checked against a brute-force numpy top-k computed here, not against what build_index
reports. Data: clustered unit vectors (cluster centres + Gaussian noise, normalised).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.faiss_index import (FLAT_MAX_N, MAX_TRAIN, IndexInfo, IndexParams, add_vectors, build_index, choose_params, estimate_bytes_per_vector, recall_at_k, remove_ids, search)
from cbir.store.index import load_index, save_index

DIM = 64
N_BASE = 16_000  # the IVF-PQ fixture is built on these...
N_EXTRA = 4_000  # ...and these are added incrementally
N_CLUSTERS = 400
BPV = 16  # 16-byte codes: PQ codebook training stays ~1 s (the 64-byte default trains 64 of them)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Clusters:
    def __init__(self, dim: int, n_clusters: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = _normalise(self.rng.standard_normal((n_clusters, dim)))

    def sample(self, n: int, sigma: float = 0.6) -> np.ndarray:
        c = self.rng.integers(0, len(self.centres), n)
        noise = self.rng.standard_normal((n, self.dim)) * (sigma / math.sqrt(self.dim))
        return _normalise(self.centres[c] + noise)


def exact_topk(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids by inner product, in numpy (independent of FAISS)."""
    sims = queries @ base.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids[top]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    gen = Clusters(DIM, N_CLUSTERS, seed=1)
    x = gen.sample(N_BASE + N_EXTRA)
    return {"x": x, "ids": np.arange(len(x), dtype=np.int64), "queries": gen.sample(500)}


@pytest.fixture(scope="module")
def ivf(data) -> tuple[faiss.Index, IndexInfo]:
    x, ids = data["x"][:N_BASE], data["ids"][:N_BASE]
    params = choose_params(N_BASE, DIM, bytes_per_vector=BPV)
    index, info = build_index(x, ids, params, k=10, seed=0)
    info.model_fingerprint = "model-A"
    return index, info


def _copy(index: faiss.Index, info: IndexInfo) -> tuple[faiss.Index, IndexInfo]:
    return faiss.clone_index(index), IndexInfo.from_dict(info.to_dict())


def _centroids(index: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _pq_codebooks(index: faiss.Index) -> np.ndarray:
    ivfpq = faiss.downcast_index(faiss.extract_index_ivf(index))
    return faiss.vector_to_array(ivfpq.pq.centroids)


# --------------------------------------------------------------------------- parameter rules


@pytest.mark.parametrize("n", [FLAT_MAX_N, 20_000, 123_457, 1_000_000, 1 << 20, 30_000_000])
@pytest.mark.parametrize("dim", [64, 96, 100, 512])
def test_choose_params_rules(n: int, dim: int) -> None:
    p = choose_params(n, dim)
    assert p.kind == "ivfpq" and p.nbits == 8 and p.refine
    assert p.nlist & (p.nlist - 1) == 0, "nlist must be a power of two"
    assert p.nlist <= 4 * math.sqrt(n) < 2 * p.nlist, "nlist is 4*sqrt(n) rounded down"
    assert n / p.nlist >= 30, "at least 30 points per centroid in the collection"
    assert p.train_size <= n and 30 <= p.train_size / p.nlist <= 256
    assert p.train_size == min(n, 256 * p.nlist, MAX_TRAIN)  # the sample fits memory
    assert dim % p.m == 0 and p.m <= 64
    assert p.m == max(d for d in range(1, 65) if dim % d == 0), "largest divisor within budget"
    assert 1 <= p.nprobe <= p.nlist
    assert IndexParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_choose_params_specific_cases() -> None:
    p = choose_params(1_000_000, 512)
    assert (p.nlist, p.m, p.train_size) == (2048, 64, 256 * 2048)
    # The whole in-memory index fits 80 bytes/vector at the benchmark scale (codes 64 + id 8).
    assert estimate_bytes_per_vector(p, 1_000_000, 512) <= 80
    assert choose_params(200_000, 512, bytes_per_vector=32).m == 32
    assert choose_params(200_000, 100, bytes_per_vector=64).m == 50
    # Points-per-centroid bounds are honoured when they bind.
    p = choose_params(20_000, 64, min_points_per_centroid=100, max_points_per_centroid=120)
    assert 20_000 / p.nlist >= 100 and p.train_size <= 120 * p.nlist
    assert choose_params(20_000, 128, opq=True).opq is True
    assert choose_params(20_000, 128).opq is False
    assert choose_params(20_000, 64, opq=True).opq is False  # 1-D sub-spaces: nothing to rotate


@pytest.mark.parametrize("n", [0, 1, 500, FLAT_MAX_N - 1])
def test_small_collections_are_flat(n: int) -> None:
    p = choose_params(n, 128)
    assert p.kind == "flat" and not p.refine


def test_choose_params_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        choose_params(1000, 0)
    with pytest.raises(ValueError):
        choose_params(1000, 64, min_points_per_centroid=300, max_points_per_centroid=256)


# --------------------------------------------------------------------------- search quality


def test_ivfpq_recall_against_exact_search(data, ivf) -> None:
    index, info = ivf
    x, ids, q = data["x"][:N_BASE], data["ids"][:N_BASE], data["queries"]
    assert info.params.kind == "ivfpq" and info.n_vectors == N_BASE == index.ntotal
    assert info.recall_at_k >= 0.95 and 1 <= info.nprobe <= info.params.nlist
    truth = exact_topk(x, ids, q, 10)
    scores, found = search(index, info, q, 10, vectors=x)
    assert found.shape == (len(q), 10)
    assert recall_at_k(found, truth) >= 0.95
    # Re-ranked scores are the true inner products, in descending order.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[found]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Without re-ranking the PQ-only ranking is worse: the re-ranking is doing real work.
    _, approx = search(index, info, q, 10)
    assert recall_at_k(approx, truth) < recall_at_k(found, truth)


def test_ivfpq_callable_vector_source_matches_array(data, ivf) -> None:
    index, info = ivf
    x, q = data["x"][:N_BASE], data["queries"][:50]
    seen: list[np.ndarray] = []

    def lookup(wanted: np.ndarray) -> np.ndarray:
        seen.append(wanted)
        return x[wanted]

    s1, i1 = search(index, info, q, 10, vectors=x)
    s2, i2 = search(index, info, q, 10, vectors=lookup)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert len(seen) == 1 and np.all(np.diff(seen[0]) > 0), "one batched, sorted, unique fetch"


def test_callable_source_is_read_a_block_of_queries_at_a_time(data, ivf, monkeypatch) -> None:
    """A batch with more than RERANK_DISTINCT distinct candidates is re-ranked in blocks of
    queries, each fetching its own distinct candidates once: the same answers as one fetch."""
    import cbir.faiss_index as cbir_index

    index, info = ivf
    x, q = data["x"][:N_BASE], data["queries"][:100]
    seen: list[np.ndarray] = []

    def lookup(wanted: np.ndarray) -> np.ndarray:
        seen.append(wanted)
        return x[wanted]

    s1, i1 = search(index, info, q, 10, vectors=x)
    n_cand = 10 * info.k_factor
    monkeypatch.setattr(cbir_index, "RERANK_ROWS", 30 * n_cand)  # blocks of 30 queries...
    s2, i2 = search(index, info, q, 10, vectors=lookup)
    assert len(seen) == 1  # ...but few distinct candidates: the batch at once
    seen.clear()
    monkeypatch.setattr(cbir_index, "RERANK_DISTINCT", 0)
    s2, i2 = search(index, info, q, 10, vectors=lookup)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(s2, s1)
    assert len(seen) == 4 and all(np.all(np.diff(w) > 0) for w in seen)
    assert all(len(w) <= 30 * n_cand for w in seen)

    def wrong(wanted: np.ndarray) -> np.ndarray:  # a block's rows in another block's order
        return x[wanted[::-1]] if len(seen) > 4 else lookup(wanted)

    _, i3 = search(index, info, q, 10, vectors=wrong)
    assert not np.array_equal(i3, i1)  # the comparison above can fail


class _Scoring:
    """A vector source that scores candidates itself (faiss_index.Scorer), as a large vector
    file does, with the kernel the fetching path uses; or declines (None) when `declines`."""

    def __init__(self, x: np.ndarray, declines: bool = False) -> None:
        self.x, self.declines, self.fetched, self.scored = x, declines, 0, 0

    def __call__(self, wanted: np.ndarray) -> np.ndarray:
        self.fetched += 1
        return self.x[wanted]

    def inner_products(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        from cbir.scoring import paired_inner_products

        if self.declines:
            return None
        self.scored += 1
        which = np.repeat(np.arange(len(q)), ids.shape[1])
        s = paired_inner_products(self.x[np.maximum(ids, 0)].reshape(len(which), -1), q, which)
        return np.where(ids >= 0, s.reshape(ids.shape), -np.inf)


def test_a_source_that_scores_its_candidates_gives_what_fetching_gives(data, ivf) -> None:
    """Re-ranking with scores from the source (store.vectors reading a large file in order):
    the same neighbours and, bit for bit, the same scores as fetching the candidates; a source
    that declines is fetched from."""
    index, info = ivf
    x, q = data["x"][:N_BASE], data["queries"][:100]
    s1, i1 = search(index, info, q, 10, vectors=x)
    scoring = _Scoring(x)
    s2, i2 = search(index, info, q, 10, vectors=scoring)
    assert (scoring.scored, scoring.fetched) == (1, 0)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(s2, s1)
    declining = _Scoring(x, declines=True)
    s3, i3 = search(index, info, q, 10, vectors=declining)
    assert declining.fetched >= 1
    np.testing.assert_array_equal(i3, i1)
    few = np.full((2, 4), -1, np.int64)  # fewer candidates than k: -inf and -1 past them
    few[0, :2], few[1, 0] = [3, 9], 5
    from cbir.faiss_index import _rerank

    s4, i4 = _rerank(q[:2], few, _Scoring(x), 3, x.shape[1])
    assert i4.tolist()[1] == [5, -1, -1] and np.isneginf(s4[1, 1:]).all()
    assert sorted(i4.tolist()[0][:2]) == [3, 9] and i4[0, 2] == -1 and s4[0, 0] >= s4[0, 1]


def test_numpy_rerank_fallback_matches_faiss_kernel(data, ivf) -> None:
    """Arrays FAISS cannot score in place (not float32) are scored by numpy: same neighbours."""
    index, info = ivf
    x, q = data["x"][:N_BASE], data["queries"][:100]
    s1, i1 = search(index, info, q, 10, vectors=x)
    s2, i2 = search(index, info, q, 10, vectors=x.astype(np.float64))
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(s2, s1, atol=1e-5)


@pytest.mark.parametrize("width", [16, 2])
def test_rows_wanted_by_several_queries_score_as_each_pair_alone(width, monkeypatch) -> None:
    """grouped_inner_products (a row converted once for all the queries that want it, some
    wanting it twice) gives bit for bit what scoring each pair on its own copy gives; also for
    a row wanted by more queries than it scores in place (GROUP_WIDTH)."""
    from cbir.scoring import grouped_inner_products, paired_inner_products

    monkeypatch.setattr("cbir.scoring.GROUP_WIDTH", width)

    rng = np.random.default_rng(3)
    rows, queries = rng.standard_normal((5, 24)), rng.standard_normal((4, 24))
    rows, queries = rows.astype(np.float32), queries.astype(np.float32)
    group = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])  # row 4 three queries, one twice
    which = np.array([2, 0, 3, 1, 1, 0, 3, 0, 2, 2, 1])
    got = grouped_inner_products(rows, group, queries, which)
    alone = paired_inner_products(rows[group], queries, which)
    assert got.dtype == np.float32 and np.array_equal(got, alone)
    assert np.allclose(got, np.einsum("id,id->i", rows[group], queries[which]), atol=1e-5)
    assert grouped_inner_products(rows, np.zeros(0, np.int64), queries, np.zeros(0)).size == 0


def test_equal_scores_are_kept_by_id_whichever_way_they_are_scored() -> None:
    """Four copies of one vector straddle the k-th place: the larger ids are kept, larger first,
    in whatever order the candidates come and whether they are fetched, scored from an array,
    or scored by the source itself (a large vector file read in order)."""
    from cbir.faiss_index import _rerank

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    x[[5, 6, 7]] = x[2]
    q = rng.standard_normal((1, 16)).astype(np.float32)
    order = np.argsort(-(x @ q[0]))
    tied = {2, 5, 6, 7}
    k = min(i for i, r in enumerate(order) if r in tied) + 2  # two of the four fit
    expected = [r for r in order if r not in tied][: k - 2] + [7, 6]
    for seed in range(6):
        cand = np.random.default_rng(seed).permutation(8)[None].astype(np.int64)
        for vectors in (x, x.astype(np.float64), lambda wanted: x[wanted], _Scoring(x)):
            s, i = _rerank(q, cand, vectors, k, 16)
            assert sorted(i[0][:-2].tolist()) == sorted(expected[:-2]), (seed, vectors)
            assert i[0][-2:].tolist() == [7, 6], (seed, vectors)
            assert s[0, -2] == s[0, -1]


def test_flat_index_is_exact_with_arbitrary_ids() -> None:
    gen = Clusters(48, 30, seed=2)
    x, q = gen.sample(3000), gen.sample(40)
    ids = np.random.default_rng(3).choice(10**12, size=len(x), replace=False).astype(np.int64)
    index, info = build_index(x, ids)
    assert info.params.kind == "flat" and info.recall_at_k == 1.0
    scores, found = search(index, info, q, 10)
    np.testing.assert_array_equal(found, exact_topk(x, ids, q, 10))
    # k larger than the collection is clamped to it.
    small, small_info = build_index(x[:5], ids[:5])
    _, found = search(small, small_info, q, 10)
    assert found.shape == (len(q), 5) and set(found[0]) == set(ids[:5])


def test_deterministic_under_seed() -> None:
    gen = Clusters(32, 100, seed=4)
    x = gen.sample(FLAT_MAX_N + 16)
    ids = np.arange(len(x))
    params = choose_params(len(x), 32, bytes_per_vector=8)
    a, ia = build_index(x, ids, params, seed=7)
    b, ib = build_index(x, ids, params, seed=7)
    assert (ia.nprobe, ia.k_factor, ia.recall_at_k) == (ib.nprobe, ib.k_factor, ib.recall_at_k)
    np.testing.assert_array_equal(faiss.serialize_index(a), faiss.serialize_index(b))


def test_opq_variant_builds_searches_and_persists(tmp_path: Path) -> None:
    gen = Clusters(32, 100, seed=5)
    x, q = gen.sample(FLAT_MAX_N + 16), gen.sample(100)
    ids = np.arange(len(x))
    params = choose_params(len(x), 32, bytes_per_vector=8, opq=True)
    assert params.opq
    index, info = build_index(x, ids, params)
    assert isinstance(index, faiss.IndexPreTransform)
    _, found = search(index, info, q, 10, vectors=x)
    assert recall_at_k(found, exact_topk(x, ids, q, 10)) >= 0.95
    assert remove_ids(index, info, ids[:10]) == 10 and index.ntotal == len(x) - 10
    save_index(index, info, tmp_path)
    index2, _ = load_index(tmp_path)
    np.testing.assert_array_equal(search(index2, info, q, 10, vectors=x)[1],
                                  search(index, info, q, 10, vectors=x)[1])


# --------------------------------------------------------------------------- updates


def test_incremental_add_keeps_quantiser_and_finds_new_ids(data, ivf) -> None:
    index, info = _copy(*ivf)
    before = _centroids(index)
    pq_before = _pq_codebooks(index)
    new_x, new_ids = data["x"][N_BASE:], data["ids"][N_BASE:]
    assert add_vectors(index, info, new_x, new_ids)
    assert index.ntotal == info.n_vectors == N_BASE + N_EXTRA
    np.testing.assert_array_equal(_centroids(index), before)
    np.testing.assert_array_equal(_pq_codebooks(index), pq_before)
    # Each added vector finds itself first; recall over the grown collection still holds.
    _, found = search(index, info, new_x[:300], 1, vectors=data["x"])
    assert np.mean(found[:, 0] == new_ids[:300]) >= 0.99
    _, found = search(index, info, data["queries"], 10, vectors=data["x"])
    assert recall_at_k(found, exact_topk(data["x"], data["ids"], data["queries"], 10)) >= 0.95


def test_add_refused_above_rebuild_factor(data, ivf) -> None:
    index, info = _copy(*ivf)
    assert info.trained_size == N_BASE
    # 16000 + 4000 > 1.2 * 16000: refused, nothing added.
    new_x, new_ids = data["x"][N_BASE:], data["ids"][N_BASE:]
    assert not add_vectors(index, info, new_x, new_ids, rebuild_factor=1.2)
    assert index.ntotal == info.n_vectors == N_BASE
    assert add_vectors(index, info, new_x, new_ids, rebuild_factor=1.25)


def test_flat_always_accepts_adds() -> None:
    gen = Clusters(16, 10, seed=6)
    x = gen.sample(200)
    index, info = build_index(x[:50], np.arange(50))
    assert add_vectors(index, info, x[50:], np.arange(50, 200), rebuild_factor=1.0)
    assert index.ntotal == info.n_vectors == 200


def test_remove_and_replace(data, ivf) -> None:
    index, info = _copy(*ivf)
    x = data["x"][:N_BASE].copy()
    victims = np.array([3, 77, 1234], dtype=np.int64)
    assert remove_ids(index, info, np.r_[victims, 10**9]) == 3  # absent id ignored
    assert index.ntotal == info.n_vectors == N_BASE - 3
    _, found = search(index, info, x[victims], 10, vectors=x)
    assert not np.isin(found, victims).any()
    # Re-embedded image: same id, new vector.
    x[77] = Clusters(DIM, 1, seed=9).sample(1)[0]
    assert add_vectors(index, info, x[77:78], victims[1:2])
    _, found = search(index, info, x[77:78], 1, vectors=x)
    assert found[0, 0] == 77


def test_input_validation(data, ivf) -> None:
    index, info = ivf
    with pytest.raises(CbirError, match="dimension"):
        search(index, info, np.ones((1, DIM + 1), np.float32), 5)
    with pytest.raises(CbirError, match="normalised"):
        build_index(np.ones((100, 8), np.float32), np.arange(100))
    with pytest.raises(ValueError, match="unique"):
        build_index(data["x"][:100], np.zeros(100, np.int64))
    with pytest.raises(CbirError, match="out of sync"):
        search(index, info, data["queries"][:5], 10, vectors=data["x"][:100])


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path: Path, data, ivf) -> None:
    index, info = ivf
    save_index(index, info, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "index.json"]
    side = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert side["format_version"] == 1 and side["n_vectors"] == N_BASE
    assert side["model_fingerprint"] == "model-A" and side["nprobe"] == info.nprobe
    index2, info2 = load_index(tmp_path / "idx", expected_fingerprint="model-A")
    assert info2 == info
    x, q = data["x"], data["queries"]
    for vectors in (x, None):
        s1, i1 = search(index, info, q, 10, vectors=vectors)
        s2, i2 = search(index2, info2, q, 10, vectors=vectors)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
    # The size estimate matches the real serialised size closely.
    size = (tmp_path / "idx" / "index.faiss").stat().st_size
    expected = estimate_bytes_per_vector(info.params, N_BASE, DIM)
    assert size / N_BASE == pytest.approx(expected, rel=0.05)


def test_truncated_index_file(tmp_path: Path, ivf) -> None:
    index, info = ivf
    save_index(index, info, tmp_path)
    f = tmp_path / "index.faiss"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CbirError, match="damaged; rebuild with `cbir index`"):
        load_index(tmp_path)
    # Even when the sidecar agrees with the truncated file, FAISS' own error becomes a CbirError.
    side = json.loads((tmp_path / "index.json").read_text())
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    side["index_file"].update(bytes=f.stat().st_size, sha256=digest)
    (tmp_path / "index.json").write_text(json.dumps(side))
    with pytest.raises(CbirError, match="damaged"):
        load_index(tmp_path)


def test_fingerprint_mismatch(tmp_path: Path, ivf) -> None:
    save_index(*ivf, tmp_path)
    expected = "model model-A but the current embeddings are from model B"
    with pytest.raises(CbirError, match=expected):
        load_index(tmp_path, expected_fingerprint="B")
    load_index(tmp_path)  # no expectation: no check


def test_missing_and_inconsistent_files(tmp_path: Path, ivf) -> None:
    with pytest.raises(CbirError, match="no index"):
        load_index(tmp_path / "nowhere")
    save_index(*ivf, tmp_path)
    side_path = tmp_path / "index.json"
    side = json.loads(side_path.read_text())
    side["n_vectors"] += 1
    side_path.write_text(json.dumps(side))
    with pytest.raises(CbirError, match="vectors"):
        load_index(tmp_path)
    side_path.write_text("{not json")
    with pytest.raises(CbirError, match="unreadable"):
        load_index(tmp_path)
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(CbirError, match="index.faiss missing"):
        load_index(tmp_path)


def test_recall_helper() -> None:
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[3, 2, 1], [4, -1, 9]]), truth) == pytest.approx(4 / 6)


def test_index_update_changes_equal_numpy_set_operations():
    """steps.index._changes (binary search in sorted copies) finds what np.setdiff1d and np.isin
    find: the ids to remove and the vectors to add, for random overlaps, empty sides included,
    the current ids in any order or as a few sorted runs (as they come: sorted as hex, the top
    bit dropped); and _after the index's ids sorted after the update."""
    from cbir.steps.index import _after, _changes

    rng = np.random.default_rng(0)
    for trial in range(600):
        u = rng.choice(10**6, 300, replace=False).astype(np.int64) - 500_000
        have = np.sort(u[: rng.integers(0, 300)])  # the index's, sorted (store.index.sorted_ids)
        fids = rng.permutation(u[rng.integers(0, 300):][: rng.integers(0, 300)])
        if trial % 2:  # a few sorted runs, searched run by run
            cuts = np.sort(rng.integers(0, len(fids) + 1, rng.integers(0, 4)))
            fids = np.concatenate([np.sort(r) for r in np.split(fids, cuts)])
        gone, new = _changes(have, fids)
        np.testing.assert_array_equal(gone, np.setdiff1d(have, fids))
        np.testing.assert_array_equal(new, ~np.isin(fids, have))
        after = _after(have, gone, fids[new])
        np.testing.assert_array_equal(after, np.sort(fids))


def test_an_index_streamed_to_disk_is_the_serialised_index_and_a_full_disk_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_index streams FAISS's bytes through Python (hashed on the way, no copy in memory):
    the file is serialize_index's bytes, and a write failing for lack of space says so in one
    line (its errno kept) and leaves the saved index as it was."""
    import errno
    import os

    gen = Clusters(32, 40, seed=9)
    x = gen.sample(3000)
    ids = np.arange(len(x), dtype=np.int64)
    index, info = build_index(x, ids, seed=0)
    save_index(index, info, tmp_path)
    saved = (tmp_path / "index.faiss").read_bytes()
    assert saved == faiss.serialize_index(index).tobytes()
    side = json.loads((tmp_path / "index.json").read_text())["index_file"]
    assert side["sha256"] == hashlib.sha256(saved).hexdigest() and side["bytes"] == len(saved)

    bigger, bigger_info = build_index(np.concatenate([x, gen.sample(500)]), np.arange(3500))
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("cbir.store.index.open", lambda p, m="r": FullDisk(real_open(p, m)),
                        raising=False)
    with pytest.raises(CbirError, match="no space left on the device"):
        save_index(bigger, bigger_info, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "index.faiss").read_bytes() == saved
    assert load_index(tmp_path)[0].ntotal == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.json"]


def test_the_index_benchmark_sweeps_a_fast_scan_index_beside_cbirs(capsys, tmp_path):
    """benchmarks/index.py --fast-scan: both indexes at every nprobe and k_factor of the sweep,
    their time ratio measured in the same run, re-ranked recall rising with nprobe."""
    from conftest import benchmark

    benchmark("index").main(["--n", "12000", "--dim", "64", "--bytes-per-vector", "16",
                             "--clusters", "300", "--queries", "200", "--repeat", "1",
                             "--fast-scan", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fast-scan 4-bit IVF-PQ (32 x 4 bits) built" in out
    rows = re.findall(r"  (ivfpq 8-bit|fast-scan 4-bit) +nprobe=(\d+) +k_factor=(\d+) +"
                      r"recall=([\d.]+) [\d.]+ ms(?:  ratio ([\d.]+))?", out)
    assert len(rows) == 2 * 5 * 3, out
    assert all((kind == "fast-scan 4-bit") == bool(ratio) for kind, *_, ratio in rows)
    most = max(int(kf) for _, _, kf, _, _ in rows)
    for kind in ("ivfpq 8-bit", "fast-scan 4-bit"):
        recall = {int(p): float(r) for k, p, kf, r, _ in rows if k == kind and int(kf) == most}
        assert recall[16] >= recall[1] and recall[16] >= 0.9, (kind, recall)


def test_tuning_trades_candidates_for_probed_lists_while_the_target_holds(data, ivf) -> None:
    """Once the target is reached, k_factor halves and nprobe doubles while it still holds
    (fewer vectors read and re-scored); never below MIN_K_FACTOR, never past the target."""
    import dataclasses

    from cbir.faiss_index import DEFAULT_K_FACTOR, MIN_K_FACTOR, _tune

    index, info = ivf
    x, ids = data["x"][:N_BASE], data["ids"][:N_BASE]

    def tuned(target: float) -> IndexInfo:
        trial = dataclasses.replace(info, nprobe=1, k_factor=DEFAULT_K_FACTOR)
        _tune(index, trial, x, ids, np.random.default_rng(0), target, 10)
        return trial

    easy = tuned(0.3)  # nprobe 1 with 10 candidates a neighbour reaches it, and so do fewer
    assert (easy.nprobe, easy.k_factor) == (4, MIN_K_FACTOR) and easy.recall_at_k >= 0.3
    unreachable = tuned(1.01)  # the best found is kept; nothing traded away
    assert unreachable.recall_at_k < 1.01 and unreachable.k_factor >= DEFAULT_K_FACTOR
    assert info.recall_at_k >= 0.95 and info.k_factor >= MIN_K_FACTOR  # the fixture's own tuning


def test_many_faiss_ids_map_to_rows_as_few_do(monkeypatch) -> None:
    """Searcher.rows_of sorts a large batch of ids before its binary searches (a batch's
    candidates at 10^7): the same rows, in the ids' shape, -1 for ids it does not hold."""
    import cbir.store.index as store_index
    from cbir.faiss_index import faiss_ids
    from cbir.store.index import Searcher

    rng = np.random.default_rng(4)
    image_ids = sorted(f"{v:016x}" for v in rng.choice(2**62, 3000, replace=False))
    searcher = Searcher.of(None, None, "fp", image_ids, np.zeros((3000, 4), np.float32), {})
    fids = faiss_ids(image_ids)
    asked = np.where(rng.random((200, 50)) < 0.9, fids[rng.integers(0, 3000, (200, 50))],
                     rng.integers(0, 2**62, (200, 50)))  # a tenth held by no image
    asked[0, :3] = -1
    monkeypatch.setattr(store_index, "SORT_LOOKUPS", 1 << 30)
    one_by_one = searcher.rows_of(asked)
    monkeypatch.setattr(store_index, "SORT_LOOKUPS", 100)
    sorted_first = searcher.rows_of(asked)
    np.testing.assert_array_equal(sorted_first, one_by_one)
    held = np.isin(asked, fids)
    assert sorted_first.shape == (200, 50) and (sorted_first[~held] == -1).all()
    assert (fids[sorted_first[held]] == asked[held]).all() and held.mean() > 0.8


def test_few_faiss_ids_are_looked_up_among_the_keys_as_many_are_among_the_ids(monkeypatch):
    """Searcher.rows_of looks a few ids (a night's candidates) up among the images' sorted keys,
    so that opening the searcher sorts no FAISS ids (0.8-1.4 s at 10^7), and many among the
    FAISS ids sorted once: the same rows, ids with the top bit set and clear alike, a pair of
    images whose ids share their low 63 bits giving the clear one's row either way, -1 for an
    id held by none and for -1."""
    import cbir.store.index as store_index
    from cbir.faiss_index import faiss_ids
    from cbir.store.index import Searcher
    from cbir.store.manifest import ImageIds

    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64)
    keys[:2] = [12345, 12345 | (1 << 63)]  # low 63 bits alike
    keys[2] = 2**64 - 1
    keys = np.unique(keys)
    ids = ImageIds.from_keys(keys)
    fids = faiss_ids(ids)
    asked = np.where(rng.random((40, 55)) < 0.9, fids[rng.integers(0, len(keys), (40, 55))],
                     rng.integers(0, 2**63 - 1, (40, 55)))
    asked[0, :4] = [-1, 12345, 2**63 - 1, -1]
    by_key = Searcher.of(None, None, "fp", ids, np.zeros((len(keys), 4), np.float32), {})
    got = by_key.rows_of(asked)
    assert by_key._by_fid is None  # no FAISS ids sorted
    monkeypatch.setattr(store_index, "KEYED_LOOKUPS", 0)
    by_fid = Searcher.of(None, None, "fp", ids, np.zeros((len(keys), 4), np.float32), {})
    want = by_fid.rows_of(asked)
    assert by_fid._by_fid is not None
    np.testing.assert_array_equal(got, want)
    assert got[0, :4].tolist() == [-1, int(np.searchsorted(keys, 12345)), len(keys) - 1, -1]
    held = np.isin(asked, fids)
    assert (got[~held] == -1).all() and (fids[got[held]] == asked[held]).all()
    assert held.mean() > 0.8 and (asked >= 0).sum() > 2000
