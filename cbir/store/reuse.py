"""Openings of the collection shared by the steps of one flow run.

The nightly flow's index and pairs steps run one after the other in one process and open the
same collection: the present images' ids and their vector rows, then the index the index step
has just written. At 10^7 images each opening of the ids costs about 10 s and reading and
checksumming the index about 5 s. Inside `sharing()` (a flow's run) an opening is kept and
handed to the next step that asks for it, while the files it came from are as they were (their
fsutil.file_stamps, the key it was kept with); outside it, nothing is kept, so a long-lived
process (the review server, tests) never holds a collection it no longer reads, and only a
flow, whose steps run one at a time, relies on the files not being rewritten between two of its
steps within a clock tick.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

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
