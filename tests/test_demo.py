"""cbir.steps.demo and cbir.synth: layout and ground truth, byte-level determinism, copies that
are near-duplicates."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.steps.demo import DemoSummary, generate_demo_collection
from cbir.synth.copies import archival_copy
from cbir.synth.paintings import paint_original

SMALL = {"n_groups": 6, "n_distractors": 4, "size": 128, "workers": 1}


def _read_gt(root: Path) -> dict[str, str]:
    with open(root / "ground_truth.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "group"]
        return {row["path"]: row["group"] for row in reader}


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _thumb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo_collection(root, **SMALL)  # type: ignore[arg-type]


def test_ground_truth_and_layout(small: tuple[Path, DemoSummary]) -> None:
    root, summary = small
    gt = _read_gt(root)
    assert summary.ground_truth == root / "ground_truth.csv"
    assert summary.n_images == len(gt)
    on_disk = {p.relative_to(root).as_posix() for p in (root / "scans").rglob("*") if p.is_file()}
    assert on_disk == set(gt)
    for path in gt:
        assert re.fullmatch(r"scans/box-\d{2}/scan-\d{6}\.(jpg|png|tif)", path), path
    assert len({p.split("/")[1] for p in gt}) >= 2  # spread over several boxes
    members: dict[str, list[str]] = defaultdict(list)
    for path, group in gt.items():
        members[group].append(path)
    sizes = sorted(len(m) for m in members.values())
    assert len(members) == SMALL["n_groups"] + SMALL["n_distractors"]
    assert sizes.count(1) == SMALL["n_distractors"]
    assert all(2 <= n <= 4 for n in sizes if n > 1)  # default max_copies=4: original + 1..3 copies
    assert all(re.fullmatch(r"g\d{4}", g) for g in members)


def test_images_decode_with_expected_sizes(small: tuple[Path, DemoSummary]) -> None:
    root, _ = small
    long_sides = []
    for path in _read_gt(root):
        with Image.open(root / path) as im:
            im.load()
            assert im.mode in ("RGB", "L")
            long_sides.append(max(im.size))
    assert max(long_sides) <= 2 * SMALL["size"] and min(long_sides) >= SMALL["size"] // 3
    n_originals = SMALL["n_groups"] + SMALL["n_distractors"]
    assert long_sides.count(SMALL["size"]) >= n_originals  # originals, and copies kept at size


Small = tuple[Path, DemoSummary]


def test_same_arguments_give_identical_bytes(small: Small, tmp_path: Path) -> None:
    root, _ = small
    generate_demo_collection(tmp_path, **SMALL)  # type: ignore[arg-type]
    assert _files(tmp_path) == _files(root)


def test_worker_pool_does_not_change_output(tmp_path: Path) -> None:
    args = {"n_groups": 10, "n_distractors": 6, "size": 64, "seed": 3}
    generate_demo_collection(tmp_path / "serial", workers=1, **args)  # type: ignore[arg-type]
    generate_demo_collection(tmp_path / "pool", workers=2, **args)  # type: ignore[arg-type]
    assert _files(tmp_path / "serial") == _files(tmp_path / "pool")


def test_different_seed_gives_different_collection(small: Small, tmp_path: Path) -> None:
    root, _ = small
    generate_demo_collection(tmp_path, **{**SMALL, "seed": 1})  # type: ignore[arg-type]
    assert _files(tmp_path)["ground_truth.csv"] != _files(root)["ground_truth.csv"]


def test_rerun_skips_and_smaller_run_removes_stale_scans(tmp_path: Path) -> None:
    args = {"n_distractors": 2, "size": 64, "workers": 1}
    generate_demo_collection(tmp_path, n_groups=5, **args)  # type: ignore[arg-type]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    generate_demo_collection(tmp_path, n_groups=5, **args)  # type: ignore[arg-type]
    again = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert again == stamp  # nothing rewritten

    (tmp_path / "scans" / "box-01" / "notes.txt").write_text("kept: not a demo scan")
    summary = generate_demo_collection(tmp_path, n_groups=2, **args)  # type: ignore[arg-type]
    gt = _read_gt(tmp_path)
    scans = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "scans").rglob("scan-*")}
    assert scans == set(gt) and summary.n_images == len(gt)
    assert (tmp_path / "scans" / "box-01" / "notes.txt").exists()


def test_copies_are_closer_to_their_group_than_distractors(small: tuple[Path, DemoSummary]) -> None:
    """Each group member is nearer to another member than to the median distractor.

    Distance: mean absolute difference of 16x16 greyscale thumbnails.
    """
    root, _ = small
    gt = _read_gt(root)
    thumbs = {p: _thumb(root / p) for p in gt}
    members: dict[str, list[str]] = defaultdict(list)
    for path, group in gt.items():
        members[group].append(path)
    distractors = [m[0] for m in members.values() if len(m) == 1]

    def dist(a: str, b: str) -> float:
        return float(np.abs(thumbs[a] - thumbs[b]).mean())

    within = []
    for group in members.values():
        if len(group) < 2:
            continue
        for p in group:
            own = min(dist(p, q) for q in group if q != p)
            assert own < np.median([dist(p, d) for d in distractors]), p
            within.append(own)
    # no distractor is a near-duplicate of anything: its nearest image is farther than a copy's
    for d in distractors:
        assert min(dist(d, q) for q in gt if q != d) > np.median(within)


def test_copies_are_not_pixel_identical() -> None:
    original = paint_original(np.random.default_rng(0), 96)
    for k in range(20):
        copy = archival_copy(original, np.random.default_rng(k))
        assert copy.mode == "RGB"
        assert copy.size != original.size or copy.tobytes() != original.tobytes()


BAD_ARGS = [{"max_copies": 1}, {"n_groups": 0, "n_distractors": 0}, {"size": 8}, {"n_groups": -1}]


@pytest.mark.parametrize("kwargs", BAD_ARGS)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        generate_demo_collection(tmp_path, **kwargs)  # type: ignore[arg-type]
