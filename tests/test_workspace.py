"""`cbir init`: archive workspaces, their params and pipeline, and what init refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cbir.config import Settings, load_settings
from cbir.errors import CbirError
from cbir.workspace import init_workspace, render_params, template, workspace_pipeline
from conftest import CBIR, REPO, photo, save


def _scans(root: Path, n: int = 3) -> Path:
    scans = root / "scans"
    for i in range(n):
        save(photo(i), scans / f"box-1/p{i}.jpg")
    return scans


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True,
                          check=True).stdout


def test_init_makes_a_self_contained_workspace(tmp_path):
    scans = _scans(tmp_path)
    before = sorted(p.stat().st_mtime_ns for p in scans.rglob("*"))
    summary = init_workspace(tmp_path / "ws", scans)
    ws = tmp_path / "ws"
    for name in ("params.yaml", "dvc.yaml", "README.md", "labels.csv", ".gitignore", ".dvc"):
        assert (ws / name).exists(), name
    settings = load_settings(ws / "params.yaml")
    assert settings.path(settings.data.scans_dir) == scans.resolve()
    assert settings.path(settings.data.ground_truth) == ws / "labels.csv"
    assert (ws / "labels.csv").read_text() == "path,group\n"  # nothing labelled yet
    assert settings.search.pair_threshold == "auto"
    # git: a new repository with the workspace committed (dvc exp run needs a commit)
    assert _git(ws, "log", "--oneline").count("\n") == 1
    assert _git(ws, "status", "--porcelain") == ""
    assert _git(ws, "check-ignore", "data/manifest").strip() == "data/manifest"
    assert "analytics = false" in (ws / ".dvc" / "config").read_text()  # nothing sent out
    assert (ws / "dvc.yaml").read_text() == workspace_pipeline((REPO / "dvc.yaml").read_text())
    assert str(scans.resolve()) in (ws / "README.md").read_text()
    assert sorted(p.stat().st_mtime_ns for p in scans.rglob("*")) == before  # scans untouched
    assert any("dvc repro" in line for line in summary.lines())


def test_init_refuses_overlaps_and_existing_workspaces_with_one_line(tmp_path):
    scans = _scans(tmp_path)
    cases = [
        (["init", str(scans / "ws"), "--scans", str(scans)], "inside the scans folder"),
        (["init", str(tmp_path), "--scans", str(tmp_path / "data" / "s")], "scans folder not"),
        (["init", str(tmp_path / "nope"), "--scans", str(tmp_path / "missing")], "not found"),
        (["init", str(tmp_path / "w"), "--scans", "/"], "root of the file system"),
    ]
    (tmp_path / "data" / "s").mkdir(parents=True)
    cases[1] = (cases[1][0], "inside the workspace's data folder")
    for args, message in cases:
        out = subprocess.run([*CBIR, *args], capture_output=True, text=True)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
    assert not (scans / "ws").exists() and not (tmp_path / "params.yaml").exists()

    init_workspace(tmp_path / "ws", scans)
    with pytest.raises(CbirError, match="already holds a workspace.*--force"):
        init_workspace(tmp_path / "ws", scans)


def test_force_keeps_the_data_and_the_users_params(tmp_path):
    scans = _scans(tmp_path)
    ws = tmp_path / "ws"
    init_workspace(ws, scans)
    text = (ws / "params.yaml").read_text().replace("  k: 10 ", "  k: 7  ")
    (ws / "params.yaml").write_text(text + "# my note\n")
    (ws / "data" / "manifest").mkdir(parents=True)
    (ws / "data" / "manifest" / "files.parquet").write_bytes(b"kept")
    (ws / "dvc.yaml").write_text((ws / "dvc.yaml").read_text() + "# edited\n")
    other = tmp_path / "other-scans"
    other.mkdir()
    gt = tmp_path / "gt.csv"
    gt.write_text("path,group\n")
    summary = init_workspace(ws, other, gt, force=True)
    settings = load_settings(ws / "params.yaml")
    assert settings.search.k == 7 and "# my note" in (ws / "params.yaml").read_text()
    assert settings.path(settings.data.scans_dir) == other.resolve()
    assert settings.path(settings.data.ground_truth) == gt.resolve()
    assert (ws / "data" / "manifest" / "files.parquet").read_bytes() == b"kept"
    assert (ws / "dvc.yaml").read_text() == workspace_pipeline(template("dvc.yaml"))
    assert (ws / "dvc.yaml.before-init").read_text().endswith("# edited\n")  # never lost
    assert any("before-init" in line for line in summary.lines())


def test_a_workspace_inside_an_existing_git_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    scans = _scans(tmp_path)
    summary = init_workspace(repo / "archive", scans)
    ws = repo / "archive"
    assert (ws / ".dvc").is_dir() and not (ws / ".git").exists()
    dvc_root = subprocess.run([sys.executable, "-m", "dvc", "root"], cwd=ws,
                              capture_output=True, text=True)
    assert dvc_root.stdout.strip() == ".", dvc_root.stderr  # a DVC project of its own
    assert _git(repo, "log", "--oneline", "--all") == ""  # the user's repository: no commit
    assert any("commit the workspace files" in line for line in summary.lines())
    # a README that is not cbir's is left alone
    (repo / "other").mkdir()
    (repo / "other" / "README.md").write_text("mine\n")
    init_workspace(repo / "other", scans)
    assert (repo / "other" / "README.md").read_text() == "mine\n"


def test_rendered_params_hold_every_default_and_load_as_settings(tmp_path):
    text = render_params("/mnt/scans", "labels.csv")
    raw = yaml.safe_load(text)
    (tmp_path / "params.yaml").write_text(text)
    loaded = load_settings(tmp_path / "params.yaml")
    defaults = Settings(root=tmp_path, params_path=tmp_path / "params.yaml",
                        data={"scans_dir": "/mnt/scans", "ground_truth": "labels.csv"})
    assert loaded == defaults
    assert "demo" not in raw  # only for `cbir demo-data`
    for section, fields in raw.items():
        model = type(getattr(defaults, section))
        assert set(fields) == set(model.model_fields), section  # every key is shown
    assert max(len(line) for line in text.splitlines()) <= 100


def test_the_repository_is_the_workspace_of_the_demo_collection():
    """One definition: the repository's params.yaml is what `cbir init` writes for the demo
    collection, and its dvc.yaml is the pipeline init copies into every workspace."""
    want = render_params("demo/scans", "demo/ground_truth.csv")
    assert (REPO / "params.yaml").read_text() == want, (
        "params.yaml differs from the rendered defaults; regenerate it with "
        "`python -m cbir.workspace demo/scans demo/ground_truth.csv > params.yaml`")
    assert template("dvc.yaml") == (REPO / "dvc.yaml").read_text()
    assert Path(REPO / "cbir" / "templates" / "dvc.yaml").is_symlink()


def test_the_repository_has_one_pipeline_for_dvc():
    """`dvc repro` in the repository (what `make demo` runs) sees the repository's pipeline only:
    the template beside the package, which resolves ${data.*} against no params file, is not a
    second one (.dvcignore)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=REPO,
                         capture_output=True, text=True)  # collects every pipeline, as repro does
    assert out.returncode == 0, out.stderr
    for stage in ("ingest", "train", "embed", "index", "calibrate", "pairs", "evaluate", "report"):
        assert f'"{stage}"' in out.stdout, out.stdout
    # DVC refuses every command in a repository whose dvc.lock git ignores (CI saw exactly that)
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=REPO)
    assert ignored.returncode == 1, "dvc.lock must not be git-ignored: DVC refuses to run then"


