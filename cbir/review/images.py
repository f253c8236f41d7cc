"""The pictures the review server shows: a scan, by content id only, as a JPEG at most `side`
pixels, made once into the workspace's cache (`layout.review_rendition`) and reused.

A request names an image id, never a path: the file is the one the manifest lists for that
content, decoded with cbir's own safe decoder (`imaging.open_scan`: regular files only, the
pixel and cost limits of `ingest.max_pixels`), so TIFF, JPEG 2000 and 16-bit scans show in
any browser. A file that changed since ingest is not shown as that content.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..fsutil import atomic_path
from ..imaging import ImageRejected, load_rgb
from ..store.layout import layout

if TYPE_CHECKING:
    from ..config import Settings

#: The sizes the screen asks for: thumbnails (cluster view) and the large pair view.
SIDES = (256, 2048)
IMAGE_ID = re.compile(r"[0-9a-f]{16}")
# Scans decoded at once: a 150-MP TIFF takes about 0.7 GB while it is decoded, and a page asks
# for two pictures and preloads the next pairs'.
_DECODING = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class Missing(Exception):
    """Why there is no picture: the HTTP status and one line."""

    status: int
    reason: str


def rendition(
    settings: Settings,
    scan_file: Callable[[str], dict[str, Any] | None],
    image_id: str,
    side: int,
) -> Path:
    """The cached JPEG of image `image_id` at most `side` px (made now when absent), or
    Missing saying why there is none. `scan_file` gives the manifest's row of a present file
    of that image (`Queue.scan_file`)."""
    if side not in SIDES:
        raise Missing(404, f"no such size: one of {', '.join(map(str, SIDES))}")
    if not IMAGE_ID.fullmatch(image_id):
        raise Missing(404, "not an image id")
    target = layout(settings).review_rendition(image_id, side)
    if target.is_file():
        return target
    row = scan_file(image_id)
    if row is None:
        raise Missing(404, "no present file of that image in the manifest")
    path = os.fsdecode(os.path.join(os.fsencode(layout(settings).scans), row["path_raw"]))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Missing(404, f"cannot read the scan: {exc.strerror or exc}") from None
    if st.st_size != row["bytes"] or st.st_mtime_ns != row["mtime_ns"]:
        raise Missing(409, "the file changed since it was ingested: run `cbir ingest`")
    with _DECODING:
        if target.is_file():  # made by the request that held the turn before this one
            return target
        # one decode makes every size still missing: the screen asks for the other one soon
        # (pair view, cluster view), and decoding a large TIFF is the whole cost
        todo = [s for s in SIDES if not layout(settings).review_rendition(image_id, s).is_file()]
        try:
            im = load_rgb(path, max(todo), max_pixels=settings.ingest.max_pixels)
        except ImageRejected as exc:
            raise Missing(422, exc.reason) from None
        except OSError as exc:
            raise Missing(404, f"cannot read the scan: {exc.strerror or exc}") from None
        for s in sorted(todo, reverse=True):
            im.thumbnail((s, s), Image.Resampling.LANCZOS)  # largest first: each from the last
            with atomic_path(layout(settings).review_rendition(image_id, s)) as tmp:
                im.save(tmp, format="JPEG", quality=88)
    return target
