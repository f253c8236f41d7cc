"""Openings of the collection shared by the steps of one flow run.

The nightly flow's index and pairs steps run one after the other in one process and open the
same collection: the present images' ids and their vector rows, then the index the index step
has just written. At 10^7 images each opening of the ids costs about 10 s and reading and
checksumming the index about 5 s. Inside `sharing()` (a flow's run) an opening is kept and
handed to the next step that asks for it, while the files it came from are as they were (path,
inode, size, mtime_ns: every cbir write renames a new file over the old); outside it, nothing is
kept, so a long-lived process (the review server, tests) never holds a collection it no longer
reads, and only a flow, whose steps run one at a time, relies on the files not being rewritten
between two of its steps within a clock tick.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Stamp = tuple[tuple[str, int, int, int] | None, ...]

_lock = threading.Lock()
_depth = 0
_kept: dict[str, tuple[Any, Any]] = {}  # name -> (key, value)


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """Keep openings for the steps run inside; forget them all when the outermost one ends."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if not _depth:
                _kept.clear()


def stamps(paths: Iterable[Path]) -> Stamp:
    """What each file is now: (path, inode, size, mtime_ns), None where it is missing."""
    out: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def get(name: str, key: Any) -> Any | None:
    """The value kept under `name` when it was kept with this key, else None."""
    with _lock:
        kept = _kept.get(name)
    return kept[1] if kept is not None and kept[0] == key else None


def put(name: str, key: Any, value: Any) -> None:
    """Keep `value` under `name` (replacing what was kept) while sharing; otherwise nothing."""
    with _lock:
        if _depth:
            _kept[name] = (key, value)


def forget(name: str) -> None:
    with _lock:
        _kept.pop(name, None)
