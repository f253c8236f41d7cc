"""Thumbnails for the gallery, and the scans they show.

A thumbnail is made once, at `report.thumb_size`, into `gallery/thumbs/<size>/<image_id>.jpg`
(named by content hash, so a later report reuses it) and pruned when its image leaves the
collection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ... import faults
from ...fsutil import atomic_path
from ...imaging import ImageRejected, load_rgb
from ...progress import bar as progress_bar
from ...store.manifest import PRESENT
from .files import THUMB_NAME, remove_stale

THUMBS = "thumbs"


@dataclass(frozen=True)
class FileInfo:
    """A present scan as the manifest describes it (what a card's caption shows)."""

    path: str
    path_raw: bytes
    image_id: str
    width: int
    height: int
    bytes: int
    format: str
    first_run: int


def files_by_path(manifest: pa.Table, paths: Iterable[str]) -> dict[str, FileInfo]:
    """Present manifest files for the given display paths (only those, to stay small)."""
    wanted = pa.array(sorted(set(p for p in paths if p is not None)), pa.string())
    table = manifest.select(
        [
            "image_id",
            "path",
            "path_raw",
            "status",
            "width",
            "height",
            "bytes",
            "format",
            "first_run",
        ]
    )
    table = table.filter(
        pc.and_(
            pc.is_in(table["path"], value_set=wanted),
            pc.is_in(table["status"], value_set=pa.array(list(PRESENT))),
        )
    )
    out: dict[str, FileInfo] = {}
    for r in table.to_pylist():
        out.setdefault(
            r["path"],
            FileInfo(
                path=r["path"],
                path_raw=r["path_raw"],
                image_id=r["image_id"],
                width=r["width"],
                height=r["height"],
                bytes=r["bytes"],
                format=r["format"],
                first_run=r["first_run"],
            ),
        )
    return out


def present_ids(manifest: pa.Table) -> set[str]:
    """The image ids still in the collection: the thumbnails worth keeping."""
    t = manifest.select(["image_id", "status"])
    t = t.filter(pc.is_in(t["status"], value_set=pa.array(list(PRESENT))))
    return set(t["image_id"].to_pylist())


@dataclass
class ThumbStats:
    """What `Thumbnails` did, for the step's summary."""

    made: int = 0
    reused: int = 0
    pruned: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image_id -> reason


class Thumbnails:
    """JPEG thumbnails named by image id (content hash): made once, reused by later reports."""

    def __init__(self, gallery: Path, size: int, scans: Path, max_pixels: int) -> None:
        self.root = gallery / THUMBS
        self.folder = self.root / str(size)
        self.size = size
        self.scans = os.fsencode(scans)
        self.max_pixels = max_pixels
        self.ok: set[str] = set()

    def name(self, image_id: str) -> str:
        """The thumbnail's URL, relative to the gallery."""
        return f"{THUMBS}/{self.size}/{image_id}.jpg"

    def _make(self, image_id: str, path_raw: bytes) -> str | None:
        """Make one thumbnail; None, or why there is none."""
        target = self.folder / f"{image_id}.jpg"
        try:
            # a str path (bytes would be taken for the file's content); surrogateescape
            # keeps names that are not UTF-8 intact
            im = load_rgb(
                os.fsdecode(os.path.join(self.scans, path_raw)),
                self.size,
                max_pixels=self.max_pixels,
            )
        except ImageRejected as exc:
            return exc.reason
        except OSError as exc:
            return f"cannot read the scan: {exc.strerror or exc}"
        im.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        with atomic_path(target) as tmp:
            im.save(tmp, format="JPEG", quality=85, optimize=True)
        return None

    def ensure(self, sources: dict[str, bytes], workers: int, progress: bool) -> ThumbStats:
        """Make the missing thumbnails of `sources` (image_id -> a file of that content)."""
        stats = ThumbStats()
        self.folder.mkdir(parents=True, exist_ok=True)
        have = {p.stem for p in self.folder.glob("*.jpg")}
        todo = {i: raw for i, raw in sources.items() if i not in have}
        stats.reused = len(sources) - len(todo)
        self.ok = set(sources) - set(todo)
        bar = progress_bar(len(todo), "thumbnails", "img", progress)
        # Pillow decodes and resizes outside the GIL, so threads use the cores.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            made = pool.map(lambda kv: self._make(*kv), todo.items())
            for image_id, why in zip(todo, made, strict=True):
                bar.update(1)
                if why is None:
                    self.ok.add(image_id)
                    stats.made += 1
                    faults.point("report.thumb")
                else:
                    stats.failed[image_id] = why
        bar.close()
        return stats

    def prune(self, keep: set[str]) -> int:
        """Remove thumbnails of images no longer in the collection, and of other sizes (only
        files named as cbir names thumbnails: anything else put there is left alone)."""
        n = 0
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            if sub.is_dir() and sub.name.isdigit() and sub != self.folder:
                n += remove_stale(sub, (), THUMB_NAME)
                with contextlib.suppress(OSError):  # left where something else is in it
                    sub.rmdir()
        return n + remove_stale(self.folder, (self.folder / f"{i}.jpg" for i in keep), THUMB_NAME)
