"""Geometric verification in the steps: `cbir query` re-ranks its top candidates, `cbir pairs`
confirms pairs below the threshold, marks the ones it contradicts, and verifies only new pairs
in an incremental run. Real OpenCV, FAISS and DuckDB on a few drawn pictures (640x480) and a
detail of one of them, with an untrained 32 px model (its scores are arbitrary: the thresholds
are set so that verification alone decides)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import save, textured, write_params

from cbir import partial_copies
from cbir.config import Settings, load_settings
from cbir.steps.embed import run_embed
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.pairs import run_pairs
from cbir.steps.query import query_images, rerank
from cbir.store.layout import layout
from cbir.store.pairs import read_pairs
from cbir.verify import Match

TINY = {"embed": {"resolution": 32, "scales": [1.0], "batch_size": 8, "workers": 0,
                  "device": "cpu"}, "ingest": {"workers": 1}}
DETAIL = (0.15, 0.25)


def iou(a: Any, b: Any) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / area if area else 0.0


def build(root: Path, search: dict[str, Any], n: int = 5) -> tuple[Settings, Any]:
    scans = root / "scans"
    for i in range(n):
        save(textured(100 + i), scans / f"p{i}.jpg", quality=92)
    crop = partial_copies.detail_crop(textured(100), np.random.default_rng(0), DETAIL)
    save(crop.picture, scans / "detail-of-p0.jpg", quality=92)
    params = {"data": {"scans_dir": "scans"}, **TINY, "search": search}
    settings = load_settings(write_params(root, params))
    update(settings)
    return settings, crop


def update(settings: Settings) -> None:
    run_ingest(settings)
    run_embed(settings)
    run_index(settings)


def ids_by_path(settings: Settings) -> dict[str, str]:
    t = pq.read_table(layout(settings).files, columns=["image_id", "path"]).to_pylist()
    return {r["path"]: r["image_id"] for r in t}


def test_rerank_puts_verified_candidates_first_most_inliers_first():
    cands = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6), ("e", 0.5)]
    ok = Match(inliers=30, relation="full")
    few = Match(inliers=15, relation="a_in_b")
    assert rerank(cands, [Match(inliers=5), few, None, ok]) == [3, 1, 0, 2, 4]
    assert rerank(cands, []) == [0, 1, 2, 3, 4]


def test_query_puts_the_verified_original_of_a_detail_first(tmp_path):
    settings, _ = build(tmp_path, {"k": 3, "pair_threshold": 0.5, "verify_top": 6})
    original = textured(100)
    crop = partial_copies.detail_crop(original, np.random.default_rng(7), DETAIL)
    query = save(crop.picture, tmp_path / "outside" / "detail.jpg", quality=90)
    [res] = query_images(settings, [query], k=6)
    assert res.error is None and len(res.neighbours) == len(res.verification) == 6
    first, m = res.neighbours[0], res.verification[0]
    assert first[1] in {"p0.jpg", "detail-of-p0.jpg"}, res.neighbours
    assert m is not None and m.relation in ("a_in_b", "full") and m.box_on == "b"
    if first[1] == "p0.jpg":
        assert m.relation == "a_in_b" and iou(m.box, crop.box) >= 0.5, (m.box, crop.box)
    others = [v for (_, p, _), v in zip(res.neighbours, res.verification, strict=True)
              if p not in {"p0.jpg", "detail-of-p0.jpg"}]
    assert len(others) == 4 and all(v is not None and not v.verified for v in others)
    assert res.features_seconds > 0 and res.verify_seconds > 0
    # switched off: the descriptor's order, nothing verified
    off = load_settings(write_params(tmp_path, {
        "data": {"scans_dir": "scans"}, **TINY,
        "search": {"k": 3, "pair_threshold": 0.5, "verify": False}}))
    [plain] = query_images(off, [query], k=6)
    assert plain.verification == [] and sorted(plain.neighbours) == sorted(res.neighbours)


def pairs_rows(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    rows = read_pairs(settings).to_pylist()
    return {(r["image_a"], r["image_b"]): r for r in rows if r["kind"] == "near"}


def test_pairs_confirms_a_detail_below_the_threshold_with_its_relation_and_box(tmp_path):
    # nothing scores 0.9999 with an untrained model: every pair is below the threshold, and all
    # six images' neighbours (k = 5) are verified (floor -1)
    settings, crop = build(
        tmp_path, {"k": 5, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 5}
    )
    summary = run_pairs(settings)
    ids = ids_by_path(settings)
    key = tuple(sorted((ids["p0.jpg"], ids["detail-of-p0.jpg"])))
    rows = pairs_rows(settings)
    assert set(rows) == {key}, rows  # only the confirmed one is kept
    r = rows[key]
    detail_is_a = key[0] == ids["detail-of-p0.jpg"]
    assert r["relation"] == ("a_in_b" if detail_is_a else "b_in_a")
    assert r["box_on"] == ("b" if detail_is_a else "a") and r["inliers"] >= 12
    box = (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"])
    assert iou(box, crop.box) >= 0.5, (box, crop.box)
    assert abs(r["covered"] - crop.area) <= 0.05 + 0.15 * crop.area
    vs = summary.verification
    assert vs is not None and vs.confirmed_below == 1 and vs.contradicted == 0
    assert vs.checked == vs.below == 15 and vs.extracted == 6  # all 15 pairs of 6 images
    assert summary.n_clusters == 1 and summary.largest_cluster == 2  # the confirmed pair joins
    assert any("confirmed below the threshold" in line for line in summary.lines())


def test_verify_rank_bounds_the_neighbours_below_the_threshold_that_are_checked(tmp_path):
    settings, _ = build(
        tmp_path, {"k": 5, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 1}
    )
    vs = run_pairs(settings).verification
    # each of the 6 images' nearest neighbour only: at most 6 pairs (fewer where two are each
    # other's nearest), not the 15 of k = 5
    assert vs is not None and 3 <= vs.checked == vs.below <= 6 and vs.regional == 0
    none = settings.model_copy(
        update={"search": settings.search.model_copy(update={"verify_rank": 0})}
    )
    summary = run_pairs(none)
    assert summary.verification is not None and summary.verification.checked == 0
    assert summary.n_near_pairs == 0  # nothing above 0.9999, nothing below checked


def test_pairs_verifies_the_prints_whose_regions_hold_an_image(tmp_path):
    """With embed.regions, an image's candidates below the threshold include the owners of
    the regions nearest to it: a detail that is one of the scheme's windows of p0 is checked
    against p0 and confirmed, found by its regions at rank 1."""
    from cbir.steps.pairs import region_pairs
    from cbir.store.index import open_searcher

    settings, _ = build(
        tmp_path,
        {"k": 1, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 1},
    )
    scans = settings.path(settings.data.scans_dir)
    save(textured(100).crop((320, 0, 640, 240)), scans / "window-of-p0.png")
    with_regions = settings.model_copy(
        update={"embed": settings.embed.model_copy(update={"regions": "halves"})}
    )
    update(with_regions)
    ids = ids_by_path(with_regions)
    key = tuple(sorted((ids["p0.jpg"], ids["window-of-p0.png"])))
    found = region_pairs(open_searcher(with_regions), 1, -1.0)
    assert key in found and found[key][1] == 1, found
    assert region_pairs(open_searcher(settings), 1, -1.0) == {}  # no regional index
    assert run_pairs(with_regions).verification is not None
    row = pairs_rows(with_regions)[key]
    detail_is_a = key[0] == ids["window-of-p0.png"]
    assert row["relation"] == ("a_in_b" if detail_is_a else "b_in_a")


def test_a_nightly_print_finds_the_detail_of_it_the_collection_already_holds(tmp_path):
    """Incremental pairs search only the new pictures, so the old detail's own search (which
    would find the print's region) is not run again: the new print's regions are searched
    among the whole pictures instead, and the pair is confirmed as a full run confirms it."""
    from cbir.steps.pairs import region_pairs
    from cbir.store.index import open_searcher

    scans = tmp_path / "scans"
    for i in range(4):
        save(textured(100 + i), scans / f"p{i}.jpg", quality=92)
    save(textured(105).crop((320, 0, 640, 240)), scans / "window-of-p5.png")
    search = {"k": 1, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 1}
    params = {"data": {"scans_dir": "scans"}, **TINY, "search": search}
    params["embed"] = {**TINY["embed"], "regions": "halves"}
    settings = load_settings(write_params(tmp_path, params))
    update(settings)
    run_pairs(settings)
    save(textured(105), scans / "p5.jpg", quality=92)  # the print arrives one night
    update(settings)
    ids = ids_by_path(settings)
    key = tuple(sorted((ids["p5.jpg"], ids["window-of-p5.png"])))
    s = open_searcher(settings)
    new_row = np.array([s.image_ids.index(ids["p5.jpg"])], np.int64)
    assert key in region_pairs(s, 1, -1.0, rows=new_row)
    nightly = run_pairs(settings, incremental=True)
    assert nightly.incremental and nightly.searched == 1
    row = pairs_rows(settings)[key]
    assert row["relation"] in ("a_in_b", "b_in_a") and row["inliers"] >= 12


def test_a_night_checks_a_new_print_that_an_older_detail_has_among_its_nearest(tmp_path):
    """A full run checks a neighbour below the threshold where either picture has the other
    among its nearest verify_rank; a night searches its new pictures, so the older side is
    searched again: the print arriving as a JPEG and a PNG has its own other file nearest, and
    the detail the collection held has the print nearest. The night confirms the detail, and
    a full run after it finds the same pairs."""
    scans = tmp_path / "scans"
    crop = partial_copies.detail_crop(textured(100), np.random.default_rng(0), DETAIL)
    save(crop.picture, scans / "detail-of-p0.jpg", quality=92)
    search = {"k": 5, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 1}
    params = {"data": {"scans_dir": "scans"}, **TINY, "search": search}
    settings = load_settings(write_params(tmp_path, params))
    update(settings)
    assert run_pairs(settings).n_near_pairs == 0
    save(textured(100), scans / "p0.jpg", quality=92)  # the print arrives one night, twice
    save(textured(100), scans / "p0.png")
    update(settings)
    night = run_pairs(settings, incremental=True)
    assert night.incremental and night.searched == 2 and night.searched_back == 1
    assert any("1 older neighbour of them from the other side" in x for x in night.lines())
    ids = ids_by_path(settings)
    detail = ids["detail-of-p0.jpg"]
    rows = pairs_rows(settings)
    held = [key for key in rows if detail in key]
    assert len(held) == 1, rows  # its nearest: one of the print's two files
    assert rows[held[0]]["relation"] in ("a_in_b", "b_in_a")
    assert night.n_clusters == 1 and night.largest_cluster == 3
    relations = {key: r["relation"] for key, r in rows.items()}
    run_pairs(settings)
    assert {key: r["relation"] for key, r in pairs_rows(settings).items()} == relations


def test_pairs_verified_in_two_processes_equal_those_verified_in_one(tmp_path):
    from cbir.steps import pairs as pairs_step
    from cbir.store.features import feature_cache

    search = {"k": 5, "pair_threshold": -1.0, "verify_floor": -1.0}
    settings, _ = build(tmp_path, search)
    one = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"workers": 1})}
    )
    two = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"workers": 2})}
    )
    keys = list(itertools.combinations(sorted(ids_by_path(settings).values()), 2))
    assert len(keys) == 15  # every pair of the 6 pictures
    by_one, _ = pairs_step.verify_pairs(one, keys)
    old_group = pairs_step.VERIFY_GROUP
    pairs_step.VERIFY_GROUP = 1  # 15 groups: enough for two processes
    try:
        by_two, extracted = pairs_step.verify_pairs(two, keys)
    finally:
        pairs_step.VERIFY_GROUP = old_group
    assert extracted == 0 and by_two == by_one
    assert sum(m is not None and m.verified for m in by_one.values()) == 1
    # a picture missing from the cache: its pairs come back unread, for the caller to extract
    cache = feature_cache(settings)
    a, b = keys[0]
    cache._entries.pop(b)
    pairs_step._verifier_cache = cache
    [(key, match, read)] = pairs_step._verify_group((a, [b]))
    assert key == (a, b) and match is None and not read


def test_a_contradicted_pair_is_kept_and_marked_and_an_incremental_run_verifies_only_new_pairs(
    tmp_path,
):
    # threshold -1: every neighbour is a pair; verification contradicts the unrelated ones
    settings, _ = build(tmp_path, {"k": 2, "pair_threshold": -1.0, "verify_floor": -1.0})
    first = run_pairs(settings)
    rows = pairs_rows(settings)
    assert len(rows) == first.n_near_pairs >= 6
    relations = [r["relation"] for r in rows.values()]
    assert all(rel is not None for rel in relations)
    assert relations.count("none") == first.verification.contradicted >= 4  # type: ignore[union-attr]
    assert all(r["box_on"] is None for r in rows.values() if r["relation"] == "none")
    # a new picture arrives: only its pairs are verified, only its features extracted
    save(textured(200), settings.path(settings.data.scans_dir) / "new.jpg", quality=92)
    update(settings)
    second = run_pairs(settings, incremental=True)
    vs = second.verification
    new_id = ids_by_path(settings)["new.jpg"]
    after = pairs_rows(settings)
    new_pairs = [k for k in after if new_id in k]
    assert second.incremental and new_pairs and vs is not None
    assert vs.checked == len(new_pairs) and vs.extracted == 1
    assert vs.kept == len(after) - len(new_pairs)
    for key, r in rows.items():  # recorded verification kept as it was
        assert after[key]["relation"] == r["relation"] and after[key]["inliers"] == r["inliers"]
    # nothing new: nothing verified
    third = run_pairs(settings, incremental=True)
    assert third.verification is not None and third.verification.checked == 0
    assert third.verification.extracted == 0
    # searching everything again checks again what confirmed nothing (matching may confirm
    # it since: a mirrored copy) and keeps the confirmed checks, from the features cached
    unconfirmed = [k for k, r in after.items() if r["relation"] == "none"]
    fourth = run_pairs(settings)
    assert fourth.verification is not None and fourth.verification.extracted == 0
    assert fourth.verification.checked == len(unconfirmed) > 0
    assert pairs_rows(settings) == after  # the same answers


def test_a_change_of_verification_rules_checks_again_what_they_may_read_otherwise(
    tmp_path, monkeypatch
):
    from cbir.steps import pairs as step

    settings, _ = build(tmp_path, {"k": 3, "pair_threshold": -1.0, "verify_floor": -1.0}, n=3)
    rescan = textured(101).resize((560, 420))  # a whole copy of p1: relation full
    save(rescan, settings.path(settings.data.scans_dir) / "p1-rescan.jpg", quality=90)
    update(settings)
    run_pairs(settings)
    rows = pairs_rows(settings)
    relations = [r["relation"] for r in rows.values()]
    assert "full" in relations and ("a_in_b" in relations or "b_in_a" in relations), relations
    # verify.RULES changed: the details (verify.REVISED) are checked again, with what confirmed
    # nothing (as every full run does); a `full` stands
    monkeypatch.setattr(step, "CHECKS", step.CHECKS + "-next")
    again = run_pairs(settings)
    assert again.verification is not None and again.verification.extracted == 0
    assert again.verification.checked == sum(
        rel in ("a_in_b", "b_in_a", "none") for rel in relations)
    assert pairs_rows(settings) == rows
    assert run_pairs(settings).verification.checked == relations.count("none")  # type: ignore[union-attr]


@pytest.mark.parametrize("verify", [False])
def test_pairs_without_verification_leave_the_columns_empty(tmp_path, verify):
    settings, _ = build(tmp_path, {"k": 2, "pair_threshold": -1.0, "verify": verify}, n=3)
    summary = run_pairs(settings)
    assert summary.verification is None
    assert all(r["relation"] is None for r in pairs_rows(settings).values())
    assert not any("verified" in line for line in summary.lines())


def test_a_decision_names_the_whole_picture_as_the_likely_master_of_a_larger_detail(tmp_path):
    from cbir.steps.decisions import remove_list, run_decide

    settings, crop = build(
        tmp_path, {"k": 5, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 5}, n=2
    )
    (settings.path(settings.data.scans_dir) / "detail-of-p0.jpg").unlink()
    w, h = crop.picture.size
    big = crop.picture.resize((w * 4, h * 4))  # more pixels than the print it was cut from
    save(big, settings.path(settings.data.scans_dir) / "detail-big.jpg", quality=92)
    assert big.size[0] * big.size[1] > 640 * 480
    update(settings)
    run_pairs(settings)
    ids = ids_by_path(settings)
    key = tuple(sorted((ids["p0.jpg"], ids["detail-big.jpg"])))
    assert pairs_rows(settings)[key]["relation"] in ("a_in_b", "b_in_a")
    said = run_decide(settings, "detail-big.jpg", "p0.jpg", "same")
    # the catalogue's rule: the whole picture before pixels (the files' rule alone keeps the
    # detail: higher resolution)
    assert said.likely == ("p0.jpg", "the whole picture"), said.likely
    # and the remove list keeps it: the print, not the enlarged detail cut from it
    remove_list(settings, tmp_path / "remove.csv")
    rows = list(csv.DictReader((tmp_path / "remove.csv").open()))
    assert [(r["remove"], r["keep"], r["reason"]) for r in rows] == [
        ("detail-big.jpg", "p0.jpg", "duplicate (decided same; likely master kept: the whole picture)")
    ]


def test_a_picture_on_a_blank_margin_gives_way_to_the_copy_without_it(tmp_path):
    # seen in an archivist trial: a copy on a card mount (more pixels, a JPEG at quality 60) was
    # "the whole picture" of the archive's scan, kept as the likely master, the scan to remove
    from PIL import ImageOps

    from cbir.steps.decisions import remove_list, run_decide
    from cbir.store.catalog import query

    settings, _ = build(
        tmp_path, {"k": 5, "pair_threshold": 0.9999, "verify_floor": -1.0, "verify_rank": 5}, n=2
    )
    scans = settings.path(settings.data.scans_dir)
    (scans / "detail-of-p0.jpg").unlink()
    save(ImageOps.expand(textured(100), border=(40, 40, 40, 160), fill="#d8ccb0"),
         scans / "p0-mounted.jpg", quality=60)
    # on a margin too, but at twice the resolution: the better copy of the picture
    save(ImageOps.expand(textured(101).resize((1280, 960)), border=80, fill="white"),
         scans / "p1-big-mounted.jpg", quality=92)
    update(settings)
    run_pairs(settings)
    _, rows = query(settings, "SELECT path_a, path_b, relation, master_path, master_reason "
                              "FROM pair_report WHERE relation = 'full'")
    found = {frozenset((r[0], r[1])): (r[2], r[3], r[4]) for r in rows}
    assert found[frozenset(("p0.jpg", "p0-mounted.jpg"))] == ("full", "p0.jpg", "no blank margin")
    assert found[frozenset(("p1.jpg", "p1-big-mounted.jpg"))] == (
        "full", "p1-big-mounted.jpg", "higher resolution")
    said = run_decide(settings, "p0-mounted.jpg", "p0.jpg", "same")
    assert said.likely == ("p0.jpg", "no blank margin"), said.likely
    run_decide(settings, "p1-big-mounted.jpg", "p1.jpg", "same")
    remove_list(settings, tmp_path / "remove.csv")
    listed = list(csv.DictReader((tmp_path / "remove.csv").open()))
    assert sorted((r["remove"], r["keep"], r["reason"].split(": ")[-1]) for r in listed) == [
        ("p0-mounted.jpg", "p0.jpg", "no blank margin)"),
        ("p1.jpg", "p1-big-mounted.jpg", "higher resolution)"),
    ]
