"""cbir.store: the layout of a workspace's data folder, and readers that refuse damaged or
foreign files with one line saying what to do."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tiny_workspace

from cbir.errors import CbirError
from cbir.store.embeddings import embedded_ids, load_embeddings, read_shard
from cbir.store.index import NoIndex, load_index
from cbir.store.layout import layout
from cbir.store.manifest import canonical_images, ids_in, latest_run, load_manifest


def test_the_layout_names_every_path_under_the_workspace(tmp_path):
    settings = tiny_workspace.make(tmp_path, steps=())
    lay = layout(settings)
    assert lay.root == tmp_path and lay.scans == tmp_path / "scans"
    assert lay.ground_truth == tmp_path / "gt.csv"
    assert lay.data == tmp_path / "data"
    assert lay.files.parent == lay.manifest_dir == tmp_path / "data" / "manifest"
    assert lay.embeddings("abc") == tmp_path / "data" / "embeddings" / "abc"
    assert lay.embeddings("abc", baseline=True).is_relative_to(lay.cache_dir)
    assert lay.checkpoint == tmp_path / "data" / "models" / "model.pt"
    assert lay.lock.parent == lay.data


def test_before_ingest_the_manifest_readers_say_to_ingest(tmp_path):
    settings = tiny_workspace.make(tmp_path, steps=())
    with pytest.raises(CbirError, match=r"no manifest at .*: run `cbir ingest` first"):
        load_manifest(settings)
    assert latest_run(settings) == 0


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return tiny_workspace.make(tmp_path_factory.mktemp("store"), steps=("ingest", "embed"))


def test_the_manifest_and_its_canonical_images(settings):
    table = load_manifest(settings)
    assert table.num_rows == tiny_workspace.N_PHOTOS + 2
    canon = canonical_images(settings)
    assert len(canon) == tiny_workspace.N_PHOTOS + 1  # one of the exact copies
    assert [r["image_id"] for r in canon] == sorted(r["image_id"] for r in canon)
    assert latest_run(settings) == 1


def test_a_damaged_manifest_is_one_line_naming_the_file_and_the_fix(settings, tmp_path):
    files = layout(settings).files
    saved = files.read_bytes()
    try:
        files.write_bytes(b"PAR1 this is not parquet")
        with pytest.raises(CbirError) as info:
            load_manifest(settings)
        text = str(info.value)
        assert "\n" not in text and str(files) in text and "dvc checkout" in text
    finally:
        files.write_bytes(saved)
    assert load_manifest(settings).num_rows == tiny_workspace.N_PHOTOS + 2


def _folder(settings):
    [folder] = [p for p in layout(settings).embeddings_dir.iterdir() if p.is_dir()]
    return folder


def test_embeddings_load_from_their_shards(settings):
    folder = _folder(settings)
    ids, vectors = load_embeddings(folder)
    assert len(ids) == tiny_workspace.N_PHOTOS + 1 and set(ids) == embedded_ids(folder)
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1,
                                                       atol=1e-4)
    some = set(ids[:2])
    assert set(load_embeddings(folder, only=some)[0]) == some


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.write_bytes(b"garbage"), "is damaged"),
    (lambda p: pq.write_table(pa.table({"image_id": ["x"]}), p), "it has no column 'vector'"),
    (lambda p: pq.write_table(pa.table({"image_id": [1], "vector": [[1.0]]}), p),
     "column 'vector' holds"),
])
def test_a_damaged_or_foreign_shard_is_one_line(tmp_path, damage, fragment):
    shard = tmp_path / "shard-x-00001.parquet"
    damage(shard)
    with pytest.raises(CbirError, match=fragment) as info:
        read_shard(shard)
    text = str(info.value)
    assert "\n" not in text and str(shard) in text and "cbir embed" in text


def test_no_index_is_its_own_error_and_a_damaged_one_is_not(tmp_path):
    with pytest.raises(NoIndex, match=r"no index at .*; build it with `cbir index`"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    (tmp_path / "index.faiss").write_bytes(b"x")
    with pytest.raises(CbirError, match="unreadable") as info:
        load_index(tmp_path)
    assert not isinstance(info.value, NoIndex)


def test_canonical_paths_is_a_mapping_found_by_bisection():
    """store.manifest.CanonicalPaths answers as the dictionary it replaces, for ids of one
    length (viewed in place) and of several (non-ASCII too); it reads the manifest once, on
    first use."""
    import pyarrow as pa

    from cbir.store.manifest import CanonicalPaths, sorted_keys

    hexed = ["f" * 16, "00000000000000a0", "0" * 16, "8000000000000000", "7fffffffffffffff"]
    for ids in (["0f3a", "a1b2", "00ff", "ffff"], ["b", "ä", "aa", "a", "ab"], hexed):
        paths = [f"box/{i}.jpg" for i in ids]
        loads = []

        def load(ids=ids, paths=paths):
            loads.append(1)
            return pa.table({"image_id": ids, "path": paths})

        m = CanonicalPaths(load)
        assert not loads  # nothing read until asked
        assert dict(m) == dict(zip(ids, paths, strict=True))
        assert len(m) == len(ids) and sorted(m) == sorted(ids)
        for i, p in zip(ids, paths, strict=True):
            assert m[i] == p and m.get(i) == p and i in m
        for other in ("", "zz", "0f3", "0f3a0", "a1b3", 7):
            assert other not in m and m.get(other, "?") == "?"
        assert len(loads) == 1
        # a few looked up at once: one pass over the rows as loaded, no sorted arrays; the
        # same answers as get, and the rows loaded once for the lookups and the sorting after
        few = CanonicalPaths(load)
        asked = [ids[-1], "zz", ids[0], ids[-1], "0" * 15 + "1"]
        assert few.paths(asked) == [m.get(x) for x in asked] and few._keys is None
        assert few.paths([ids[1]]) == [paths[1]] and few.paths([]) == []
        assert dict(few) == dict(m) and few.paths(asked) == [m.get(x) for x in asked]
        assert len(loads) == 2
        # many at once (a full clustering's members): by bisection in arrays, not one by one
        many = asked * 30
        assert few.path_array(pa.array(many)).to_pylist() == [m.get(x) for x in many]
        assert few.path_array(pa.chunked_array([many[:7], many[7:]])).to_pylist() == [
            m.get(x) for x in many]
        assert few.path_array(pa.array([], pa.string())).to_pylist() == []
        assert few.path_array(pa.array(["zz", "yy"])).to_pylist() == [None, None]
        absent_hex = ["0" * 15 + "1", "e" * 16]  # cbir's form: looked up as integers
        assert few.path_array(pa.array([ids[0], *absent_hex])).to_pylist() == [
            paths[0], None, None]
    keys = sorted_keys(pa.array(["00ff", "0f3a", "a1b2"]))
    assert keys.dtype == "S4" and keys.tolist() == [b"00ff", b"0f3a", b"a1b2"]
    sliced = sorted_keys(pa.array(["xx00ff", "0f3a", "a1b2"]).slice(1))  # an offset into buffers
    assert sliced.tolist() == [b"0f3a", b"a1b2"]


def test_canonical_paths_says_which_recorded_paths_moved():
    """CanonicalPaths.moved: a recorded (id, path) whose path is no longer the id's canonical
    one, or whose id is no canonical image, means moved; all current means not."""
    import pyarrow as pa

    from cbir.store.manifest import CanonicalPaths

    for form in (str, lambda x: x * 8):  # ids of any form, and cbir's (16 hex digits: integers)
        aa, bb, cc, dd = (form(x) for x in ("aa", "bb", "cc", "dd"))
        m = CanonicalPaths(lambda aa=aa, bb=bb, cc=cc: pa.table(
            {"image_id": [cc, aa, bb], "path": ["x/c.jpg", "x/a.jpg", "x/b.jpg"]}))
        assert not m.moved(pa.array([cc, aa, cc]), pa.array(["x/c.jpg", "x/a.jpg", "x/c.jpg"]))
        assert not m.moved(pa.array([], pa.string()), pa.array([], pa.string()))
        assert m.moved(pa.array([cc, aa]), pa.array(["x/c.jpg", "y/a.jpg"]))  # a moved file
        assert m.moved(pa.array([aa, dd]), pa.array(["x/a.jpg", "x/d.jpg"]))  # no longer here
        assert m.moved(pa.array([aa]), pa.array([None], pa.string()))
        assert (m._hexed is not None) == (len(aa) == 16)


def test_ids_in_agrees_with_arrow_is_in():
    """Membership of image ids: integer binary search for cbir's hex ids, Arrow's is_in for
    others; the same answers, whatever the order, chunking or form of either side."""
    from cbir.store.manifest import ImageIds

    rng = np.random.default_rng(11)
    for case in range(200):
        pool = [f"{x:016x}" for x in rng.integers(0, 1 << 63, size=int(rng.integers(1, 40)))]
        pool += ["0" * 16, "f" * 16]
        values = [pool[j] for j in rng.integers(0, len(pool), size=int(rng.integers(0, 50)))]
        among = [pool[j] for j in rng.integers(0, len(pool), size=int(rng.integers(0, 20)))]
        if case % 4 == 1:
            among.sort()
        if case % 4 == 2:  # not cbir's form on one side: Arrow's is_in
            among = [a.upper() for a in among] + among[:1]
        if case % 4 == 3:
            values = values + ["not-an-id"]
        half = len(values) // 2
        chunked = pa.chunked_array([pa.array(values[:half], pa.string()),
                                    pa.array(values[half:], pa.string())])
        want = [v in set(among) for v in values]
        assert ids_in(chunked, pa.array(among, pa.string())).tolist() == want
        assert ids_in(pa.array(values, pa.string()), pa.array(among, pa.string())).dtype == bool
        # sorted distinct values, as the searcher holds them (ImageIds): `among` looked up in
        # them instead, with repeats and ids absent from them
        ordered = sorted(set(values) - {"not-an-id"})
        expect = [v in set(among) for v in ordered]
        assert ids_in(ImageIds(pa.array(ordered, pa.string())), pa.array(among)).tolist() == expect
        assert ids_in(pa.array(ordered, pa.string()), pa.array(among)).tolist() == expect


def test_image_ids_read_like_the_list_they_replace():
    """store.manifest.ImageIds (the searcher's ids, held in Arrow): indexing, slicing,
    iteration, comparison, FAISS ids and takes as the list of strings gives them; ids not of
    cbir's form too (parsed one at a time)."""
    import pyarrow as pa

    from cbir.faiss_index import faiss_ids
    from cbir.store.manifest import ImageIds

    rng = np.random.default_rng(5)
    hexed = sorted(f"{x:016x}" for x in rng.integers(0, 1 << 63, 300_000)) + ["f" * 16]
    listed_upper = ["00FF" * 4, "0a" * 8]  # not cbir's form: no keys
    for listed in (hexed, listed_upper, []):
        ids = ImageIds(pa.chunked_array([pa.array(listed[:7], pa.string()),
                                         pa.array(listed[7:], pa.string())]))
        assert len(ids) == len(listed) and list(ids) == listed and ids == listed
        assert ids == ImageIds(pa.array(listed, pa.string())) and ids != listed + ["x"]
        for i in (0, 1, len(listed) - 1, -1, -len(listed)):
            if listed:
                assert ids[i] == listed[i]
        for cut in (slice(None), slice(3, 9), slice(5, 2), slice(1, None, 4), slice(-3, None)):
            assert ids[cut] == listed[cut]
        rows = rng.integers(0, max(1, len(listed)), 50) if listed else np.zeros(0, np.int64)
        assert ids.take(rows) == ImageIds.of(listed).take(rows) == [listed[r] for r in rows.tolist()]
        assert faiss_ids(ids).tolist() == faiss_ids(listed).tolist()
        assert ids.arrow.to_pylist() == ImageIds.of(listed).arrow.to_pylist() == listed
        assert ImageIds.of(ids) is ids
        assert (ids.hex_keys() is not None) == (listed is not listed_upper)
        given = ImageIds(ids.arrow, ids.hex_keys())  # keys made by the caller (open_vectors)
        assert faiss_ids(given).tolist() == faiss_ids(listed).tolist()
        if listed:
            with pytest.raises(IndexError):
                ids[len(listed)]


def test_the_rows_of_a_few_images_and_of_the_exact_copies_in_one_pass(tmp_path, monkeypatch):
    """store.manifest.rows_of_images: every manifest row of the images asked and of each image
    with a byte-identical copy (what a night's stored reports grow from), their canonical
    paths, the exact copies from them, and whether the manifest is still the file they were
    read from."""
    from cbir.store.manifest import canonical_table, exact_copies, rows_of_images

    s = tiny_workspace.make(tmp_path, steps=("ingest",))
    files = load_manifest(s)
    copied = files.filter(pc.equal(files.column("status"), "duplicate"))
    copied = set(copied.column("image_id").to_pylist())
    assert len(copied) == 1  # p0, copied
    table = canonical_table(s)
    now = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(),
                   strict=True))
    asked = [i for i in now if i not in copied][:2] + ["0" * 16]
    read = rows_of_images(s, asked, ["bytes", "first_run"])
    assert read is not None
    assert read.ids.to_pylist() == sorted({*asked, *copied})
    expected = files.filter(pc.is_in(files.column("image_id"), value_set=read.ids))
    key = ("image_id", "path", "status", "bytes", "first_run")
    assert sorted(zip(*(read.table.column(c).to_pylist() for c in key))) == sorted(
        zip(*(expected.column(c).to_pylist() for c in key)))
    assert expected.num_rows == 4  # two asked, p0 and its copy
    # every image read: its canonical path or None (an unknown id asked); one not read left out
    assert read.paths_of([*now, "0" * 16, "f" * 16]) == {i: now.get(i) for i in read.ids.to_pylist()}
    assert read.current(s)
    # the exact copies from those rows, as from the manifest (every image with a copy is read):
    # the file is not read again (here damaged, the rows said to be current)
    copies = exact_copies(s)
    assert len(copies) == 1
    saved = layout(s).files.read_bytes()
    layout(s).files.write_bytes(b"not a manifest")
    with monkeypatch.context() as m:
        m.setattr(type(read), "current", lambda self, settings: True)
        assert exact_copies(s, read) == copies
    with pytest.raises(CbirError, match="files.parquet is unreadable"):
        exact_copies(s, read)  # not current: read, and named
    layout(s).files.write_bytes(saved)
    manifest = layout(s).files
    assert not read.current(s)  # written again: another file, whatever it holds
    manifest.write_bytes(b"not a manifest")
    assert rows_of_images(s, asked, ["bytes"]) is None


