"""Pairs stored partitioned by run (cbir.store.pairs): a nightly run writes only its own
partition - the recorded pairs and the pairs its new images found - and updates only the
clusters its new pairs touch, to what clustering all the pairs again gives; removals and too
many partitions fold the partitions into the base; a killed run's partition never counts. On a
synthetic collection (benchmarks/scale.py's generator: clustered descriptors with planted
near-copies), through the real steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import benchmark

from cbir.fsutil import write_parquet
from cbir.faiss_index import index_ids
from cbir.steps import index as index_step
from cbir.steps import pairs as pairs_step
from cbir.steps.index import run_index
from cbir.steps.pairs import clusters_from_pairs, run_pairs
from cbir.store import pairs as store_pairs
from cbir.store.catalog import query
from cbir.store.index import load_index
from cbir.store.layout import layout
from cbir.store.manifest import (
    CANONICAL_EPOCH,
    ROWS_EPOCH,
    CanonicalPaths,
    ImageIds,
    canonical_epoch,
    canonical_table,
    hex_keys,
)
from cbir.store.pairs import (
    clusters_files,
    current_cluster_ids,
    read_clusters,
    read_pairs,
    read_state,
    stray_runs,
)
from cbir.store.tables import DamagedFile

N = 1_500
NEW = 60  # a night's arrivals; a fifth are near-copies of images already in the collection


@pytest.fixture(scope="module")
def scale():
    return benchmark("scale")


@pytest.fixture
def ws(tmp_path, scale) -> Path:
    """The collection, indexed, with its pairs found by a full run."""
    root = tmp_path / "ws"
    scale.child_write_vectors(root, {"n": N, "seed": 3, "shard_size": 250, "dup_frac": 0.2})
    s = scale._settings(root)
    run_index(s)
    run_pairs(s)
    return root


def _night(scale, ws: Path, seed: int) -> Any:
    """A night's arrivals, then the index update and the incremental pairs run."""
    scale.child_arrivals(ws, {"seed": seed, "new": NEW})
    s = scale._settings(ws)
    run_index(s)
    return run_pairs(s, incremental=True)


def _rows(table: pa.Table) -> list[tuple]:
    return sorted(tuple(r.values()) for r in table.to_pylist())


def _in_order(rows: list[dict]) -> list[dict]:
    """Clusters' rows in the clusters' order: size, then the smallest member; members by id."""
    first: dict[int, str] = {}
    for r in rows:
        first[r["cluster_id"]] = min(first.get(r["cluster_id"], r["image_id"]), r["image_id"])
    return sorted(rows, key=lambda r: (-r["size"], first[r["cluster_id"]], r["image_id"]))


def _clusters_hold_every_link(
    ws: Path, scale, threshold: float, before: dict[frozenset, int] | None = None
) -> dict[frozenset, int]:
    """The clusters (clusters.parquet with the nights' changes beside it) are what clustering
    all the recorded pairs again gives (the full algorithm, clusters_from_pairs), weakest
    links included; clusters.parquet, and the nights' file, each in that order (size, then the
    smallest member); each cluster under an id of its own (store.pairs.CLUSTER_IDS): those
    of `before` (the clusters' ids as this returned them earlier) that are still there under
    theirs, the others above every id given before. Returns the clusters' ids."""
    s = scale._settings(ws)
    near = {(r["image_a"], r["image_b"]): (r["score"], r["rank"])
            for r in read_pairs(s).to_pylist() if r["kind"] == "near"}
    clusters = clusters_from_pairs(near, threshold)
    expected = [(m, len(members), np.float32(weak)) for members, weak in clusters for m in members]
    lay = layout(s)
    stored = read_clusters(lay).to_pylist()
    assert [(r["image_id"], r["size"], np.float32(r["weakest_link"]))
            for r in _in_order(stored)] == expected
    for f in clusters_files(lay):
        if f is not None:  # each file in the clusters' order (its rows without members last)
            rows = [r for r in pq.read_table(f).to_pylist() if r["image_id"] is not None]
            assert rows == _in_order(rows)
    assert len(expected) > 10  # something to compare
    groups: dict[int, set[str]] = {}
    for r in stored:
        groups.setdefault(r["cluster_id"], set()).add(r["image_id"])
    ids = {frozenset(m): cid for cid, m in groups.items()}
    assert len(ids) == len(groups) == len(clusters)  # one id a cluster, one cluster an id
    numbering = current_cluster_ids(lay)
    assert numbering is not None and max(groups) < numbering.next
    if before is not None:
        top = max(before.values())
        for members, cid in ids.items():
            assert cid == before[members] if members in before else cid > top
        assert len(set(ids) & set(before)) > 10  # most clusters kept their ids
    return ids


