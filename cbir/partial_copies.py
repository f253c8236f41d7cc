"""Partial copies for benchmarks: details cut from a photograph, with where they came from.

Archives reproduce details of photographs: a face cut from a group portrait, one building from a
street view, enlarged for an exhibition panel or a book. `detail_crop(img, rng, area)` cuts one
such detail: a rectangle covering a chosen fraction of the picture's area (drawn within a band,
e.g. 10-20 %), of a random aspect within bounds, at a random place; then, optionally, a light
rescan of the cut print written here (a change of resolution, a slight turn on the scanner bed,
a tone curve, a little noise, JPEG). It returns the detail and its true box on the original.

Like `cbir.heldout`, it is independent of the training's augmentations: numpy and Pillow only,
nothing from `degrade` or `augment`, so a benchmark of details does not measure how well the
model learnt its own crops.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

#: Bands of area (fraction of the original's area) a benchmark reports separately.
BANDS: dict[str, tuple[float, float]] = {
    "5-10%": (0.05, 0.10),
    "10-20%": (0.10, 0.20),
    "20-40%": (0.20, 0.40),
    "40-50%": (0.40, 0.50),
}
#: Aspect (width / height) of a detail, drawn log-uniformly in these bounds.
ASPECT = (0.5, 2.0)
MIN_SIDE = 16  # px: a detail is never thinner than this


@dataclass(frozen=True)
class DetailCrop:
    picture: Image.Image  # the detail (RGB), rescanned when asked
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) on the original, in its pixels
    area: float  # the box's share of the original's area
    processes: tuple[str, ...]  # what the rescan did ("" when not rescanned)


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    area: tuple[float, float],
    aspect: tuple[float, float] = ASPECT,
) -> tuple[int, int, int, int]:
    """A box covering a fraction of width x height drawn in `area`, aspect within `aspect`
    (narrowed where the picture's shape demands), at a uniformly random place."""
    frac = float(rng.uniform(*area))
    target = frac * width * height
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    w = math.sqrt(target * ratio)
    w = min(max(w, target / height), width)  # fits both ways: w <= width and h <= height
    h = target / w
    cw = int(min(width, max(MIN_SIDE, round(w))))
    ch = int(min(height, max(MIN_SIDE, round(h))))
    x0 = int(rng.integers(0, width - cw + 1))
    y0 = int(rng.integers(0, height - ch + 1))
    return (x0, y0, x0 + cw, y0 + ch)


def rescan(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, tuple[str, ...]]:
    """A light rescan of a cut print: resolution, a slight turn, tone, noise, JPEG."""
    out = img.convert("RGB")
    done: list[str] = []
    k = float(rng.uniform(0.6, 1.6))  # the detail scanned at another resolution (enlarged print)
    w, h = out.size
    out = out.resize(
        (max(MIN_SIDE, round(w * k)), max(MIN_SIDE, round(h * k))), Image.Resampling.LANCZOS
    )
    done.append(f"scale {k:.2f}")
    if rng.random() < 0.5:  # a slight turn on the scanner bed; the corners take the bed's grey
        angle = float(rng.uniform(-2.0, 2.0))
        bed = tuple(int(v) for v in rng.uniform(200, 250, 3))
        out = out.rotate(angle, Image.Resampling.BICUBIC, expand=False, fillcolor=bed)
        done.append(f"turn {angle:.1f}")
    a = np.asarray(out, np.float32) / 255.0
    gamma = float(rng.uniform(0.75, 1.35))
    contrast = float(rng.uniform(0.8, 1.2))
    lift = float(rng.uniform(-0.06, 0.06))
    a = np.clip((a**gamma - 0.5) * contrast + 0.5 + lift, 0.0, 1.0)
    done.append("tone")
    if rng.random() < 0.6:
        a = a + rng.normal(0.0, rng.uniform(0.005, 0.025), a.shape[:2])[..., None]
        done.append("noise")
    out = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
        done.append("soft")
    quality = int(rng.integers(45, 92))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as j:
        out = j.convert("RGB")
    done.append(f"jpeg {quality}")
    return out, tuple(done)


def detail_crop(
    img: Image.Image,
    rng: np.random.Generator,
    area: tuple[float, float] = BANDS["10-20%"],
    *,
    aspect: tuple[float, float] = ASPECT,
    rescanned: bool = True,
) -> DetailCrop:
    """One detail of `img` (a fraction of its area drawn in `area`) and its box on `img`."""
    rgb = img.convert("RGB")
    box = crop_box(rgb.width, rgb.height, rng, area, aspect)
    piece = rgb.crop(box)
    processes: tuple[str, ...] = ()
    if rescanned:
        piece, processes = rescan(piece, rng)
    share = (box[2] - box[0]) * (box[3] - box[1]) / (rgb.width * rgb.height)
    return DetailCrop(piece, box, share, processes)
