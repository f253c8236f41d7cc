"""cbir.store.catalog: DuckDB views over the Parquet outputs; queries only, on a read-only,
sandboxed connection."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_workspace
from conftest import open_catalogue, photo, save

from cbir.config import load_settings
from cbir.errors import CbirError
from cbir.store import catalog


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    settings = tiny_workspace.make(root)
    from cbir.steps.pairs import run_pairs
    run_pairs(settings)
    return root


def outside_parquet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"secret": ["outside the workspace"]}), folder / "secret.parquet")
    return folder / "secret.parquet"


def test_every_view_is_in_the_catalogue(ws):
    settings = load_settings(ws / "params.yaml")
    names = [v.name for v in catalog.views(settings)]
    assert names[:2] == ["ingest_runs", "files"] and "pair_report" in names
    cols, rows = catalog.query(settings, "SELECT view_name FROM duckdb_views() "
                                         "WHERE NOT internal ORDER BY view_name")
    assert cols == ["view_name"] and {r[0] for r in rows} == set(names)


def test_queries_see_the_outputs(ws):
    settings = load_settings(ws / "params.yaml")
    _, rows = catalog.query(settings, "SELECT count(*) FROM images")
    assert rows == [(tiny_workspace.N_PHOTOS + 1,)]  # the exact copy is the same image
    _, rows = catalog.query(settings, "SELECT path FROM exact_duplicates ORDER BY path")
    assert ("copies/p0-copy.png",) in rows or ("p0.png",) in rows
    _, rows = catalog.query(settings, "SELECT count(*) FROM files WHERE path = ?", ["p3.png"])
    assert rows == [(1,)]
    cols, page, total = catalog.query_page(settings, "SELECT path FROM files ORDER BY path",
                                           limit=2)
    assert cols == ["path"] and len(page) == 2 and total == tiny_workspace.N_PHOTOS + 2


def test_queries_read_this_workspace_from_any_folder(ws, tmp_path, monkeypatch):
    """The views name their files relative to the workspace (so it can move), and DuckDB would
    read a relative name from the current folder first: run from a folder that holds another
    workspace's data/, a query still reads this workspace's files."""
    settings = load_settings(ws / "params.yaml")
    other = tmp_path / "other" / "data" / "manifest"
    other.mkdir(parents=True)
    files = pq.read_table(ws / "data" / "manifest" / "files.parquet")
    pq.write_table(files.slice(0, 1), other / "files.parquet")  # another, smaller manifest
    monkeypatch.chdir(tmp_path / "other")
    _, rows = catalog.query(settings, "SELECT count(*) FROM files")
    assert rows == [(files.num_rows,)] and files.num_rows > 1


def test_the_catalogue_is_built_from_this_workspace_from_any_folder(ws, tmp_path, monkeypatch):
    """DuckDB binds a view when it is created: from a folder holding another workspace's older
    pairs (without the verification columns), building this catalogue once failed with a Binder
    Error on pair_report. It is built from this workspace's files wherever it is started."""
    settings = load_settings(ws / "params.yaml")
    other = tmp_path / "other" / "data" / "pairs"
    other.mkdir(parents=True)
    pairs = pq.read_table(ws / "data" / "pairs" / "pairs.parquet")
    pq.write_table(pairs.select(["image_a", "image_b", "score"]), other / "pairs.parquet")
    (ws / "data" / "catalog.duckdb").unlink()
    monkeypatch.chdir(tmp_path / "other")
    catalog.refresh_catalog(settings)
    cols, _ = catalog.query(settings, "SELECT * FROM pair_report LIMIT 0")
    assert "relation" in cols and "box_x0" in cols


@pytest.mark.parametrize("sql,fragment", [
    ("CREATE TABLE t (x INT)", "only queries can run on the catalogue"),
    ("DROP VIEW files", "only queries can run on the catalogue"),
    ("SELECT 1; SELECT 2", "one query at a time: the SQL holds 2 statements"),
    ("-- nothing", "no query to run"),
    ("SELEC 1", "query failed"),
])
def test_anything_but_one_query_is_refused_with_one_line(ws, sql, fragment):
    settings = load_settings(ws / "params.yaml")
    with pytest.raises(CbirError, match=fragment) as info:
        catalog.query(settings, sql)
    assert "\n" not in str(info.value)
    assert catalog.query(settings, "SELECT count(*) FROM files")[1][0][0] > 0  # unchanged


