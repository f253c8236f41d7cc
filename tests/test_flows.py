"""The build flow, run in-process against a temporary Prefect server."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from cbir.store.layout import layout
from cbir.store.embeddings import embedded_ids
from cbir.model import retrieval_model
from conftest import photo, save

SMALL = {
    "embed": {"resolution": 64, "batch_size": 8, "shard_size": 2, "workers": 0},
    "train": {"epochs": 1, "resolution": 32, "batch_size": 4, "workers": 0},
    "search": {"k": 3, "pair_threshold": 0.5, "cluster_threshold": 0.9},
    "report": {"thumb_size": 64},
    "orchestration": {"task_retries": 1, "retry_delay_seconds": 0, "lock_timeout": 5},
}


def _photos(workspace, n: int = 5):
    for i in range(n):
        save(photo(i), workspace.scans / f"p{i}.jpg")
    save(photo(0), workspace.scans / "copy.jpg")
    return workspace(**SMALL)


def test_build_flow_runs_every_step(prefect_harness, workspace):
    from prefect.artifacts import Artifact

    from flows.build import build

    settings = _photos(workspace, 3)
    result = build(str(settings.params_path))
    st = result.steps
    assert list(st) == ["ingest", "train", "embed", "index", "pairs", "report", "dvc"]
    assert st["ingest"].counts["new"] == 4 and st["ingest"].counts["new_duplicates"] == 1
    rows = pq.read_table(settings.path(settings.data.manifest_dir) / "files.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["duplicate", "ok", "ok", "ok"]
    assert st["train"].epochs_done == 1 and settings.path(settings.model.checkpoint).is_file()
    _, _, fp, source = retrieval_model(settings)
    assert source.startswith("checkpoint") and st["embed"].summary.fingerprint == fp
    assert st["embed"].summary.embedded == 3 and len(st["embed"].shards) == 2
    assert st["index"].info.n_vectors == 3
    assert (settings.path(settings.data.reports_dir) / "gallery" / "index.html").is_file()
    art = Artifact.get("cbir-build-summary")
    assert art is not None and "## train" in art.data and "## pairs" in art.data


def test_a_user_error_fails_the_flow_at_once_with_its_cause(prefect_harness, workspace,
                                                           monkeypatch):
    import tasks.ingest
    from flows.build import build

    calls = []
    real = tasks.ingest.run_ingest
    monkeypatch.setattr(tasks.ingest, "run_ingest", lambda s, **kw: calls.append(1) or real(s, **kw))
    settings = workspace(**SMALL, data={"scans_dir": "no-such-folder"})
    state = build(str(settings.params_path), train=False, return_state=True)
    assert state.is_failed() and len(calls) == 1  # a CbirError is not retried
    assert "scans folder not found" in state.message and "no-such-folder" in state.message


def test_a_failed_build_resumes_from_what_completed(prefect_harness, workspace, monkeypatch):
    import tasks.embed
    import tasks.index
    from flows.build import build

    settings = _photos(workspace, 6)  # 6 images: 3 shards of 2
    real_embed_shard = tasks.embed.embed_shard
    seen: list[str] = []

    def second_shard_fails(settings_, model, pp, folder, shard, progress=None):
        seen.append(shard.name)
        if len(seen) >= 2 and shard.name == seen[1]:
            raise OSError("disk full")
        return real_embed_shard(settings_, model, pp, folder, shard, progress)

    monkeypatch.setattr(tasks.embed, "embed_shard", second_shard_fails)
    state = build(str(settings.params_path), train=False, return_state=True)
    assert state.is_failed() and "disk full" in state.message
    assert seen.count(seen[1]) == 2  # retried once (orchestration.task_retries), then failed
    _, _, fp, _ = retrieval_model(settings)
    folder = layout(settings).embeddings(fp)
    assert len(embedded_ids(folder)) == 4  # the other two shards are kept
    assert not settings.path(settings.data.index_dir).exists()  # nothing ran after the failure

    # the rerun embeds the missing shard only; a transient error in the index step is retried
    monkeypatch.setattr(tasks.embed, "embed_shard", real_embed_shard)
    real_run_index, index_calls = tasks.index.run_index, []

    def flaky_index(settings_, rebuild=False):
        index_calls.append(1)
        if len(index_calls) == 1:
            raise ConnectionResetError("NFS hiccup")
        return real_run_index(settings_, rebuild=rebuild)

    monkeypatch.setattr(tasks.index, "run_index", flaky_index)
    st = build(str(settings.params_path), train=False).steps
    assert st["ingest"].decoded == 0
    assert st["embed"].summary.embedded == 2 and st["embed"].summary.already == 4
    assert len(index_calls) == 2 and st["index"].info.n_vectors == 6
    shard_ids = [pq.read_table(p).column("image_id").to_pylist()
                 for p in sorted(folder.glob("shard-*.parquet"))]
    assert sum(map(len, shard_ids)) == 6 and len({i for s in shard_ids for i in s}) == 6


def test_the_nightly_deployment_follows_the_params(workspace):
    from cbir.errors import CbirError
    from flows.nightly import deployment

    settings = workspace()
    dep = deployment(str(settings.params_path))
    (sched,) = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "UTC")  # 02:00
    assert dep.parameters == {"params_path": str(settings.params_path)}
    assert dep.concurrency_limit == 1 and dep.entrypoint == "flows.nightly.nightly"
    settings = workspace(orchestration={"nightly_cron": "30 3 * * 1-5",
                                        "timezone": "Europe/Paris"})
    (sched,) = deployment(str(settings.params_path)).schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("30 3 * * 1-5", "Europe/Paris")
    settings = workspace(orchestration={"timezone": "Mars/Olympus_Mons"})
    with pytest.raises(CbirError, match="orchestration.nightly_cron / timezone"):
        deployment(str(settings.params_path))


@pytest.fixture
def refused_url():
    """An API URL where nothing answers: a port bound here that never listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api"


