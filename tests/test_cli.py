"""What a new user meets at the command line: help, versions, errors, SQL output, queries."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cbir.store import catalog
from cbir.cli import DETAILS, build_parser
from cbir.config import load_settings
from cbir.steps.embed import run_embed
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.pairs import run_pairs
from conftest import CBIR, photo, save, write_params

SMALL = {"ingest": {"workers": 2},
         "embed": {"resolution": 64, "batch_size": 16, "shard_size": 16, "workers": 0},
         "search": {"k": 3, "pair_threshold": 0.5, "cluster_threshold": 0.9}}


def cbir(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CBIR, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Six photographs, one rescan and a byte-identical copy: ingested, embedded, paired."""
    root = tmp_path_factory.mktemp("cli")
    scans = root / "scans"
    for i in range(6):
        save(photo(i, (120, 90)), scans / f"box-b/p{i}.jpg")
    save(photo(0, (120, 90)).resize((100, 75)), scans / "box-b/p0-rescan.jpg")
    # a byte-identical copy whose path sorts first but which was modified later: the canonical
    # file and the likely master must still be the same file
    (scans / "a-copies").mkdir()
    shutil.copy(scans / "box-b/p1.jpg", scans / "a-copies/p1.jpg")
    t = (scans / "box-b/p1.jpg").stat().st_mtime
    os.utime(scans / "a-copies/p1.jpg", (t + 120, t + 120))
    settings = load_settings(write_params(root, {"data": {"scans_dir": "scans",
                                                          "ground_truth": None}, **SMALL}))
    for step in (run_ingest, run_embed, run_index, run_pairs):
        step(settings)
    return root


def test_every_subcommand_describes_itself_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert name in DETAILS, name
        assert DETAILS[name][0].split()[0] in text and "example:" in text, name
    out = cbir("--version")
    assert out.returncode == 0 and out.stdout.startswith("cbir ")
    assert "cbir init" in cbir("--help").stdout


def test_query_of_a_missing_or_odd_file_fails_clearly(built, tmp_path):
    params = str(built / "params.yaml")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it to read would block forever
    good = str(built / "scans" / "box-b" / "p2.jpg")
    out = cbir("query", str(tmp_path / "nothere.jpg"), str(tmp_path / "pipe.jpg"), good,
               "--params", params)
    assert out.returncode == 2
    assert "not found" in out.stdout and "damaged" not in out.stdout
    assert "not a regular file" in out.stdout
    assert "box-b/p2.jpg" in out.stdout.split(good)[-1]  # the good one still answered
    assert "2 of 3 files could not be queried" in out.stderr
    out = cbir("query", good, "--k", "-5", "--params", params)
    assert out.returncode == 2 and "--k must be at least 1" in out.stderr


