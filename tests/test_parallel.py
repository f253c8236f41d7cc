"""cbir.parallel: the worker pool every step's parallel work runs in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbir.parallel import worker_map
from conftest import REPO

# a process that starts two pool workers on jobs of ten minutes and says its pid
_SCRIPT = """
import os, sys, time
from cbir.parallel import worker_map

def slow(x):
    time.sleep(600)
    return x

with worker_map(slow, range(4), 2, preload=[]) as results:
    print(os.getpid(), flush=True)
    list(results)
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl: Linux only")
def test_workers_end_with_a_parent_killed_outright(tmp_path):
    """Killed with SIGKILL (the OOM killer, kill -9), cbir cannot stop its pool: its workers end
    with it, quietly, instead of running their jobs for nobody and then printing a
    BrokenPipeError each on the user's terminal."""
    err = tmp_path / "stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=subprocess.PIPE,
                                stderr=fh, text=True, cwd=REPO)
    workers: list[int] = []
    try:
        pid = int(proc.stdout.readline())
        for _ in range(6000):  # the pool starts its workers before the first job is sent
            workers = _children(pid)
            if len(workers) == 2:
                break
            time.sleep(0.01)
        assert len(workers) == 2
        os.kill(pid, signal.SIGKILL)
        proc.wait()
        for _ in range(600):  # the kernel ends them at once; a loaded machine may take a while
            if not any(_alive(w) for w in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)  # not after their 600 s jobs
        assert err.read_text() == ""
    finally:
        for w in [*workers, proc.pid]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_one_worker_runs_in_this_process_set_up_alike():
    seen = []
    with worker_map(abs, [-1, 2, -3], 1, preload=[], initializer=seen.append,
                    initargs=("set up",)) as results:
        assert list(results) == [1, 2, 3]
    assert seen == ["set up"]
