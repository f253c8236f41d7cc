"""The index's delta file: a nightly update adds to `index.delta.faiss` beside the index file
(cbir.faiss_index.layered, cbir.store.index.save_delta, cbir.steps.index), and the index file is
read and written whole again only past DELTA_SHARE or when images are removed.

What matters to a user: the index searched after an update holds exactly what a whole rewrite
holds (same ids, same scores), the index file is left untouched by a small night, and a kill at
any point of a delta save leaves the previous state or the new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from cbir import faults
from cbir.config import load_settings
from cbir.errors import CbirError
from cbir.faiss_index import (add_vectors, build_index, choose_params, delta_of, empty_like, index_ids, layered, remove_ids, search)
from cbir.steps import index as index_step
from cbir.store import index as store_index
from cbir.store.index import (finish_save, load_index, reusable_index, save_delta, save_index,
                              sorted_ids)
from cbir.store.layout import DELTA_FILE, DELTA_STAGED, IDS_GLOB, INDEX_FILE, SIDECAR_FILE

DIM = 32
N = 12_000


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((300, DIM)))
    n = N + 2_000
    x = _unit(centres[rng.integers(0, 300, n)] + rng.standard_normal((n, DIM)) * 0.6 / math.sqrt(DIM))
    ids = rng.choice(1 << 40, n, replace=False).astype(np.int64)
    return {"x": x, "ids": ids}


@pytest.fixture(scope="module")
def built(data):
    params = choose_params(N, DIM, bytes_per_vector=16)
    assert params.kind == "ivfpq"
    index, info = build_index(data["x"][:N], data["ids"][:N], params, k=10, seed=0)
    info.model_fingerprint = "fp"
    return index, info


def _lookup(data):
    order = np.argsort(data["ids"])
    keys = data["ids"][order]
    return lambda fids: data["x"][order[np.searchsorted(keys, fids)]]


def _saved(tmp_path: Path, built) -> Path:
    folder = tmp_path / "index"
    save_index(faiss.clone_index(built[0]), _copy_info(built[1]), folder)
    return folder


def _copy_info(info):
    return type(info).from_dict(info.to_dict())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_layered_index_searches_as_the_merged_index_does(data, built) -> None:
    main, info = built
    whole = faiss.clone_index(main)
    info_w = _copy_info(info)
    add_vectors(whole, info_w, data["x"][N:N + 500], data["ids"][N:N + 500])
    lay = layered(faiss.clone_index(main), empty_like(main))
    info_l = _copy_info(info)
    assert lay.ntotal == N and delta_of(lay).ntotal == 0
    add_vectors(lay, info_l, data["x"][N:N + 500], data["ids"][N:N + 500])
    assert lay.ntotal == info_l.n_vectors == N + 500 and delta_of(lay).ntotal == 500
    assert main.ntotal == N  # empty_like left the main index as it was
    np.testing.assert_array_equal(np.sort(index_ids(lay)), np.sort(index_ids(whole)))
    q = data["x"][N - 100:N + 100]  # old and new vectors as queries
    s1, i1 = search(whole, info_w, q, 10, vectors=_lookup(data))
    s2, i2 = search(lay, info_l, q, 10, vectors=_lookup(data))
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    assert set(data["ids"][N:N + 100]) <= set(i2[100:, 0].tolist())  # the new ones find themselves
    with pytest.raises(ValueError, match="layered index cannot remove"):
        remove_ids(lay, info_l, data["ids"][:3])


def test_a_delta_is_saved_beside_the_untouched_index_file_and_read_back(tmp_path, data, built) -> None:
    folder = _saved(tmp_path, built)
    before = _digest(folder / INDEX_FILE)
    index, info, reason = reusable_index(folder, "fp", False, mapped=True)
    assert reason == "" and delta_of(index) is not None
    add_vectors(index, info, data["x"][N:N + 300], data["ids"][N:N + 300])
    save_delta(index, info, folder)
    assert _digest(folder / INDEX_FILE) == before
    side = json.loads((folder / SIDECAR_FILE).read_text())
    assert side["n_vectors"] == N + 300 and side["delta_file"]["n_vectors"] == 300
    assert side["delta_file"]["sha256"] == _digest(folder / DELTA_FILE)
    q = data["x"][N:N + 50]
    want = search(index, info, q, 10, vectors=_lookup(data))
    for mmap in (False, True):  # read in memory (merged) or mapped (layered)
        got_index, got_info = load_index(folder, "fp", mmap=mmap)
        assert got_index.ntotal == N + 300 and (delta_of(got_index) is not None) == mmap
        got = search(got_index, got_info, q, 10, vectors=_lookup(data))
        np.testing.assert_array_equal(want[1], got[1])
        np.testing.assert_allclose(want[0], got[0], rtol=0, atol=1e-6)
    # a second night adds to the same delta
    index, info, _ = reusable_index(folder, "fp", False, mapped=True)
    assert delta_of(index).ntotal == 300
    add_vectors(index, info, data["x"][N + 300:N + 400], data["ids"][N + 300:N + 400])
    save_delta(index, info, folder)
    assert load_index(folder)[0].ntotal == N + 400 and _digest(folder / INDEX_FILE) == before
    # a whole save writes the delta into the index file and removes the delta file
    whole, info = load_index(folder)
    save_index(whole, info, folder)
    assert sorted(p.name for p in folder.iterdir()) == [INDEX_FILE, SIDECAR_FILE]
    assert "delta_file" not in json.loads((folder / SIDECAR_FILE).read_text())
    assert load_index(folder)[0].ntotal == N + 400


def test_a_damaged_delta_is_refused_and_the_update_rebuilds(tmp_path, data, built) -> None:
    folder = _saved(tmp_path, built)
    index, info, _ = reusable_index(folder, "fp", False, mapped=True)
    add_vectors(index, info, data["x"][N:N + 10], data["ids"][N:N + 10])
    save_delta(index, info, folder)
    raw = bytearray((folder / DELTA_FILE).read_bytes())
    raw[-20] ^= 0xFF
    (folder / DELTA_FILE).write_bytes(bytes(raw))
    for mmap in (False, True):
        with pytest.raises(CbirError, match=f"{DELTA_FILE} is damaged; rebuild with `cbir index`"):
            load_index(folder, mmap=mmap)
    index, info, reason = reusable_index(folder, "fp", False, mapped=True)
    assert index is None and "damaged" in reason


@pytest.mark.parametrize("point", ["index.save", "write.index.delta.faiss.next", "index.commit"])
def test_a_delta_save_killed_anywhere_leaves_the_old_or_the_new_index(
    tmp_path, data, built, monkeypatch, point
) -> None:
    folder = _saved(tmp_path, built)
    index, info, _ = reusable_index(folder, "fp", False, mapped=True)
    add_vectors(index, info, data["x"][N:N + 200], data["ids"][N:N + 200])
    save_delta(index, info, folder)  # a first night's delta: the old state has one
    old = set(index_ids(load_index(folder)[0]).tolist())

    class Killed(BaseException):
        pass

    def kill(pid, sig):
        raise Killed

    index, info, _ = reusable_index(folder, "fp", False, mapped=True)
    add_vectors(index, info, data["x"][N + 200:N + 300], data["ids"][N + 200:N + 300])
    monkeypatch.setattr(faults.os, "kill", kill)
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    monkeypatch.setenv(faults.ENV, point)
    with pytest.raises(Killed):
        save_delta(index, info, folder)
    monkeypatch.delenv(faults.ENV)
    got = set(index_ids(load_index(folder)[0]).tolist())  # a reader, before any writer
    new = old | set(data["ids"][N + 200:N + 300].tolist())
    assert got == (new if point == "index.commit" else old)
    finish_save(folder)  # the next writer completes or drops what the kill left
    assert not (folder / DELTA_STAGED).exists()
    assert set(index_ids(load_index(folder)[0]).tolist()) == got
    reusable_index(folder, "fp", False)  # cleans temporary files
    assert sorted(p.name for p in folder.iterdir()) == [DELTA_FILE, INDEX_FILE, SIDECAR_FILE]


def test_a_delta_left_by_a_whole_save_killed_before_removing_it_is_ignored(tmp_path, data, built) -> None:
    folder = _saved(tmp_path, built)
    index, info, _ = reusable_index(folder, "fp", False, mapped=True)
    add_vectors(index, info, data["x"][N:N + 50], data["ids"][N:N + 50])
    save_delta(index, info, folder)
    stale = (folder / DELTA_FILE).read_bytes()
    whole, info = load_index(folder)
    save_index(whole, info, folder)
    (folder / DELTA_FILE).write_bytes(stale)  # as if killed before the delta was removed
    assert load_index(folder)[0].ntotal == N + 50  # the sidecar names no delta: not added twice
    finish_save(folder)
    assert not (folder / DELTA_FILE).exists()


def _settings(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"index": {"bytes_per_vector": 16}}))
    return load_settings(params)


def test_the_index_step_keeps_small_nights_in_the_delta_and_rewrites_past_its_share(
    tmp_path, data
) -> None:
    s = _settings(tmp_path)
    folder = tmp_path / "idx"
    x, ids = data["x"], data["ids"]

    def update(n: int, *, rebuild: bool = False, keep: slice | None = None):
        rows = np.arange(n) if keep is None else np.arange(n)[keep]
        out = index_step._build_or_update(s, folder, "fp", ids[rows], x[rows], rebuild)
        _ids_kept(folder)
        return out

    first = update(N)
    assert first.rebuilt and not (folder / DELTA_FILE).exists()
    main = _digest(folder / INDEX_FILE)
    share = int(index_step.DELTA_SHARE * N)  # 600 at 12,000
    night = update(N + share // 2)
    assert (night.rebuilt, night.added, night.delta) == (False, share // 2, share // 2)
    assert _digest(folder / INDEX_FILE) == main and (folder / DELTA_FILE).exists()
    assert "in the delta file beside the index" in "\n".join(night.lines())
    again = update(N + share // 2)  # nothing new: nothing written
    assert (again.added, again.delta) == (0, share // 2)
    night = update(N + share)  # the delta at its share: still a delta
    assert night.delta == share and _digest(folder / INDEX_FILE) == main
    past = update(N + share + 1)  # past it: the index file written whole, with everything
    assert (past.rebuilt, past.delta, past.added) == (False, 0, 1)
    assert not (folder / DELTA_FILE).exists() and _digest(folder / INDEX_FILE) != main
    assert load_index(folder)[0].ntotal == N + share + 1
    update(N + share + 101)  # a delta again
    removed = update(N + share + 101, keep=slice(10, None))  # ten removed: whole again
    assert (removed.removed, removed.delta) == (10, 0) and not (folder / DELTA_FILE).exists()
    held = np.sort(index_ids(load_index(folder)[0]))
    np.testing.assert_array_equal(held, np.sort(ids[10:N + share + 101]))
    assert os.path.getsize(folder / INDEX_FILE) > 0


def test_a_night_whose_new_rows_account_for_every_id_compares_none_and_writes_no_ids(
    tmp_path, data, monkeypatch
) -> None:
    """`since` (the rows appended since the opening the index records): where the index and
    they make up every current id, the update adds them without comparing every id or
    reading and writing the sorted ids file; the ids file then lists the main file's ids and
    sorted_ids merges the delta's in. Where they do not add up, every id is compared."""
    s = _settings(tmp_path)
    folder = tmp_path / "idx"
    x, ids = data["x"], data["ids"]
    compared: list[int] = []
    real = index_step._changes
    monkeypatch.setattr(index_step, "_changes",
                        lambda have, fids: compared.append(len(fids)) or real(have, fids))
    index_step._build_or_update(s, folder, "fp", ids[:N], x[:N], False, opened={"at": 1})
    assert json.loads((folder / SIDECAR_FILE).read_text())["opened"] == {"at": 1}
    main_ids = json.loads((folder / SIDECAR_FILE).read_text())["ids_file"]
    night = index_step._build_or_update(s, folder, "fp", ids[:N + 100], x[:N + 100], False,
                                        since=np.arange(N, N + 100), opened={"at": 2})
    assert (night.added, night.delta, compared) == (100, 100, [])
    side = json.loads((folder / SIDECAR_FILE).read_text())
    assert side["opened"] == {"at": 2} and side["ids_file"] == main_ids  # no ids written
    assert [p.name for p in folder.glob(IDS_GLOB)] == [main_ids["name"]]
    layered_index = reusable_index(folder, "fp", False, mapped=True)[0]
    np.testing.assert_array_equal(sorted_ids(folder, layered_index), np.sort(ids[:N + 100]))
    # rows that do not account for every id (50 of the 100 new): every id compared
    night = index_step._build_or_update(s, folder, "fp", ids[:N + 200], x[:N + 200], False,
                                        since=np.arange(N + 150, N + 200), opened={"at": 3})
    assert (night.added, night.delta, compared) == (100, 200, [N + 200])
    _ids_kept(folder)  # written again by the comparing update: the main file's
    assert json.loads((folder / SIDECAR_FILE).read_text())["ids_file"]["n"] == N
    held = np.sort(index_ids(load_index(folder)[0]))
    np.testing.assert_array_equal(held, np.sort(ids[:N + 200]))
    # a night taking the delta past its share: the index file written whole, with its ids
    # (the main file's and the delta's, not gathered from the 12,900 of the whole index), and
    # none compared
    gathered: list[int] = []
    real_ids = store_index.index_ids
    monkeypatch.setattr(store_index, "index_ids",
                        lambda index: gathered.append(index.ntotal) or real_ids(index))
    night = index_step._build_or_update(s, folder, "fp", ids[:N + 900], x[:N + 900], False,
                                        since=np.arange(N + 200, N + 900), opened={"at": 4})
    assert (night.added, night.delta, compared) == (700, 0, [N + 200])
    assert gathered == [200]  # the delta's ids alone
    assert not (folder / DELTA_FILE).exists()
    _ids_kept(folder)
    np.testing.assert_array_equal(np.load(next(folder.glob(IDS_GLOB))), np.sort(ids[:N + 900]))


