"""The per-file work of ingest, run in worker processes: hash, then decode unless already known.

Kept apart from ingest.py so that worker processes import only Pillow and numpy, not the
Parquet/DuckDB machinery.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from . import imaging

_READ_WHOLE_LIMIT = 256 * 1024 * 1024  # larger files are hashed and decoded in a streaming way
_PHASH_DRAFT = 64  # JPEGs decode at 1/8 DCT scale when that still gives >= 64 px: the hash needs 32


def display_path(raw: bytes) -> str:
    """A printable UTF-8 form of a relative path (undecodable bytes shown as \\xNN)."""
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Entry:
    """A file found by the stat walk."""

    raw: bytes  # path relative to the scans root, as the file system spells it
    size: int
    mtime_ns: int
    problem: str | None = None  # known unusable from the walk alone (symlinks, special files)

    @property
    def path(self) -> str:
        return display_path(self.raw)


_KNOWN: frozenset[str] = frozenset()
_MAX_PIXELS: int | None = None


def init_worker(known: frozenset[str], max_pixels: int) -> None:
    global _KNOWN, _MAX_PIXELS
    _KNOWN, _MAX_PIXELS = known, max_pixels


def probe_file(root: bytes, entry: Entry) -> dict[str, Any]:
    """Hash one file and, unless its content is already known, decode it. Never raises."""
    out: dict[str, Any] = {
        "path": entry.path,
        "path_raw": entry.raw,
        "bytes": entry.size,
        "mtime_ns": entry.mtime_ns,
    }
    full = os.path.join(root, entry.raw)
    data: bytes | None = None
    try:
        with imaging.open_regular(full) as fh:  # never a FIFO swapped in after the walk
            st = os.fstat(fh.fileno())
            out["bytes"], out["mtime_ns"] = st.st_size, st.st_mtime_ns
            if st.st_size == 0:
                out["reason"] = "empty file (0 bytes)"
                return out
            digest = hashlib.sha256()
            if st.st_size <= _READ_WHOLE_LIMIT:
                data = fh.read()
                digest.update(data)
            else:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    except FileNotFoundError:
        out["reason"] = "file disappeared during ingest (deleted or moved while scanning)"
        return out
    except PermissionError:
        out["reason"] = "cannot read the file: permission denied"
        return out
    except OSError as exc:
        out["reason"] = f"cannot read the file: {exc.strerror or exc}"
        return out
    out["sha256"] = sha = digest.hexdigest()
    if sha in _KNOWN:
        return out  # same content as an image already in the manifest: no decode needed
    try:
        source: bytes | str = data if data is not None else os.fsdecode(full)
        pic, info = decoded(source, max_pixels=_MAX_PIXELS, name=entry.path)
    except imaging.ImageRejected as exc:
        out["reason"] = exc.reason
        return out
    except OSError as exc:  # a large file, streamed from its path: gone or swapped meanwhile
        out["reason"] = f"cannot read the file: {exc.strerror or exc}"
        return out
    except Exception as exc:  # a decoder bug must not stop the run; the file is quarantined
        out["reason"] = f"damaged image: unexpected decoder error ({type(exc).__name__}: {exc})"
        return out
    out.update(properties(pic, info))
    return out


def decoded(
    source: bytes | str, *, max_pixels: int | None = None, name: str = ""
) -> tuple[Image.Image, imaging.ImageInfo]:
    """The decode ingest owes a new file: greyscale at reduced DCT scale, all the perceptual
    hash needs, and the whole file is still decoded (imaging.open_scan's picture and info)."""
    return imaging.open_scan(
        source, max_pixels=max_pixels, draft=("L", _PHASH_DRAFT), rgb=False, name=name
    )


def properties(pic: Image.Image, info: imaging.ImageInfo) -> dict[str, Any]:
    """What the manifest keeps of a decoded file: its size, mode, format, pages and hash."""
    return {
        "width": info.width,
        "height": info.height,
        "mode": info.mode,
        "format": info.format,
        "pages": info.pages,
        "phash": imaging.phash(pic),
    }


def probe_batch(args: tuple[bytes, list[Entry]]) -> list[dict[str, Any]]:
    """`probe_file` over a batch of files under one root: one job (one pickled round trip to a
    worker) per batch, not per file, so small scans do not pay the pool's cost per file."""
    root, entries = args
    return [probe_file(root, e) for e in entries]


def sha256_of(path: bytes) -> str | None:
    digest = hashlib.sha256()
    try:
        with imaging.open_regular(path) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None  # the worker will meet the same problem and report it
    return digest.hexdigest()


def sha256_batch(args: tuple[bytes, list[bytes]]) -> list[str | None]:
    """`sha256_of` for a batch of paths relative to one root, in their order."""
    root, raws = args
    return [sha256_of(os.path.join(root, raw)) for raw in raws]