def test_without_a_catalogue_connect_says_to_ingest(tmp_path):
    settings = tiny_workspace.make(tmp_path, steps=())
    with pytest.raises(CbirError, match="run `cbir ingest` first"):
        catalog.connect(settings, refresh=False)


# Moved from tests/test_hostile.py (issue 12's guarded DuckDB), assertions unchanged.
def test_catalogue_connections_are_guarded_by_duckdb_itself(ws, tmp_path):
    """Beyond `cbir sql`'s refusal of anything but queries: a connection from
    catalog.connect (nightly reports, the gallery) cannot write, read other files or undo
    that, and its lock binds no other connection to the same file in this process."""
    settings = load_settings(ws / "params.yaml")
    out = tmp_path / "outside"
    mine = open_catalogue(settings)  # a user's own connection, open meanwhile
    con = catalog.connect(settings)
    try:
        assert con.execute("SELECT count(*) FROM pair_report").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM read_parquet('data/pairs/pairs.parquet')"
                           ).fetchone()[0] > 0  # the workspace's own Parquet, relative path
        # the embedding shards, a folder allowed whole: relative, in full, as a glob
        shard = sorted(Path(ws).glob("data/embeddings/*/shard-*.parquet"))[0]
        n_rows = pq.read_metadata(shard).num_rows
        for name in (shard.relative_to(ws).as_posix(), str(shard), f"{shard.parent}/shard-*",
                     "data/embeddings/*/shard-*.parquet"):
            assert con.execute(f"SELECT count(*) FROM read_parquet('{name}')"
                               ).fetchone()[0] >= n_rows > 0
        for sql in (f"SELECT * FROM read_text('{shard.parent}/../../../params.yaml')",f"COPY (SELECT 1) TO '{out}/x.csv'",
                    f"EXPORT DATABASE '{out}/export'",
                    f"ATTACH '{out}/new.duckdb' AS other",
                    "SELECT * FROM read_text('/etc/passwd')",
                    f"SELECT * FROM read_parquet('{outside_parquet(out)}')",
                    "SET enable_external_access = true", "SET lock_configuration = false",
                    "SET allowed_directories = ['/']", "CREATE TABLE t (x INT)", "LOAD httpfs"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    mine.execute("SET file_search_path = ?", [str(ws)])  # not locked by ours
    mine.close()
    assert sorted(p.name for p in out.iterdir()) == ["secret.parquet"]


def test_decisions_view_holds_each_pairs_current_decision_and_follows_new_parts(tmp_path):
    from cbir.store import decisions as D
    from cbir.store.layout import layout

    settings = tiny_workspace.make(tmp_path)
    folder = layout(settings).decisions_dir
    _, rows = catalog.query(settings, "SELECT count(*) FROM decisions")
    assert rows == [(0,)]  # the view exists before the first decision
    _, rows = catalog.query(settings, "SELECT image_id, path FROM images ORDER BY path LIMIT 2")
    (ia, pa_), (ib, pb) = rows
    first = D.Decision(ia, ib, D.SAME, path_a="old/a.png", path_b="old/b.png", master=ib)
    D.record(folder, [first])
    _, rows = catalog.query(settings, "SELECT path_a, path_b, decision, master_path, "
                                      "decided_path_a FROM decisions")
    lo, hi = sorted([(ia, pa_), (ib, pb)])
    assert rows == [(lo[1], hi[1], "same", pb, "old/a.png" if lo[0] == ia else "old/b.png")]
    con = catalog.connect(settings)  # open while new parts arrive (the review server)
    try:
        D.record(folder, [D.Decision(ia, ib, D.DIFFERENT)])
        assert con.execute("SELECT decision FROM decisions").fetchall() == [("different",)]
        undo = D.Decision(ia, ib, D.UNDO, undoes=D.read_log(folder).to_pylist()[-1]["decision_id"])
        D.record(folder, [undo])
        assert con.execute("SELECT decision FROM decisions").fetchall() == [("same",)]
        assert con.execute("SELECT count(*) FROM decision_log").fetchall() == [(3,)]
    finally:
        con.close()
    with pytest.raises(CbirError, match="only queries"):
        catalog.query(settings, f"COPY (SELECT 1) TO '{folder}/part-1-x.parquet'")


# ------------------------------------------------------------------ stored results (issue 16)


def _live(settings, sql: str) -> list[tuple]:
    """`sql` over every view as its live query (the joins computed now, nothing stored)."""
    con = duckdb.connect(":memory:")
    try:
        for view in catalog._plan(settings):
            con.execute(f'CREATE TEMP VIEW "{view.name}" AS {view.live(None)}')
        return con.execute(sql).fetchall()
    finally:
        con.close()


STORED_ORDER = {"pair_report": "ORDER BY path_a, path_b, kind",
                "cluster_report": "ORDER BY cluster_id"}


def test_stored_reports_hold_what_their_live_queries_give(ws):
    """pair_report and cluster_report are read from their stored results (the joins with the
    whole manifest cost seconds at 10^7): the same rows, columns and types as the live query."""
    settings = load_settings(ws / "params.yaml")
    stored = {v.name: v.stored for v in catalog.views(settings) if v.stored is not None}
    assert set(stored) == set(STORED_ORDER)
    for name, order in STORED_ORDER.items():
        _, rows = catalog.query(settings, f"SELECT * FROM {name} {order}")
        assert rows and rows == _live(settings, f"SELECT * FROM {name} {order}")
        assert (catalog.query(settings, f"DESCRIBE {name}")[1]
                == _live(settings, f"DESCRIBE SELECT * FROM {name}"))
        assert catalog.stored_stamp(stored[name]) is not None  # read from there


def test_a_stored_report_follows_its_inputs_and_is_not_rewritten_without_a_change(tmp_path):
    """A stored result carries a stamp of its inputs: unchanged inputs, the file stays as it is;
    a changed manifest (an image's width), the next query computes it again; a damaged file is
    computed again. Ingest leaves it to the pairs step (a nightly run would compute it twice)
    and the next query brings it up to date."""
    from cbir.fsutil import write_parquet
    from cbir.steps.ingest import run_ingest
    from cbir.steps.pairs import run_pairs

    settings = tiny_workspace.make(tmp_path)
    run_pairs(settings)
    report = next(v.stored for v in catalog.views(settings) if v.name == "pair_report")
    assert report is not None and report.is_relative_to(tmp_path / "data" / "cache")
    stamp, inode = catalog.stored_stamp(report), report.stat().st_ino
    sql = "SELECT image_a, width_a FROM pair_report WHERE kind = 'near' ORDER BY score DESC"
    image, width = catalog.query(settings, sql)[1][0]
    assert (catalog.stored_stamp(report), report.stat().st_ino) == (stamp, inode)

    files_path = tmp_path / "data" / "manifest" / "files.parquet"
    files = pq.read_table(files_path)
    wider = pa.array([w + 1000 if i == image else w for i, w in
                      zip(files["image_id"].to_pylist(), files["width"].to_pylist(),
                          strict=True)], pa.int32())
    # a row changed by other means than ingest: without ingest's epochs (see manifest.ROWS_EPOCH)
    write_parquet(files.set_column(files.schema.get_field_index("width"), "width", wider)
                  .replace_schema_metadata(None), files_path)
    assert catalog.query(settings, sql)[1][0] == (image, width + 1000)
    assert catalog.stored_stamp(report) not in (None, stamp)

    report.write_bytes(b"not parquet")
    assert catalog.query(settings, sql)[1][0] == (image, width + 1000)
    stamp = catalog.stored_stamp(report)
    assert stamp is not None

    save(photo(9), tmp_path / "scans" / "p9.png")
    assert run_ingest(settings).counts["new"] == 1
    assert catalog.stored_stamp(report) == stamp  # left to the pairs step
    catalog.query(settings, sql)
    assert catalog.stored_stamp(report) not in (None, stamp)


def test_a_killed_stored_write_leaves_a_temporary_file_that_clean_stale_removes(ws):
    from cbir.fsutil import TMP_PREFIX

    settings = load_settings(ws / "params.yaml")
    report = next(v.stored for v in catalog.views(settings) if v.name == "cluster_report")
    assert report is not None
    left = report.parent / f"{TMP_PREFIX}{report.name}.killed"
    left.write_bytes(b"half a parquet file")
    catalog.clean_stale(settings)
    assert not left.exists() and report.is_file()


def test_a_stored_report_missing_a_part_or_written_before_parts_is_computed_again(tmp_path):
    """pair_report keeps its near pairs' rows in parts that its file names: a part gone makes
    the result stale (computed again, never read short); a file written before parts (every
    row in it) is computed whole rather than grown, which would drop its near pairs; a part
    no file names (a killed refresh's) and its temporary files are removed by the next
    writer."""
    from cbir.fsutil import TMP_PREFIX, write_parquet
    from cbir.steps.pairs import run_pairs
    from cbir.store.manifest import rows_mark

    settings = tiny_workspace.make(tmp_path)
    run_pairs(settings)
    report = next(v.stored for v in catalog.views(settings) if v.name == "pair_report")
    files = catalog.stored_files(report)
    assert files is not None and len(files) == 2
    sql = "SELECT count(*) FROM pair_report WHERE kind = 'near'"
    near = catalog.query(settings, sql)[1][0][0]
    assert near > 0 and pq.read_metadata(files[1]).num_rows == near

    files[1].unlink()
    assert catalog.stored_files(report) is None and catalog.stored_stamp(report) is None
    assert catalog.query(settings, sql)[1][0][0] == near  # computed again
    files = catalog.stored_files(report)
    assert files is not None and len(files) == 2

    chosen = catalog._plan(settings)
    by_name = {v.name: v for v in chosen}
    view = by_name["pair_report"]
    key = catalog._growth_key(settings, view, by_name, rows_mark(settings))
    assert catalog._growth(settings, view, by_name, key) is not None  # it would grow
    rows = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files],
                           promote_options="permissive")
    meta = {k: v for k, v in pq.read_schema(report).metadata.items()
            if k != catalog.PARTS.encode()}
    write_parquet(rows.replace_schema_metadata(meta), report)  # as written before parts
    assert catalog.stored_files(report) == [report] and catalog.stored_stamp(report)
    assert catalog._growth(settings, view, by_name, key) is None  # computed whole instead

    stray = report.with_name("pair_report-0123abcd.parquet")
    write_parquet(pq.read_table(files[1]), stray)
    half = report.parent / f"{TMP_PREFIX}pair_report-4567.parquet.killed"
    half.write_bytes(b"half a part")
    kept = catalog.stored_files(report)
    catalog.clean_stale(settings)
    assert not stray.exists() and not half.exists() and not files[1].exists()  # none named
    assert catalog.stored_files(report) == kept and report.is_file()