def _ids_kept(folder: Path) -> None:
    """The one ids file beside the index is named by its sidecar and holds its ids, sorted:
    of a layered index, those of its main file (sorted_ids adds the delta's)."""
    files = sorted(folder.glob(IDS_GLOB))
    side = json.loads((folder / SIDECAR_FILE).read_text())
    assert [p.name for p in files] == [side["ids_file"]["name"]]
    whole = np.sort(index_ids(load_index(folder)[0]))
    layers = reusable_index(folder, side["model_fingerprint"], False, mapped=True)[0]
    delta = delta_of(layers)
    in_delta = np.sort(index_ids(delta)) if delta is not None else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.load(files[0]), np.setdiff1d(whole, in_delta))
    np.testing.assert_array_equal(sorted_ids(folder, layers), whole)


def test_ids_kept_beside_the_index_are_read_only_where_its_sidecar_names_them_whole(
    tmp_path, data, built
) -> None:
    folder = tmp_path / "index"
    index, info = faiss.clone_index(built[0]), _copy_info(built[1])
    held = np.sort(index_ids(index))
    save_index(index, info, folder, held)
    _ids_kept(folder)
    (kept,) = folder.glob(IDS_GLOB)
    np.save(kept, held[::-1].copy())  # not sorted: gathered from the index instead
    np.testing.assert_array_equal(sorted_ids(folder, index), held)
    np.save(kept, held[:-1])  # another count
    np.testing.assert_array_equal(sorted_ids(folder, index), held)
    kept.write_bytes(b"damaged")
    np.testing.assert_array_equal(sorted_ids(folder, index), held)
    kept.unlink()
    np.testing.assert_array_equal(sorted_ids(folder, index), held)
    # a save without ids names none, and removes those of the save before
    save_index(index, info, folder, held)
    save_index(index, info, folder)
    assert not list(folder.glob(IDS_GLOB))
    np.testing.assert_array_equal(sorted_ids(folder, index), held)
    with pytest.raises(CbirError, match="ids were given"):
        save_index(index, info, folder, held[1:])


