"""cbir.probes: a stored vector's search probes the lists around the one it lies in, found among
the index's ids; its lists and neighbours depend on it alone, never on its batch, and recall
holds against exact search (numpy, here)."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from cbir.faiss_index import build_index, choose_params, ivf_part, recall_at_k, search
from cbir.probes import NearLists, lists_of, stored_lists
from cbir.store.index import Searcher

DIM, N, K = 64, 12_000, 10


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built() -> tuple[np.ndarray, np.ndarray, faiss.Index, object]:
    rng = np.random.default_rng(4)
    centres = _unit(rng.standard_normal((300, DIM)))
    x = _unit(
        centres[rng.integers(0, 300, N)] + rng.standard_normal((N, DIM)) * 0.6 / math.sqrt(DIM)
    )
    ids = np.sort(rng.choice(1 << 40, N, replace=False)).astype(np.int64)  # sparse, like cbir's
    index, info = build_index(x, ids, choose_params(N, DIM, bytes_per_vector=16), k=K, seed=0)
    assert info.params.kind == "ivfpq" and ivf_part(index).nlist >= 64
    return x, ids, index, info


def _vectors(x: np.ndarray, ids: np.ndarray):
    return lambda wanted: x[np.searchsorted(ids, wanted)]


def test_each_stored_vector_lies_in_the_list_of_its_nearest_centroid(built) -> None:
    x, ids, index, _ = built
    ivf = ivf_part(index)
    held, lists = stored_lists(ivf)
    np.testing.assert_array_equal(held, ids)
    _, nearest = ivf.quantizer.search(x, 1)  # what adding it chose
    np.testing.assert_array_equal(lists, nearest[:, 0])
    # some ids, in any order, repeated, and one the index does not hold
    some = np.array([ids[7], ids[3], ids[7], 5], np.int64)
    assert 5 not in set(ids.tolist())
    np.testing.assert_array_equal(lists_of(ivf, some), [lists[7], lists[3], lists[7], -1])
    assert lists_of(ivf, np.zeros(0, np.int64)).shape == (0,)


def test_a_vectors_probed_lists_do_not_depend_on_its_batch(built) -> None:
    x, ids, index, _ = built
    ivf = ivf_part(index)
    own = lists_of(ivf, ids)
    rows = np.random.default_rng(0).choice(N, 500, replace=False)
    together = NearLists(ivf).probes(x[rows], own[rows], 4)
    fresh = NearLists(ivf)  # its near lists computed a query at a time, in another order
    for i in (499, 0, 250):
        alone = fresh.probes(x[rows[i : i + 1]], own[rows[i : i + 1]], 4)
        np.testing.assert_array_equal(alone[1][0], together[1][i])
        np.testing.assert_array_equal(alone[0][0], together[0][i])
    # its own list among them; with 2 lists, mostly the two comparing every centroid finds
    assert (together[1] == own[rows][:, None]).any(axis=1).all()
    _, two = NearLists(ivf).probes(x[rows], own[rows], 2)
    _, flat = ivf.quantizer.search(x[rows], 2)
    same = np.mean([set(a) == set(b) for a, b in zip(two, flat, strict=True)])
    assert same >= 0.85, same


def test_searching_around_its_own_list_recalls_what_exact_search_finds(built) -> None:
    x, ids, index, info = built
    ivf = ivf_part(index)
    rows = np.random.default_rng(1).choice(N, 400, replace=False)
    q = x[rows]
    own = (NearLists(ivf), lists_of(ivf, ids[rows]))
    truth = ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, : K + 1]]
    _, flat = search(index, info, q, K + 1, vectors=_vectors(x, ids))
    _, near = search(index, info, q, K + 1, vectors=_vectors(x, ids), own=own)
    r_flat, r_near = recall_at_k(flat, truth), recall_at_k(near, truth)
    assert r_near >= r_flat - 0.01 and r_near >= info.recall_at_k - 0.02, (r_near, r_flat)
    # a query not stored (-1) searches every centroid: a batch may mix both
    mixed = own[1].copy()
    mixed[::2] = -1
    _, both = search(index, info, q, K + 1, vectors=_vectors(x, ids), own=(own[0], mixed))
    np.testing.assert_array_equal(both[::2], flat[::2])
    np.testing.assert_array_equal(both[1::2], near[1::2])
    # one query alone finds what it finds in the batch
    _, one = search(index, info, q[5:6], K + 1, vectors=_vectors(x, ids), own=(own[0], own[1][5:6]))
    np.testing.assert_array_equal(one[0], near[5])


def test_a_searcher_finds_the_lists_of_a_few_rows_as_of_all_rows(built) -> None:
    x, ids, index, info = built
    image_ids = [f"{i:016x}" for i in ids.tolist()]  # cbir's ids: the FAISS id is their hex
    s = Searcher.of(index, info, "fp", image_ids, x, {})
    rows = np.array([9, 2, 11_000, 2])
    first = s.own(rows)  # looked up among the index's ids
    assert first is not None and s._row_lists is None
    s.map_lists()  # every row's list at once, for a search of many batches
    again = s.own(rows)
    assert again is not None and s._row_lists is not None
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(again[1], lists_of(ivf_part(index), ids[rows]))
    # all-pairs searches of rows alone and together agree
    _, together = s.search_rows(x[rows], K, rows=rows)
    _, alone = s.search_rows(x[rows[2:3]], K, rows=rows[2:3])
    np.testing.assert_array_equal(alone[0], together[2])


def test_near_lists_kept_for_their_centroids_are_restored_and_searched_alike(
    built, tmp_path
) -> None:
    """store.index.keep_near_lists: every list's near lists kept beside the index, for its
    centroids; a searcher restores them instead of computing them a night at a time, and
    searches what it searched computing them. A file kept for other centroids, or damaged, is
    not used."""
    from cbir.store.index import keep_near_lists, near_lists
    from cbir.store.layout import NEAR_FILE

    x, ids, index, info = built
    ivf = ivf_part(index)
    computed = NearLists(ivf)
    assert not computed.complete
    table = computed.table().copy()
    assert computed.complete and table.shape == (ivf.nlist, min(64, ivf.nlist))
    assert not near_lists(tmp_path, ivf).complete  # nothing kept
    assert keep_near_lists(tmp_path, index) and (tmp_path / NEAR_FILE).is_file()
    assert not keep_near_lists(tmp_path, index)  # kept already: not written again
    restored = near_lists(tmp_path, ivf)
    assert restored.complete and restored.digest == computed.digest
    np.testing.assert_array_equal(restored.near(np.arange(ivf.nlist)), table)
    # a searcher of this folder searches with them what one computing them finds
    image_ids = [f"{i:016x}" for i in ids.tolist()]
    rows = np.random.default_rng(2).choice(N, 300, replace=False)
    kept = Searcher.of(index, info, "fp", image_ids, x, {}, index_dir=tmp_path)
    fresh = Searcher.of(index, info, "fp", image_ids, x, {})
    got, want = kept.search_rows(x[rows], K, rows=rows), fresh.search_rows(x[rows], K, rows=rows)
    assert kept._near is not None and kept._near.complete and not fresh._near.complete
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    # other centroids (another training): their own digest, the kept table left unused
    rng = np.random.default_rng(9)
    other, _ = build_index(x[rng.permutation(N)], ids, info.params, k=K, seed=3)
    assert not near_lists(tmp_path, ivf_part(other)).complete
    assert keep_near_lists(tmp_path, other)  # written for them
    assert near_lists(tmp_path, ivf_part(other)).complete
    assert not near_lists(tmp_path, ivf).complete
    # damaged: computed instead, and written again by the next keep
    (tmp_path / NEAR_FILE).write_bytes(b"not a table")
    assert not near_lists(tmp_path, ivf).complete
    assert keep_near_lists(tmp_path, index) and near_lists(tmp_path, ivf).complete
    # within a flow run (store.reuse.sharing), what the index step kept is what the pairs
    # step's searcher takes, until the files change
    from cbir.store.reuse import sharing

    assert near_lists(tmp_path, ivf) is not near_lists(tmp_path, ivf)
    with sharing():
        keep_near_lists(tmp_path, index)
        shared = near_lists(tmp_path, ivf)
        assert shared.complete and near_lists(tmp_path, ivf) is shared
        (tmp_path / NEAR_FILE).write_bytes(b"changed meanwhile")
        assert near_lists(tmp_path, ivf) is not shared
        assert not near_lists(tmp_path, ivf).complete
    with pytest.raises(ValueError):
        NearLists(ivf).restore(table[:-1])
    with pytest.raises(ValueError):
        NearLists(ivf).restore(np.full_like(table, ivf.nlist))