def test_the_likely_master_is_the_continuous_tone_copy_whatever_its_size(tmp_path):
    """One print, its newspaper halftone scanned in black and white at twice the resolution and
    a palette GIF of the same size and more bytes: pair_report, cluster_report and the remove
    list (one rule) keep the print as the likely master, found in the trial on a real archive's
    formats, where a GIF and a bilevel TIFF were the masters of JPEG originals."""
    from PIL import Image

    from cbir.steps.decisions import remove_list, run_decide
    from cbir.steps.pairs import run_pairs

    scans = tmp_path / "scans"
    pic = photo(11, (160, 120))
    save(pic, scans / "box/print.jpg", quality=70)
    save(pic.resize((320, 240)).convert("1"), scans / "reprint.tif")
    save(pic.convert("P", palette=Image.Palette.ADAPTIVE), scans / "web.gif")
    names = ["box/print.jpg", "reprint.tif", "web.gif"]
    assert (scans / "web.gif").stat().st_size > (scans / "box/print.jpg").stat().st_size
    settings = tiny_workspace.make(tmp_path, search={"k": 9, "pair_threshold": -1.0,
                                                     "cluster_threshold": -1.0})
    run_pairs(settings)

    _, rows = catalog.query(settings, "SELECT path_a, path_b, master_path, master_reason "
                                      "FROM pair_report WHERE path_a IN (?, ?, ?) AND path_b "
                                      "IN (?, ?, ?)", names + names)
    masters = {frozenset(r[:2]): r[2:] for r in rows}
    for copy in ("reprint.tif", "web.gif"):
        assert masters[frozenset({"box/print.jpg", copy})] == ("box/print.jpg", "continuous tone")
    # between the two reduced copies the usual order holds: the halftone has more pixels
    assert masters[frozenset({"reprint.tif", "web.gif"})] == ("reprint.tif", "higher resolution")
    _, rows = catalog.query(settings, "SELECT master_path FROM cluster_report "
                                      "WHERE list_contains(members, 'web.gif')")
    assert rows == [("box/print.jpg",)]

    run_decide(settings, "reprint.tif", "box/print.jpg", "same")
    run_decide(settings, "web.gif", "reprint.tif", "same")
    remove_list(settings, tmp_path / "remove.csv")
    kept = {r.split(",")[1] for r in (tmp_path / "remove.csv").read_text().splitlines()[1:]}
    assert kept == {"box/print.jpg", "p0.png"}  # p0.png: of the tiny workspace's exact copy