def test_a_searcher_over_a_layered_index_finds_what_one_over_the_whole_index_finds(data, built) -> None:
    """The nightly's pairs search the layered index the index step left (store.reuse): with
    each stored vector probing around its own list (Searcher.own, map_lists), as read whole."""
    from cbir.store.index import Searcher

    main, info = built
    n = N + 400
    names = [f"{i:016x}" for i in data["ids"][:n]]
    order = np.argsort(names)
    image_ids = [names[i] for i in order]
    vectors = data["x"][:n][order]
    whole = faiss.clone_index(main)
    info_w = _copy_info(info)
    add_vectors(whole, info_w, data["x"][N:n], data["ids"][N:n])
    lay = layered(faiss.clone_index(main), empty_like(main))
    info_l = _copy_info(info)
    add_vectors(lay, info_l, data["x"][N:n], data["ids"][N:n])
    rows = np.flatnonzero(np.isin(order, np.arange(N - 300, n)))  # old and new images
    got = []
    for index, inf in ((whole, info_w), (lay, info_l)):
        for mapped in (False, True):
            s = Searcher.of(index, inf, "fp", image_ids, vectors, {})
            if mapped:
                s.map_lists()
            got.append(s.search_rows(vectors[rows], 10, rows=rows))
    for scores, found in got[1:]:
        np.testing.assert_array_equal(found, got[0][1])
        np.testing.assert_allclose(scores, got[0][0], rtol=0, atol=1e-6)
    assert (got[0][1][:, 0] == rows).mean() > 0.95  # each finds itself first


