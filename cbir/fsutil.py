"""Atomic file writes: write a temporary file beside the target, fsync, then rename.

A reader never sees a half-written file, and a process killed mid-write leaves the previous
version in place (the stray temporary file is ignored and cleaned on the next write).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import faults
from .errors import CbirError

TMP_PREFIX = ".tmp-"


class DiskFull(CbirError):
    """A write ran out of space (or quota); the file it was replacing is unchanged."""


def disk_full(target: str | os.PathLike[str] | None) -> DiskFull:
    """The error for a write that ran out of space: what to do, and that nothing was lost."""
    where = f" while writing {target}" if target else ""
    return DiskFull(
        f"no space left on the device{where}; outputs written before are kept "
        f"unchanged (each is replaced whole). Free some space and run again"
    )


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk or the quota is full.

    Python's own writes set errno; pyarrow and DuckDB wrap the OS error, so the text is checked
    as well.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, Exception) and (
        os.strerror(errno.ENOSPC) in str(exc) or os.strerror(errno.EDQUOT) in str(exc)
    )


class ReadOnly(CbirError):
    """cbir may not write where an output goes: a read-only folder or file system."""


_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_read_only(exc: BaseException) -> bool:
    """Whether `exc` says a write was refused: permissions, or a read-only file system."""
    return isinstance(exc, OSError) and exc.errno in _DENIED


def read_only(exc: OSError, target: str | os.PathLike[str] | None = None) -> ReadOnly:
    """The one line for a refused write: where, why, and what to do."""
    where = exc.filename or target
    if target is not None and os.path.basename(str(where)).startswith(TMP_PREFIX):
        where = target  # the temporary file beside it says less
    why = (
        "the file system is read-only"
        if exc.errno == errno.EROFS
        else "permission denied: it is read-only for this user"
    )
    return ReadOnly(
        f"cannot write {where} ({why}); cbir writes its outputs under the data "
        f"folder, which must be writable (or point the data.* params at a writable "
        f"folder)"
    )


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs should get the usual permissions (readable by the team).
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over the target."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    except OSError as exc:  # a read-only data folder: one line, as for a full disk
        if is_read_only(exc):
            raise read_only(exc, target) from None
        if is_disk_full(exc):
            raise disk_full(target) from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        _fsync_file(tmp_path)
        faults.point(f"write.{target.name}")  # complete but not yet in place
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if is_disk_full(exc):  # a user can act on it: one clear line instead of a traceback
            raise disk_full(target) from exc
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Row groups of a table that grows by appending (the manifest, the vector file's rows): a
#: reader of the night's new rows reads the groups that hold them (tables.rows_from), 65,536
#: rows at most before them rather than Parquet's default of 1,048,576.
APPENDED_ROW_GROUP = 1 << 16


def write_parquet(
    table: pa.Table, target: str | os.PathLike[str], row_group_size: int | None = None
) -> None:
    """Write a Parquet file atomically (`row_group_size`: rows a group, Parquet's default)."""
    with atomic_path(target) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=row_group_size,
            use_dictionary=dictionary_columns(table),
        )


#: Rows of a column looked at to choose its encoding (dictionary_columns).
DICTIONARY_SAMPLE = 1 << 16


def dictionary_columns(table: pa.Table) -> list[str]:
    """The columns worth a dictionary: those whose values repeat (status, format, runs...), by
    their first DICTIONARY_SAMPLE rows. Parquet's writer tries a dictionary for every column
    and gives up on one of distinct values (ids, paths, hashes) only after filling a page: at
    10^7 manifest rows, writing took 6.9 s with it against 5.6 s, and reading ids and paths
    0.58 s against 0.45 s (the file 241 MB against 202)."""
    head = table.slice(0, DICTIONARY_SAMPLE)
    out = []
    for name, column in zip(head.column_names, head.columns, strict=True):
        values = len(column) - column.null_count
        flat = pa.types.is_primitive(column.type) or pa.types.is_string(column.type)
        flat = flat or pa.types.is_binary(column.type) or pa.types.is_large_string(column.type)
        if not flat or values == 0 or pc.count_distinct(column).as_py() * 2 <= values:
            out.append(name)
    return out


def write_text(text: str, target: str | os.PathLike[str]) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, target: str | os.PathLike[str]) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", target)


def clean_stale_tmp(folder: str | os.PathLike[str], name: str | None = None) -> int:
    """Remove temporary files left by a killed writer in `folder` (only those of the target file
    `name` when given). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(TMP_PREFIX + (glob.escape(name) + ".*" if name else "*")):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


Stamp = tuple[tuple[str, int, int, int] | None, ...]


def file_stamps(paths: Iterable[str | os.PathLike[str]]) -> Stamp:
    """What each file is now, (path, size, mtime_ns, inode), None where it is missing or
    unreadable: every cbir write renames a new file over the old, so a rewrite shows as a new
    inode and time. An in-memory key for what was opened from the files."""
    out: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)
