"""cbir.store.vector_order: the vector file's rows in image id order, kept between runs, grown
from the rows a night appends and equal to matching every row again; matched whole whenever
the files are not the ones it grew from."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_workspace
from conftest import photo, save

import cbir.store.vectors as store_vectors
from cbir.fsutil import TMP_PREFIX, disk_full, write_parquet
from cbir.steps.embed import run_embed
from cbir.steps.ingest import run_ingest
from cbir.store.fingerprint import current_fingerprint
from cbir.store.layout import layout
from cbir.store.manifest import canonical_ids, hex_ids, hex_keys
from cbir.store.tables import rows_from
from cbir.store.vector_order import VectorOrder
from cbir.store.vectors import current_embeddings, open_vectors


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, 1 << 63, size=n, dtype=np.uint64)


def _same(a: VectorOrder, b: VectorOrder) -> None:
    for name in ("keys", "rows", "present", "waiting"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_hex_ids_are_the_inverse_of_hex_keys():
    keys = np.array([0, 1, 255, 0xDEADBEEF, (1 << 64) - 1], np.uint64)
    ids = hex_ids(keys)
    assert ids.to_pylist() == [f"{int(k):016x}" for k in keys]
    np.testing.assert_array_equal(hex_keys(ids), keys)
    assert hex_ids(np.zeros(0, np.uint64)).to_pylist() == []


@pytest.mark.parametrize("seed", range(5))
def test_growing_equals_matching_every_row_again(seed, tmp_path):
    rng = np.random.default_rng(seed)
    images = _keys(rng, 300)
    # the vector file: every image once in some order, then some embedded again (a later row)
    first = rng.permutation(images[:200])
    again = rng.choice(first, 30)
    vectors = np.concatenate([first, again])
    present = rng.choice(images[:250], 180, replace=False)  # 50 present images without a row
    before = VectorOrder.whole({"n": 1}, vectors[:150], present[:120])

    # a night: new images present and embedded, older ones embedded again, a late vector for an
    # image present before, one row twice in the night, and the images of the night's manifest
    night = np.concatenate([vectors[150:], images[250:], present[:3], images[260:262]])
    new_present = np.concatenate([present[120:], images[250:290]])
    present_all = np.concatenate([present, images[250:290]])
    whole = VectorOrder.whole({"n": 2}, np.concatenate([vectors[:150], night]), present_all)
    grown = before.grown({"n": 2}, night, 150, new_present)
    _same(grown, whole)
    assert grown.stamp == {"n": 2}
    # the same from the order as saved and loaded: its arrays mapped from the file, never
    # written (they are read-only), the grown ones new
    before.save(tmp_path / "order.bin")
    loaded = VectorOrder.load(tmp_path / "order.bin")
    assert loaded is not None
    assert all(not getattr(loaded, a).flags.writeable for a in ("keys", "rows", "present"))
    _same(loaded.grown({"n": 2}, night, 150, new_present), whole)
    _same(loaded, before)
    # nights that only embed again, or only bring images present: each array copied as needed
    again = before.grown({"n": 2}, vectors[:10], 150, present[:0])
    assert again.rows.tolist() == [150 + list(vectors[:10]).index(k) if k in vectors[:10]
                                   else r for k, r in zip(before.keys, before.rows, strict=True)]
    _same(loaded.grown({"n": 2}, vectors[:10], 150, present[:0]), again)
    _same(loaded.grown({"n": 2}, night[:0], 150, new_present),
          before.grown({"n": 2}, night[:0], 150, new_present))
    # idempotent: the same rows and images again change nothing
    _same(grown.grown({"n": 3}, night, 150, new_present), whole)
    keys, rows = grown.kept()
    assert np.all(np.diff(keys.astype(np.float64)) >= 0) and len(set(keys)) == len(keys)
    assert set(keys) == set(present_all) & set(vectors) | (set(present_all) & set(night))
    last_row = {k: i for i, k in enumerate(np.concatenate([vectors[:150], night]))}
    assert [last_row[k] for k in keys] == rows.tolist()  # each image's latest row


def test_the_order_is_saved_whole_or_not_read(tmp_path):
    rng = np.random.default_rng(7)
    order = VectorOrder.whole({"manifest": ["e", 3, "x"]}, _keys(rng, 50), _keys(rng, 5))
    path = tmp_path / "order.bin"
    order.save(path)
    back = VectorOrder.load(path)
    assert back is not None and back.stamp == order.stamp
    _same(back, order)
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # cut short (a crash before the rename cannot, a disk can)
    assert VectorOrder.load(path) is None
    path.write_bytes(b"something else\n" + data)
    assert VectorOrder.load(path) is None
    assert VectorOrder.load(tmp_path / "absent.bin") is None


def _opened_as_before(s) -> tuple[list[str], list[int], int]:
    """current_embeddings' answer without the kept order (open_vectors, the fallback)."""
    fp = current_fingerprint(s)
    present = canonical_ids(s)
    ids, vectors = open_vectors(layout(s).embeddings(fp), present)
    return list(ids), vectors._rows.tolist(), len(present) - len(ids)


