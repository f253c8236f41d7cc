"""Regional descriptors (cbir.regions): windows, storage beside the embeddings, their index, and
the union of global and regional candidates that `cbir query` answers with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_workspace
from conftest import photo, save

from cbir import regions
from cbir.errors import CbirError
from cbir.faiss_index import MAX_REGIONS, region_ids
from cbir.model import retrieval_model
from cbir.steps.embed import plan_shards, run_embed
from cbir.steps.index import run_index
from cbir.steps.query import query_images
from cbir.store.embeddings import load_regions
from cbir.store.index import load_index, open_searcher
from cbir.store.layout import REGION_SHARD_GLOB, SHARD_GLOB, layout

HALVES = regions.SCHEMES["halves"]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name, count", [("halves", 9), ("thirds", 34)])
def test_windows_cover_the_picture_in_overlapping_grids(name, count):
    s = regions.SCHEMES[name]
    boxes = s.boxes()
    assert boxes.shape == (count, 4) and s.count == count
    assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # every point of the picture lies in a window of each size
    for side in s.sides:
        grid = boxes[np.isclose(boxes[:, 2] - boxes[:, 0], side)]
        for x in np.linspace(0, 1, 11):
            for y in np.linspace(0, 1, 11):
                inside = (
                    (grid[:, 0] <= x) & (x <= grid[:, 2]) & (grid[:, 1] <= y) & (y <= grid[:, 3])
                )
                assert inside.any()
    assert s.decode_size(112) >= 112 / min(s.sides)
    assert regions.scheme("none") is None and regions.scheme(name) is s


def test_schemes_are_told_apart_by_their_key():
    other = regions.RegionScheme("halves", (0.5,), overlap=0.25)
    assert other.key != HALVES.key and other.key.startswith("halves-")


def test_crops_follow_the_boxes():
    pic = photo(0, (100, 60))
    pieces = regions.crops(pic, HALVES.boxes())
    assert [p.size for p in pieces[:2]] == [(50, 30), (50, 30)]
    assert np.array_equal(np.asarray(pieces[0]), np.asarray(pic.crop((0, 0, 50, 30))))
    assert np.array_equal(np.asarray(pieces[-1]), np.asarray(pic.crop((50, 30, 100, 60))))


def test_region_ids_are_unique_and_keep_their_owner():
    owners = ["a" * 64] * 3 + ["b" * 63 + "1"] * 2
    fids = region_ids(owners)
    assert len(set(fids.tolist())) == 5 and (fids >= 0).all()
    assert (fids[:3] & 255).tolist() == [0, 1, 2]
    assert len(set((fids[:3] >> 8).tolist())) == 1
    assert (fids[3:] >> 8 != fids[0] >> 8).all()
    with pytest.raises(ValueError):
        region_ids(["c" * 64] * (MAX_REGIONS + 1))


def test_union_says_which_search_found_each_candidate():
    box = np.array([0, 0, 0.5, 0.5], np.float32)
    g = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)]
    r = [("e", 0.95, box), ("c", 0.85, box), ("f", 0.5, box), ("g", 0.4, box)]
    out = regions.union(g, r, 4)
    assert [c.image_id for c in out] == ["e", "a", "c", "b"]
    by = {c.image_id: c for c in out}
    assert by["e"].found_by == regions.REGIONS and by["e"].box == (0.0, 0.0, 0.5, 0.5)
    assert by["a"].found_by == regions.GLOBAL and by["a"].box is None
    assert by["c"].found_by == regions.BOTH and by["c"].score == 0.85
    assert by["c"].global_score == 0.7 and by["c"].region_score == 0.85
    # neither search crowds the other out: the top k // 2 of each are kept
    low = [("x", 0.1, box), ("y", 0.05, box)]
    out = regions.union(g, low, 4)
    assert {c.image_id for c in out} == {"a", "b", "x", "y"}
    assert [c.image_id for c in regions.union(g, [], 3)] == ["a", "b", "c"]


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return tiny_workspace.make(tmp_path_factory.mktemp("regions"), embed={"regions": "halves"})


def test_embed_writes_the_regions_of_every_image_beside_the_embeddings(settings):
    _, _, fp, _ = retrieval_model(settings)
    folder = layout(settings).regions(fp, HALVES.key)
    owners, boxes, vectors = load_regions(folder)
    images = tiny_workspace.N_PHOTOS + 1  # the exact copy is one image
    assert len(set(owners)) == images and len(owners) == 9 * images
    assert np.allclose(boxes[:9], HALVES.boxes())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert plan_shards(settings, fp).shards == []  # nothing left to do


def test_a_killed_run_redoes_only_the_missing_regions(settings):
    _, _, fp, _ = retrieval_model(settings)
    lay = layout(settings)
    folder = lay.regions(fp, HALVES.key)
    before = load_regions(folder)
    embeddings = {p: p.stat().st_mtime_ns for p in lay.embeddings(fp).glob(SHARD_GLOB)}
    victim = sorted(folder.glob(REGION_SHARD_GLOB))[0]
    victim.unlink()  # as if killed before this shard's regions were written
    plan = plan_shards(settings, fp)
    assert plan.shards and not any(g for s in plan.shards for g in s.need_global)
    assert all(r for s in plan.shards for r in s.need_regions)
    run_embed(settings)
    after = load_regions(folder)
    assert after[0] == before[0] and np.allclose(after[2], before[2], atol=1e-5)
    # the global shards were left alone
    assert {p: p.stat().st_mtime_ns for p in lay.embeddings(fp).glob(SHARD_GLOB)} == embeddings


def test_a_damaged_region_shard_is_refused_in_one_line(settings, tmp_path):
    _, _, fp, _ = retrieval_model(settings)
    folder = layout(settings).regions(fp, HALVES.key)
    copy = tmp_path / folder.name
    copy.mkdir()
    for p in folder.glob(REGION_SHARD_GLOB):
        (copy / p.name).write_bytes(p.read_bytes())
    shard = sorted(copy.glob(REGION_SHARD_GLOB))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CbirError) as err:
        load_regions(copy)
    assert "\n" not in str(err.value) and shard.name in str(err.value)
    assert "cbir embed" in str(err.value)


def test_the_region_index_is_saved_beside_the_global_one_and_updated_in_place(settings):
    lay = layout(settings)
    index, info = load_index(lay.region_index_dir)
    _, _, fp, _ = retrieval_model(settings)
    assert info.model_fingerprint == f"{fp}/{HALVES.key}"
    assert index.ntotal == 9 * (tiny_workspace.N_PHOTOS + 1)
    # a new scan: embedded, then added to both indexes without a rebuild
    save(photo(40), settings.path(settings.data.scans_dir) / "new.png")
    from cbir.steps.ingest import run_ingest

    run_ingest(settings)
    run_embed(settings)
    summary = run_index(settings)
    assert summary.regions is not None and not summary.regions.rebuilt
    assert summary.regions.added == 9 and summary.added == 1
    assert any(line.startswith("regions index:") for line in summary.lines())
    assert load_index(lay.region_index_dir)[0].ntotal == 9 * (tiny_workspace.N_PHOTOS + 2)


def test_a_detail_finds_its_original_through_its_regions(settings, tmp_path):
    # a detail cut from p3: the top-right quarter (a window of the scheme, so the region
    # describes exactly what the query shows)
    detail = save(photo(3).crop((48, 0, 96, 32)), tmp_path / "detail.png")
    [res] = query_images(settings, [detail], k=4)
    assert res.error is None and len(res.neighbours) == len(res.candidates) == 4
    top = res.candidates[0]
    assert res.neighbours[0][1] == "p3.png" and top.found_by in (regions.REGIONS, regions.BOTH)
    assert top.box == (0.5, 0.0, 1.0, 0.5)
    assert top.region_score is not None and top.region_score > 0.999
    # the global descriptor of the whole p3 is further from the detail than its region is
    s = open_searcher(settings, with_regions=False)
    assert s.regions is None
    [plain] = s.candidates(query_vector(settings, detail), 10)
    score_of = {c.image_id: c.score for c in plain}
    assert score_of.get(top.image_id, -1.0) < top.region_score - 1e-3
    assert all(c.found_by == regions.GLOBAL for c in plain)


def query_vector(settings, path):
    import os

    from cbir.model import pick_device
    from cbir.steps.embed import embed_files

    model, pp, _, _ = retrieval_model(settings)
    _, vectors, _ = embed_files(
        model, [os.fsencode(path)], pp, batch_size=1, workers=0, device=pick_device("cpu")
    )
    return vectors


def test_regions_turned_on_without_their_index_is_one_clear_line(tmp_path):
    s = tiny_workspace.make(tmp_path, embed={"regions": "halves"}, steps=("ingest",))
    from cbir.steps.embed import run_embed as embed

    embed(s)
    with pytest.raises(CbirError, match="cbir index"):
        open_searcher(s)


def test_the_global_input_does_not_depend_on_the_regions(tmp_path):
    """A JPEG is drafted at about the input size; its windows need it larger, but the global
    input must stay what it is without regions (else vectors of one model would differ)."""
    import os

    from cbir.model import Preprocess
    from cbir.steps.embed import ScanDataset

    path = save(photo(5, (640, 480)), tmp_path / "scan.jpg", quality=90)
    pp = Preprocess(resolution=32, scales=(1.0, 1.25))
    _, plain, none, _ = ScanDataset([os.fsencode(path)], pp, None)[0]
    _, xs, rs, _ = ScanDataset([os.fsencode(path)], pp, None, HALVES)[0]
    assert none is None and plain is not None and xs is not None and rs is not None
    assert all(torch.equal(a, b) for a, b in zip(plain, xs, strict=True))
    assert [tuple(r.shape) for r in rs] == [(9, 3, 32, 32)]
