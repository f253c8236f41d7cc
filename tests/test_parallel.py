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

# A process that starts two workers on jobs of ten minutes, each saying its pid (a pool's, or
# a training's DataLoader's), after saying its own. With a thread running beside, workers start
# from a forkserver (cbir.parallel.start_method): they are its children, not this process's,
# and import the jobs' module (written beside, not __main__) by name.
_JOBS = """
import os, time
import torch.utils.data as tud

def slow(x):
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: two workers' lines never interleave
    time.sleep(600)
    return x

class Slow(tud.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return slow(i)
"""
_SCRIPT = """
import os, sys, threading, time
from functools import partial
sys.path.insert(0, sys.argv[1])
from cbir.parallel import end_with, start_method, worker_map
from slowjobs import Slow, slow

if "threaded" in sys.argv:
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
os.write(1, f"{os.getpid()}\\n".encode())
if "loader" in sys.argv:
    import torch.utils.data as tud

    loader = tud.DataLoader(Slow(), batch_size=1, num_workers=2,
                            multiprocessing_context=start_method(["cbir.augment"]),
                            worker_init_fn=partial(end_with, os.getpid()))
    list(loader)
else:
    with worker_map(slow, range(4), 2, preload=[], chunksize=1) as results:
        list(results)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd, prctl: Linux only")
@pytest.mark.parametrize("how", ["pool", "pool threaded", "loader threaded"])
def test_workers_end_with_a_parent_killed_outright(tmp_path, how):
    """Killed with SIGKILL (the OOM killer, kill -9), cbir cannot stop its workers: they end
    with it, quietly, instead of running their jobs for nobody and then printing a
    BrokenPipeError each on the user's terminal. Found in a trial for a training's workers
    started from a forkserver: they and the forkserver ran on after the command had gone."""
    err = tmp_path / "stderr"
    with err.open("w") as fh:
        (tmp_path / "slowjobs.py").write_text(_JOBS)
        # multiprocessing's temporary folder, which a process killed outright cannot remove
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path), *how.split()],
                                env=env,
                                stdout=subprocess.PIPE, stderr=fh, text=True, cwd=REPO)
    workers: list[int] = []
    try:
        pid = int(proc.stdout.readline())
        workers = [int(proc.stdout.readline()) for _ in range(2)]  # both at their jobs
        assert pid not in workers
        os.kill(pid, signal.SIGKILL)
        proc.wait()
        for _ in range(600):  # they end at once; a loaded machine may take a while
            if not any(_alive(w) for w in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)  # not after their 600 s jobs
        # quietly: no BrokenPipeError, no traceback; only, with a forkserver, Python's resource
        # tracker (a process of its own) on the semaphores the killed process left
        said = [ln for ln in err.read_text().splitlines()
                if "resource_tracker" not in ln and "warnings.warn(" not in ln]
        assert said == [], err.read_text()
        assert "threaded" in how or err.read_text() == ""
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
