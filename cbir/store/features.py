"""The cache of local features (cbir.verify) of the collection's pictures, under data.cache_dir.

Geometric verification needs each picture's SIFT keypoints; extracting them (decoding the scan,
about 0.1 s of SIFT) costs far more than matching them, so each picture's are extracted once
and kept, keyed by content (the manifest's image_id), independent of the descriptor model: a
new model searches again and finds the features already there. The folder is named after the
extraction recipe (`RECIPE`: working side, keypoint cap, format), so a change of it starts a
cache of its own beside the old one.

Layout: `<cache_dir>/features/<recipe>/`, written in parts of up to `PART_SIZE` pictures (not one
file per picture: a collection of 10^6 pictures makes about 2,000 parts, not 10^6 files):

- `part-<time>-<pid>.bin`: the records, one after another: keypoints (float32 x, y) then
  SIFT descriptors (uint8, 128 a keypoint), about 136 kB a picture at 1,000 keypoints;
- `part-<time>-<pid>.parquet`: its index (image_id, offset, keypoints, size, scale, CRC-32 of
  the record), written after the .bin, both atomically: a part exists once its index does,
  so a run killed mid-part loses only that part, and a .bin without an index is an orphan
  that `clean` removes;
- `index.parquet`: every part's index in one file, rewritten after a run that added parts,
  so that opening the cache reads one file and the indexes of the parts newer than it.

Part names are unique (time and process), so two writers (a `cbir query` beside a `cbir pairs`)
never collide; a picture in several parts is read from the newest. A record whose bytes do not
match its CRC (a damaged disk, a truncated part) reads as absent and is extracted again.
Extraction runs in `settings.decode_workers` processes, decoding through cbir.imaging as the
rest of the pipeline does (`ingest.max_pixels` applies).
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults, verify
from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_parquet
from ..imaging import ImageRejected, open_scan
from ..parallel import worker_map
from ..progress import bar as progress_bar
from .layout import layout
from .manifest import canonical_images

#: What the cached features were extracted with; a change of any starts another cache.
RECIPE = f"sift-{verify.MAX_SIDE}px-{verify.MAX_KEYPOINTS}kp-v1"
#: Pictures per part: the unit of atomic writing (what a killed run may lose).
PART_SIZE = 500
INDEX = "index.parquet"
INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("part", pa.string()),
        ("offset", pa.int64()),
        ("n", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("scale", pa.float64()),
        ("crc", pa.int64()),
    ]
)
_POINT = 8  # bytes of a keypoint's (x, y) float32
_DESC = 128  # bytes of its descriptor


def _record(f: verify.Features) -> bytes:
    return (
        np.ascontiguousarray(f.points, np.float32).tobytes()
        + np.ascontiguousarray(f.sift, np.uint8).tobytes()
    )


class FeatureCache:
    """The cached features of one recipe's folder: look-ups by image_id, parts appended."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, dict[str, Any]] = {}  # image_id -> its INDEX_SCHEMA row
        self._covered: set[str] = set()  # parts whose index index.parquet already holds
        self.added_parts = 0
        self._load()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        rows: list[dict[str, Any]] = []
        consolidated = _read_index(self.folder / INDEX)
        if consolidated is not None:
            rows += consolidated
            self._covered = {r["part"] for r in consolidated}
        for p in sorted(self.folder.glob("part-*.parquet")):
            if p.stem not in self._covered:
                rows += _read_index(p) or []  # a damaged index: its pictures are extracted again
        rows.sort(key=lambda r: r["part"])  # the newest part last: it wins
        self._entries.update((r["image_id"], r) for r in rows)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keypoints(self, image_id: str) -> int:
        """How many keypoints the picture's cached features hold (0 when absent), unread."""
        entry = self._entries.get(image_id)
        return int(entry["n"]) if entry is not None else 0

    def missing(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if i not in self._entries]

    def get(self, image_id: str) -> verify.Features | None:
        """The picture's features, or None when absent or damaged (then forgotten, so that
        `missing` lists it and it is extracted again)."""
        entry = self._entries.get(image_id)
        if entry is None:
            return None
        n = entry["n"]
        size = n * (_POINT + _DESC)
        try:
            with open(self.folder / f"{entry['part']}.bin", "rb") as fh:
                fh.seek(entry["offset"])
                data = fh.read(size)
        except OSError:
            data = b""
        if len(data) != size or zlib.crc32(data) != entry["crc"]:
            del self._entries[image_id]
            return None
        points = np.frombuffer(data, np.float32, 2 * n).reshape(n, 2)
        sift = np.frombuffer(data, np.uint8, n * _DESC, offset=n * _POINT).reshape(n, _DESC)
        return verify.Features(
            points, sift, int(entry["width"]), int(entry["height"]), float(entry["scale"])
        )

    # ------------------------------------------------------------------ writing
    def add(self, items: Sequence[tuple[str, verify.Features]]) -> None:
        """Write one part (atomically: its records, then its index) and know its pictures."""
        if not items:
            return
        part = f"part-{time.time_ns():020d}-{os.getpid()}"
        rows: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        offset = 0
        for image_id, f in items:
            rec = _record(f)
            rows.append(
                {
                    "image_id": image_id,
                    "part": part,
                    "offset": offset,
                    "n": len(f),
                    "width": f.width,
                    "height": f.height,
                    "scale": f.scale,
                    "crc": zlib.crc32(rec),
                }
            )
            chunks.append(rec)
            offset += len(rec)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{part}.bin") as tmp, open(tmp, "wb") as fh:
            for c in chunks:
                fh.write(c)
        faults.point("features.part")
        write_parquet(
            pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), self.folder / f"{part}.parquet"
        )
        self._entries.update((r["image_id"], r) for r in rows)
        self.added_parts += 1

    def consolidate(self) -> None:
        """Rewrite index.parquet with every part's index (after a run that added parts), so
        that the next opening reads one file instead of one per part."""
        parts = {e["part"] for e in self._entries.values()}
        rows = [self._entries[i] for i in sorted(self._entries)]
        write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), self.folder / INDEX)
        self._covered = parts

    def clean(self) -> int:
        """Remove what a killed writer left: temporary files, and records (.bin) without an
        index. Only for a writer holding the data folder's lock (a part being written by a
        `cbir query` would lose its records, which are then extracted again)."""
        n = clean_stale_tmp(self.folder)
        for b in self.folder.glob("part-*.bin") if self.folder.is_dir() else ():
            if not b.with_suffix(".parquet").exists():
                b.unlink(missing_ok=True)
                n += 1
        return n


