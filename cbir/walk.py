"""Walking a scans folder: every file under it, in a stable order, with its size and mtime (a stat
walk: nothing is opened). Ignore patterns skip names; symbolic links are checked, never trusted: a
link is followed only to a regular file inside the folder. What cannot be used comes back as an
`Entry` with its problem (the ingest step quarantines it)."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .probe import Entry, display_path


def _ignorer(patterns: list[str]) -> Callable[[bytes], bool]:
    """Whether a name matches one of the patterns (fnmatchcase), as one compiled expression: a
    walk of 10^6 files asks it 10^6 times."""
    if not patterns:
        return lambda name: False
    match = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
    return lambda name: match(display_path(name)) is not None


def walk_scans(root: Path, ignore: list[str]) -> Iterator[Entry]:
    """Every file under root, recursively, in a stable order; symlinks are checked, not trusted."""
    root_b = os.fsencode(root)
    ignored = _ignorer(ignore)
    real_root = os.path.realpath(root_b)
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            with os.scandir(full_dir) as it:
                items = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if rel_dir:
                yield Entry(rel_dir, 0, 0, "folder disappeared during ingest (deleted or moved)")
            continue
        except PermissionError:
            yield Entry(rel_dir or b".", 0, 0, "folder cannot be read: permission denied")
            continue
        except OSError as exc:
            yield Entry(rel_dir or b".", 0, 0, f"folder cannot be read: {exc.strerror}")
            continue
        subdirs = []
        for item in items:
            name = item.name
            if ignored(name):
                continue
            rel = rel_dir + b"/" + name if rel_dir else name  # os.path.join, without its checks
            try:
                if item.is_symlink():
                    yield from _check_symlink(item.path, rel, real_root)
                elif item.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                elif item.is_file(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                    yield Entry(rel, st.st_size, st.st_mtime_ns)
                else:
                    yield Entry(rel, 0, 0, "not a regular file (a device, pipe or socket)")
            except FileNotFoundError:
                yield Entry(rel, 0, 0, "file disappeared during ingest (deleted or moved)")
            except OSError as exc:
                yield Entry(rel, 0, 0, f"cannot read the file's metadata: {exc.strerror}")
        stack.extend(reversed(subdirs))


def _check_symlink(full: bytes, rel: bytes, real_root: bytes) -> Iterator[Entry]:
    target = os.path.realpath(full)
    shown = display_path(target)
    if not os.path.exists(target):
        yield Entry(rel, 0, 0, f"broken symbolic link: its target {shown} does not exist")
        return
    if os.path.commonpath([real_root, target]) != real_root:
        yield Entry(rel, 0, 0, f"symbolic link points outside the scans folder (to {shown})")
        return
    st = os.stat(target)
    if stat.S_ISDIR(st.st_mode):
        yield Entry(
            rel,
            0,
            0,
            "symbolic link to a folder: not followed (its files are "
            "ingested from their real location)",
        )
        return
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would wait for a writer forever
        yield Entry(
            rel,
            0,
            0,
            "symbolic link to something that is not a regular file (a device, pipe or socket)",
        )
        return
    # A link to a file inside the scans root: ingested like a file (its content makes it an
    # exact duplicate of its target).
    yield Entry(rel, st.st_size, st.st_mtime_ns)