def test_a_few_canonical_paths_are_read_by_duckdb_as_arrow_reads_them(tmp_path):
    """store.manifest.canonical_paths_of: the canonical paths of a few ids, read by DuckDB
    (only those rows' paths), equal to those of canonical_table; CanonicalPaths.paths asks it
    first and loads the manifest only where it cannot answer."""
    from cbir.store.manifest import CanonicalPaths, canonical_paths_of, canonical_table

    s = tiny_workspace.make(tmp_path, steps=("ingest",))
    table = canonical_table(s)
    now = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(),
                   strict=True))
    assert "copies/p0-copy.png" not in now.values()  # an exact copy is no canonical image
    asked = [*list(now)[:3], "0" * 16, list(now)[0]]
    assert canonical_paths_of(s, asked) == {i: now[i] for i in asked if i in now}
    loads: list[int] = []

    def load():
        loads.append(1)
        return table

    paths = CanonicalPaths(load, lambda ids: canonical_paths_of(s, ids))
    assert paths.paths(asked) == [now.get(i) for i in asked] and not loads
    layout(s).files.write_bytes(b"not a manifest")  # DuckDB cannot read it: loaded instead
    assert canonical_paths_of(s, asked) is None
    assert paths.paths(asked) == [now.get(i) for i in asked] and loads == [1]
