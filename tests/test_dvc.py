"""`dvc repro` end to end in a workspace made by `cbir init` on the demo collection (as the
repository's own demo is), then a nightly run recorded with DVC and pushed to a remote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbir import lock
from cbir.steps.demo import generate_demo_collection
from cbir.paramsfile import set_params
from cbir.workspace import init_workspace
from conftest import photo, save

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (lock.ENV, "DVC_STAGE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `cbir`
    env["PREFECT_HOME"] = str(tmp / "prefect")  # the nightly's own temporary Prefect server
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


TINY = {"ingest.workers": 2, "embed.resolution": 64, "embed.batch_size": 16,
        "embed.shard_size": 16, "embed.workers": 0, "train.epochs": 2, "train.resolution": 32,
        "train.batch_size": 8, "train.workers": 0, "search.k": 5, "calibrate.copies": 20,
        "evaluate.baselines": False, "report.thumb_size": 64}


def test_dvc_repro_then_nightly_in_a_temporary_repository(tmp_path):
    repo = tmp_path / "repo"
    env = _env(tmp_path)

    def run(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
        return out.stdout + out.stderr

    def dvc(*args: str) -> str:
        return run(sys.executable, "-m", "dvc", *args)

    def ran(log: str) -> list[str]:
        return [ln.split("'")[1] for ln in log.splitlines() if ln.startswith("Running stage")]

    generate_demo_collection(tmp_path / "demo", n_groups=4, n_distractors=4, max_copies=3,
                             size=96, seed=0)
    init_workspace(repo, tmp_path / "demo" / "scans", tmp_path / "demo" / "ground_truth.csv")
    set_params(repo / "params.yaml", TINY)
    run("git", "config", "user.email", "ci@example.org")
    run("git", "config", "user.name", "ci")
    run("git", "commit", "-qam", "small")

    # everything is built from params.yaml; the demo collection stands for an archive's scans
    first = dvc("repro")
    assert "decisions" in ran(first)  # an empty log, recorded as an output of its own
    # with the note saying what it is: DVC warned "'data/decisions' is empty" 12 times before
    assert (repo / "data" / "decisions" / "README.txt").is_file() and "is empty" not in first
    assert [s for s in ran(first) if s != "decisions"] == [
        "ingest", "train", "embed", "index", "calibrate", "pairs", "evaluate", "report"]
    run("git", "add", "-A")
    run("git", "commit", "-qm", "built")
    assert ran(dvc("repro")) == []  # nothing to do the second time
    assert "up to date" in dvc("status")

    assert "model.map@10" in dvc("metrics", "show") and "loss" in dvc("metrics", "show")
    dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    table = dvc("exp", "show", "--no-pager", "--md").splitlines()[0]
    assert "train.lr" in table and "model.map@10" in table  # params and metrics side by side

    # a training param reruns training and what follows it, not the demo or ingest
    text = (repo / "params.yaml").read_text().replace("lr: 0.001", "lr: 0.002")
    (repo / "params.yaml").write_text(text)
    assert "train.lr" in dvc("params", "diff")
    assert ran(dvc("repro")) == ["train", "embed", "index", "calibrate", "pairs", "evaluate",
                                 "report"]
    run("git", "add", "-A")
    run("git", "commit", "-qm", "lr")

    # the nightly run, by hand, after scans arrived: recorded with `dvc commit`, pushed
    dvc("remote", "add", "-d", "store", str(tmp_path / "store"))
    for i in range(3):
        save(photo(50 + i), tmp_path / "demo" / "scans" / "arrived" / f"new-{i}.jpg")
    assert "up to date" not in dvc("status")
    out = run("cbir", "nightly")
    assert "3 new images searched against the collection" in out
    assert "dvc: outputs committed" in out and "dvc: pushed to remote store" in out
    assert any((tmp_path / "store").rglob("*"))
    assert "in sync" in dvc("status", "--cloud")  # the remote has everything
    assert "up to date" in dvc("status")
    assert ran(dvc("repro")) == []
    changed = run("git", "status", "--porcelain", "--untracked-files=no")
    assert "dvc.lock" in changed
