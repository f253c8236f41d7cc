"""Local-feature voting (cbir/votes.py, cbir/store/local.py): the tally of one query's
neighbours, the index `cbir index` builds of the collection's local descriptors (off by default,
updated as the collection changes, rebuilt when its recipe changes, never left torn by a kill),
and `cbir query` taking the pictures voted for as candidates. Real SIFT, FAISS and DuckDB on
drawn pictures (640x480) and details cut from them, with an untrained 32 px model."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CBIR, REPO, save, textured, write_params

from cbir import partial_copies, regions, votes
from cbir.config import Settings, load_settings
from cbir.faiss_index import MAX_LOCAL, index_ids, owner_key
from cbir.steps.embed import run_embed
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.query import query_images
from cbir.store.features import extract_file
from cbir.store.index import load_index
from cbir.store.layout import layout
from cbir.store.local import open_local, recipe

TINY = {"embed": {"resolution": 32, "scales": [1.0], "batch_size": 8, "workers": 0,
                  "device": "cpu"}, "ingest": {"workers": 1}}
SMALL = (0.10, 0.20)  # details of 10-20 % of a picture's area: where descriptors fail


def workspace(root: Path, n: int, search: dict[str, Any], **extra: Any) -> Settings:
    for i in range(n):
        save(textured(300 + i), root / "scans" / f"p{i}.jpg", quality=92)
    params = {"data": {"scans_dir": "scans"}, **TINY, "search": search, **extra}
    settings = load_settings(write_params(root, params))
    run_ingest(settings)
    run_embed(settings)
    run_index(settings)
    return settings


def detail(root: Path, seed: int, of: int = 0) -> Path:
    crop = partial_copies.detail_crop(textured(300 + of), np.random.default_rng(seed), SMALL)
    return save(crop.picture, root / "outside" / f"detail-{of}-{seed}.jpg", quality=90)


def name_of(settings: Settings, image_id: str) -> str:
    return {i: p for p, i in _ids(settings).items()}[image_id]


def _ids(settings: Settings) -> dict[str, str]:
    t = pq.read_table(layout(settings).files, columns=["image_id", "path"]).to_pylist()
    return {r["path"]: r["image_id"] for r in t}


# ----------------------------------------------------------------------------- the tally


def test_tally_counts_one_vote_per_picture_per_keypoint_past_the_ratio_test():
    # three keypoints, K = 3 neighbours and the background last
    sims = np.array([
        [0.95, 0.94, 0.90, 0.10],  # picture 7 twice (one vote), picture 8 once
        [0.93, 0.20, 0.15, 0.10],  # picture 7
        [0.30, 0.29, 0.28, 0.27],  # no better than the background: no vote
    ], np.float32)
    owners = np.array([[7, 7, 8, 9], [7, 5, 6, 9], [8, 8, 8, 8]], np.int64)
    assert votes.tally(sims, owners, min_votes=1) == [(7, 2), (8, 1)]
    assert votes.tally(sims, owners) == [(7, 2)]  # MIN_VOTES 2
    # no neighbour (-1) never votes, and an empty answer is no candidate
    assert votes.tally(sims, np.full_like(owners, -1), min_votes=1) == []
    assert votes.tally(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int64)) == []
    with pytest.raises(ValueError, match="shapes"):
        votes.tally(sims, owners[:, :2])


def test_tally_breaks_ties_by_the_closer_descriptor():
    sims = np.array([[0.90, 0.99, 0.0], [0.90, 0.99, 0.0]], np.float32)
    owners = np.array([[3, 4, 1], [3, 4, 1]], np.int64)
    assert votes.tally(sims, owners, min_votes=1) == [(4, 2), (3, 2)]


# ----------------------------------------------------------------------------- the index


def test_off_by_default_no_local_index(tmp_path):
    settings = workspace(tmp_path, 3, {"k": 2})
    assert settings.search.local_candidates == 0
    assert not layout(settings).local_index_dir.exists()
    assert open_local(settings) is None
    [res] = query_images(settings, [detail(tmp_path, 1)], k=3)
    assert res.error is None and all(c.votes is None for c in res.candidates)


def test_a_small_detail_votes_for_its_original_first(tmp_path):
    settings = workspace(tmp_path, 8, {"k": 2, "local_candidates": 3})
    summary = run_index(settings)
    assert summary.local is not None and summary.local.pictures == 8
    lay = layout(settings)
    index, info = load_index(lay.local_index_dir, expected_fingerprint=recipe(300))
    # every picture's strongest descriptors, each id naming its picture
    keys = set(owner_key(index_ids(index), MAX_LOCAL).tolist())
    assert keys == set(owner_key(list(_ids(settings).values()), MAX_LOCAL).tolist())
    assert info.n_vectors <= 8 * settings.index.local_keypoints
    local = open_local(settings)
    assert local is not None
    for of, seed in ((0, 1), (3, 2), (5, 3)):
        q = extract_file(detail(tmp_path, seed, of), None)
        [hits] = local.votes([q], 3)
        assert hits, f"no votes for a detail of p{of}"
        assert name_of(settings, hits[0][0]) == f"p{of}.jpg", hits
        assert len(hits) == 1 or hits[0][1] > hits[1][1]  # ahead of the chance votes
    assert local.votes([None], 3) == [[]]


def test_the_index_follows_the_collection_and_its_recipe(tmp_path):
    settings = workspace(tmp_path, 4, {"k": 2, "local_candidates": 3})
    scans = tmp_path / "scans"
    save(textured(300 + 4), scans / "p4.jpg", quality=92)
    (scans / "p1.jpg").unlink()
    run_ingest(settings)
    run_embed(settings)
    s = run_index(settings).local
    assert s is not None and not s.rebuilt and (s.added, s.removed, s.pictures) == (1, 1, 4)
    local = open_local(settings)
    assert local is not None
    [hits] = local.votes([extract_file(detail(tmp_path, 5, of=4), None)], 3)
    assert hits and name_of(settings, hits[0][0]) == "p4.jpg"
    again = run_index(settings).local
    assert again is not None and not again.rebuilt and again.added == again.removed == 0
    # fewer descriptors a picture: another index, rebuilt
    fewer = settings.model_copy(update={"index": settings.index.model_copy(
        update={"local_keypoints": 50})})
    s = run_index(fewer).local
    assert s is not None and s.rebuilt and "descriptors changed" in s.reason
    assert s.info.n_vectors <= 4 * 50
    with pytest.raises(Exception, match="rebuild with `cbir index`"):
        open_local(settings)  # 300 a picture asked, 50 built


@pytest.mark.parametrize("kill", ["index.save:2", "index.commit:2", "write.index.json:2"])
def test_a_killed_build_leaves_a_loadable_index_and_the_next_run_completes(tmp_path, kill):
    settings = workspace(tmp_path, 3, {"k": 2, "local_candidates": 2})
    folder = layout(settings).local_index_dir
    _, before = load_index(folder)
    save(textured(310), tmp_path / "scans" / "new.jpg", quality=92)
    run_ingest(settings)
    run_embed(settings)
    # the global index is saved first (its save and commit: the first of each point), then
    # the local one's
    out = subprocess.run([*CBIR, "index", "--params", str(tmp_path / "params.yaml")], cwd=REPO,
                         env={**os.environ, "CBIR_KILL_AT": kill}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    index, _ = load_index(folder)  # the old one or the new one, never a torn one
    pictures = len(set(owner_key(index_ids(index), MAX_LOCAL).tolist()))
    assert pictures == 4 or index.ntotal == before.n_vectors
    s = run_index(settings).local
    assert s is not None
    index, _ = load_index(folder, expected_fingerprint=recipe(300))
    assert len(set(owner_key(index_ids(index), MAX_LOCAL).tolist())) == 4
    assert not list(folder.glob(".tmp-*")) and not (folder / "index.faiss.next").exists()


# ----------------------------------------------------------------------------- cbir query


def test_query_takes_the_voted_original_as_a_candidate_and_verifies_it_first(tmp_path):
    # 12 pictures, the global search's top 2 only: the votes must bring the original in
    settings = workspace(tmp_path, 12, {"k": 2, "local_candidates": 2, "verify_top": 2})
    query = detail(tmp_path, 9, of=6)
    [res] = query_images(settings, [query], k=2)
    assert res.error is None, res.error
    first = res.candidates[0]
    assert res.neighbours[0][1] == "p6.jpg", res.neighbours
    assert first.votes is not None and first.votes >= votes.MIN_VOTES
    assert first.found_by in (regions.LOCAL, regions.GLOBAL)
    m = res.verification[0]
    assert m is not None and m.relation == "a_in_b"
    assert res.features_seconds > 0  # the query's own features, extracted once, timed
    # without votes, and a model blind to details, the global top 2 holds other pictures
    off = settings.model_copy(update={"search": settings.search.model_copy(
        update={"local_candidates": 0})})
    [plain] = query_images(off, [query], k=2)
    assert all(c.votes is None for c in plain.candidates)


def test_union_keeps_every_voted_picture_and_ranks_it_by_its_global_similarity():
    g = [(f"g{i}", 0.9 - i / 100) for i in range(6)]
    cands = regions.union(g, [], 4, [("v", 40), ("g3", 9), ("g5", 3)], {"v": 0.2})
    by = {c.image_id: c for c in cands}
    assert set(by) == {"g0", "g3", "v", "g5"}  # every voted one, the global top 1
    assert by["v"].found_by == regions.LOCAL and by["v"].votes == 40 and by["v"].score == 0.2
    assert by["g3"].found_by == regions.GLOBAL and by["g3"].votes == 9
    # past the global top k: found by the votes only (no similarity given: ranked last)
    assert by["g5"].found_by == regions.LOCAL and by["g5"].score == -1.0
    assert [c.image_id for c in cands][-2:] == ["v", "g5"]  # the lowest similarity last
    # without votes: as before, the global top k
    assert [c.image_id for c in regions.union(g, [], 4)] == ["g0", "g1", "g2", "g3"]
