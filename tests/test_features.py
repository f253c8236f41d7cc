"""The cache of local features (cbir.store.features): round trip, damaged entries, a killed
writer's leftovers, and parallel extraction equal to serial. Real OpenCV SIFT on drawn
pictures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from conftest import save, textured

from cbir import verify
from cbir.store import features as F


def same(a: verify.Features, b: verify.Features) -> bool:
    return (
        np.array_equal(a.points, b.points)
        and np.array_equal(a.sift, b.sift)
        and (a.width, a.height) == (b.width, b.height)
        and abs(a.scale - b.scale) < 1e-6
    )


def test_features_come_back_as_written_across_parts_and_the_consolidated_index(tmp_path):
    folder = tmp_path / "cache"
    f1, f2 = verify.features(textured(1)), verify.features(textured(2, (700, 300)))
    cache = F.FeatureCache(folder)
    cache.add([("a", f1), ("b", f2)])
    assert len(f1) > 100 and len(f2) > 100
    reopened = F.FeatureCache(folder)
    got_a, got_b = reopened.get("a"), reopened.get("b")
    assert got_a is not None and got_b is not None and same(got_a, f1) and same(got_b, f2)
    reopened.consolidate()
    f3 = verify.features(textured(3))
    reopened.add([("c", f3), ("a", f3)])  # a newer part: it wins for "a"
    again = F.FeatureCache(folder)
    assert len(again) == 3 and again.missing(["a", "b", "c", "d"]) == ["d"]
    assert same(again.get("a"), f3) and same(again.get("b"), f2)  # type: ignore[arg-type]
    # the verification of cached features is that of fresh ones
    assert verify.verify(again.get("b"), f2) == verify.verify(f2, f2)  # type: ignore[arg-type]


def test_a_damaged_entry_reads_as_absent_and_is_extracted_again(tmp_path):
    scans = tmp_path / "scans"
    paths = [save(textured(i), scans / f"p{i}.jpg", quality=92) for i in range(2)]
    cache = F.FeatureCache(tmp_path / "cache")
    jobs = [(f"id{i}", os.fsencode(p)) for i, p in enumerate(paths)]
    assert F.extract(cache, jobs, workers=1, max_pixels=10**8) == {}
    [part] = list((tmp_path / "cache").glob("part-*.bin"))
    raw = bytearray(part.read_bytes())
    raw[len(raw) - 10] ^= 0xFF  # a flipped byte in the last record (id1)
    part.write_bytes(bytes(raw))
    cache = F.FeatureCache(tmp_path / "cache")
    assert cache.get("id0") is not None
    assert cache.get("id1") is None and cache.missing(["id0", "id1"]) == ["id1"]
    assert F.extract(cache, jobs[1:], workers=1, max_pixels=10**8) == {}
    fresh = F.FeatureCache(tmp_path / "cache").get("id1")
    assert fresh is not None and same(fresh, F.extract_file(paths[1], 10**8))
    # a damaged part index: its pictures are missing (extracted again), nothing raises
    for p in (tmp_path / "cache").glob("*.parquet"):
        p.write_bytes(b"not parquet")
    assert F.FeatureCache(tmp_path / "cache").missing(["id0", "id1"]) == ["id0", "id1"]


def test_a_killed_writers_records_without_index_are_cleaned(tmp_path):
    cache = F.FeatureCache(tmp_path)
    cache.add([("a", verify.features(textured(4)))])
    orphan = tmp_path / "part-00000000000000000001-1.bin"
    orphan.write_bytes(b"records whose index was never written")
    (tmp_path / ".tmp-part-x.bin.abc").write_bytes(b"half a part")
    assert cache.clean() == 2 and not orphan.exists()
    assert F.FeatureCache(tmp_path).get("a") is not None


def test_parallel_extraction_equals_serial_and_reports_unreadable_files(tmp_path):
    scans = tmp_path / "scans"
    paths = [save(textured(10 + i), scans / f"p{i}.jpg", quality=90) for i in range(8)]
    (scans / "broken.jpg").write_bytes(b"not a picture")
    jobs = [(f"id{i}", os.fsencode(p)) for i, p in enumerate(paths)]
    jobs.append(("bad", os.fsencode(scans / "broken.jpg")))
    serial, parallel = F.FeatureCache(tmp_path / "s"), F.FeatureCache(tmp_path / "p")
    assert set(F.extract(serial, jobs, workers=1, max_pixels=10**8)) == {"bad"}
    assert set(F.extract(parallel, jobs, workers=2, max_pixels=10**8)) == {"bad"}
    for image_id, _ in jobs[:-1]:
        a, b = F.FeatureCache(tmp_path / "s").get(image_id), parallel.get(image_id)
        assert a is not None and b is not None and same(a, b)
    assert (tmp_path / "p" / F.INDEX).is_file()  # consolidated after the run


def test_a_reduced_decode_keeps_the_pictures_own_pixels(tmp_path: Path):
    big = textured(9).resize((2400, 1800))
    path = save(big, tmp_path / "big.jpg", quality=90)
    f = F.extract_file(path, 10**8)
    assert (f.width, f.height) == (2400, 1800)
    assert abs(f.scale - verify.MAX_SIDE / 2400) < 1e-6
    box = (900, 600, 1500, 1100)
    m = verify.verify(big.crop(box), f)
    assert m.relation == "a_in_b" and m.box is not None
    assert max(abs(x - y) for x, y in zip(m.box, box, strict=True)) <= 40, m.box
