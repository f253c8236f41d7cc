"""Nothing cbir does destroys what it does not own (issue 12, family 1).

Every output path (`data.*`, `model.checkpoint`, an `--out`) is checked when the settings load
(cbir/store/outputs.py): one overlapping the scans, the params file, the ground truth or another
output, a foreign folder or file, and a scans folder that is the file system's root or holds the
data folder are refused with one line naming both paths, and nothing anywhere changes.
`cbir demo-data` refuses a non-empty folder it did not write; `cbir report` deletes only files
named as it names its own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cbir import cli
from conftest import photo, save, write_params
from test_hostile import FAST, assert_one_line_error, run_cli


def tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, the writer lock's scratch file aside."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".cbir.lock"}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace (scans, labels, params) beside a folder and a file of the user's own."""
    root = tmp_path / "ws"
    for i in range(2):
        save(photo(i), root / "scans" / f"p{i}.jpg", quality=90)
    (root / "labels.csv").write_text("path,group\nscans/p0.jpg,g0\nscans/p1.jpg,g0\n")
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("the user's own notes\n")
    (root / "notes.md").write_text("# not cbir's\n")
    os.symlink(root / "scans", root / "scans-link")
    write_params(root, {"data": {"scans_dir": "scans", "ground_truth": "labels.csv"}, **FAST})
    return root