def _opened(s) -> tuple[list[str], list[int], int]:
    _, ids, vectors, missing = current_embeddings(s)
    return list(ids), vectors._rows.tolist(), missing


@pytest.fixture
def whole_counted(monkeypatch):
    calls = {"whole": 0}
    whole = store_vectors._whole_order

    def counted(*a, **kw):
        calls["whole"] += 1
        return whole(*a, **kw)

    monkeypatch.setattr(store_vectors, "_whole_order", counted)
    return calls


def _night(s, name: str, seed: int) -> None:
    save(photo(seed), s.root / "scans" / "new" / name)
    run_ingest(s)
    run_embed(s)


def test_a_night_grows_the_kept_order_and_anything_else_matches_it_whole(
    tmp_path, whole_counted, monkeypatch
):
    monkeypatch.setattr(store_vectors, "ORDER_SAVE_ROWS", 1)  # every grown order saved
    s = tiny_workspace.make(tmp_path, steps=("ingest", "embed"))
    lay = layout(s)
    path = lay.vector_order(current_fingerprint(s))
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 1
    assert path.is_file()
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 1  # as kept

    shutil.copytree(s.root / "data", tmp_path / "before")
    _night(s, "a.png", 40)  # a new image: the manifest and the vector file appended to
    save(photo(3), s.root / "scans" / "new" / "p3-again.png")  # an exact copy
    run_ingest(s)
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 1  # grown
    assert len(_opened(s)[0]) == tiny_workspace.N_PHOTOS + 2  # p1-small and a.png

    # the same number of rows appended elsewhere: another branch of the data (dvc checkout)
    night_a = tmp_path / "night-a"
    shutil.move(s.root / "data", night_a)
    shutil.copytree(tmp_path / "before", s.root / "data")
    (s.root / "scans" / "new" / "a.png").unlink()
    (s.root / "scans" / "new" / "p3-again.png").unlink()
    _night(s, "b.png", 41)
    save(photo(4), s.root / "scans" / "new" / "p4-again.png")
    run_ingest(s)
    shutil.copy2(night_a / "cache" / path.relative_to(s.root / "data" / "cache"), path)
    ids = _opened(s)[0]
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 2  # not grown
    assert len(ids) == tiny_workspace.N_PHOTOS + 2

    # a scan moved: a row changed, the rows epoch is new
    (s.root / "scans" / "new" / "b.png").rename(s.root / "scans" / "b-moved.png")
    run_ingest(s)
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 3
    # a scan gone: no longer among the present images
    (s.root / "scans" / "b-moved.png").unlink()
    run_ingest(s)
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 4
    assert len(_opened(s)[0]) == tiny_workspace.N_PHOTOS + 1

    # a damaged order is matched whole again and replaced
    path.write_bytes(path.read_bytes()[:40])
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 5
    assert VectorOrder.load(path) is not None


