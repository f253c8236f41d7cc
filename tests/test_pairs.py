"""cbir.steps.pairs: mutual top-k pairs above a threshold, and clusters joined strongest first."""

from __future__ import annotations

import numpy as np

from cbir.faiss_index import build_index, choose_params, faiss_ids
from cbir.steps.pairs import clusters_from_pairs, knn_pairs
from cbir.store.index import Searcher


def _searcher(vectors: np.ndarray) -> Searcher:
    ids = [f"{i:016x}" for i in range(1, len(vectors) + 1)]
    fids = faiss_ids(ids)
    index, info = build_index(vectors, fids, choose_params(len(ids), vectors.shape[1]),
                              target_recall=None)
    return Searcher.of(index, info, "test", ids, vectors, {i: f"{i}.jpg" for i in ids})


def _unit(rows: list[list[float]]) -> np.ndarray:
    v = np.asarray(rows, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


VECTORS = _unit([[1, 0, 0, 0], [0.99, 0.05, 0, 0], [0, 1, 0, 0], [0, 0.98, 0.1, 0],
                 [0, 0, 0, 1]])


def test_knn_pairs_keeps_pairs_above_the_threshold_once_with_best_score_and_rank():
    s = _searcher(VECTORS)
    pairs = knn_pairs(s, k=2, threshold=0.9)
    a, b, c, d = s.image_ids[:4]
    assert set(pairs) == {(a, b), (c, d)}  # unordered, each once, the lonely image in none
    score, rank = pairs[(a, b)]
    assert abs(score - float(VECTORS[0] @ VECTORS[1])) < 1e-5 and rank == 1
    assert knn_pairs(s, k=2, threshold=0.9, rows=np.array([0])) == {(a, b): pairs[(a, b)]}
    assert knn_pairs(s, k=2, threshold=0.9, batch=2) == pairs  # batching changes nothing
    assert knn_pairs(s, k=2, threshold=1.01) == {}


def test_knn_pairs_only_looks_at_the_top_k():
    s = _searcher(VECTORS)
    low = knn_pairs(s, k=1, threshold=-1.0)
    assert all(rank == 1 for _, rank in low.values())
    assert len(knn_pairs(s, k=4, threshold=-1.0)) == 10  # every pair of 5 images


def test_clusters_are_connected_components_with_their_weakest_link():
    pairs = {("a", "b"): (0.95, 1), ("b", "c"): (0.80, 1), ("d", "e"): (0.99, 1),
             ("e", "f"): (0.40, 2)}
    assert clusters_from_pairs(pairs, 0.5) == [(["a", "b", "c"], 0.80), (["d", "e"], 0.99)]
    assert clusters_from_pairs(pairs, 0.9) == [(["a", "b"], 0.95), (["d", "e"], 0.99)]
    assert clusters_from_pairs(pairs, 0.3)[0] == (["a", "b", "c"], 0.80)
    assert clusters_from_pairs({}, 0.5) == []


def test_the_weakest_link_is_that_of_the_maximum_spanning_tree():
    # a triangle: the 0.6 edge is not needed to keep it connected
    pairs = {("a", "b"): (0.9, 1), ("b", "c"): (0.8, 1), ("a", "c"): (0.6, 2)}
    assert clusters_from_pairs(pairs, 0.0) == [(["a", "b", "c"], 0.8)]


def test_a_rejected_link_splits_a_cluster_and_a_confirmed_one_joins_whatever_its_score():
    pairs = {("a", "b"): (0.95, 1), ("b", "c"): (0.80, 1), ("a", "c"): (0.70, 2),
             ("d", "e"): (0.30, 1)}
    assert clusters_from_pairs(pairs, 0.5) == [(["a", "b", "c"], 0.80)]
    # a and c decided different: no path may join them (b goes with the stronger link, to a)
    assert clusters_from_pairs(pairs, 0.5, different=[("a", "c")]) == [(["a", "b"], 0.95)]
    # d and e confirmed, far below the threshold: one cluster; confirmed links weigh 1
    assert clusters_from_pairs(pairs, 0.5, same=[("d", "e")]) == [
        (["a", "b", "c"], 0.80), (["d", "e"], 1.0)]
    # a confirmed pair that no search found joins too; a rejection beats any score (b joins
    # c by the stronger link, so a, rejected by b, stays out)
    got = clusters_from_pairs(pairs, 0.5, same=[("c", "f")], different=[("a", "b")])
    assert got == [(["b", "c", "f"], 0.80)]
    # confirmations come first: a later rejected link cannot undo them
    assert clusters_from_pairs({}, 0.5, same=[("a", "b"), ("b", "c")],
                               different=[("a", "c")]) == [(["a", "b"], 1.0)]


def test_an_exact_index_scores_a_pair_the_same_whatever_the_batch():
    # An exact (flat) index scores a batch by one matrix product whose last bits depend on the
    # batch's shape: a full run, a night and a Dask part would score a pair an ulp apart, and
    # one scoring exactly the threshold would be kept one way and not the other.
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((100, 512)).astype(np.float32)
    noise = rng.standard_normal((1000, 512)).astype(np.float32)
    x = centres[rng.integers(0, 100, 1000)] + 0.3 * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = _searcher(x)
    assert s.info.params.kind == "flat"
    whole = knn_pairs(s, k=5, threshold=0.5, batch=1000)
    assert len(whole) > 1000
    for batch in (200, 7, 1):
        assert knn_pairs(s, k=5, threshold=0.5, batch=batch) == whole  # bit for bit
    # a night searches only its images (its ranks are one side's): the same scores
    night = knn_pairs(s, k=5, threshold=0.5, rows=np.arange(0, 1000, 3), batch=50)
    assert len(night) > 300 and all(whole[key][0] == sc for key, (sc, _) in night.items())
    # so the pair exactly at a threshold is kept whichever way it was searched
    key, (score, _) = max(whole.items(), key=lambda item: item[1][0])
    at_batch = knn_pairs(s, k=5, threshold=score, batch=1000)
    assert key in at_batch and at_batch == knn_pairs(s, k=5, threshold=score, batch=1)
