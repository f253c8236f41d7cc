"""Reviewers' decisions without a browser, and how they feed back: `cbir decide`, `cbir decisions
import|export`, `cbir export --remove-list`, the clusters of `cbir pairs`, `cbir evaluate` on
decisions alone, and the log's own DVC stage (real DVC, in a temporary git repository)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny_workspace
from conftest import CBIR, photo, save

from cbir import cli, lock
from cbir.config import Settings, load_settings
from cbir.errors import CbirError
from cbir.steps.decisions import (
    ImportRefused,
    export_decisions,
    import_decisions,
    remove_list,
    run_decide,
)
from cbir.store.labels import read_labels
from cbir.steps.pairs import run_pairs
from cbir.store import decisions as D
from cbir.store.catalog import query
from cbir.store.layout import layout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny workspace, ingested, embedded, indexed and paired (fixed thresholds). Tests work on
    copies of it."""
    root = tmp_path_factory.mktemp("decide")
    settings = tiny_workspace.make(root)
    run_pairs(settings)
    return root


def _copy(built: Path, tmp_path: Path, **data) -> Settings:
    ws = tmp_path / "ws"
    shutil.copytree(built, ws)
    if data:
        from cbir.paramsfile import set_params

        set_params(ws / "params.yaml", {f"data.{k}": v for k, v in data.items()})
    return load_settings(ws / "params.yaml")


def _cbir(settings: Settings, *args: str, process: bool = False
          ) -> subprocess.CompletedProcess[str]:
    """`cbir ARGS --params ...` run in the workspace: by its entry point in this process (each
    `cbir` process spends seconds importing torch before it starts), or, with `process`, as a
    user runs it (the exit status of the process, what it prints)."""
    argv = [*args, "--params", str(settings.params_path)]
    if process:
        return subprocess.run([*CBIR, *argv], capture_output=True, text=True, cwd=settings.root)
    out, err = io.StringIO(), io.StringIO()
    os.chdir(settings.root)  # put back after the test (conftest)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argparse's refusals exit, as in a process
            rc = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess([*CBIR, *argv], rc, out.getvalue(), err.getvalue())


def _id(settings: Settings, path: str) -> str:
    _, rows = query(settings, "SELECT image_id FROM files WHERE path = ?", [path])
    return rows[0][0]


def _current(settings: Settings) -> dict[tuple[str, str], dict]:
    return D.current_decisions(layout(settings).decisions_dir)