def _read_index(path: Path) -> list[dict[str, Any]] | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if not table.schema.equals(INDEX_SCHEMA):
        return None
    return table.to_pylist()


def feature_cache(settings: Any) -> FeatureCache:
    """The workspace's cache of local features (the current recipe's folder)."""
    return FeatureCache(layout(settings).features(RECIPE))


def scan_files(settings: Any, ids: Iterable[str] | None = None) -> dict[str, bytes]:
    """Where each of these images' canonical scan is (absolute, as the file system spells it);
    an image absent from the collection is left out. None: every image of the collection."""
    wanted = None if ids is None else set(ids)
    scans = os.fsencode(layout(settings).scans)
    return {
        r["image_id"]: os.path.join(scans, r["path_raw"])
        for r in canonical_images(settings)
        if wanted is None or r["image_id"] in wanted
    }


def extract_missing(
    settings: Any,
    cache: FeatureCache,
    ids: Iterable[str] | None = None,
    *,
    progress: bool = False,
) -> tuple[dict[str, bytes], dict[str, str], int]:
    """Extract into the cache the features it lacks of these images (None: the collection's),
    from their canonical scans, in `decode_workers` processes. Returns each image's scan
    (`scan_files`), image_id -> why it could not be read, and how many were extracted."""
    files = scan_files(settings, ids)
    jobs = [(i, files[i]) for i in sorted(cache.missing(files))]
    failed = extract(
        cache,
        jobs,
        workers=settings.decode_workers,
        max_pixels=settings.ingest.max_pixels,
        progress=progress,
    )
    return files, failed, len(jobs) - len(failed)


def features_of(
    cache: FeatureCache,
    ids: Sequence[str],
    files: dict[str, bytes],
    max_pixels: int | None,
    failed: dict[str, str] | None = None,
) -> list[verify.Features | None]:
    """Each picture's cached features; one missing or damaged (read as absent) is extracted
    from its scan in `files` and added to the cache (one part for all of them; a read-only
    data folder: used without caching). None where the scan cannot be read, or is already in
    `failed` (image_id -> why), which collects the new failures."""
    failed = {} if failed is None else failed
    out: list[verify.Features | None] = []
    new: list[tuple[str, verify.Features]] = []
    for image_id in ids:
        f = cache.get(image_id)
        if f is None and image_id in files and image_id not in failed:
            try:
                f = extract_file(os.fsdecode(files[image_id]), max_pixels)
                new.append((image_id, f))
            except (ImageRejected, OSError) as exc:
                failed[image_id] = str(exc)
        out.append(f)
    if new:
        with contextlib.suppress(CbirError, OSError):
            cache.add(new)
    return out


# ---------------------------------------------------------------------- extraction

_max_pixels: int | None = None


def _init_worker(max_pixels: int | None) -> None:
    global _max_pixels
    _max_pixels = max_pixels


def extract_file(path: str | Path, max_pixels: int | None) -> verify.Features:
    """The features of one scan (a path: never its bytes), decoded as the pipeline decodes it
    (oriented; a JPEG at a reduced DCT scale when the working side allows). Raises
    ImageRejected or OSError."""
    rgb, info = open_scan(Path(path), max_pixels=max_pixels, draft=("RGB", verify.MAX_SIDE))
    return verify.features(rgb, size=(info.width, info.height))


def _extract_one(job: tuple[str, bytes]) -> tuple[str, verify.Features | None, str]:
    image_id, path = job
    try:
        return image_id, extract_file(os.fsdecode(path), _max_pixels), ""
    except ImageRejected as exc:
        return image_id, None, str(exc)
    except OSError as exc:  # gone since ingest, unreadable
        return image_id, None, exc.strerror or str(exc)


def extract(
    cache: FeatureCache,
    jobs: Sequence[tuple[str, bytes]],
    *,
    workers: int,
    max_pixels: int | None,
    progress: bool = False,
    on_done: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Extract the features of (image_id, path) `jobs` into the cache, in `workers` processes,
    written in parts of PART_SIZE as they come (a killed run keeps the parts it wrote).
    Returns image_id -> why it could not be read."""
    failed: dict[str, str] = {}
    if not jobs:
        return failed
    workers = max(1, min(workers, len(jobs) // 4 or 1))
    bar = progress_bar(len(jobs), "local features", "img", progress)
    done: list[tuple[str, verify.Features]] = []
    with (
        contextlib.closing(bar),
        worker_map(
            _extract_one,
            jobs,
            workers,
            preload=["cbir.store.features"],
            initializer=_init_worker,
            initargs=(max_pixels,),
        ) as results,
    ):
        for image_id, f, why in results:
            if f is None:
                failed[image_id] = why
            else:
                done.append((image_id, f))
            if len(done) >= PART_SIZE:
                cache.add(done)
                done = []
            bar.update(1)
            if on_done is not None:
                on_done(1)
        cache.add(done)
    if cache.added_parts:
        cache.consolidate()
    return failed
