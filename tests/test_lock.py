"""One writer at a time: the data folder's lock, between processes, threads of one flow and DVC."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cbir import lock
from cbir.lock import LockBusy, dvc_busy, holder_of, lock_path, writer_lock
from conftest import CBIR, REPO, photo, save


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (lock.ENV, "DVC_STAGE")}
    return {**env, **extra}


def _cbir(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CBIR, *args], capture_output=True, text=True, cwd=REPO,
                          env=env or _env(), **kw)


def _holder(settings) -> subprocess.Popen:
    """Another process that takes the lock, says so, and holds it until its stdin is closed
    (never for a fixed time: on a busy machine any time can be too short)."""
    code = textwrap.dedent(f"""
        import sys
        from cbir.config import load_settings
        from cbir.lock import writer_lock
        with writer_lock(load_settings({str(settings.params_path)!r}), "cbir test-holder"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def ws(workspace):
    for i in range(3):
        save(photo(i), workspace.scans / f"p{i}.jpg")
    return workspace(orchestration={"lock_timeout": 0.5})


def test_a_second_writer_exits_naming_the_holder(ws):
    with writer_lock(ws, "cbir nightly (test)"):
        info = holder_of(lock_path(ws))
        assert info["pid"] == os.getpid() and info["command"] == "cbir nightly (test)"
        out = _cbir("ingest", "--params", str(ws.params_path))
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("cbir ingest: error: another cbir run is writing to ")
    assert f"pid {os.getpid()}" in err[-1] and "`cbir nightly (test)`" in err[-1]
    assert "since 20" in err[-1] and "waited 0.5 s" in err[-1]
    assert not (ws.path(ws.data.manifest_dir) / "files.parquet").exists()  # nothing written
    assert holder_of(lock_path(ws)) is None  # released: the holder's details went with it
    assert lock.ENV not in os.environ


def test_readers_do_not_take_the_lock(ws):
    assert _cbir("ingest", "--params", str(ws.params_path)).returncode == 0
    with writer_lock(ws, "holder"):
        out = _cbir("sql", "SELECT count(*) AS n FROM images", "--params", str(ws.params_path))
    assert out.returncode == 0, out.stderr
    assert "3" in out.stdout


def _until_waiting(proc: subprocess.Popen) -> str:
    """`proc`'s stderr up to its line saying it waits for the lock (or to its end)."""
    seen = ""
    for line in proc.stderr:
        seen += line
        if "waiting for the data folder" in line:
            break
    return seen


def test_writers_wait_their_turn_and_the_manifest_stays_whole(ws, workspace):
    # the holder lets go only once both writers said they wait: no timing decides the test
    settings = workspace(orchestration={"lock_timeout": 3600})
    holder = _holder(settings)
    try:
        runs = [subprocess.Popen([*CBIR, "ingest", "--params", str(settings.params_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO, env=_env()) for _ in range(2)]
        waited = [_until_waiting(p) for p in runs]
    finally:
        holder.stdin.close()
        holder.wait()
    results = [(p.wait(), *p.communicate()) for p in runs]
    for said, (rc, _, err) in zip(waited, results):
        assert rc == 0, said + err
        assert "waiting for the data folder: another cbir run is writing" in said
        assert "`cbir test-holder`" in said
    mdir = settings.path(settings.data.manifest_dir)
    assert sorted(pq.read_table(mdir / "runs.parquet").column("run_id").to_pylist()) == [1, 2]
    files = pq.read_table(mdir / "files.parquet").to_pylist()
    assert sorted(r["path"] for r in files) == ["p0.jpg", "p1.jpg", "p2.jpg"]


def test_the_lock_is_reentrant_and_inherited_by_child_commands(ws):
    with writer_lock(ws, "flow"):
        with writer_lock(ws, "a library step inside the flow", timeout=0):
            assert lock.held(lock_path(ws))
            # a `cbir` command the holder runs (its environment names the lock) goes ahead
            out = _cbir("ingest", "--params", str(ws.params_path),
                        env={**_env(), lock.ENV: os.environ[lock.ENV]})
            assert out.returncode == 0, out.stderr
        assert lock.held(lock_path(ws))
    assert not lock.held(lock_path(ws))
    # a stale CBIR_LOCK_HELD (its holder gone) grants nothing: the lock is free, it is taken
    out = _cbir("ingest", "--params", str(ws.params_path),
                env={**_env(), lock.ENV: f"{os.path.realpath(lock_path(ws))}#deadbeef"})
    assert out.returncode == 0, out.stderr


def test_a_second_process_waits_and_a_killed_holder_frees_the_lock(ws):
    holder = _holder(ws)
    try:
        with pytest.raises(LockBusy, match="cbir test-holder"):
            with writer_lock(ws, "second", timeout=0.3):
                pass
        holder.send_signal(signal.SIGKILL)  # no cleanup at all
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with writer_lock(ws, "after the kill", timeout=0):  # at once: the kernel let go of it
        assert holder_of(lock_path(ws))["command"] == "after the kill"


def test_a_dvc_stage_stops_at_once_instead_of_waiting(workspace):
    for i in range(2):
        save(photo(i), workspace.scans / f"p{i}.jpg")
    settings = workspace(orchestration={"lock_timeout": 600})
    with writer_lock(settings, "cbir nightly"):
        out = _cbir("ingest", "--params", str(settings.params_path),
                    env=_env(DVC_STAGE="dvc.yaml:ingest"))
    assert out.returncode == 2  # at once: "waited" would name the 600 s it waited
    assert "`cbir nightly`" in out.stderr and "waited" not in out.stderr
    assert "a `dvc repro` stage does not wait for it" in out.stderr


def test_flows_wait_while_dvc_holds_its_repository_lock(tmp_path: Path, monkeypatch):
    root = tmp_path / "repo"
    (root / ".dvc" / "tmp").mkdir(parents=True)
    (root / "sub").mkdir()
    busy = dvc_busy(root / "sub")
    assert busy() is None  # no DVC command has run here yet
    (root / ".dvc" / "tmp" / "lock").write_text("")
    assert busy() is None
    with open(root / ".dvc" / "tmp" / "lock", "a+") as fh:  # what zc.lockfile does for DVC
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "DVC command" in busy() and str(root) in busy()
        monkeypatch.setenv("DVC_STAGE", "dvc.yaml:ingest")  # inside `dvc repro` itself
        assert busy() is None
        monkeypatch.delenv("DVC_STAGE")
        with pytest.raises(LockBusy, match="DVC command"):
            lock.acquire(tmp_path / "data" / ".cbir.lock", "nightly", timeout=0.3,
                         blockers=[busy])
    assert busy() is None
    assert dvc_busy(tmp_path / "elsewhere")() is None  # not in a DVC repository


# --------------------------------------------------------------------------- a busy machine

def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _busy_make(tmp_path: Path, suite: str, **kw) -> subprocess.Popen:
    """`make test-busy` with the suite replaced by the shell script `suite` (its install step
    taken as done): the target's own mechanism, without a suite inside the suite."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\n" + suite + "\n")
    (fake / "python").chmod(0o755)
    return subprocess.Popen(["make", "-s", "-o", "install", "test-busy", f"BIN={fake}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), preexec_fn=_default_sigint, **kw)


def _default_sigint() -> None:
    """Ctrl-C as a terminal's shell leaves it to the commands it starts: a process inherits an
    ignored SIGINT, and the suite's worker processes (pytest-xdist) run with it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _burners(proc: subprocess.Popen) -> list[int]:
    """The pids of the CPU-bound processes `make test-busy` says it started."""
    for line in proc.stdout:
        if line.startswith("test-busy: two CPU-bound processes ("):
            return [int(x) for x in line.split("(")[1].split(")")[0].split(", ")]
    raise AssertionError("make test-busy did not say which processes it started")


def _running(proc: subprocess.Popen) -> None:
    """Read `proc`'s output up to the line its suite prints when it starts."""
    assert any(line.strip() == "suite running" for line in proc.stdout)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("status", [0, 1])
def test_make_test_busy_always_stops_its_load(tmp_path, status):
    # the suite waits for its stdin to close: the burners are checked while it runs
    proc = _busy_make(tmp_path, f"echo suite running; cat >/dev/null; exit {status}",
                      stdin=subprocess.PIPE)
    burners = _burners(proc)
    _running(proc)
    assert all(_alive(pid) for pid in burners)  # beside the suite
    proc.stdin.close()
    proc.stdout.read()
    proc.wait()
    assert (proc.returncode == 0) == (status == 0)  # the suite's outcome is the target's
    assert not any(_alive(pid) for pid in burners)  # stopped, and waited for, by the target


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_make_test_busy_stops_its_load_on_ctrl_c(tmp_path):
    proc = _busy_make(tmp_path, "echo suite running; exec cat >/dev/null",
                      stdin=subprocess.PIPE, start_new_session=True)
    burners = _burners(proc)
    _running(proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    proc.stdin.close()
    proc.stdout.read()
    proc.wait()
    assert proc.returncode != 0
    assert not any(_alive(pid) for pid in burners)