def test_query_of_a_folder_answers_for_every_file_under_it_and_can_write_a_table(built, tmp_path):
    """A donation under consideration: which of its files does the collection hold already?"""
    params = str(built / "params.yaml")
    gift = tmp_path / "donation"
    save(photo(3, (120, 90)).resize((96, 72)), gift / "box 1" / "rescan.jpg")
    shutil.copy(built / "scans" / "box-b" / "p2.jpg", gift / "box 1" / "p2 copy.jpg")
    (gift / "list.txt").write_text("box 1: two prints\n")  # not an image: skipped, not an error
    shutil.copy(built / "scans" / "box-b" / "p4.jpg", gift / ".hidden.jpg")  # ingest.ignore
    out = cbir("query", str(gift), "--k", "2", "--params", params)
    assert out.returncode == 0, out.stderr
    asked = [line for line in out.stdout.splitlines() if line.startswith(str(gift))]
    # as ingest walks: a folder's files, then its folders'
    assert asked == [str(gift / "list.txt")] + [
        str(gift / "box 1" / n) for n in ("p2 copy.jpg", "rescan.jpg")], out.stdout
    assert "exact duplicate (same bytes) of box-b/p2.jpg" in out.stdout
    assert out.stdout.splitlines()[-1] == (
        "query: 3 files: 1 exact copy of a collection image, 1 with a near-duplicate, "
        "1 not an image (skipped)")

    table = tmp_path / "gift.csv"
    out = cbir("query", str(gift), str(built / "scans" / "box-b" / "p5.jpg"), "--csv", str(table),
               "--params", params)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].endswith(f"1 not an image (skipped); table: {table}")
    assert str(gift) not in out.stdout  # the table holds the neighbours, not the terminal
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    by_query: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_query.setdefault(Path(r["query"]).name, []).append(r)
    assert {q: rs[0]["verdict"] for q, rs in by_query.items()} == {
        "p2 copy.jpg": "exact copy", "rescan.jpg": "near-duplicate",
        "list.txt": "not an image", "p5.jpg": "in the collection"}
    copy = by_query["p2 copy.jpg"]
    assert (copy[0]["rank"], copy[0]["path"], copy[0]["check"]) == ("0", "box-b/p2.jpg",
                                                                     "the same bytes")
    # then its neighbours, ranked: all 7 images of the collection (--k is 10)
    assert [r["rank"] for r in copy[1:]] == [str(i) for i in range(1, 8)]
    assert by_query["p5.jpg"][0]["check"] == "this very file"
    near = by_query["rescan.jpg"]
    assert near[0]["path"] == "box-b/p3.jpg" and near[0]["near"] == "1", near[0]
    assert "not an image" in by_query["list.txt"][0]["check"]

    # a damaged scan in the folder is an error; a file that is no CSV of cbir's is not replaced
    (gift / "box 1" / "torn.jpg").write_bytes((built / "scans" / "box-b" / "p1.jpg")
                                             .read_bytes()[:400])
    out = cbir("query", str(gift), "--csv", str(table), "--params", params)
    assert out.returncode == 2 and "1 of 4 files could not be queried" in out.stderr, out.stderr
    assert "torn.jpg,error" in table.read_text(encoding="utf-8")
    mine = tmp_path / "mine.csv"
    mine.write_text("accession,title\n")
    out = cbir("query", str(gift), "--csv", str(mine), "--params", params)
    assert out.returncode == 2 and "refused" in out.stderr and str(gift) not in out.stdout
    assert mine.read_text() == "accession,title\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cbir("query", str(empty), "--params", params)
    assert out.returncode == 2 and f"no files to query in {empty}" in out.stderr, out.stderr


def test_query_tells_a_collection_file_from_a_copy_of_one(built, tmp_path):
    """A file of the collection is named as itself, a byte-identical copy elsewhere as a copy."""
    params = str(built / "params.yaml")
    own = built / "scans" / "box-b" / "p2.jpg"
    shutil.copy(own, tmp_path / "copy.jpg")
    out = cbir("query", str(own), str(tmp_path / "copy.jpg"), "--k", "1", "--params", params)
    assert out.returncode == 0, out.stderr
    *lines, summary = out.stdout.splitlines()
    assert summary == "query: 2 files: 1 already in the collection, 1 exact copy of a collection image"
    mine, copy = "\n".join(lines).split(str(tmp_path / "copy.jpg"))
    assert "in the collection as box-b/p2.jpg" in mine and "exact duplicate" not in mine
    assert "exact duplicate (same bytes) of box-b/p2.jpg" in copy and "in the collection" not in copy


def test_query_marks_the_neighbours_cbir_pairs_would_count_as_near_duplicates(built):
    # Found in an archivist trial: ten neighbours of a halftone reprint scored 0.95-0.9994 and
    # nothing said which of them `cbir pairs` would report.
    def marked(params: Path) -> tuple[str, dict[str, tuple[bool, float, bool]]]:
        out = cbir("query", str(built / "scans" / "box-b" / "p0-rescan.jpg"), "--k", "7",
                   "--params", str(params))
        assert out.returncode == 0, out.stderr
        found = {}
        for line in out.stdout.splitlines()[2:]:
            if (m := re.match(r"\s+\d+([* ]) (\d\.\d{4})  (\S+)", line)) is not None:
                confirmed = "(confirmed by" in line or "detail of" in line
                found[m[3]] = (m[1] == "*", float(m[2]), confirmed)
        assert len(found) == 7, out.stdout
        return out.stdout.splitlines()[0], found

    head, found = marked(built / "params.yaml")
    assert head.startswith("pair threshold 0.5000 (params): * marks a near-duplicate")
    scores = sorted((score for _, score, _ in found.values()), reverse=True)
    cut = round((scores[2] + scores[3]) / 2, 4)  # between the 3rd and 4th neighbours
    params = yaml.safe_load((built / "params.yaml").read_text())
    params["search"].update(pair_threshold=cut, cluster_threshold=cut)
    (built / "strict.yaml").write_text(yaml.safe_dump(params))
    head, found = marked(built / "strict.yaml")
    assert head.startswith(f"pair threshold {cut:.4f} (params)"), head
    for path, (star, score, confirmed) in found.items():
        assert star == (score >= cut or confirmed), (path, star, score, confirmed)
    assert found["box-b/p0.jpg"][0] and not all(star for star, _, _ in found.values()), found