def _full(ws: Path, scale) -> list[tuple]:
    """The pairs a full `cbir pairs` records on a copy of the workspace."""
    other = ws.parent / "full"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(ws, other)
    run_pairs(scale._settings(other))
    assert read_state(layout(scale._settings(other))).runs == []
    return _rows(read_pairs(scale._settings(other)))


def test_nightly_runs_write_their_own_partition_and_cluster_as_all_pairs_would(ws, scale):
    lay = layout(scale._settings(ws))
    base = lay.pairs.stat()
    n_before = read_pairs(scale._settings(ws)).num_rows
    ids = _clusters_hold_every_link(ws, scale, 0.9)  # numbered whole: by size from 1
    clusters_base = lay.clusters.stat()
    assert clusters_files(lay) == (lay.clusters, None)
    assert sorted(ids.values()) == list(range(1, len(ids) + 1))
    lineage = current_cluster_ids(lay).lineage
    for night, seed in enumerate((11, 12), start=1):
        recorded = _rows(read_pairs(scale._settings(ws)))
        out = _night(scale, ws, seed)
        assert out.incremental and out.searched == NEW
        state = read_state(lay)
        assert state is not None and state.runs == list(range(1, night + 1))
        assert lay.run_pairs(night).is_file() and lay.run_searched(night).is_file()
        new = pq.read_table(lay.run_pairs(night))
        assert out.added == new.num_rows > 0  # the planted copies of old images, at least
        searched = pq.read_table(lay.run_searched(night)).column("image_id")
        assert len(searched) == NEW
        # the recorded pairs as they were, and the new ones, each involving a new image
        assert _rows(read_pairs(scale._settings(ws))) == sorted(recorded + _rows(new))
        involved = pc.or_(pc.is_in(new.column("image_a"), value_set=searched),
                          pc.is_in(new.column("image_b"), value_set=searched))
        assert pc.all(involved).as_py()
        # the base is not rewritten: same file, same bytes
        now = lay.pairs.stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
            base.st_ino, base.st_mtime_ns, base.st_size)
        was = ids
        ids = _clusters_hold_every_link(ws, scale, out.thresholds.cluster, was)
        assert set(ids) != set(was)  # the night formed clusters, numbered after the others
        assert current_cluster_ids(lay).lineage == lineage
        # clusters.parquet is not rewritten either: the night's changes are in a file beside it
        assert lay.clusters.stat().st_ino == clusters_base.st_ino
        assert clusters_files(lay)[1] == lay.run_clusters(read_state(lay).clusters_delta)
        # its summary says where the nights' files are, beside the two a reader would open
        assert out.pairs_parts == night and out.clusters_delta == clusters_files(lay)[1]
        printed = "\n".join(out.lines())
        assert f"{lay.pairs} and {night} nightly file" in printed
        assert f"nights' changes to it in runs/{out.clusters_delta.name}" in printed
        assert "duplicate_pairs and clusters views read them together" in printed
    s = scale._settings(ws)
    assert read_pairs(s).num_rows > n_before
    # the catalogue's view reads the base and both partitions
    assert query(s, "SELECT count(*) FROM duplicate_pairs")[1][0][0] == read_pairs(s).num_rows
    # the new pairs joined existing clusters: the update touched some
    clusters = read_clusters(lay)
    assert pc.max(clusters.column("size")).as_py() >= 2
    assert query(s, "SELECT count(*) FROM clusters")[1][0][0] == clusters.num_rows


