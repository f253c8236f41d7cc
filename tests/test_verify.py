"""Geometric verification (cbir.verify) and the detail-crop generator (cbir.partial_copies), on
real photographs from ../shared/data where present and on a textured picture drawn here."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from conftest import shared_photos, textured
from PIL import Image, ImageOps

from cbir import partial_copies, verify
from cbir.imaging import load_rgb


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / area if area else 0.0


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [load_rgb(p) for p in shared_photos()[::40]]


def check_detail(original: Image.Image, seed: int, area: tuple[float, float]) -> None:
    crop = partial_copies.detail_crop(original, np.random.default_rng(seed), area)
    m = verify.verify(crop.picture, original)  # a: the detail, b: the print it came from
    assert m.relation == "a_in_b" and m.box_on == "b", (m, crop.processes)
    assert m.inliers >= verify.MIN_INLIERS
    assert m.box is not None and iou(m.box, crop.box) >= 0.5, (m.box, crop.box)
    assert abs(m.covered - crop.area) <= 0.05 + 0.15 * crop.area, (m.covered, crop.area)
    swapped = verify.verify(original, crop.picture)  # the other way round: b is the detail
    assert swapped.relation == "b_in_a" and swapped.box_on == "a"
    assert swapped.box is not None and iou(swapped.box, crop.box) >= 0.5


@pytest.mark.parametrize("area", [(0.1, 0.2), (0.2, 0.4)])
def test_a_detail_of_a_drawn_picture_is_found_on_it(area: tuple[float, float]) -> None:
    original = textured(3)
    for seed in range(3):
        check_detail(original, seed, area)


@pytest.mark.shared_data
def test_a_detail_of_a_real_photograph_is_found_on_it(photos: list[Image.Image]) -> None:
    for i, photo in enumerate(photos):
        check_detail(photo, 100 + i, (0.1, 0.4))


@pytest.mark.shared_data
def test_a_rescan_of_a_whole_photograph_is_full(photos: list[Image.Image]) -> None:
    for i, photo in enumerate(photos[:2]):
        copy, _ = partial_copies.rescan(photo, np.random.default_rng(i))
        m = verify.verify(copy, photo)
        assert m.relation == "full" and m.covered >= verify.FULL, m
        assert m.box is not None and iou(m.box, (0, 0, photo.width, photo.height)) >= 0.8


def test_a_rescan_of_a_whole_drawn_picture_is_full() -> None:
    original = textured(5)
    copy, _ = partial_copies.rescan(original, np.random.default_rng(1))
    m = verify.verify(original, copy)
    assert m.relation == "full" and m.box_on == "b"
    assert m.box is not None and iou(m.box, (0, 0, copy.width, copy.height)) >= 0.8


def check_margin(picture: Image.Image) -> None:
    """A copy on a blank margin is the same picture (full), the box on the margin's picture
    where the picture lies on it; a crop of as large a share stays a detail of its original."""
    w, h = picture.size
    for border, fill in (((60, 60, 60, 60), "white"), ((20, 20, 20, 130), "#d8ccb0")):
        mounted = ImageOps.expand(picture, border=border, fill=fill)
        where = (border[0], border[1], border[0] + w, border[1] + h)
        share = w * h / (mounted.width * mounted.height)
        assert share < verify.FULL  # as a detail would be, by the area alone
        for m, on in ((verify.verify(picture, mounted), "b"), (verify.verify(mounted, picture), "a")):
            assert m.relation == "full" and m.box_on == on, (fill, m)
            assert m.box is not None and iou(m.box, where) >= 0.9, (m.box, where)
            assert abs(m.covered - share) <= 0.05, (m.covered, share)
    crop = picture.crop((0, 0, w * 3 // 4, h))  # a quarter of the picture cut away
    assert verify.verify(crop, picture).relation == "a_in_b"
    assert verify.verify(picture, crop).relation == "b_in_a"


def test_a_drawn_picture_on_a_blank_margin_is_the_same_picture() -> None:
    check_margin(textured(7))


@pytest.mark.shared_data
def test_a_photograph_mounted_or_on_the_scanner_bed_is_the_same_picture(
    photos: list[Image.Image],
) -> None:
    # seen in an archivist trial: a copy on a card mount was "a detail of" it (79 %), so the
    # mounted JPEG was kept as the whole picture and the original scan listed to remove
    for photo in photos[:3]:
        check_margin(photo)


@pytest.mark.shared_data
def test_unrelated_photographs_are_not_verified(photos: list[Image.Image]) -> None:
    feats = [verify.features(p) for p in photos]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            m = verify.verify(feats[i], feats[j])  # as they are, then against the mirror image
            assert m.relation == "none" and m.box is None, (i, j, m)
            assert m.inliers < verify.MIN_INLIERS
            flipped = verify.verify(feats[i], feats[j].mirrored(), mirror=False)
            assert flipped.relation == "none" and flipped.inliers < verify.MIN_INLIERS


def check_mirrored(original: Image.Image, seed: int) -> None:
    flopped = ImageOps.mirror(original)
    assert not verify.verify(flopped, original, mirror=False).verified  # no similarity fits
    m = verify.verify(flopped, original)
    assert m.relation == "full" and m.mirrored and m.box_on == "b", m
    assert m.box is not None and iou(m.box, (0, 0, original.width, original.height)) >= 0.8
    assert verify.verify_pair(flopped, original).mirrored
    # a detail of the mirror image: its box is where the detail lies on the original as it is
    crop = partial_copies.detail_crop(original, np.random.default_rng(seed), (0.1, 0.4))
    d = verify.verify(ImageOps.mirror(crop.picture), original)
    assert d.relation == "a_in_b" and d.mirrored and d.box is not None, d
    assert iou(d.box, crop.box) >= 0.5, (d.box, crop.box)
    # the other way round: the mirrored detail is a, the box on a as it is
    whole = verify.verify(original, ImageOps.mirror(crop.picture))
    assert whole.relation == "b_in_a" and whole.mirrored and whole.box_on == "a"
    assert whole.box is not None and iou(whole.box, crop.box) >= 0.5
    # a copy as it is stays a copy as it is
    assert not verify.verify(original, original.copy()).mirrored


@pytest.mark.shared_data
def test_a_mirrored_copy_of_a_real_photograph_is_confirmed(photos: list[Image.Image]) -> None:
    for i, photo in enumerate(photos[:3]):
        check_mirrored(photo, 200 + i)


def test_a_mirrored_copy_of_a_drawn_picture_is_confirmed() -> None:
    check_mirrored(textured(4), 7)


def test_mirrored_features_are_those_of_the_mirror_image() -> None:
    """Features.mirrored against SIFT run on the mirrored picture: most keypoints are found at
    the same place (within a pixel: OpenCV's SIFT places them half a pixel off its own mirror)
    and hold nearly the same descriptor (about 0.75 without the permutation)."""
    picture = textured(6)
    made = verify.features(picture).mirrored()
    extracted = verify.features(ImageOps.mirror(picture))
    d = np.linalg.norm(made.points[:, None, :] - extracted.points[None, :, :], axis=2)
    near = d.argmin(axis=1)
    same_place = d[np.arange(len(made)), near] < 1.0
    sims = (made.descriptors * extracted.descriptors[near]).sum(axis=1)[same_place]
    assert same_place.mean() > 0.8 and np.median(sims) > 0.95, (same_place.mean(), sims)


def test_unrelated_drawn_pictures_are_not_verified() -> None:
    m = verify.verify(textured(1), textured(2))
    assert m.relation == "none" and m.inliers < verify.MIN_INLIERS and m.covered == 0.0


@pytest.mark.parametrize("picture", [
    Image.new("RGB", (400, 300), "white"),
    Image.new("RGB", (1, 1)),
    np.zeros((0, 0, 3), np.uint8),
    np.zeros((5, 7), np.uint8),
    np.full((200, 200), 0.5, np.float32),
    np.zeros((64, 64, 4), np.uint8),
    np.zeros((3,), np.uint8),
], ids=["blank", "1px", "empty", "tiny", "flat-float", "rgba-black", "1d"])
def test_degenerate_pictures_are_not_verified_and_never_raise(picture: object) -> None:
    real = textured(7)
    for a, b in ((picture, real), (real, picture), (picture, picture)):
        m = verify.verify(a, b)  # type: ignore[arg-type]
        assert m.relation == "none" and m.inliers == 0 and m.box is None


def test_verification_is_deterministic_and_verify_many_extracts_the_query_once() -> None:
    original = textured(11)
    crop = partial_copies.detail_crop(original, np.random.default_rng(4), (0.05, 0.1))
    assert verify.verify(crop.picture, original) == verify.verify(crop.picture, original)
    f1, f2 = verify.features(original), verify.features(original)
    assert np.array_equal(f1.sift, f2.sift) and np.array_equal(f1.points, f2.points)
    others = [original, textured(12), Image.new("RGB", (50, 50))]
    many = verify.verify_many(crop.picture, [verify.features(o) for o in others])
    q = verify.QUERY_KEYPOINTS
    assert many == [verify.verify(crop.picture, o, a_keypoints=q) for o in others]
    assert [m.relation for m in many] == ["a_in_b", "none", "none"]


def test_a_large_scan_is_verified_at_the_working_scale_with_its_own_pixel_box() -> None:
    big = textured(9, (640, 480)).resize((2560, 1920), Image.Resampling.BICUBIC)
    box = (1000, 500, 1800, 1100)
    m = verify.verify(big.crop(box), big)
    assert m.relation == "a_in_b" and m.box is not None and iou(m.box, box) >= 0.8, m
    f = verify.features(big)
    assert max(f.points.max(axis=0)) <= verify.MAX_SIDE and len(f) <= verify.MAX_KEYPOINTS + 50


# --------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("band", list(partial_copies.BANDS))
def test_detail_crops_cover_their_band_inside_the_picture(band: str) -> None:
    lo, hi = partial_copies.BANDS[band]
    for w, h in ((640, 480), (300, 900), (1000, 120)):
        for seed in range(20):
            x0, y0, x1, y1 = partial_copies.crop_box(w, h, np.random.default_rng(seed), (lo, hi))
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            share = (x1 - x0) * (y1 - y0) / (w * h)
            assert lo - 0.01 <= share <= hi + 0.01, (w, h, seed, share)


def test_detail_crops_are_seeded_and_cut_from_the_original() -> None:
    img = textured(2)
    a = partial_copies.detail_crop(img, np.random.default_rng(8), (0.2, 0.4), rescanned=False)
    b = partial_copies.detail_crop(img, np.random.default_rng(8), (0.2, 0.4), rescanned=False)
    assert a.box == b.box and a.processes == ()
    assert np.array_equal(np.asarray(a.picture), np.asarray(img.crop(a.box)))
    r1 = partial_copies.detail_crop(img, np.random.default_rng(8), (0.2, 0.4))
    r2 = partial_copies.detail_crop(img, np.random.default_rng(8), (0.2, 0.4))
    assert r1.processes and np.array_equal(np.asarray(r1.picture), np.asarray(r2.picture))
    aspects = [(x1 - x0) / (y1 - y0) for x0, y0, x1, y1 in (
        partial_copies.crop_box(4000, 4000, np.random.default_rng(s), (0.1, 0.2))
        for s in range(50))]
    assert min(aspects) >= partial_copies.ASPECT[0] - 0.01
    assert max(aspects) <= partial_copies.ASPECT[1] + 0.01


def test_the_detail_generator_is_independent_of_the_training_augmentations() -> None:
    tree = ast.parse(inspect.getsource(partial_copies))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(m and ("degrade" in m or "augment" in m) for m in imported), imported


@pytest.mark.shared_data
def test_verify_pair_agrees_with_verify_and_its_first_pass_confirms_whole_copies(
    photos: list[Image.Image],
) -> None:
    """cbir pairs' two-pass check: a rescan is confirmed by the strongest QUICK_KEYPOINTS alone
    (its inliers bounded by them), a detail and an unrelated photograph get verify's answer."""
    photo = photos[0]
    feats = verify.features(photo)
    assert len(feats) > verify.QUICK_KEYPOINTS  # else the first pass would be the only one
    copy, _ = partial_copies.rescan(photo, np.random.default_rng(3))
    quick = verify.verify(
        copy, feats, a_keypoints=verify.QUICK_KEYPOINTS, b_keypoints=verify.QUICK_KEYPOINTS
    )
    pair = verify.verify_pair(copy, feats)
    assert pair == quick and pair.relation == "full"
    assert pair.inliers <= verify.QUICK_KEYPOINTS
    crop = partial_copies.detail_crop(photo, np.random.default_rng(5), (0.05, 0.1))
    full = verify.verify(crop.picture, feats)
    pair = verify.verify_pair(crop.picture, feats)
    assert full.relation == pair.relation == "a_in_b"
    assert pair.box is not None and full.box is not None and iou(pair.box, full.box) >= 0.8
    for other in photos[1:4]:
        assert verify.verify_pair(other, feats) == verify.verify(other, feats)


def test_the_pairs_files_read_a_blank_margin_as_verification_writes_it() -> None:
    from cbir.store.pairs import FULL_SHARE

    assert FULL_SHARE == verify.FULL  # the catalogue's copy, kept without importing OpenCV
