"""Worker processes: how to start them, and one map over them that always cleans up."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import select
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def start_method(preload: list[str] | None = None) -> str:
    """fork is the cheapest start, but unsafe once other threads exist (a Prefect task runs beside
    several): then forkserver, whose server process imports only `preload`."""
    if threading.active_count() == 1:
        return "fork"
    if preload:
        mp.set_forkserver_preload(preload)
    return "forkserver"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with(pid: int, *_: Any) -> None:
    """End this worker process when process `pid` (the cbir that wants its work) ends, however
    it ends (Linux; elsewhere nothing changes). A cbir killed outright (SIGKILL, the OOM
    killer), or one whose clean-up did not run, cannot stop its workers: they went on with
    their job for nobody, then printed a BrokenPipeError each on the user's terminal. The
    parent's death signal covers a forked worker; a forkserver's worker is the forkserver's
    child, which its own workers keep alive, and there torch's DataLoader watchdog (which
    watches the parent) kept a training's workers and the forkserver running after the
    command had gone: so a thread waits on `pid` itself. Extra arguments (a DataLoader's
    worker id) are ignored, so that `partial(end_with, os.getpid())` is a worker_init_fn."""
    with contextlib.suppress(OSError, AttributeError):
        if os.getppid() == pid:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)  # gone already
    except (OSError, AttributeError):
        return  # no pidfd (an old kernel, not Linux)

    def wait() -> None:
        select.select([fd], [], [])  # readable once the process has ended
        os._exit(0)

    threading.Thread(target=wait, name="cbir-end-with", daemon=True).start()


def _worker_setup(
    pid: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    """A pool worker ends with the process that started the pool (`end_with`)."""
    end_with(pid)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def worker_map(
    fn: Callable[[T], R],
    jobs: Iterable[T],
    workers: int,
    *,
    preload: list[str],
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    ordered: bool = False,
    chunksize: int = 4,
) -> Iterator[Iterator[R]]:
    """`fn` over `jobs` in `workers` processes (each set up by `initializer(*initargs)`), or in
    this process when `workers` <= 1 (set up the same way), as results come (in `jobs`' order
    when `ordered`). The pool is terminated on leaving, also when the caller is interrupted."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield map(fn, jobs)
        return
    ctx = mp.get_context(start_method(preload))
    pool = ctx.Pool(
        workers, initializer=_worker_setup, initargs=(os.getpid(), initializer, initargs)
    )
    try:
        yield (pool.imap if ordered else pool.imap_unordered)(fn, jobs, chunksize)
    finally:
        pool.terminate()
        pool.join()


def dask_client(address: str) -> Any:
    """A client of the Dask scheduler at `address` (orchestration.dask_address), not made the
    default (a Prefect flow's task runner has its own); one line when none answers there."""
    from distributed import Client  # only with a cluster: slow to import

    from .errors import CbirError

    try:
        return Client(address, set_as_default=False)
    except OSError as exc:  # no scheduler there (distributed waits comm.timeouts.connect)
        raise CbirError(
            f"cannot reach the Dask scheduler at {address} (orchestration.dask_address): {exc}"
        ) from exc