def test_the_lists_of_a_layered_index_are_found_in_its_delta_first(data, built, monkeypatch):
    """faiss_index.lists_holding: the list holding each id, as in the merged index; a night's
    new images (in the delta) are found without reading the main index's lists."""
    from cbir import faiss_index
    from cbir.probes import lists_of

    main, info = built
    lay = layered(faiss.clone_index(main), empty_like(main))
    add_vectors(lay, _copy_info(info), data["x"][N:N + 300], data["ids"][N:N + 300])
    whole = faiss.clone_index(main)
    add_vectors(whole, _copy_info(info), data["x"][N:N + 300], data["ids"][N:N + 300])
    absent = int(data["ids"][N + 300])  # never added
    asked = np.r_[data["ids"][N:N + 300], data["ids"][:50], [absent]]
    expected = lists_of(faiss_index.ivf_part(whole), asked)
    assert expected[-1] == -1 and (expected[:-1] >= 0).all()
    np.testing.assert_array_equal(faiss_index.lists_holding(lay, asked), expected)
    np.testing.assert_array_equal(faiss_index.lists_holding(whole, asked), expected)
    read: list[int] = []  # the vectors held by each index part whose lists were read
    real = faiss_index.lists_of
    monkeypatch.setattr(faiss_index, "lists_of",
                        lambda ivf, ids: read.append(ivf.ntotal) or real(ivf, ids))
    np.testing.assert_array_equal(faiss_index.lists_holding(lay, asked[:300]), expected[:300])
    assert read == [300]  # the delta's alone
    read.clear()
    faiss_index.lists_holding(lay, asked)
    assert read == [300, N + 300]  # the old ones and the absent one: then the whole