def test_query_says_which_neighbour_the_query_found_turned(built, tmp_path):
    from PIL import Image

    side = tmp_path / "side.jpg"
    Image.open(built / "scans" / "box-b" / "p4.jpg").rotate(90, expand=True).save(side)
    out = cbir("query", str(side), "--k", "2", "--params", str(built / "params.yaml"))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[2]
    assert "box-b/p4.jpg" in first and "(the query turned 90\u00b0 clockwise)" in first, out.stdout
    assert "found with the query turned, only if confirmed" in out.stdout.splitlines()[0]


def test_the_canonical_copy_is_the_likely_master(built):
    settings = load_settings(built / "params.yaml")
    cols, rows = catalog.query(settings, "SELECT path FROM images WHERE path LIKE '%p1.jpg'")
    assert rows == [("box-b/p1.jpg",)]  # seen first: the older file, not the first path
    cols, rows = catalog.query(settings, "SELECT path_a, path_b, master_path, master_reason "
                                         "FROM pair_report WHERE kind = 'exact'")
    assert rows == [("box-b/p1.jpg", "a-copies/p1.jpg", "box-b/p1.jpg", "earlier")]


def test_sql_limits_rows_and_speaks_csv_and_json(built):
    params = str(built / "params.yaml")
    sql = "SELECT path, width FROM images ORDER BY path"
    out = cbir("sql", sql, "--limit", "2", "--params", params)
    assert out.returncode == 0
    assert "(2 rows)" in out.stdout and "5 more rows not shown" in out.stdout
    out = cbir("sql", sql, "--format", "csv", "--params", params)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 7 and rows[0]["path"] == "box-b/p0-rescan.jpg" and out.stderr == ""
    out = cbir("sql", sql, "--format", "json", "--limit", "1", "--params", params)
    assert json.loads(out.stdout) == [{"path": "box-b/p0-rescan.jpg", "width": 100}]
    assert "6 more rows" in out.stderr
    out = cbir("sql", "SELECT round(score, 3) AS score FROM duplicate_pairs WHERE kind = 'exact'",
               "--params", params)
    assert out.stdout.splitlines()[2].strip() == "1.0"
    out = cbir("sql", "SELECT round(max(score), 3) AS s FROM duplicate_pairs WHERE kind = 'near'",
               "--format", "json", "--params", params)
    value = json.loads(out.stdout)[0]["s"]
    assert value == round(value, 3)  # not 0.9980000257492065


def test_params_errors_say_where_and_suggest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  scans_dir: x\n search:\n  k: 3\n")
    out = cbir("ingest", "--params", str(bad))
    assert out.returncode == 2 and "line 3, column 2" in out.stderr
    bad.write_text("data:\n  scan_dir: x\nsearch:\n  pair_treshold: 0.5\n")
    out = cbir("ingest", "--params", str(bad))
    assert "data.scan_dir: unknown key; did you mean data.scans_dir?" in out.stderr
    assert "did you mean search.pair_threshold?" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_moved_workspace_reads_its_own_files(built, tmp_path):
    """The catalogue's views name their files relative to the workspace: a moved copy reads
    itself, not the folder it came from."""
    moved = tmp_path / "moved"
    shutil.copytree(built, moved)
    (built / "data" / "pairs" / "pairs.parquet").rename(built / "data" / "pairs" / "gone")
    try:
        out = cbir("sql", "SELECT count(*) AS n FROM duplicate_pairs", "--format", "json",
                   "--params", str(moved / "params.yaml"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["n"] >= 1
        con = __import__("duckdb").connect(str(moved / "data" / "catalog.duckdb"),
                                           read_only=True)
        os.chdir(moved)  # a user's own script, run in the workspace
        try:
            assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 7
        finally:
            os.chdir(tmp_path)
    finally:
        (built / "data" / "pairs" / "gone").rename(built / "data" / "pairs" / "pairs.parquet")


def test_output_cut_short_by_its_reader_ends_quietly(built):
    """`cbir sql ... | head`: the reader closes the pipe early; cbir stops as a Unix tool does
    (status 141, SIGPIPE's), with no traceback."""
    proc = subprocess.Popen([*CBIR, "sql", "SELECT range AS n FROM range(200000)", "--limit",
                             "200000", "--params", str(built / "params.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert b"n" in first[0] and "Traceback" not in err and "BrokenPipe" not in err