def with_params(root: Path, **data: object) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in data.items():
        section, _, name = key.partition("__")
        params.setdefault(section, {})[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# (params to set, the step run, what the one error line names besides the keys)
OVERLAPS = [
    # the issue's own examples
    ("reports-in-scans", {"data__reports_dir": "scans"}, "report",
     ["data.reports_dir", "overlaps data.scans_dir", "ws/scans"]),
    ("reports-in-foreign-folder", {"data__reports_dir": "docs"}, "evaluate",
     ["data.reports_dir", "ws/docs", "'notes.txt'", "did not write"]),
    ("catalog-is-params", {"data__catalog": "params.yaml"}, "ingest",
     ["data.catalog", "overlaps the params file", "ws/params.yaml"]),
    ("catalog-is-a-scan", {"data__catalog": "scans/p0.jpg"}, "ingest",
     ["data.catalog", "ws/scans/p0.jpg", "overlaps data.scans_dir"]),
    ("scans-at-root", {"data__scans_dir": "/"}, "ingest", ["root of the file system"]),
    # more of the same families
    ("manifest-in-scans", {"data__manifest_dir": "scans/manifest"}, "ingest",
     ["data.scans_dir", "contains the workspace's data folder", "ws/scans"]),
    ("catalog-in-scans", {"data__catalog": "scans/sub/catalog.duckdb"}, "sql",
     ["data.catalog", "overlaps data.scans_dir"]),
    ("scans-hold-the-data-folder", {"data__scans_dir": "."}, "ingest",
     ["data.scans_dir", "contains the workspace's data folder", "ws/data"]),
    ("scans-through-a-link", {"data__pairs_dir": "scans-link/pairs"}, "pairs",
     ["data.pairs_dir", "ws/scans/pairs", "overlaps data.scans_dir"]),
    ("index-in-the-workspace-root", {"data__index_dir": "."}, "index",
     ["data.index_dir", "overlaps data.scans_dir"]),
    ("models-beside-the-params", {"data__models_dir": "docs/..", "model__checkpoint": "m.pt"},
     "train", ["data.models_dir", "overlaps"]),
    ("two-outputs-one-folder", {"data__embeddings_dir": "data/index"}, "embed",
     ["data.embeddings_dir", "data.index_dir", "each output needs a place of its own"]),
    ("cache-holds-every-output", {"data__cache_dir": "data"}, "train",
     ["data.cache_dir", "data.manifest_dir", "ws/data"]),
    ("checkpoint-is-the-labels", {"model__checkpoint": "labels.csv"}, "train",
     ["model.checkpoint", "overlaps data.ground_truth", "ws/labels.csv"]),
    ("checkpoint-is-a-foreign-file", {"model__checkpoint": "notes.md"}, "train",
     ["model.checkpoint", "ws/notes.md", "is not a torch checkpoint"]),
    ("catalog-is-a-foreign-file", {"data__catalog": "notes.md"}, "sql",
     ["data.catalog", "ws/notes.md", "is not a DuckDB database"]),
    ("reports-is-a-file", {"data__reports_dir": "notes.md"}, "report",
     ["data.reports_dir", "is a file, not a folder"]),
    ("prefect-state-is-the-scans", {"data__scans_dir": "data/prefect"}, "nightly",
     ["Prefect's state", "overlaps data.scans_dir", "ws/data/prefect"]),
]


@pytest.mark.parametrize("params,step,fragments",
                         [pytest.param(*c[1:], id=c[0]) for c in OVERLAPS])
def test_outputs_that_would_overwrite_what_cbir_does_not_own_are_refused(ws, capsys, params, step,
                                                                         fragments):
    with_params(ws, **params)
    before = tree(ws)
    argv = [step, "--params", str(ws / "params.yaml")] + (["SELECT 1"] if step == "sql" else [])
    rc, err = run_cli("in-process", capsys, *argv)
    assert_one_line_error(rc, err, step, *fragments)
    assert tree(ws) == before


def test_an_output_folder_cbir_wrote_is_accepted_again_and_a_foreign_one_is_not(ws, capsys):
    """A folder holding only cbir's own names (as `dvc checkout` restores one) is cbir's; one
    file of the user's put into it makes the next command stop before writing anything."""
    params = str(ws / "params.yaml")
    assert cli.main(["ingest", "--params", params]) == 0
    (ws / "data" / "manifest" / "my-export.csv").write_text("a,b\n")
    before = tree(ws)
    rc, err = run_cli("in-process", capsys, "ingest", "--params", params)
    assert_one_line_error(rc, err, "ingest", "data.manifest_dir", "'my-export.csv'")
    assert tree(ws) == before
    (ws / "data" / "manifest" / "my-export.csv").unlink()
    (ws / "data" / "manifest" / ".DS_Store").write_bytes(b"\0")  # a file browser's litter
    assert cli.main(["ingest", "--params", params]) == 0


def test_augment_preview_out_may_not_overwrite_a_scan(ws, capsys):
    before = tree(ws)
    rc, err = run_cli("in-process", capsys, "augment-preview", str(ws / "scans" / "p0.jpg"),
                      "--out", str(ws / "scans" / "p1.jpg"), "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, "augment-preview", "--out", "overlaps data.scans_dir")
    assert tree(ws) == before


DEMO = ["demo-data", "--params"]


@pytest.mark.parametrize("held", ["scans/box-01/scan-000001.jpg", "ground_truth.csv",
                                  "notes.txt", "scans/"])
def test_demo_data_refuses_a_folder_it_did_not_write(tmp_path, capsys, held):
    """An archive's folder whose scans are named like the demo's: nothing is overwritten."""
    params = write_params(tmp_path / "p", {"demo": {"n_groups": 2, "n_distractors": 1,
                                                    "size": 64}})
    out = tmp_path / "archive"
    target = out / held
    if held.endswith("/"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"the archive's own " + held.encode())
    before = tree(out)
    rc, err = run_cli("in-process", capsys, *DEMO, str(params), str(out))
    assert_one_line_error(rc, err, "demo-data", str(out), "is not a demo collection")
    assert tree(out) == before and sorted(os.listdir(out)) == sorted({held.split("/")[0]})


def test_demo_data_reruns_in_its_own_folder_and_refuses_a_file(tmp_path, capsys):
    params = write_params(tmp_path / "p", {"demo": {"n_groups": 2, "n_distractors": 1,
                                                    "size": 64}})
    out = tmp_path / "demo"
    assert cli.main([*DEMO, str(params), str(out)]) == 0
    assert cli.main([*DEMO, str(params), str(out)]) == 0  # its own: done already
    (tmp_path / "file").write_text("x")
    rc, err = run_cli("in-process", capsys, *DEMO, str(params), str(tmp_path / "file"))
    assert_one_line_error(rc, err, "demo-data", "is a file, not a folder")


def test_report_deletes_only_the_files_it_wrote(ws):
    """Surplus pages, plots and thumbnails of other sizes go; a user's files beside them stay."""
    params = str(ws / "params.yaml")
    for step in ("ingest", "embed", "index", "pairs", "evaluate", "report"):
        assert cli.main([step, "--params", params]) == 0, step
    gallery, plots = ws / "data/reports/gallery", ws / "data/reports/plots"
    mine = [gallery / "notes.html", gallery / "pairs-0001.html.bak", gallery / "Index.html",
            plots / "figure.png", plots / "pr_curve.svg", gallery / "thumbs" / "64" / "keep.jpg",
            gallery / "thumbs" / "128" / "readme.txt"]
    stale = [gallery / "pairs-0099.html", gallery / "query-00042.html",
             plots / "train_loss.png", gallery / "thumbs" / "128" / "0123456789abcdef.jpg"]
    for p in mine + stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert cli.main(["report", "--params", params]) == 0
    assert all(p.read_text() == "x" for p in mine)
    assert not any(p.exists() for p in stale)