def test_the_index_step_keeps_the_near_lists_of_the_centroids_it_trained(tmp_path, data) -> None:
    """`near`: the image index's near lists (cbir.probes) kept beside it when it is trained,
    left as they are by nights that add to it (the centroids stay), written again for a new
    training; a folder holding them is still cbir's own (store.outputs)."""
    from cbir.store.index import near_lists
    from cbir.store.layout import NEAR_FILE, layout

    s = _settings(tmp_path)
    folder = layout(s).index_dir
    x, ids = data["x"], data["ids"]
    index_step._build_or_update(s, folder, "fp", ids[:N], x[:N], False, near=True)
    kept = _digest(folder / NEAR_FILE)
    index_step._build_or_update(s, folder, "fp", ids[: N + 100], x[: N + 100], False, near=True)
    assert (folder / DELTA_FILE).exists() and _digest(folder / NEAR_FILE) == kept
    index, _ = reusable_index(folder, "fp", False, mapped=True)[:2]
    assert near_lists(folder, faiss.extract_index_ivf(index)).complete
    load_settings(tmp_path / "params.yaml")  # the index folder holds only cbir's files
    # trained again on the same vectors: the same centroids, their near lists kept as they are
    index_step._build_or_update(s, folder, "fp", ids[:N], x[:N], True, near=True)
    assert _digest(folder / NEAR_FILE) == kept
    rebuilt = index_step._build_or_update(s, folder, "fp", ids[50:], x[50:], True, near=True)
    assert rebuilt.rebuilt and _digest(folder / NEAR_FILE) != kept
    index, _ = reusable_index(folder, "fp", False, mapped=True)[:2]
    assert near_lists(folder, faiss.extract_index_ivf(index)).complete
    # without `near` (the regional index) none is kept
    other = tmp_path / "regions"
    index_step._build_or_update(s, other, "fp", ids[:N], x[:N], False)
    assert not (other / NEAR_FILE).exists()
