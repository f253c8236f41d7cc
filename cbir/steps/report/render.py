"""The gallery's HTML, from the Jinja2 templates in `templates/`.

Every value a template writes is escaped (autoescape), with `html.escape`'s entities as the
gallery always had them, so a file name holding markup, quotes or control characters is shown
as text. The style sheet and the score filter script are files beside the templates, inlined
into each page: a page opened from file:// needs nothing else, and its Content-Security-Policy
allows that one script by its SHA-256 hash (a name that slipped past escaping could run no
script of its own) and inline styles, nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from ...safetext import counted
from ...store.layout import PLOTS
from ...store.pairs import CONFIRMED, PARTIAL, on_margin
from .files import cluster_page, clusters_page, pair_page, queries_page, query_page
from .thumbnails import FileInfo, Thumbnails

TEMPLATES = Path(__file__).resolve().parent / "templates"


def escape(value: Any) -> Markup:
    """What a template writes of a value (Jinja's finalize, before autoescape): markup a macro
    made as it is; anything else escaped by `html.escape` (quotes as &quot; and &#x27;, as the
    gallery always wrote them), None as nothing."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def human_bytes(n: int | None) -> str:
    """A file size as people read it (KB, MB, GB of 1024)."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def threshold(value: float | None) -> str:
    """A similarity threshold as the overview states it."""
    return "(not calibrated yet)" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Region:
    """The matched region on a pair's larger picture, in % of it (so of its thumbnail)."""

    left: float
    top: float
    width: float
    height: float

    def style(self) -> str:
        return (
            f"left:{self.left:.2f}%;top:{self.top:.2f}%;"
            f"width:{self.width:.2f}%;height:{self.height:.2f}%"
        )


def region(row: dict[str, Any], side: str) -> Region | None:
    """Where geometric verification matched the other picture on side `side` ("a" or "b") of
    a `pair_report` row, or None (not checked, not confirmed, or the box is on the other side).
    The box is in the picture's pixels with EXIF orientation applied, as are the row's width
    and height and the thumbnail."""
    if row.get("box_on") != side or row.get("relation") not in CONFIRMED:
        return None
    w, h = row.get(f"width_{side}"), row.get(f"height_{side}")
    box = [row.get(k) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
    coords = [float(v) for v in box if v is not None]
    if not w or not h or len(coords) != 4:
        return None
    x0, y0, x1, y1 = (
        min(100.0, max(0.0, 100.0 * v / size)) for v, size in zip(coords, (w, h, w, h), strict=True)
    )
    if x1 <= x0 or y1 <= y0:
        return None
    return Region(x0, y0, x1 - x0, y1 - y0)


def _static(name: str) -> Markup:
    """A file inlined into every page as it is: ours, not user input."""
    return Markup((TEMPLATES / name).read_text(encoding="utf-8"))


# Hides cards outside the score range; the range travels to other pages in the URL fragment.
FILTER_JS = Markup(_static("gallery.js").strip())
CSS = _static("gallery.css")
_JS_HASH = base64.b64encode(hashlib.sha256(FILTER_JS.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_JS_HASH}'"
)

ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    finalize=escape,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENV.filters.update(human_bytes=human_bytes, counted=counted, threshold=threshold)
ENV.globals.update(
    region=region,
    partial=PARTIAL,
    on_margin=on_margin,
    csp=CSP,
    css=CSS,
    js=FILTER_JS,
    plots_folder=PLOTS,
    pair_page=pair_page,
    clusters_page=clusters_page,
    cluster_page=cluster_page,
    queries_page=queries_page,
    query_page=query_page,
)


@dataclass(frozen=True)
class Shown:
    """A file as a page shows it: its thumbnail, or why there is none, and its scan's URL."""

    path: str
    info: FileInfo | None  # None: not in the collection now
    href: str = ""  # the scan, relative to the gallery
    src: str = ""  # the thumbnail, relative to the gallery; "" when there is none
    why: str = ""  # why there is no thumbnail
    size: int = 0  # the thumbnails' long side

    def fit(self, box: int | None = None) -> tuple[int, int]:
        """The thumbnail's width and height shown in a `box` (the thumbnail size if None)."""
        assert self.info is not None
        w, h = self.info.width, self.info.height
        scale = min(1.0, (box or self.size) / max(w, h, 1))
        return max(1, round(w * scale)), max(1, round(h * scale))


class Pages:
    """Renders one report's pages: templates see `shown(path)` for the files they show."""

    def __init__(
        self,
        gallery: Path,
        scans: Path,
        files: dict[str, FileInfo],
        thumbs: Thumbnails,
        failed: dict[str, str],
    ) -> None:
        self.gallery = os.fsencode(os.path.abspath(gallery))
        self.scans = os.fsencode(os.path.abspath(scans))
        self.files = files
        self.thumbs = thumbs
        self.failed = failed  # image_id -> why it has no thumbnail

    def shown(self, path: str) -> Shown:
        """The file at `path` (a display path), as a page shows it."""
        f = self.files.get(path)
        if f is None:
            return Shown(path, None)
        rel = os.path.relpath(os.path.join(self.scans, f.path_raw), self.gallery)
        href = quote(rel, safe="/")
        if f.image_id not in self.thumbs.ok:
            return Shown(path, f, href, why=self.failed.get(f.image_id, "not made"))
        return Shown(path, f, href, self.thumbs.name(f.image_id), size=self.thumbs.size)

    def render(self, template: str, title: str, *, script: bool = False, **values: Any) -> str:
        """A page: `template` within the gallery's frame; `script`: with the score filter."""
        return ENV.get_template(template).render(
            title=title, script=script, shown=self.shown, **values
        )