def test_cli_init_prints_what_it_did(tmp_path):
    scans = _scans(tmp_path)
    out = subprocess.run([*CBIR, "init", str(tmp_path / "ws"), "--scans", str(scans)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "workspace" in out.stdout and "next: cd" in out.stdout
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    stages = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=tmp_path / "ws",
                            capture_output=True, text=True, env=env)
    names = [line.split()[0] for line in stages.stdout.splitlines() if line.strip()]
    assert names == ["ingest", "decisions", "train", "embed", "index", "calibrate", "pairs",
                     "evaluate", "report"], stages.stderr

    # a command run beside the workspace, where find-duplicates leaves the user: it is named
    out = subprocess.run([*CBIR, "sql", "SELECT 1"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == (
        f"cbir sql: error: no params.yaml in {tmp_path}: run cbir inside a workspace, e.g. "
        f"`cd ws` first or `--params ws/params.yaml`\n"), out.stderr
    out = subprocess.run([*CBIR, "sql", "SELECT 1"], capture_output=True, text=True,
                         cwd=tmp_path / "scans")  # no workspace in it: the plain error
    assert out.stderr == f"cbir sql: error: params file not found: {scans}/params.yaml\n"


@pytest.mark.parametrize("files,says", [
    ({}, "the scans folder {scans} holds no image files (check data.scans_dir)"),
    ({"notes.txt": b"box list", "p1.jpg": b"\xff\xd8 half"},
     "none of the files in the scans folder {scans} is a usable image: 2 quarantined, see why "
     'with cbir sql "SELECT path, reason FROM quarantine"'),
])
def test_steps_with_no_image_to_work_on_say_why_in_one_line(tmp_path, files, says):
    """Found in a trial: find-duplicates on a folder without a usable image said "the manifest
    is empty (run `cbir ingest`)" right after ingest ran, and with --no-train "run `cbir embed`
    first" right after embed ran. Each step now says what the scans folder holds."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, data in files.items():
        (scans / name).write_bytes(data)
    ws = tmp_path / "ws"
    want = says.format(scans=scans)
    for extra in ([], ["--no-train"]):
        out = subprocess.run([*CBIR, "find-duplicates", str(scans), "--out", str(ws), *extra],
                             capture_output=True, text=True)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stderr.strip() == (f"cbir find-duplicates: error: no images to compare: "
                                      f"{want} (workspace {ws})")
    for step, what in (("train", "no images to train on"), ("index", "no images")):
        out = subprocess.run([*CBIR, step], capture_output=True, text=True, cwd=ws)
        assert out.returncode == 2 and out.stderr.strip() == f"cbir {step}: error: {what}: {want}"


def test_find_duplicates_in_one_command(tmp_path):
    scans = _scans(tmp_path, 4)
    save(photo(0).resize((80, 53)), scans / "box-2/p0-rescan.jpg")
    (scans / "box-2" / "p1-copy.jpg").write_bytes((scans / "box-1" / "p1.jpg").read_bytes())
    out = subprocess.run([*CBIR, "find-duplicates", str(scans), "--no-train"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    ws = tmp_path / "scans-cbir"  # beside the current folder, named after the scans
    tail = out.stdout[out.stdout.index("find-duplicates: done"):]
    for line in ("gallery", "pair table", "catalogue"):
        assert line in tail
    assert (ws / "data" / "reports" / "gallery" / "index.html").is_file()
    assert str(ws / "data" / "pairs" / "pairs.parquet") in tail
    assert "1 exact copy, " in tail
    assert "dvc: not recorded: no trained model yet" in out.stdout
    settings = load_settings(ws / "params.yaml")
    assert settings.path(settings.data.scans_dir) == scans.resolve()
    # DVC cannot record a workspace without its train stage's output: it warns of the empty
    # decisions folder first, and the error that follows is what a user is told
    from cbir.steps.nightly import _dvc
    (ws / "data" / "decisions").mkdir(exist_ok=True)  # as record_with_dvc makes it: empty
    with pytest.raises(CbirError, match="model.pt' does not exist.*run `dvc repro` once"):
        _dvc(["commit", "-f"], ws)
    # the next night, in that workspace: new scans found, nothing recorded, no failure
    save(photo(3).resize((90, 60)), scans / "box-3" / "p3-rescan.jpg")
    night = subprocess.run([*CBIR, "nightly"], capture_output=True, text=True, cwd=ws)
    assert night.returncode == 0, night.stdout[-2000:] + night.stderr[-2000:]
    assert "dvc: not recorded: no trained model yet" in night.stdout
    again = subprocess.run([*CBIR, "find-duplicates", str(scans), "--no-train", "--out",
                            str(ws)], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "reusing the workspace" in again.stdout
    assert "0 new, 0 changed" in again.stdout  # nothing decoded twice
    other = tmp_path / "other"
    other.mkdir()
    refused = subprocess.run([*CBIR, "find-duplicates", str(other), "--out", str(ws)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "workspace of other scans" in refused.stderr
    # run from inside the workspace (found in a trial: it made ws/scans-cbir, a workspace inside
    # the workspace, and started over): the workspace itself, or a refusal for other scans
    inside = subprocess.run([*CBIR, "find-duplicates", "../scans", "--no-train"],
                            capture_output=True, text=True, cwd=ws)
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert f"reusing the workspace {ws} " in inside.stdout and "0 new, 0 changed" in inside.stdout
    assert not (ws / "scans-cbir").exists()
    refused = subprocess.run([*CBIR, "find-duplicates", str(other)], capture_output=True,
                             text=True, cwd=ws)
    assert refused.returncode == 2 and not (ws / "other-cbir").exists()
    assert f"the current folder {ws} is the workspace of other scans" in refused.stderr
