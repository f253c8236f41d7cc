"""The vector file's rows in image id order, kept between runs and grown with the night.

Opening the embeddings matches the manifest's present images with the vector file's rows: read
every id of both, make them integers, sort them (at 10^7 seconds, for a night that adds 1,000).
The match is kept in the cache (`Layout.vector_order`), stamped with what it was made from:
the manifest's rows epoch, its number of rows and its last row's id, and the vector file's
generation, rows and last row's id. Ingest keeps the epoch while a run only appends rows, and
`cbir embed` only appends to a generation, so where the stamp's epoch and generation still hold
and its last rows are still there, the match is grown from the rows past them alone. Anything
else (a file rewritten, a row changed, another branch's files checked out) matches them whole.
A cache that cannot be read is matched whole too; one that cannot be written is not kept.

The file: a line naming the format, a JSON header (the stamp, the arrays' lengths and types),
then the arrays, each at a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import unique_sorted
from ..fsutil import atomic_path
from .manifest import keys_in

MAGIC = b"cbir vector order 1\n"
_ARRAYS = {"keys": np.uint64, "rows": np.int64, "present": np.bool_, "waiting": np.uint64}


def latest(keys: np.ndarray) -> np.ndarray:
    """The positions of `keys` in key order, the last of each key (a stable sort keeps a key's
    positions in order: its last is the last of its run)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    last = np.ones(len(order), bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


@dataclass
class VectorOrder:
    """Every embedded image once, sorted by key, with its latest row in the vector file and
    whether it is a present canonical image; and the present ones without a vector yet."""

    stamp: dict[str, Any]
    keys: np.ndarray  # uint64 hex_keys, sorted, unique
    rows: np.ndarray  # int64: the image's last row in the vector file
    present: np.ndarray  # bool
    waiting: np.ndarray  # uint64 sorted: present images with no row

    @classmethod
    def whole(
        cls, stamp: dict[str, Any], vector_keys: np.ndarray, present_keys: np.ndarray
    ) -> VectorOrder:
        """Matched from every row of both (`vector_keys` in file order)."""
        rows = latest(vector_keys).astype(np.int64)
        keys = vector_keys[rows]
        wanted = unique_sorted(present_keys)
        present = keys_in(keys, wanted)
        return cls(stamp, keys, rows, present, wanted[~keys_in(wanted, keys)])

    def grown(
        self,
        stamp: dict[str, Any],
        vector_keys: np.ndarray,
        first_row: int,
        present_keys: np.ndarray,
    ) -> VectorOrder:
        """This order after the vector file's rows from `first_row` on (`vector_keys`) and the
        manifest's new present images (`present_keys`) were appended. Idempotent: rows and
        images it already holds change nothing. Each array is copied once at most, where it
        changes (at 10^7 each is 10-80 MB: copies a night need not make)."""
        keys, rows, present, waiting = self.keys, self.rows, self.present, self.waiting
        if len(vector_keys):
            last = latest(vector_keys)
            new_keys, new_rows = vector_keys[last], last.astype(np.int64) + first_row
            found = keys_in(new_keys, keys)
            again = np.searchsorted(keys, new_keys[found])  # images with a later row
            add_keys, add_rows = new_keys[~found], new_rows[~found]
            if len(add_keys):
                at = np.searchsorted(keys, add_keys)  # ascending: the result stays sorted
                keys = np.insert(keys, at, add_keys)
                rows = np.insert(rows, at, add_rows)
                present = np.insert(present, at, keys_in(add_keys, waiting))
                waiting = waiting[~keys_in(waiting, add_keys)]
                again += np.searchsorted(at, again, side="right")  # moved by the insertions
            elif len(again):
                rows = rows.copy()
            rows[again] = new_rows[found]  # a later row wins
        wanted = unique_sorted(present_keys)
        if len(wanted):
            found = keys_in(wanted, keys)
            if present is self.present:  # not copied by an insertion above
                present = present.copy()
            present[np.searchsorted(keys, wanted[found])] = True
            waiting = unique_sorted(np.concatenate([waiting, wanted[~found]]))
        return VectorOrder(stamp, keys, rows, present, waiting)

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of the present images with a vector, sorted by key: the order's own
        arrays where every image is present (no copy of 10^7 of each; callers do not write)."""
        if self.present.all():
            return self.keys, self.rows
        return self.keys[self.present], self.rows[self.present]

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS}
        header = {
            "stamp": self.stamp,
            "arrays": {k: [a.dtype.str, len(a)] for k, a in arrays.items()},
        }
        head = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(head + b"\0" * (-len(head) % 8))
            for a in arrays.values():
                fh.write(a.tobytes())
                fh.write(b"\0" * (-a.nbytes % 8))

    @classmethod
    def load(cls, path: Path) -> VectorOrder | None:
        """The order saved at `path`, its arrays mapped from the file rather than read into
        memory (read-only; a night touches what it uses, and the page cache holds them); None
        where there is none or it is not whole. A later save renames a new file over it: the
        arrays mapped stay those of this one."""
        try:
            with open(path, "rb") as fh:
                if fh.readline() != MAGIC:
                    return None
                header = json.loads(fh.readline())
                at = fh.tell() + (-fh.tell() % 8)
                size = os.fstat(fh.fileno()).st_size
                spans: dict[str, tuple[np.dtype[Any], int, int]] = {}
                for name, want in _ARRAYS.items():
                    kind, n = header["arrays"][name]
                    dtype, n = np.dtype(kind), int(n)
                    if dtype != want or n < 0:
                        return None
                    spans[name] = (dtype, n, at)
                    end = at + n * dtype.itemsize
                    at = end + (-end % 8)
                if end > size:
                    return None  # cut short
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            arrays = {
                name: np.frombuffer(mapped, dtype, n, offset) if n else np.zeros(0, dtype)
                for name, (dtype, n, offset) in spans.items()
            }
            stamp = header["stamp"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(stamp, dict) or len({len(arrays[k]) for k in list(_ARRAYS)[:3]}) != 1:
            return None
        return cls(stamp, **arrays)