def test_an_unreachable_configured_api_is_one_line_naming_it(workspace, monkeypatch,
                                                             refused_url):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cbir.errors import CbirError
    from flows.nightly import nightly
    from flows.server import flow_api, prefect_home

    settings = workspace()
    monkeypatch.setenv("PREFECT_API_URL", refused_url)
    with temporary_settings(updates={PREFECT_API_URL: refused_url}), \
            pytest.raises(CbirError) as err, flow_api(settings, "nightly") as api:
        api.run(nightly, str(settings.params_path))
    assert refused_url in str(err.value) and "\n" not in str(err.value)
    assert not (prefect_home(settings) / "server.log").exists()  # no server of its own


def test_serve_needs_a_running_prefect_server(workspace, refused_url):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cbir.errors import CbirError
    from flows.nightly import serve

    settings = workspace()
    with temporary_settings(restore_defaults={PREFECT_API_URL}), \
            pytest.raises(CbirError, match="`prefect server start`"):
        serve(str(settings.params_path))
    with temporary_settings(updates={PREFECT_API_URL: refused_url}), \
            pytest.raises(CbirError, match=f"no Prefect API answers at {refused_url}"):
        serve(str(settings.params_path))


def test_a_killed_flow_module_leaves_no_prefect_home_behind(tmp_path):
    """`python -m flows.<module>` whose params do not load, killed (SIGKILL: no exit handler
    runs), as the temporary Prefect server `python -m flows.server` is stopped: no folder is
    left per run in the temporary folder. Without a home set, every such run shares one."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # as `python -m flows.nightly` imports the package: argv[0] is "-m" meanwhile
    script = ("import os, signal, sys; sys.argv[:] = ['-m', '--params', 'none.yaml']; "
              "import flows; print(os.environ['PREFECT_HOME'], flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    homes = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == -signal.SIGKILL, out.stderr
        homes.append(out.stdout.strip())
    assert homes[0] == homes[1] == str(tmp / f"cbir-prefect-{os.getuid()}")
    assert [p.name for p in tmp.iterdir()] == [f"cbir-prefect-{os.getuid()}"]

    # the server's case: its home is set, so nothing at all is made
    server_home = tmp_path / "server-home"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         env={**env, "PREFECT_HOME": str(server_home)}, text=True)
    assert out.returncode == -signal.SIGKILL and out.stdout.strip() == str(server_home)
    assert [p.name for p in tmp.iterdir()] == [f"cbir-prefect-{os.getuid()}"]
