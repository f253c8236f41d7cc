"""The nightly flow, in-process under a temporary Prefect server, on an ingested demo collection."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cbir.store.pairs import read_pairs
from cbir.store.layout import layout
from cbir import lock
from cbir.store import catalog
from cbir.config import load_settings
from cbir.errors import CbirError
from cbir.steps.demo import generate_demo_collection
from cbir.store.embeddings import embedded_ids
from cbir.steps.embed import run_embed
from cbir.steps.evaluate import run_evaluate
from cbir.faiss_index import index_ids
from cbir.store.index import load_index
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.model import retrieval_model
from cbir.steps.report import run_report
from cbir.faiss_index import faiss_ids
from cbir.steps.pairs import run_pairs
from conftest import CBIR, REPO, photo, save, write_params

SMALL = {
    "embed": {"resolution": 64, "batch_size": 16, "shard_size": 8, "workers": 0},
    "ingest": {"workers": 2},
    "search": {"k": 5, "pair_threshold": 0.5, "cluster_threshold": 0.9},
    "evaluate": {"baselines": False},
    "report": {"thumb_size": 64},
    "orchestration": {"task_retries": 1, "retry_delay_seconds": 0, "lock_timeout": 5},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workspace holding a small demo collection, built by the library calls `dvc repro`
    makes (without training). Tests work on copies of it."""
    root = tmp_path_factory.mktemp("built")
    demo = root / "demo"
    generate_demo_collection(demo, n_groups=6, n_distractors=6, max_copies=3, size=128, seed=2)
    ws = root / "ws"
    shutil.copytree(demo / "scans", ws / "scans")
    shutil.copy(demo / "ground_truth.csv", ws / "ground_truth.csv")
    s = load_settings(_params(ws))
    for step in (run_ingest, run_embed, run_index, run_pairs, run_evaluate, run_report):
        step(s)
    return ws


def _params(ws: Path, **extra) -> Path:
    params = {"data": {"scans_dir": "scans", "ground_truth": "ground_truth.csv"}, **SMALL}
    for k, v in extra.items():
        params[k] = {**params.get(k, {}), **v}
    return write_params(ws, params)


def _built(tmp_path: Path, built: Path, **extra) -> Path:
    """A copy of the built workspace (relative paths: it works where it lands)."""
    ws = tmp_path / "ws"
    shutil.copytree(built, ws)
    return _params(ws, **extra)