def test_decide_names_images_by_path_or_id_and_undo_withdraws(built, tmp_path):
    s = _copy(built, tmp_path)
    p1, small = _id(s, "p1.png"), _id(s, "copies/p1-small.png")
    out = _cbir(s, "decide", "p1.png", "copies/p1-small.png", "--same", "--master",
                "copies/p1-small.png", "--note", "a rescan", "--reviewer", "ann", process=True)
    assert out.returncode == 0, out.stderr
    assert "p1.png and copies/p1-small.png: same, master copies/p1-small.png" in out.stdout
    row = _current(s)[D.pair_key(p1, small)]
    assert (row["decision"], row["master"], row["note"], row["reviewer"], row["source"]) == (
        "same", small, "a rescan", "ann", "cli")
    assert row["score"] is not None  # the pair's score, when `cbir pairs` found it
    from cbir.store.pairs import scores_fingerprint
    assert row["model"] == scores_fingerprint(s) and row["model"]  # the model of that score

    # an absolute path inside the scans folder, and an image id
    out = _cbir(s, "decide", str(s.root / "scans" / "p2.png"), _id(s, "p3.png"), "--different")
    assert out.returncode == 0, out.stderr
    assert _current(s)[D.pair_key(_id(s, "p2.png"), _id(s, "p3.png"))]["decision"] == "different"
    # the decision as a third word, as people say it
    out = _cbir(s, "decide", "p4.png", "p5.png", "different")
    assert out.returncode == 0, out.stderr
    assert _current(s)[D.pair_key(_id(s, "p4.png"), _id(s, "p5.png"))]["decision"] == "different"

    for args, says in [
        (["p1.png", "p2.png", "different", "--same"], "two decisions given (different and --same)"),
        (["p1.png", "p2.png", "same", "--undo"], "two decisions given (same and --undo)"),
        (["nope.png", "p1.png", "--same"], "'nope.png' is no ingested image"),
        (["p1.png", "copies\\p1-small.png", "same"],  # from a Windows spreadsheet
         "did you mean 'copies/p1-small.png'? (paths are written with /"),
        (["p0.png", "copies/p0-copy.png", "--same"], "the same image"),
        (["p1.png", "p2.png", "--different", "--master", "p1.png"], "--master goes with --same"),
        (["p1.png", "p2.png"], "--same, --different or --unsure"),
        (["p3.png", "p5.png", "--undo"], "no decision on 'p3.png' and 'p5.png' to undo"),
    ]:
        out = _cbir(s, "decide", *args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr

    out = _cbir(s, "decide", "p1.png", "p2.png", "diff")  # argparse: its usage, then the error
    assert out.returncode == 2 and "invalid choice: 'diff'" in out.stderr.splitlines()[-1]

    run_decide(s, "p1.png", "copies/p1-small.png", "unsure")
    out = _cbir(s, "decide", "copies/p1-small.png", "p1.png", "--undo")
    assert out.returncode == 0, out.stderr
    assert "withdrew 'unsure'" in out.stdout and "(now same)" in out.stdout
    assert _current(s)[D.pair_key(p1, small)]["decision"] == "same"
    assert len(D.read_log(layout(s).decisions_dir)) == 5  # the history keeps every row


def test_an_import_with_a_bad_row_imports_nothing(built, tmp_path):
    s = _copy(built, tmp_path)
    good = ("path_a,path_b,decision,master,note,reviewer\n"
            "p1.png,copies/p1-small.png,same,p1.png,rescan,ann\n"
            "p2.png,p3.png,different,,,\n"
            "p4.png,p5.png,Unsure,,,\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(good + "p2.png,missing.png,same,,,\n"
                          "p4.png,p2.png,maybe,,,\n"
                          "p3.png,p2.png,same,,,\n")
    out = _cbir(s, "decisions", "import", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert [ln.split(": ", 2)[1] for ln in lines[:3]] == [
        f"{bad}, line 5", f"{bad}, line 6", f"{bad}, line 7"]
    assert "'missing.png' is no ingested image" in lines[0] and "'maybe'" in lines[1]
    assert "the same pair as line 3" in lines[2]
    assert "3 of 6 rows are bad; nothing imported" in lines[3] and len(lines) == 4
    assert D.parts(layout(s).decisions_dir) == []  # not half imported

    fine = tmp_path / "fine.csv"
    fine.write_text(good)
    summary = import_decisions(s, fine)
    assert (summary.rows, summary.recorded, summary.unchanged) == (3, 3, 0)
    assert len(D.parts(layout(s).decisions_dir)) == 1  # one part, written at once
    now = {(r["path_a"], r["path_b"]): r for r in _current(s).values()}
    assert len(now) == 3 and {r["source"] for r in now.values()} == {"import"}
    assert sorted(r["decision"] for r in now.values()) == ["different", "same", "unsure"]
    assert import_decisions(s, fine).recorded == 0  # nothing new the second time
    with pytest.raises(CbirError, match="path_a,path_b,decision"):
        (tmp_path / "nohead.csv").write_text("a,b\n1,2\n")
        import_decisions(s, tmp_path / "nohead.csv")


def test_export_then_import_gives_the_same_decisions(built, tmp_path):
    s = _copy(built, tmp_path / "one")
    run_decide(s, "p1.png", "copies/p1-small.png", "same", master="p1.png", note='a, "quoted"\nnote',
               reviewer="ann")
    run_decide(s, "p2.png", "p3.png", "different", reviewer="bob")
    run_decide(s, "p4.png", "p5.png", "same")
    from cbir.steps.decisions import run_undo

    run_undo(s, "p4.png", "p5.png")
    out = _cbir(s, "decisions", "compact", "--all")  # merges the four parts, loses nothing
    assert out.returncode == 0 and "merged 4 parts into one" in out.stdout, out.stderr
    assert len(D.parts(layout(s).decisions_dir)) == 1 and len(D.read_log(
        layout(s).decisions_dir)) == 4
    target = tmp_path / "decisions.csv"
    out = _cbir(s, "decisions", "export", str(target))
    assert out.returncode == 0 and "2 current decisions to" in out.stdout, out.stderr
    assert export_decisions(s, target).rows == 2  # over its own earlier export
    history = tmp_path / "history.csv"
    assert export_decisions(s, history, history=True).rows == 4
    rows = list(csv.DictReader(history.open()))
    assert [r["decision"] for r in rows] == ["same", "different", "same", "undo"]

    other = _copy(built, tmp_path / "two")
    assert import_decisions(other, target).recorded == 2

    def key(settings):
        return {k: (r["decision"], r["master"], r["note"], r["reviewer"])
                for k, r in _current(settings).items()}

    assert key(other) == key(s) and len(key(s)) == 2
    with pytest.raises(ImportRefused) as refused:
        import_decisions(other, history)
    assert "undo rows of a --history export are not imported" in refused.value.problems[0]

    # never over what cbir did not write: a foreign file, the scans, the params, its outputs
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my own notes\n")
    for path, says in [(foreign, "is not a CSV cbir wrote"),
                       (s.root / "scans" / "x.csv", "overlaps data.scans_dir"),
                       (s.params_path, "overlaps the params file"),
                       (layout(s).decisions_dir / "x.csv", "which cbir writes itself")]:
        with pytest.raises(CbirError, match=says):
            export_decisions(s, path)
    assert foreign.read_text() == "my own notes\n"


def test_a_pair_cbir_pairs_never_found_decided_same_names_the_likely_master(built, tmp_path):
    # seen in an archivist trial: a copy on a wide margin, which the nightly had not paired,
    # decided same by hand: the decision recorded, then a KeyError traceback
    from cbir.store.pairs import read_pairs

    s = _copy(built, tmp_path)
    found = read_pairs(s).select(["path_a", "path_b"]).to_pylist()
    paired = {frozenset((r["path_a"], r["path_b"])) for r in found}
    names = [f"p{i}.png" for i in range(6)]
    a, b = next((a, b) for a in names for b in names if a < b and {a, b} not in paired)
    said = run_decide(s, a, b, "same")
    assert said.likely is not None and said.likely[0] in (a, b), said.likely
    assert D.current_decisions(layout(s).decisions_dir)  # recorded, as before


def test_the_remove_list_keeps_one_master_per_confirmed_group(built, tmp_path):
    s = _copy(built, tmp_path)
    named = run_decide(s, "p1.png", "copies/p1-small.png", "same", master="copies/p1-small.png")
    unnamed = run_decide(s, "p2.png", "p3.png", "same")
    run_decide(s, "p3.png", "p4.png", "same")
    run_decide(s, "p2.png", "p4.png", "different")  # keeps p4 out of p2's group
    run_decide(s, "p5.png", "p0.png", "unsure")
    before = sorted(p.relative_to(s.root) for p in (s.root / "scans").rglob("*"))
    target = tmp_path / "remove.csv"
    out = _cbir(s, "export", "--remove-list", str(target))
    assert out.returncode == 0, out.stderr
    assert "3 files to remove, keeping 3 masters, from 2 confirmed groups and 1 set of " \
        "byte-identical copies; nothing was deleted" in out.stdout
    assert "1 of the 2 groups keeps the likely master (no reviewer named one; chosen by larger " \
        "file, as the reason column says)" in out.stdout
    rows = list(csv.DictReader(target.open()))
    _, sizes = query(s, "SELECT path, bytes FROM images WHERE path IN ('p2.png', 'p3.png')")
    bigger, smaller = (p for p, _ in sorted(sizes, key=lambda r: -r[1]))  # same pixels
    # the decision says whom the rule keeps where no master was named
    assert f"no master named: the likely master is {bigger} (larger file)" in unnamed.lines()[1]
    assert named.likely is None and len(named.lines()) == 1
    assert sorted((r["remove"], r["keep"], r["reason"]) for r in rows) == sorted([
        ("p1.png", "copies/p1-small.png", "duplicate (decided same; master named by a reviewer)"),
        (smaller, bigger, "duplicate (decided same; likely master kept: larger file)"),
        ("copies/p0-copy.png", "p0.png", "byte-identical copy"),
    ])
    assert sorted(p.relative_to(s.root) for p in (s.root / "scans").rglob("*")) == before


def test_clusters_follow_the_decisions_and_pairs_stay_as_found(built, tmp_path):
    s = _copy(built, tmp_path)
    lay = layout(s)

    def clusters() -> dict[str, int]:
        return {r["image_id"]: r["cluster_id"] for r in pq.read_table(lay.clusters).to_pylist()}

    found = pq.read_table(lay.pairs).to_pylist()
    near = [r for r in found if r["kind"] == "near"]
    assert near, "the tiny workspace has near pairs at threshold 0.5"
    before = clusters()
    a, b = near[0]["image_a"], near[0]["image_b"]
    assert before[a] == before[b]
    # a rejected link splits the cluster: the two never share one, whatever links them
    D.record(lay.decisions_dir, [D.Decision(a, b, D.DIFFERENT)])
    summary = run_pairs(s)
    after = clusters()
    assert after.get(a) is None or after.get(a) != after.get(b)
    assert "clusters follow 0 pairs decided same and 1 decided different" in "\n".join(
        summary.lines())
    # a confirmed pair below the threshold joins a cluster
    _, ids = query(s, "SELECT image_id FROM images ORDER BY path")
    scored = {(r["image_a"], r["image_b"]) for r in near}
    x, y = next((x, y) for (x,), (y,) in
                ((p, q) for i, p in enumerate(ids) for q in ids[i + 1:])
                if (min(x, y), max(x, y)) not in scored and {x, y} != {a, b})
    D.record(lay.decisions_dir, [D.Decision(x, y, D.SAME)])
    run_pairs(s)
    joined = clusters()
    assert joined[x] == joined[y]
    assert pq.read_table(lay.pairs).to_pylist() == found  # the pairs as found, unchanged


def test_evaluate_scores_against_decisions_alone(built, tmp_path):
    s = _copy(built, tmp_path, ground_truth=None)
    out = _cbir(s, "evaluate")
    assert out.returncode == 0 and "nothing to evaluate" in out.stdout, out.stderr
    run_decide(s, "p1.png", "copies/p1-small.png", "same")
    run_decide(s, "p2.png", "p3.png", "different")
    run_decide(s, "p4.png", "p5.png", "unsure")  # says nothing
    out = _cbir(s, "evaluate")
    assert out.returncode == 0, out.stderr
    assert "evaluate: 2 queries (4 of 7 images labelled" in out.stdout
    assert "labels: 1 labelled duplicate pair in 3 groups (from 1 pair decided same, " \
        "1 different)" in out.stdout
    figures = json.loads(layout(s).metrics_json.read_text())
    assert figures["labels"] == {"images": 4, "groups": 3, "positive_pairs": 1, "csv_images": 0,
                                 "decided_same": 1, "decided_different": 1, "overridden": 0,
                                 "contradicted": 0, "csv_gone": 0, "queries": 2}
    assert figures["model"]["map@1"] is not None


def test_decisions_join_the_ground_truth_csv_and_override_it_on_their_pairs(built, tmp_path):
    # gt.csv: group a = p0 (and its exact copy), p2; group b = p1, copies/p1-small
    s = _copy(built, tmp_path)
    ids = {p: _id(s, p) for p in ("p0.png", "p1.png", "copies/p1-small.png", "p2.png", "p3.png",
                                  "p4.png")}
    plain = read_labels(s)
    assert plain.n_groups == 2 and plain.positive_pairs == 2 and plain.csv_images == 4
    run_decide(s, "p1.png", "copies/p1-small.png", "different")  # overrides group b
    run_decide(s, "p2.png", "p3.png", "same")  # p3 joins group a
    run_decide(s, "p0.png", "p4.png", "different")  # p4: labelled, alone
    gt = read_labels(s)
    g = gt.group_of
    assert g[ids["p0.png"]] == g[ids["p2.png"]] == g[ids["p3.png"]]
    assert g[ids["p1.png"]] != g[ids["copies/p1-small.png"]]
    assert ids["p4.png"] in g and list(g.values()).count(g[ids["p4.png"]]) == 1
    assert (gt.positive_pairs, gt.overridden, gt.contradicted, gt.csv_images) == (3, 1, 0, 4)
    run_decide(s, "p3.png", "p0.png", "different")  # p2 still joins them: contradicted
    assert read_labels(s).contradicted == 1


def test_decisions_survive_dvc_repro_and_make_their_readers_rerun(tmp_path):
    """The workspace's `decisions` stage, with real DVC in a temporary git repository."""
    scans = tmp_path / "scans"
    for i in range(3):
        save(photo(i), scans / f"p{i}.png")
    from cbir.workspace import init_workspace

    repo = tmp_path / "ws"
    init_workspace(repo, scans)
    env = {k: v for k, v in os.environ.items() if k not in (lock.ENV, "DVC_STAGE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `cbir`
    env["DVC_NO_ANALYTICS"] = "1"

    def dvc(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        return out.stdout

    folder = load_settings(repo / "params.yaml").path("data/decisions")
    first = D.record(folder, [D.Decision("a" * 16, "b" * 16, D.SAME, path_a="x.png",
                                         path_b="y.png")])
    assert first is not None
    content = first.read_bytes()
    assert "Running stage 'decisions'" in dvc("repro", "decisions")
    assert "didn't change" in dvc("repro", "decisions")
    recorded = (repo / "dvc.lock").read_text()
    second = D.record(folder, [D.Decision("a" * 16, "c" * 16, D.DIFFERENT)])
    assert second is not None
    status = json.loads(dvc("status", "--json"))
    assert any("data/decisions" in json.dumps(e) for e in status["decisions"])
    readers = [name for name, changes in status.items() if "data/decisions" in json.dumps(changes)]
    assert {"pairs", "calibrate", "evaluate", "report"} <= set(readers)
    assert "Running stage 'decisions'" in dvc("repro", "decisions")
    assert sorted(D.parts(folder)) == sorted([first, second]) and first.read_bytes() == content
    assert (repo / "dvc.lock").read_text() != recorded  # the new log is recorded
    assert len(D.read_log(folder)) == 2
    dvc("checkout", "decisions")  # restores nothing over them: they are what dvc.lock records
    assert len(D.read_log(folder)) == 2


def test_calibrate_labels_with_decisions_once_there_are_enough(built, tmp_path, monkeypatch):
    from cbir.steps import calibrate

    s = _copy(built, tmp_path, ground_truth=None)
    s = load_settings(s.params_path, {"calibrate.copies": 10})
    run_decide(s, "p1.png", "copies/p1-small.png", "same")
    run_decide(s, "p2.png", "p3.png", "different")
    few = calibrate.run_calibrate(s)
    assert few.ground_truth is None  # the self-calibration decides (were the threshold auto)
    assert "(1 pair decided same, 1 different) decide the threshold from 10 of each" in "\n".join(
        few.lines())
    monkeypatch.setattr(calibrate, "MIN_DECISIONS", 1)
    enough = calibrate.run_calibrate(s)
    assert enough.ground_truth is not None
    assert "1 labelled duplicate pair in 3 groups" in enough.ground_truth.basis
    # a pair decided same says nothing of the images' other copies: among the decided only
    assert "ranked among the 4 labelled images" in enough.ground_truth.basis
    figures = json.loads(layout(s).calibration.read_text())
    assert figures["ground_truth"]["labels"]["decided_same"] == 1
    assert figures["ground_truth"]["labels"]["decided_different"] == 1
    # a new decision makes the recorded calibration stale (`cbir pairs` calibrates again)
    record = calibrate.recorded(s)
    assert calibrate.is_current(record, s, record["fingerprint"], record["images"])
    run_decide(s, "p4.png", "p5.png", "different")
    assert not calibrate.is_current(record, s, record["fingerprint"], record["images"])


def test_the_likely_master_says_which_criterion_chose_it():
    from cbir.steps.decisions import _likely_master

    tiff = {"mode": "L", "width": 100, "height": 80, "format": "TIFF", "arrived": 2,
            "bytes": 1000, "first_run": 2, "mtime_ns": 5, "path": "b"}
    jpeg = {**tiff, "format": "JPEG"}
    cases = [  # (the file kept, the other's difference, what keeps the first over it)
        (tiff, {"mode": "1", "width": 400, "height": 320, "bytes": 9000}, "continuous tone"),
        (tiff, {"width": 90, "bytes": 9000, "arrived": 1}, "higher resolution"),
        (tiff, {"format": "JPEG", "bytes": 9000, "arrived": 1}, "lossless file"),
        (tiff, {"format": None, "bytes": 9000, "arrived": 1}, "lossless file"),
        # a JPEG of one resolution that came later lost a generation whatever its bytes (a
        # donor's re-save at a higher quality, a copy turned and saved again) ...
        (jpeg, {"arrived": 3, "bytes": 9000, "first_run": 1}, "arrived first"),
        # ... a lossless one did not: more bytes may be more bits (a 48-bit rescan of a 24-bit
        # TIFF, which Pillow reads as RGB too)
        ({**tiff, "arrived": 3, "first_run": 3}, {"bytes": 999}, "larger file"),
        (jpeg, {"bytes": 999, "first_run": 1}, "larger file"),
        (tiff, {"first_run": 3}, "earlier"),
        (tiff, {"mtime_ns": 6}, "earlier"),
        (tiff, {"path": "c"}, "earlier"),
    ]
    for base, change, why in cases:
        other = {**base, **change}
        for rows in ([base, other], [other, base]):
            assert _likely_master(rows) == (base, why), change
    assert _likely_master([tiff]) == (tiff, "earlier")


def test_the_remove_list_summary_counts_the_likely_masters_by_reason(tmp_path):
    from cbir.steps.decisions import RemoveSummary

    one = RemoveSummary(tmp_path / "r.csv", groups=1, remove=1, keep=1,
                        by_rule={"arrived first": 1})
    assert "the group keeps the likely master (no reviewer named one; chosen by arrived first, " \
        "as the reason column says)" in one.lines()[2]
    many = RemoveSummary(tmp_path / "r.csv", groups=5, remove=5, keep=5,
                         by_rule={"arrived first": 1, "higher resolution": 2})
    assert "3 of the 5 groups keep the likely master (no reviewer named one; chosen by higher " \
        "resolution 2, arrived first 1, as the reason column says): check them" in many.lines()[2]
    assert len(RemoveSummary(tmp_path / "r.csv", groups=2, keep=2).lines()) == 2  # all named