def test_nights_joining_clusters_an_earlier_night_formed_rewrite_only_the_nights_file(ws, scale):
    """Nights whose copies are of the same images: the second night's links join clusters the
    first night formed, which live in the nights' file (not clusters.parquet): they leave that
    file, and no row says they were replaced; the clusters of clusters.parquet replaced are
    listed once each. clusters.parquet is never rewritten; the clusters, read from Python or
    in the catalogue, are what clustering every pair again gives."""
    (ws / scale.SOURCES_FILE).unlink()  # every night copies the first shard's images
    s = scale._settings(ws)
    lay = layout(s)
    written = lay.clusters.stat()
    before = current_cluster_ids(lay)
    _night(scale, ws, 61)
    first_path = clusters_files(lay)[1]
    assert first_path is not None
    first = pq.read_table(first_path)
    formed = set(first.filter(pc.is_valid(first.column("image_id"))).column("cluster_id")
                 .to_pylist())
    assert formed and min(formed) >= before.next
    out = _night(scale, ws, 62)
    delta_path = clusters_files(lay)[1]
    assert delta_path is not None and delta_path != first_path and not first_path.exists()
    delta = pq.read_table(delta_path)
    replaced = delta.filter(pc.is_null(delta.column("image_id"))).column("cluster_id").to_pylist()
    members = delta.filter(pc.is_valid(delta.column("image_id")))
    assert replaced and len(set(replaced)) == len(replaced) and max(replaced) < before.next
    still = set(members.column("cluster_id").to_pylist())
    assert formed - still  # clusters the first night formed, joined by the second: gone
    assert not set(replaced) & formed  # ... without a row saying so
    assert list(lay.pairs_runs.glob("clusters-*.parquet")) == [delta_path]
    stat = lay.clusters.stat()
    assert (stat.st_ino, stat.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    _clusters_hold_every_link(ws, scale, out.thresholds.cluster)
    listed = query(s, "SELECT cluster_id, image_id, path, size FROM clusters")[1]
    clusters = read_clusters(lay).select(["cluster_id", "image_id", "path", "size"])
    assert sorted(listed) == sorted(tuple(r.values()) for r in clusters.to_pylist())
    assert len(listed) > 10


def test_a_damaged_nights_clusters_file_is_named_and_the_next_night_clusters_everything(ws, scale):
    """A nights' clusters file that no longer reads: queries of the clusters stop with one line
    naming it and what rewrites it, not a DuckDB error; the next night clusters every pair
    again (clusters.parquet rewritten, the file dropped from the commit and removed)."""
    s = scale._settings(ws)
    lay = layout(s)
    _night(scale, ws, 71)
    damaged = clusters_files(lay)[1]
    assert damaged is not None
    damaged.write_bytes(b"not a Parquet file")
    with pytest.raises(DamagedFile, match=r"clusters-.*\.parquet is unreadable: .*`cbir pairs`"):
        query(s, "SELECT count(*) FROM clusters")
    with pytest.raises(DamagedFile, match="is unreadable"):
        read_clusters(lay)
    written = lay.clusters.stat()
    out = _night(scale, ws, 72)
    assert out.incremental and read_state(lay).clusters_delta == ""
    assert not damaged.exists() and not list(lay.pairs_runs.glob("clusters-*"))
    assert lay.clusters.stat().st_mtime_ns != written.st_mtime_ns
    _clusters_hold_every_link(ws, scale, out.thresholds.cluster)
    assert query(s, "SELECT count(*) FROM clusters")[1][0][0] == read_clusters(lay).num_rows


def test_searched_files_hold_their_keys_and_files_without_them_give_the_same_night(ws, scale,
                                                                                monkeypatch):
    """A searched file holds its ids' hex_keys beside them, in id order, and a night reads the
    keys, not the strings (10^7 strings: 2.5 s); a base written before the keys existed
    (strings only) is read by its strings and gives the same night."""
    old = ws.parent / "old"
    shutil.copytree(ws, old)
    lay_old = layout(scale._settings(old))
    _forget_opening(lay_old)  # as written before the stamp: the searched files are read
    base = pq.read_table(lay_old.searched)
    write_parquet(base.drop_columns([store_pairs.SEARCHED_KEY]), lay_old.searched)
    assert pq.read_schema(lay_old.searched).metadata == base.schema.metadata  # same token
    strings_read: list[Path] = []
    real = store_pairs._strings
    monkeypatch.setattr(store_pairs, "_strings",
                        lambda path: strings_read.append(path) or real(path))
    out = _night(scale, ws, 51)
    assert out.incremental and out.searched == NEW and not strings_read
    lay = layout(scale._settings(ws))
    for f in (lay.searched, lay.run_searched(1)):
        table = pq.read_table(f)
        keys = table.column(store_pairs.SEARCHED_KEY).to_numpy()
        assert np.array_equal(keys, hex_keys(table.column("image_id").combine_chunks()))
        assert (np.diff(keys.astype(np.float64)) > 0).all() and len(keys) >= NEW
    out_old = _night(scale, old, 51)
    assert strings_read == [lay_old.searched]
    assert (out_old.incremental, out_old.searched, out_old.added) == (True, NEW, out.added)
    assert _rows(read_pairs(scale._settings(old))) == _rows(read_pairs(scale._settings(ws)))
    assert read_clusters(lay_old).equals(read_clusters(lay))


def _forget_opening(lay) -> None:
    """pairs.json as written before it recorded the embeddings' stamp (`opened`)."""
    raw = json.loads(lay.pairs_state.read_text())
    assert isinstance(raw.pop("opened"), dict)
    lay.pairs_state.write_text(json.dumps(raw))


def test_a_night_finds_its_unsearched_images_among_the_rows_appended(ws, scale, monkeypatch):
    """A night whose manifest and vector file only appended rows since the recorded search
    takes its unsearched images from those rows (store.vectors.added_between), reading no
    searched file (10^7 ids at 10^7), and finds what comparing every image with the
    searched files finds. A changed row, or searched files that do not list every image
    present then (checked by count), mean comparing every image."""
    slow = ws.parent / "slow"
    shutil.copytree(ws, slow)
    read: list[int] = []
    real = pairs_step.read_searched
    monkeypatch.setattr(pairs_step, "read_searched",
                        lambda files: read.append(len(files)) or real(files))
    compared: list[int] = []  # the index update's comparison of every id (steps.index)
    real_changes = index_step._changes
    monkeypatch.setattr(index_step, "_changes",
                        lambda have, fids: compared.append(len(fids)) or real_changes(have, fids))
    lay, lay_slow = layout(scale._settings(ws)), layout(scale._settings(slow))
    for night, seed in enumerate((61, 62), start=1):
        out = _night(scale, ws, seed)
        assert out.incremental and out.searched == NEW and read == [] and compared == []
        assert read_state(lay).opened is not None
        _forget_opening(lay_slow)
        out_slow = _night(scale, slow, seed)
        assert read == [night]  # the base and the partitions before this night's
        read.clear()
        assert (out_slow.searched, out_slow.added) == (NEW, out.added) and out.added > 0
        assert _rows(read_pairs(scale._settings(slow))) == _rows(read_pairs(scale._settings(ws)))
        for f in ("clusters", "searched"):
            assert pq.read_table(getattr(lay_slow, f)).equals(pq.read_table(getattr(lay, f)))
        assert pq.read_table(lay_slow.run_searched(night)).equals(
            pq.read_table(lay.run_searched(night)))
        compared.clear()
    held = [np.sort(index_ids(load_index(x.index_dir)[0])) for x in (lay, lay_slow)]
    assert np.array_equal(*held) and len(held[0]) == N + 2 * NEW
    # the searched files miss an image that was present (not as any run leaves them): the
    # count says so, and the night compares every image - and searches that one again
    base = pq.read_table(lay.searched)
    write_parquet(base.slice(1), lay.searched)
    out = _night(scale, ws, 63)
    assert read == [3] and out.searched == NEW + 1 and compared == []
    read.clear()
    # a changed row (ingest draws a new rows epoch): every image compared
    files = pq.read_table(lay.files)
    meta = {**files.schema.metadata, ROWS_EPOCH.encode(): b"another"}
    write_parquet(files.replace_schema_metadata(meta), lay.files)
    out = _night(scale, ws, 64)
    assert read == [4] and out.searched == NEW and compared == [N + 4 * NEW]


def test_searched_ids_are_read_by_key_by_string_or_both(tmp_path):
    """store.pairs.read_searched: keyed files by their keys; a file without keys converted;
    ids that are not cbir's (no keys) as strings, in file order either way."""
    hexed = [f"{i:016x}" for i in (5, 9, 2**63 + 1)]
    keyed, plain, foreign = tmp_path / "k.parquet", tmp_path / "p.parquet", tmp_path / "f.parquet"
    write_parquet(store_pairs.searched_table(ImageIds.of(hexed[:2])), keyed)
    write_parquet(pa.table({"image_id": hexed[2:]}), plain)
    write_parquet(store_pairs.searched_table(ImageIds.of(["scan-b", "scan-a"])), foreign)
    assert pq.read_schema(foreign).names == ["image_id"]
    both = store_pairs.read_searched([keyed, plain])
    assert list(both) == hexed and both.hex_keys() is not None
    assert list(store_pairs.read_searched([keyed, foreign])) == [*hexed[:2], "scan-b", "scan-a"]
    assert len(store_pairs.read_searched([])) == 0
    rows = np.array([1], np.int64)
    assert store_pairs.searched_table(ImageIds.of(hexed), rows).to_pydict() == {
        "image_id": [hexed[1]], store_pairs.SEARCHED_KEY: [9]}


def test_removed_images_and_many_partitions_fold_into_the_base(ws, scale, monkeypatch):
    s = scale._settings(ws)
    lay = layout(s)
    _night(scale, ws, 21)
    assert read_state(lay).runs == [1]
    # a scan removed: its pairs go, as a full run drops them; the partitions fold in
    pairs = read_pairs(s)
    gone = pairs.column("image_a")[0].as_py()
    files = pq.read_table(lay.files)
    keep = pc.not_equal(files.column("image_id"), gone)
    write_parquet(files.filter(keep), lay.files)
    run_index(s)
    out = run_pairs(s, incremental=True)
    assert read_state(lay).runs == [] and not list(lay.pairs_runs.glob("*.parquet"))
    after = read_pairs(s)
    assert _rows(after) == [r for r in _rows(pairs) if gone not in r[:2]]
    _clusters_hold_every_link(ws, scale, out.thresholds.cluster)
    # a scan moved (same content, another path): the recorded pairs are folded in with the
    # path as it is now
    _night(scale, ws, 25)
    assert read_state(lay).runs == [1]
    moved = read_pairs(s).filter(pc.equal(read_pairs(s).column("kind"), "near"))
    who = moved.column("image_b")[0].as_py()
    files = pq.read_table(lay.files)
    at = pc.equal(files.column("image_id"), who)
    paths = pc.if_else(at, "moved/elsewhere.jpg", files.column("path"))
    files = files.set_column(files.column_names.index("path"), "path", paths)
    # as ingest writes it after a move: a new canonical epoch
    write_parquet(files.replace_schema_metadata({CANONICAL_EPOCH: "moved"}), lay.files)
    run_pairs(s, incremental=True)
    assert read_state(lay).runs == []
    now = read_pairs(s).to_pylist()
    assert {r["path_b"] for r in now if r["image_b"] == who} == {"moved/elsewhere.jpg"}
    assert "moved/elsewhere.jpg" in read_clusters(lay).column("path").to_pylist()
    # MAX_RUNS partitions: the next run folds them in
    monkeypatch.setattr(store_pairs, "MAX_RUNS", 2)
    monkeypatch.setattr("cbir.steps.pairs.MAX_RUNS", 2)
    _night(scale, ws, 22)
    _night(scale, ws, 23)
    assert read_state(lay).runs == [1, 2]
    before = _rows(read_pairs(s))
    out = _night(scale, ws, 24)
    assert read_state(lay).runs == []
    after = _rows(read_pairs(s))  # now all in the base
    assert after == sorted(_rows(pq.read_table(lay.exact)) + _rows(pq.read_table(lay.pairs)))
    assert set(before) <= set(after) and len(after) == len(before) + out.added > len(before)
    _clusters_hold_every_link(ws, scale, out.thresholds.cluster)


def test_a_night_under_the_recorded_canonical_epoch_sorts_no_canonical_paths(ws, scale,
                                                                            monkeypatch):
    """While the manifest's canonical epoch is the one the recorded pairs were written under,
    a night trusts their paths: the canonical paths are not sorted (10^7 of them cost seconds),
    its new pairs' paths and their clusters' members' are read in one pass (the rows its
    stored reports grow from: store.manifest.rows_of_images), none looked up, and every path
    recorded is the image's canonical path. A manifest without an epoch (written before
    epochs) is checked in full."""
    s = scale._settings(ws)
    lay = layout(s)
    sorted_paths: list[int] = []
    real = CanonicalPaths._ready
    monkeypatch.setattr(CanonicalPaths, "_ready",
                        lambda self: sorted_paths.append(1) or real(self))
    looked_up: list[int] = []  # the ids of each lookup in the manifest
    real_paths = CanonicalPaths.paths
    monkeypatch.setattr(CanonicalPaths, "paths",
                        lambda self, ids: looked_up.append(len(ids)) or real_paths(self, ids))
    reads: list[int] = []  # the images of each read of the manifest's rows
    real_rows = pairs_step.rows_of_images
    monkeypatch.setattr(pairs_step, "rows_of_images",
                        lambda st, ids, cols: reads.append(len(ids)) or real_rows(st, ids, cols))

    def all_paths_current() -> None:
        now = dict(zip(*canonical_table(s).to_pydict().values(), strict=True))
        rows = read_pairs(s).to_pylist()
        assert all(now[r[f"image_{x}"]] == r[f"path_{x}"] for r in rows for x in "ab")
        members = read_clusters(lay).to_pylist()
        assert all(now[m["image_id"]] == m["path"] for m in members)
        assert len(rows) > 10 and len(members) > 10

    numbered = current_cluster_ids(lay)
    assert read_state(lay).epoch == canonical_epoch(s) != ""
    out = _night(scale, ws, 41)
    assert out.incremental and out.added > 0 and read_state(lay).runs == [1]
    assert not sorted_paths
    assert read_state(lay).epoch == canonical_epoch(s)
    # one read, of the new pairs' images and the members of the clusters they are in: the
    # updated clusters' members take their paths from it, none looked up
    assert current_cluster_ids(lay).next > numbered.next  # the update formed some
    assert len(reads) == 1 and reads[0] >= out.added and not looked_up
    assert read_clusters(lay).num_rows > 10
    all_paths_current()
    reads.clear()
    files = pq.read_table(lay.files)
    write_parquet(files.replace_schema_metadata(None), lay.files)  # as before epochs
    out = _night(scale, ws, 42)
    assert out.incremental and read_state(lay).runs == [1, 2]  # checked: nothing moved
    assert sorted_paths and read_state(lay).epoch == ""
    # the recorded paths not trusted; the rows read are the manifest's: nothing looked up
    assert len(reads) == 1 and not looked_up
    all_paths_current()


def test_a_killed_runs_partition_never_counts(ws, scale):
    s = scale._settings(ws)
    lay = layout(s)
    _night(scale, ws, 31)
    counted = read_pairs(s).num_rows
    # what a run killed before its commit leaves: a partition no commit names
    stray = lay.run_pairs(7)
    write_parquet(pq.read_table(lay.run_pairs(1)), stray)
    assert stray_runs(lay) == [stray]
    assert read_pairs(s).num_rows == counted
    assert query(s, "SELECT count(*) FROM duplicate_pairs")[1][0][0] == counted
    # ... and its clusters, staged (a full run's) or the nights' changes (an incremental
    # run's): the committed ones stay
    clusters = read_clusters(lay)
    write_parquet(clusters.slice(0, 5).replace_schema_metadata({store_pairs.TOKEN: "killed"}),
                  lay.clusters_next)
    stray_clusters = lay.run_clusters("killed")
    write_parquet(clusters.slice(0, 5).replace_schema_metadata({store_pairs.TOKEN: "killed"}),
                  stray_clusters)
    assert stray_runs(lay) == [stray_clusters, stray]
    assert read_clusters(lay).equals(clusters)
    assert query(s, "SELECT count(*) FROM clusters")[1][0][0] == clusters.num_rows
    # the next run removes them
    _night(scale, ws, 32)
    assert not stray.exists() and read_state(lay).runs == [1, 2]
    assert not lay.clusters_next.exists() and not stray_clusters.exists()
    _clusters_hold_every_link(ws, scale, 0.9)
    # a full run stages its new base: killed before its commit, the staged base never counts
    # and the next run removes it; killed after it, readers find the committed base staged and
    # the next run renames it into place
    counted = _rows(read_pairs(s))
    _full(ws, scale)
    staged = ws.parent / "full" / "data" / "pairs" / "pairs.parquet"
    shutil.copy2(staged, lay.pairs_next)
    assert _rows(read_pairs(s)) == counted
    assert query(s, "SELECT count(*) FROM duplicate_pairs")[1][0][0] == len(counted)
    out = _night(scale, ws, 33)
    assert out.incremental and not lay.pairs_next.exists()
    assert read_state(lay).runs == [1, 2, 3]
    out = run_pairs(s)  # a full run: its base committed, then renamed
    state = read_state(lay)
    assert state.runs == [] and store_pairs.file_token(lay.pairs) == state.base
    assert not lay.pairs_next.exists() and not lay.searched_next.exists()
    # clustered whole: the nights' changes to the clusters are in clusters.parquet, their file
    # gone
    assert state.clusters_delta == "" and clusters_files(lay) == (lay.clusters, None)
    assert not list(lay.pairs_runs.glob("clusters-*"))
    assert out.pairs_parts == 0 and out.clusters_delta is None  # two files, as it prints
    assert [x.strip() for x in out.lines()[-2:]] == [str(lay.pairs), str(lay.clusters)]
    committed = _rows(read_pairs(s))
    os.replace(lay.pairs, lay.pairs_next)  # as if killed between the commit and the renames
    os.replace(lay.clusters, lay.clusters_next)
    assert read_state(lay) == state
    assert store_pairs.pair_files(lay)[1] == lay.pairs_next
    assert _rows(read_pairs(s)) == committed
    out = _night(scale, ws, 34)
    assert out.incremental and read_state(lay).runs == [1]
    assert lay.pairs.is_file() and not lay.pairs_next.exists()
    assert lay.clusters.is_file() and not lay.clusters_next.exists()
    assert set(committed) < set(_rows(read_pairs(s)))
    _clusters_hold_every_link(ws, scale, out.thresholds.cluster)


def test_each_kept_cluster_row_knows_its_smallest_member_in_order_or_not():
    """steps.pairs._with_firsts: read off each cluster's leading row where the clusters file is
    in its order, grouped where it is not; the same smallest member either way."""
    import numpy as np

    from cbir.steps.pairs import _with_firsts

    rng = np.random.default_rng(4)
    rows = []
    for cid, size in enumerate([5, 3, 3, 2, 2, 2, 1], start=1):
        members = sorted(f"{x:016x}" for x in rng.integers(1, 1 << 62, size))
        rows += [{"cluster_id": cid, "image_id": m} for m in members]
    table = pa.Table.from_pylist(rows)
    want = {}
    for r in rows:
        want[r["cluster_id"]] = min(want.get(r["cluster_id"], r["image_id"]), r["image_id"])
    # ids kept by nights need not follow the rows' order (store.pairs.CLUSTER_IDS)
    renumbered = {cid: new for cid, new in zip(range(1, 8), [40, 30, 17, 10, 99, 20, 50], strict=True)}
    relabelled = table.set_column(0, "cluster_id", pa.array(
        [renumbered[c] for c in table.column("cluster_id").to_pylist()], pa.int64()))
    want.update({renumbered[c]: want[c] for c in list(want)})
    spread = relabelled.set_column(0, "cluster_id", pc.multiply(  # ids far apart: sorted
        relabelled.column("cluster_id"), 10**6))
    want.update({c * 10**6: want[c] for c in renumbered.values()})
    split = table.take(pa.array([*range(5, len(rows)), *range(5)]))  # cluster 1 after the rest
    # one id heading two runs (cluster 2's rows apart): read off, it would take two firsts
    apart = table.take(pa.array([5, 8, 6, 7, *range(9, len(rows)), *range(5)]))
    shuffled = table.take(pa.array(rng.permutation(len(rows))))
    spread_apart = spread.take(pa.array([5, 8, 6, 7, *range(9, len(rows)), *range(5)]))
    for t in (table, relabelled, spread, split, apart, spread_apart, shuffled):
        got = _with_firsts(t).to_pylist()
        assert len(got) == len(rows)
        assert all(r["first"] == want[r["cluster_id"]] for r in got)
    assert _with_firsts(table.slice(0, 0)).num_rows == 0