def _arrivals(scans: Path) -> dict[str, Path]:
    """The day's scans: an exact copy, a rescan of a known print, and two new photographs."""
    first = sorted(scans.rglob("*.jpg"))[0]
    new = scans / "arrived"
    new.mkdir()
    out = {"copy": new / "copy-of-first.jpg", "rescan": new / "rescan.jpg",
           "new1": new / "new1.png", "new2": new / "new2.png"}
    shutil.copy(first, out["copy"])
    with Image.open(first) as im:
        im.convert("RGB").resize((im.width * 9 // 10, im.height * 9 // 10)).save(
            out["rescan"], quality=70)
    save(photo(101, (120, 90)), out["new1"])
    save(photo(102, (90, 120)), out["new2"])
    out["first"] = first
    return out


def _pair_keys(settings) -> list[tuple[str, str, str]]:
    t = read_pairs(settings)
    return [(r["kind"], *sorted((r["image_a"], r["image_b"]))) for r in t.to_pylist()]


def test_nightly_reindexes_only_the_new_scans(prefect_harness, tmp_path, built):
    from prefect.artifacts import Artifact

    from flows.nightly import nightly

    params = _built(tmp_path, built, orchestration={"nightly_evaluate": True,
                                                    "nightly_gallery": True})
    s = load_settings(params)
    before = {(r[1], r[2]): r for r in _pair_keys(s)}
    old_pairs = read_pairs(s).to_pylist()
    _, _, fp, _ = retrieval_model(s)
    n_before = len(embedded_ids(layout(s).embeddings(fp)))
    _arrivals(s.path(s.data.scans_dir))

    result = nightly(str(params))
    st = result.steps
    assert st["ingest"].run_id == 2
    assert st["ingest"].counts["new"] == 4 and st["ingest"].counts["new_duplicates"] == 1
    assert " 1 new exact duplicate, " in st["ingest"].lines()[1]  # in the singular
    assert st["ingest"].decoded == 3  # the exact copy is known by its hash: not decoded
    assert st["embed"].summary.embedded == 3 and st["embed"].summary.already == n_before
    assert not st["index"].rebuilt and st["index"].added == 3
    assert st["pairs"].incremental and st["pairs"].searched == 3
    assert "evaluate" in st and "report" in st
    assert "not recorded" in st["dvc"].lines()[0]  # a temporary folder is no DVC project

    # every recorded pair is kept as it was, none twice; the new ones involve a new image
    keys = _pair_keys(s)
    assert len(keys) == len(set(keys))
    after = read_pairs(s).to_pylist()
    by_key = {(r["kind"], *sorted((r["image_a"], r["image_b"]))): r for r in after}
    for r in old_pairs:
        k = (r["kind"], *sorted((r["image_a"], r["image_b"])))
        assert by_key[k]["score"] == pytest.approx(r["score"])
    new_ids = {r["image_id"] for r in pq.read_table(
        s.path(s.data.manifest_dir) / "files.parquet").to_pylist() if r["first_run"] == 2}
    added = [k for k in keys if (k[1], k[2]) not in before]
    assert added and all(k[1] in new_ids or k[2] in new_ids for k in added)
    assert sum(1 for k in keys if k[0] == "exact") == 1

    # the report of the night = the catalogue's pairs found in run 2
    report = st["new pairs"]
    assert report.run_id == 2 and report.since_run == 1 and report.file.is_file()
    con = catalog.connect(s)  # its views find their Parquet files relative to the workspace
    n = con.execute("SELECT count(*) FROM new_pairs WHERE new_run = 2").fetchone()[0]
    rescan = con.execute("SELECT count(*) FROM new_pairs WHERE new_run = 2 AND new_path = ? "
                         "AND kind = 'near'", ["arrived/rescan.jpg"]).fetchone()[0]
    con.close()
    assert len(report.pairs) == n > 0 and rescan >= 1
    assert "arrived/copy-of-first.jpg" in report.file.read_text()
    art = Artifact.get("cbir-nightly-summary")
    assert art is not None and "ingest run 2" in art.data

    # the index holds exactly the present images, each once
    index, _ = load_index(s.path(s.data.index_dir))
    ids = index_ids(index)
    assert len(ids) == len(set(ids)) == n_before + 3
    assert set(ids) == set(faiss_ids(sorted(embedded_ids(layout(s).embeddings(fp)))))


def test_a_nightly_run_without_new_scans_decodes_and_embeds_nothing(prefect_harness, tmp_path,
                                                                     built, monkeypatch):
    from flows.nightly import nightly

    params = _built(tmp_path, built)
    s = load_settings(params)
    outputs = [s.path(s.data.pairs_dir) / "pairs.parquet", s.path(s.data.index_dir) / "index.faiss",
               s.path(s.data.manifest_dir) / "files.parquet"]
    mtimes = [p.stat().st_mtime_ns for p in outputs]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr("cbir.steps.ingest.probe_batch", no_decoding)
    monkeypatch.setattr("cbir.imaging.load_rgb", no_decoding)
    monkeypatch.setattr("cbir.steps.report.thumbnails.load_rgb", no_decoding)
    st = nightly(str(params)).steps
    assert st["ingest"].decoded == 0 and st["ingest"].counts.get("new", 0) == 0
    assert st["embed"].summary.embedded == 0 and st["embed"].summary.shards == 0
    assert st["index"].added == 0 and not st["index"].rebuilt
    assert st["pairs"].searched == 0 and st["pairs"].added == 0
    assert st["new pairs"].pairs == []
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes  # nothing rewritten


def test_a_night_without_a_mounted_share_changes_nothing(prefect_harness, tmp_path, built):
    # An archivist trial: half the scans folder (a share) not mounted one night was taken as
    # 194 scans deleted; the night refuses instead, until told they were removed.
    from flows.nightly import nightly

    params = _built(tmp_path, built)
    s = load_settings(params)
    files = s.path(s.data.manifest_dir) / "files.parquet"
    before = files.read_bytes()
    scans = params.parent / "scans"
    shutil.move(scans / "box-01", tmp_path / "box-01")
    with pytest.raises(CbirError, match=r"^\d+ of the \d+ images ingested before are gone from "
                                        r"the scans folder .*\(10 files under box-01/\): is a "
                                        r"drive or network share not mounted\?"):
        nightly(str(params))
    assert files.read_bytes() == before
    st = nightly(str(params), accept_missing=True).steps
    assert st["ingest"].counts["newly_missing"] == 10 and st["index"].removed > 0


def test_a_failed_nightly_resumes_without_losing_or_duplicating(prefect_harness, tmp_path, built,
                                                                monkeypatch):
    from flows.nightly import nightly

    params = _built(tmp_path, built)
    s = load_settings(params)
    _arrivals(s.path(s.data.scans_dir))
    calls = []

    def nas_went_away(*args, **kwargs):
        calls.append(1)
        raise OSError("the NAS went away")

    monkeypatch.setattr("cbir.steps.pairs.knn_pairs", nas_went_away)
    state = nightly(str(params), return_state=True)
    assert state.is_failed() and "the NAS went away" in state.message
    assert len(calls) == 2  # tried, then retried once (orchestration.task_retries: 1)
    assert not (s.path(s.data.reports_dir) / "nightly" / "run-00002.md").exists()
    monkeypatch.undo()

    st = nightly(str(params)).steps  # run 3: nothing new to ingest or embed, pairs still to do
    assert st["ingest"].run_id == 3 and st["ingest"].counts.get("new", 0) == 0
    assert st["embed"].summary.embedded == 0 and st["index"].added == 0
    assert st["pairs"].searched == 3 and st["pairs"].added > 0
    keys = _pair_keys(s)
    assert len(keys) == len(set(keys))
    report = st["new pairs"]  # covers the arrivals of the failed run 2
    assert report.since_run == 1 and report.run_id == 3
    assert any(r[report.columns.index("new_run")] == 2 for r in report.pairs)


def test_a_pair_decided_before_the_next_nightly_is_not_reported_as_new(prefect_harness, tmp_path,
                                                                      built, monkeypatch):
    """A nightly run fails after ingesting the day's scans; a reviewer decides a pair of them
    (`cbir decide`) before the next run, whose report then leaves that pair out (it is no
    longer in new_pairs) and links to the review queue of each run it covers."""
    from flows.nightly import nightly

    params = _built(tmp_path, built)
    s = load_settings(params)
    scans = s.path(s.data.scans_dir)
    arrived = _arrivals(scans)
    first = arrived["first"].relative_to(scans).as_posix()

    def nas_went_away(*args, **kwargs):
        raise OSError("the NAS went away")

    monkeypatch.setattr("cbir.steps.pairs.knn_pairs", nas_went_away)
    assert nightly(str(params), return_state=True).is_failed()  # run 2 ingested, not paired
    monkeypatch.undo()
    out = subprocess.run([*CBIR, "decide", "arrived/rescan.jpg", first, "--different",
                          "--params", str(params)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    report = nightly(str(params)).steps["new pairs"]  # run 3, covering runs 2-3
    assert report.since_run == 1 and report.run_id == 3
    _, found = catalog.query(s, "SELECT count(*) FROM pair_report WHERE kind = 'near' AND "
                                "[path_a, path_b] IN ([?, ?], [?, ?])",
                             ["arrived/rescan.jpg", first, first, "arrived/rescan.jpg"])
    assert found == [(1,)]  # `cbir pairs` found the pair: the decision keeps it out of the news
    shown = [{r[report.columns.index("new_path")], r[report.columns.index("match_path")]}
             for r in report.pairs]
    assert {"arrived/rescan.jpg", first} not in shown
    assert {"arrived/copy-of-first.jpg", first} in shown  # the undecided ones stay
    _, new = catalog.query(s, "SELECT count(*) FROM new_pairs WHERE new_run = 2")
    assert new == [(len(report.pairs),)]
    text = report.file.read_text()
    assert "http://127.0.0.1:8765/?run=3" in text and "http://127.0.0.1:8765/?run=2" in text
    assert "start cbir review in the workspace" in text and "?run=3" in "\n".join(report.lines())


def test_embedding_shards_run_on_a_dask_cluster(prefect_harness, tmp_path, built):
    import dask
    from distributed import Client, LocalCluster

    from flows.nightly import nightly

    # the scratch folder under the test's, not dask-scratch-space in the machine's /tmp
    with dask.config.set({"temporary-directory": str(tmp_path / "dask")}), LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        params = _built(tmp_path, built, embed={"shard_size": 1},
                        orchestration={"dask_address": cluster.scheduler_address})
        s = load_settings(params)
        _arrivals(s.path(s.data.scans_dir))
        with Client(cluster) as client:
            workers = client.run(os.getpid)  # worker address -> its pid
        st = nightly(str(params)).steps
    shards = st["embed"].shards
    assert len(shards) == 3 and sum(r.embedded for r in shards) == 3
    assert all(r.pid != os.getpid() and r.worker is not None for r in shards)
    assert {r.pid for r in shards} <= set(workers.values())
    assert {r.worker for r in shards} <= set(workers)
    assert st["pairs"].searched == 3


# --------------------------------------------------------------------------- `cbir nightly`

def _cli_env(home: Path) -> dict[str, str]:
    """The environment of a `cbir` command run by a user with no Prefect configured: HOME is
    `home` (nothing may be written there), no PREFECT_* setting, no inherited writer lock."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in (lock.ENV, "DVC_STAGE", "DO_NOT_TRACK")}
    return {**env, "HOME": str(home)}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def busy_cli_nightly(tmp_path_factory, built) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`cbir nightly` run as a user runs it (no Prefect server configured, a fresh HOME) while two
    CPU-bound processes keep both cores of a small machine busy: its outcome and workspace."""
    tmp = tmp_path_factory.mktemp("busy-cli")
    params = _built(tmp, built)
    _arrivals(params.parent / "scans")
    home = tmp / "home"
    home.mkdir()
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        out = subprocess.run([*CBIR, "nightly", "--params", str(params)], cwd=REPO,
                             env=_cli_env(home), capture_output=True, text=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return out, tmp


def test_cli_nightly_succeeds_beside_busy_processes_without_tracebacks(busy_cli_nightly):
    out, _ = busy_cli_nightly
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "database is locked" not in out.stderr, out.stderr
    assert "3 new images searched against the collection" in out.stdout


def test_cli_nightly_keeps_prefect_state_in_the_workspace(busy_cli_nightly):
    out, tmp = busy_cli_nightly
    assert out.returncode == 0, out.stderr[-3000:]
    prefect = tmp / "ws" / "data" / "prefect"
    assert (prefect / "prefect.db").is_file() and (prefect / "server.log").is_file()
    assert "Traceback" not in (prefect / "server.log").read_text()
    assert "Finished in state Completed" in (prefect / "nightly.log").read_text()
    assert _files(tmp / "home") == []  # no ~/.prefect, nothing else either


def test_a_failed_cli_nightly_is_one_error_line_and_exit_status_2(tmp_path, built):
    params = _built(tmp_path, built)
    shutil.rmtree(params.parent / "scans")
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run([*CBIR, "nightly", "--params", str(params)], cwd=REPO,
                         env=_cli_env(home), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("cbir nightly: error: "), out.stderr
    assert errors[0].startswith("cbir nightly: error: the nightly flow run failed: scans folder "
                                "not found: "), errors[0]  # cbir's words, not Prefect's framing
    log = params.parent / "data" / "prefect" / "nightly.log"
    assert f"(log: {log})" in errors[0] and "Traceback" in log.read_text()
    # besides the error, at most the note that the server is slow to start
    assert all(ln == errors[0] or ln.startswith("cbir nightly: waiting") for ln in lines), lines


def _server_of(home: Path) -> int | None:
    """The pid of the temporary Prefect server working in `home` (its cwd), if one runs."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (b"flows.server" in (proc / "cmdline").read_bytes()
                        and Path(os.readlink(proc / "cwd")) == home.resolve()):
                    return int(proc.name)
            except OSError:
                continue
    return None


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")
def test_ctrl_c_stops_cli_nightly_and_its_server(tmp_path, built):
    params = _built(tmp_path, built)
    home = params.parent / "data" / "prefect"
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    # SIGINT's default action, as a terminal's shell starts a command: the suite's worker
    # processes (pytest-xdist) run with it ignored, and a child would inherit that
    cli = subprocess.Popen([*CBIR, "nightly", "--params", str(params)], cwd=REPO,
                           env=_cli_env(fake_home), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        server = None
        while server is None and cli.poll() is None:
            server = _server_of(home)
            time.sleep(0.05)
        assert server is not None, "the server never started"
        os.killpg(cli.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = cli.communicate()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    # 130; or killed by SIGINT (the shell's $? is 130 too): Python ends so when the interrupt
    # went through code that a C extension ran during an import, even though cbir caught it
    assert cli.returncode in (130, -signal.SIGINT), err
    assert err.strip() == "cbir nightly: interrupted", err
    assert not Path(f"/proc/{server}").exists()  # stopped and reaped: no orphan


@pytest.mark.parametrize("review, url", [
    ({}, "http://127.0.0.1:8765/"),
    ({"host": "0.0.0.0", "port": 9000}, "http://127.0.0.1:9000/"),  # reached as loopback here
    ({"host": "::1"}, "http://[::1]:8765/"),
    ({"host": "archive-pc.local"}, "http://archive-pc.local:8765/"),
    ({"port": 0}, ""),  # a free port each time: nothing to link
])
def test_nightly_reports_link_where_review_serves(tmp_path, review, url):
    from cbir.config import load_settings
    from cbir.steps.nightly import NightlyReport, review_url

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  scans_dir: scans\nreview: {review or '{}'}\n")
    (tmp_path / "scans").mkdir()
    assert review_url(load_settings(params)) == url
    report = NightlyReport(run_id=4, since_run=3, columns=["kind"], pairs=[("near",)],
                           review_url=url)
    assert report.review_links() == ([f"{url}?run=4"] if url else [])
    assert ("review them" in "\n".join(report.lines())) == bool(url)


def test_the_nightly_report_lists_partial_copies_apart(tmp_path):
    """Pairs that geometric verification found to be a detail of the other picture get a table
    of their own (detail, the picture it was cut from, how much of it); the rest stay in the
    whole-picture table, a verified one saying so."""
    from review_workspace import RUN1, RUN2, build

    from cbir.steps.nightly import nightly_report

    s = build(tmp_path / "ws")
    report = nightly_report(s, 2, 1)
    # run 2's partial copies: late/p6 cut from box-b/p4 (10 %), the HTML-named file from late/p7
    assert [(r["detail_path"], r["whole_path"], r["covered"]) for r in report.partial] == [
        (f"box-b/{RUN1[5].split('/')[1]}", RUN2[1], 0.5), (RUN2[0], RUN1[4], 0.1)]
    assert len(report.whole) == len(report.pairs) - 2 == 11
    assert "2 of them partial copies" in report.lines()[0]
    text = report.file.read_text()
    whole, partial = text.split("## Partial copies")
    assert "## Whole pictures" in whole and "| late/p6.jpg | box-b/p3.jpg | 0.88 | near" in whole
    assert "same picture \\(140 points\\)" in whole and "late/p6.jpg | box-b/p4.jpg" not in whole
    assert "| run | detail | cut from | covers | matching points | score |" in partial
    assert "| 2 | late/p6.jpg | box-b/p4.jpg | 10 % | 23 | 0.919 |" in partial
    assert "onerror" in partial and "<img" not in text  # a file name is text, never markup
    assert "?relation=partial" in partial


def test_the_nightly_report_lists_the_files_that_arrived_and_were_quarantined(tmp_path):
    """A scan caught half-written by the scanner is quarantined by the night's ingest: the
    report says so (with why) instead of leaving it unseen; an older quarantined file is not
    listed again, and one ingested once complete leaves the list."""
    import tiny_workspace

    from cbir.steps.ingest import run_ingest
    from cbir.steps.nightly import nightly_report
    from cbir.steps.pairs import run_pairs

    s = tiny_workspace.make(tmp_path)
    scans = tmp_path / "scans"
    (scans / "old-bad.jpg").write_bytes(b"not an image")
    run_ingest(s)  # run 2
    run_pairs(s)
    whole = (scans / "p3.png").read_bytes()
    (scans / "box-9").mkdir()
    (scans / "box-9" / "scan|0042.png").write_bytes(whole[: len(whole) // 2])
    run_ingest(s)  # run 3: the scanner is still writing
    report = nightly_report(s, 3, 2)
    assert [p for p, _ in report.quarantined] == ["box-9/scan|0042.png"]
    assert "1 file that arrived was quarantined" in "\n".join(report.lines())
    text = report.file.read_text()
    assert "## Quarantined" in text and "| box-9/scan\\|0042.png | " in text
    assert "truncated" in text.split("## Quarantined")[1] and "old-bad" not in text

    (scans / "box-9" / "scan|0042.png").write_bytes(whole)  # complete by the next night
    run_ingest(s)  # run 4
    report = nightly_report(s, 4, 3)
    assert report.quarantined == [] and "Quarantined" not in report.file.read_text()


def test_one_pair_one_partial_copy_and_one_quarantined_file_are_said_in_the_singular():
    # seen in an archivist trial: "4 new duplicate pairs (...; 1 of them partial copies)" and
    # "1 pairs where one picture is a detail of the other"
    from cbir.steps.nightly import NightlyReport

    columns = ["new_run", "new_path", "match_path", "score", "kind", "master_path", "relation",
               "inliers", "covered", "detail_path", "whole_path"]
    pair = (2, "new/mounted.jpg", "box/p1.jpg", 0.986, "near", "new/mounted.jpg", "b_in_a", 122,
            0.79, "box/p1.jpg", "new/mounted.jpg")
    report = NightlyReport(2, 1, columns, [pair], quarantined=[("new/torn.jpg", "truncated")])
    assert report.lines()[0].startswith(
        "nightly report: 1 new duplicate pair (1 near, 0 exact; 1 of them a partial copy)")
    assert report.lines()[-1].startswith("  1 file that arrived was quarantined")
    text = report.markdown()
    assert "1 pair (1 near-duplicate) involves images that arrived after run 1" in text
    assert "1 pair where one picture is a detail of the other" in text
    assert "1 file that arrived could not be used and was not ingested" in text
    margin = (2, "new/on-card.jpg", "box/p2.jpg", 0.99, "near", "box/p2.jpg", "full", 122, 0.79,
              None, None)
    assert "| same picture, one on a blank margin \\(122 points\\) |" in NightlyReport(
        2, 1, columns, [margin]).markdown()
    report = NightlyReport(2, 1, columns, [pair, pair], quarantined=[("a", "b")] * 2)
    assert "2 of them partial copies" in report.lines()[0]
    assert "2 pairs (2 near-duplicates) involve" in report.markdown()


def test_a_night_of_one_arrival_is_said_in_the_singular(tmp_path):
    # seen in an archivist trial: "1 images embedded in 1 shards", "1 vectors written",
    # "local features of 1 pictures extracted", "1 new images searched ...; 1 new pairs"
    from cbir.steps.embed import EmbedSummary
    from cbir.steps.pairs import PairsSummary, VerifySummary

    embed = EmbedSummary("f" * 16, "checkpoint", tmp_path, embedded=1, already=385, shards=1,
                         vectors_written=1).lines()
    assert embed[1].startswith("  1 image embedded in 1 shard, 385 already embedded")
    assert embed[3] == "  1 vector written to the memory-mapped vector file beside the shards"
    checks = VerifySummary(checked=1, below=1, extracted=1).line()
    assert "verified 1 candidate pair (1 below" in checks
    assert "local features of 1 picture extracted" in checks
    night = "\n".join(PairsSummary(searched=1, added=1, incremental=True).lines())
    assert "  1 new image searched against the collection; 1 new pair\n" in night
    many = "\n".join(PairsSummary(searched=2, added=3, incremental=True).lines())
    assert "  2 new images searched against the collection; 3 new pairs\n" in many
