"""One writer at a time: an advisory lock on the data folder, held for a whole command or flow.

Every step that writes (the `cbir` subcommands ingest, train, embed, index, pairs, evaluate,
report, nightly, build, and the Prefect flows) holds an exclusive `flock` on `<data>/.cbir.lock`
(the folder holding the manifest folder) while it runs. A second writer - a nightly run while
`dvc repro` works, two nightlies, a hand-run `cbir embed` - waits for it up to
`orchestration.lock_timeout` seconds, then stops with one line naming the holder (pid, host,
command, since when), which the holder writes into the lock file. Readers (query, sql) never
take it: every output is replaced atomically, so they always see a whole version.

The kernel drops a `flock` when its process dies, so a killed run (even `kill -9`) never leaves
a stale lock behind. The lock is re-entrant: in-process (a flow that holds it and calls library
steps, or a CLI command that runs a flow) by a depth count, and in child processes (a `cbir`
command started by a holder) through the CBIR_LOCK_HELD environment variable, which names the
lock and the holder's token; the child checks the token against the lock file. Under `dvc
repro` (DVC sets DVC_STAGE) a busy lock stops the stage at once instead of waiting, because the
holder may be a nightly run that needs DVC's own repository lock, which `dvc repro` holds, to
record its outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CbirError
from .store.layout import layout

if TYPE_CHECKING:  # for the annotations only: no runtime import of config (and pydantic)
    from .config import Settings

ENV = "CBIR_LOCK_HELD"
POLL_SECONDS = 0.25

#: A check run before each attempt: returns who else is busy (a description), or None.
Blocker = Callable[[], str | None]


class LockBusy(CbirError):
    """Another writer holds the data folder and did not let go in time."""


@dataclass
class _Holding:
    fd: int
    token: str
    depth: int
    inherited: bool
    env_before: str | None


_held: dict[str, _Holding] = {}
_guard = threading.Lock()


def lock_path(settings: Settings) -> Path:
    """The lock file: `.cbir.lock` in the data folder (the folder holding data.manifest_dir)."""
    return layout(settings).lock


def holder_of(path: Path) -> dict[str, object] | None:
    """What the lock file says about its holder (None when empty or unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, object] | None) -> str:
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
        f"since {holder.get('since')}"
    )


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _inherited(key: str) -> str | None:
    """The holder's token when a parent process holds this lock for us (CBIR_LOCK_HELD)."""
    value = os.environ.get(ENV, "")
    for item in filter(None, value.split(os.pathsep)):
        where, _, token = item.rpartition("#")
        if where == key and token:
            holder = holder_of(Path(key))
            if holder and holder.get("token") == token:
                return token
    return None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def acquire(
    path: Path,
    command: str,
    *,
    timeout: float,
    blockers: Sequence[Blocker] = (),
    notify: Callable[[str], None] | None = None,
    hint: str = "orchestration.lock_timeout sets how long to wait",
) -> None:
    """Take the lock (or deepen this process's hold on it); raise LockBusy after `timeout` s."""
    path = Path(path)
    key = _key(path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
            return
    fd = _open_lock_file(path)
    deadline = time.monotonic() + timeout
    told = False
    try:
        while True:
            busy = next((b for b in (blocker() for blocker in blockers) if b), None)
            if busy is None:
                if _try_flock(fd):
                    break
                token = _inherited(key)
                if token is not None:  # our parent holds it and waits for us
                    os.close(fd)
                    with _guard:
                        _held[key] = _Holding(
                            fd=-1, token=token, depth=1, inherited=True, env_before=None
                        )
                    return
                busy = f"another cbir run is writing to {path.parent} ({describe(holder_of(path))})"
            if time.monotonic() >= deadline:
                waited = f"; waited {timeout:g} s" if timeout else ""
                raise LockBusy(f"{busy}{waited}. Run again when it has finished ({hint})")
            if not told and notify is not None:
                notify(f"waiting for the data folder: {busy}")
                told = True
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    except BaseException:
        os.close(fd)
        raise
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": token,
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as exc:  # e.g. a full disk: let go, and name the file in the error
        os.close(fd)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    with _guard:
        before = os.environ.get(ENV)
        os.environ[ENV] = os.pathsep.join(filter(None, [before, f"{key}#{token}"]))
        _held[key] = _Holding(fd=fd, token=token, depth=1, inherited=False, env_before=before)


def _open_lock_file(path: Path) -> int:
    """The lock file, opened for writing its holder's details; a read-only data folder (or
    workspace) is one line saying so, before any work starts."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        from .fsutil import is_read_only, read_only

        if is_read_only(exc):
            raise read_only(exc, path) from None
        raise


def release(path: Path) -> None:
    key = _key(Path(path))
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth > 0:
            return
        del _held[key]
        if held.inherited:
            return
        if held.env_before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = held.env_before
        with contextlib.suppress(OSError):
            os.ftruncate(held.fd, 0)  # the holder's details go with the hold
        os.close(held.fd)  # closing the last descriptor drops the flock


def held(path: Path) -> bool:
    """Whether this process holds (or inherited) the lock."""
    return _key(Path(path)) in _held


@contextlib.contextmanager
def writer_lock(
    settings: Settings,
    command: str,
    *,
    timeout: float | None = None,
    blockers: Sequence[Blocker] = (),
    notify: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Hold the data folder's writer lock for the duration of the block.

    `timeout` defaults to orchestration.lock_timeout, and to 0 inside a `dvc repro` stage.
    """
    in_dvc = bool(os.environ.get("DVC_STAGE"))
    if timeout is None:
        timeout = 0.0 if in_dvc else float(settings.orchestration.lock_timeout)
    path = lock_path(settings)
    acquire(
        path,
        command,
        timeout=timeout,
        blockers=blockers,
        notify=notify if notify is not None else _to_stderr,
        hint="a `dvc repro` stage does not wait for it"
        if in_dvc
        else "orchestration.lock_timeout sets how long to wait",
    )
    try:
        yield path
    finally:
        release(path)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- DVC's own lock


def dvc_root(start: Path) -> Path | None:
    """The DVC repository holding `start` (the nearest folder above with a `.dvc` folder)."""
    p = Path(start).resolve()
    for folder in (p, *p.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_busy(start: Path) -> Blocker:
    """A blocker: busy while a DVC command (`dvc repro`...) holds the repository's lock.

    Flows wait for it before they take the writer lock, so a nightly run does not slip in
    between two stages of a running `dvc repro`. Inside a DVC stage it never blocks (the stage's
    own `dvc repro` holds that lock).
    """
    root = dvc_root(start)

    def check() -> str | None:
        if root is None or os.environ.get("DVC_STAGE"):
            return None
        lock = root / ".dvc" / "tmp" / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None  # no lock file: no DVC command has run here, or it is not ours to read
        try:
            if _try_flock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
        finally:
            os.close(fd)
        return f"a DVC command (`dvc repro`?) holds the repository lock in {root}"

    return check