def test_a_grown_order_is_saved_again_only_after_enough_rows(tmp_path, whole_counted,
                                                           monkeypatch):
    """A few nights' rows: the kept order stays as saved and each opening grows it from all the
    rows appended since (the same rows as matching whole); past ORDER_SAVE_ROWS rows appended
    since it was saved, the grown order is saved."""
    s = tiny_workspace.make(tmp_path, steps=("ingest", "embed"))
    path = layout(s).vector_order(current_fingerprint(s))
    assert _opened(s) == _opened_as_before(s) and path.is_file()
    saved = path.stat()
    kept = VectorOrder.load(path)
    monkeypatch.setattr(store_vectors, "ORDER_SAVE_ROWS", 3)
    for night, seed in enumerate((50, 51), start=1):
        _night(s, f"n{night}.png", seed)  # a row in the manifest and one in the vector file
        assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 1  # grown
        now = path.stat()
        assert (now.st_ino, now.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)
    assert VectorOrder.load(path).stamp == kept.stamp
    _night(s, "n3.png", 52)  # three rows since it was saved: saved grown
    assert _opened(s) == _opened_as_before(s) and whole_counted["whole"] == 1
    assert VectorOrder.load(path).stamp != kept.stamp
    assert len(VectorOrder.load(path).kept()[0]) == len(_opened(s)[0]) == len(kept.kept()[0]) + 3


@pytest.mark.parametrize("start", [0, 2, 3, 4, 9])
def test_rows_from_reads_the_rows_from_a_start_across_row_groups(tmp_path, start):
    table = pa.table({"n": list(range(10)), "s": [f"r{i}" for i in range(10)]})
    write_parquet(table, tmp_path / "t.parquet", row_group_size=3)
    file = pq.ParquetFile(tmp_path / "t.parquet")
    assert file.metadata.num_row_groups == 4
    got = rows_from(file, start, ["s", "n"])
    assert got.column_names == ["s", "n"] and got.column("n").to_pylist() == list(range(start, 10))


def test_an_order_that_cannot_be_kept_is_gone_without(tmp_path, monkeypatch, whole_counted):
    s = tiny_workspace.make(tmp_path, steps=("ingest", "embed"))
    path = layout(s).vector_order(current_fingerprint(s))
    stale = path.parent / (TMP_PREFIX + path.name + ".killed")  # a save killed before its rename
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")

    def full(self, target):
        raise disk_full(target)

    monkeypatch.setattr(VectorOrder, "save", full)
    assert _opened(s) == _opened_as_before(s)  # a full disk: opened all the same, not kept
    assert not path.exists() and not stale.exists()
    monkeypatch.undo()
    assert _opened(s) == _opened_as_before(s) and path.is_file()


def test_the_rows_added_between_two_openings_are_read_from_the_rows_appended(tmp_path):
    """store.vectors.added_between: between two openings of a real workspace, the present
    images of the rows ingest and embed appended (a new scan; a scan not embedded yet is not
    among the opening's images), read from those rows alone; None where a row changed between
    them (a scan moved: a new rows epoch), where the files changed since the later opening,
    or where either opening is unknown."""
    s = tiny_workspace.make(tmp_path, steps=("ingest", "embed"))
    fp = current_fingerprint(s)
    _, _, first, _ = current_embeddings(s)
    assert isinstance(first.stamp, dict)
    _night(s, "a.png", 40)
    save(photo(41), s.root / "scans" / "new" / "b.png")  # ingested, not embedded yet
    run_ingest(s)
    _, ids, now, _ = current_embeddings(s)
    rows = store_vectors.added_between(s, fp, first.stamp, now.stamp, ids)
    assert rows is not None and len(rows) == 1
    manifest = pq.read_table(layout(s).files).to_pylist()
    assert [r["path"] for r in manifest if r["image_id"] == ids[int(rows[0])]] == ["new/a.png"]
    assert store_vectors.added_between(s, fp, now.stamp, now.stamp, ids).tolist() == []
    assert store_vectors.added_between(s, fp, None, now.stamp, ids) is None
    assert store_vectors.added_between(s, fp, first.stamp, None, ids) is None
    run_embed(s)  # b.png's row appended after `now`: the files are not those it was made from
    assert store_vectors.added_between(s, fp, first.stamp, now.stamp, ids) is None
    _, ids, later, _ = current_embeddings(s)
    rows = store_vectors.added_between(s, fp, now.stamp, later.stamp, ids)
    manifest = pq.read_table(layout(s).files).to_pylist()
    assert [r["path"] for r in manifest if r["image_id"] == ids[int(rows[0])]] == ["new/b.png"]
    (s.root / "scans" / "new" / "a.png").rename(s.root / "scans" / "a-moved.png")
    run_ingest(s)  # a row changed
    _, ids, moved, _ = current_embeddings(s)
    assert store_vectors.added_between(s, fp, later.stamp, moved.stamp, ids) is None