def test_a_later_copy_of_one_resolution_and_format_is_not_the_master_for_its_bytes(tmp_path):
    """Found in the archivist trial: a scan turned 1.5 degrees and saved again at JPEG quality
    90 (67 KB) was the likely master over the archive's own scan (58 KB) - pair_report,
    cluster_report, and the remove list's suggestion. Of two copies of one resolution and
    format, the picture the archive held first is kept, here after it moved (its file is new,
    its picture is not); a lossless copy still outranks a JPEG whenever it came, and of two
    lossless copies the larger file (more bits, say) is kept whenever it came."""
    from cbir.steps.decisions import remove_list, run_decide
    from cbir.steps.embed import run_embed
    from cbir.steps.index import run_index
    from cbir.steps.ingest import run_ingest
    from cbir.steps.pairs import run_pairs

    scans = tmp_path / "scans"
    pic = photo(11, (160, 120))
    save(pic, scans / "box/print.jpg", quality=60)
    save(pic, scans / "box/print.png")
    settings = tiny_workspace.make(tmp_path, steps=("ingest",), search={
        "k": 9, "pair_threshold": -1.0, "cluster_threshold": -1.0})
    save(pic, scans / "donor/print-q95.jpg", quality=95)  # run 2: the same pixels, more bytes
    save(pic, scans / "donor/print.tif")  # lossless, also run 2
    run_ingest(settings)
    (scans / "moved").mkdir()
    (scans / "box/print.jpg").rename(scans / "moved/print.jpg")  # run 3: the scan moved
    run_ingest(settings)
    run_embed(settings)
    run_index(settings)
    run_pairs(settings)
    held, later, tiff, png = ("moved/print.jpg", "donor/print-q95.jpg", "donor/print.tif",
                              "box/print.png")
    assert (scans / later).stat().st_size > (scans / held).stat().st_size
    assert (scans / tiff).stat().st_size > (scans / png).stat().st_size

    _, rows = catalog.query(settings, "SELECT path_a, path_b, master_path, master_reason "
                                      "FROM pair_report WHERE path_a IN (?, ?, ?, ?) AND path_b "
                                      "IN (?, ?, ?, ?)", [held, later, tiff, png] * 2)
    masters = {frozenset(r[:2]): r[2:] for r in rows}
    assert masters[frozenset({held, later})] == (held, "arrived first")
    for jpeg in (held, later):
        assert masters[frozenset({tiff, jpeg})] == (tiff, "lossless file")
        assert masters[frozenset({png, jpeg})] == (png, "lossless file")
    assert masters[frozenset({png, tiff})] == (tiff, "larger file")
    cluster = ("SELECT master_path, list_contains(members, ?) FROM cluster_report "
               "WHERE list_contains(members, ?)")
    assert catalog.query(settings, cluster, [held, later])[1] == [(tiff, True)]
    for lossless in (tiff, png):  # without the lossless copies, the held scan leads the cluster
        (scans / lossless).unlink()
    for step in (run_ingest, run_embed, run_index, run_pairs):
        step(settings)
    assert catalog.query(settings, cluster, [held, later])[1] == [(held, True)]

    # the remove list's rule (Python, over the manifest) agrees with the catalogue's
    said = run_decide(settings, later, held, "same")
    assert said.likely == (held, "arrived first"), said.likely
    remove_list(settings, tmp_path / "remove.csv")
    rows = [r.split(",") for r in (tmp_path / "remove.csv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows if r[0] == later] == [[later, held]]
    assert "likely master kept: arrived first" in next(r for r in rows if r[0] == later)[2]
