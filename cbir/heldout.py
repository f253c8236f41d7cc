"""Near-duplicates made by processes the training never sees: an independent copy generator.

The training augmentations (`cbir.augment`, built on `cbir.degrade`) teach the descriptor what
rescans, crops, mounts, toning, fading, damage, halftones, re-photography and JPEG do to a print.
A quality figure measured on copies made by that same code measures self-agreement, not how the
model treats copies it was not taught. This module makes copies by *other* processes an archive
also meets, written independently (numpy and Pillow only; it imports nothing from `degrade` or
`augment`):

- microfilm: a high-contrast greyscale film copy, with grain and a soft lens;
- photocopy: a toner copy, thresholded towards black and white with a dither;
- thumbnail: a small web derivative blown up again, then sharpened;
- palette: saved as an indexed-colour GIF (a few dozen colours, dithered);
- dye fade: a colour slide whose cyan dye faded (a red-magenta cast), or a white balance cast;
- lens: a copy-stand lens with barrel or pincushion distortion;
- shake: a hand-held re-photograph, blurred along one direction;
- page: reproduced on a printed page with a caption block beside it;
- watermark: a translucent agency watermark across the picture;
- corner loss: a torn or missing corner;
- grain: film grain or sensor noise;
- posterise: a few bits per channel (an early digital copy);
- webp: saved as lossy WebP (another codec than the training's JPEG).

`held_out_copy(img, rng)` applies two to four of them. Every function is pure: it takes an RGB
picture and a `numpy.random.Generator` and returns a new RGB picture. Self-calibration
(`cbir.selfcal`) and the benchmarks use these copies to stand in for real duplicates.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Op = Callable[[Image.Image, np.random.Generator], Image.Image]


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")


def _luma(a: np.ndarray) -> np.ndarray:
    return a @ np.array([0.299, 0.587, 0.114], np.float32)


def microfilm(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Greyscale film copy: steep contrast curve, grain, softened by the copy lens."""
    y = _luma(_arr(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2))))) / 255.0
    k = rng.uniform(5.0, 9.0)  # logistic contrast around mid-grey
    y = 1.0 / (1.0 + np.exp(-k * (y - rng.uniform(0.4, 0.6))))
    y = y + rng.normal(0.0, rng.uniform(0.02, 0.05), y.shape)
    return _img(np.repeat((y * 255.0)[..., None], 3, axis=2))


def photocopy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Toner copy: greyscale pushed towards black and white with an ordered dither."""
    y = _luma(_arr(img)) / 255.0
    y = np.clip((y - 0.5) * rng.uniform(1.6, 2.4) + 0.5 + rng.uniform(-0.08, 0.08), 0.0, 1.0)
    bayer = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) / 16.0
    h, w = y.shape
    cell = int(rng.integers(1, 3))
    tiles = np.kron(bayer, np.ones((cell, cell)))
    th = np.tile(tiles, (h // tiles.shape[0] + 1, w // tiles.shape[1] + 1))[:h, :w]
    mix = rng.uniform(0.35, 0.6)  # part dithered, part continuous tone (toner is not binary)
    out = (1.0 - mix) * y + mix * (y > th)
    paper = rng.uniform(230, 250)
    return _img(np.repeat((out * (paper - 20) + 20)[..., None], 3, axis=2))


def thumbnail(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A web thumbnail (96-160 px long side) scaled back up and sharpened."""
    w, h = img.size
    k = rng.uniform(96, 160) / max(w, h)
    if k >= 1.0:
        return img.copy()
    small = img.resize((max(8, round(w * k)), max(8, round(h * k))), Image.Resampling.BOX)
    big = small.resize((w, h), Image.Resampling.BICUBIC)
    return big.filter(
        ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(80, 200)), threshold=2)
    )


def palette(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Indexed colour (a GIF): 16-64 colours chosen for the picture, Floyd-Steinberg dither."""
    colours = int(rng.choice([16, 24, 32, 48, 64]))
    return (
        img.convert("RGB")
        .quantize(
            colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
        )
        .convert("RGB")
    )


def dye_fade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A faded colour slide (cyan dye lost: red-magenta cast) or a wrong white balance."""
    a = _arr(img) / 255.0
    if rng.random() < 0.6:  # per-channel gamma: the cyan layer (red channel) fades first
        gammas = np.array(
            [rng.uniform(0.55, 0.8), rng.uniform(0.85, 1.05), rng.uniform(0.8, 1.0)], np.float32
        )
        a = a**gammas
    else:  # tungsten or fluorescent light on daylight film
        gains = np.array(
            [rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15), rng.uniform(0.7, 1.2)], np.float32
        )
        a = a * gains / gains.max()
    sat = rng.uniform(0.6, 1.3)
    grey = _luma(a)[..., None]
    return _img((grey + (a - grey) * sat) * 255.0)


def lens(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Radial (barrel or pincushion) distortion of a copy lens, cropped to the picture."""
    a = _arr(img)
    h, w = a.shape[:2]
    kcoef = rng.uniform(0.06, 0.16) * (1 if rng.random() < 0.5 else -1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    nx, ny = (xx - cx) / cx, (yy - cy) / cy
    r2 = nx * nx + ny * ny
    # scale so the corners stay inside the source: no empty border to fill
    corner = 1.0 + kcoef * 2.0
    f = (1.0 + kcoef * r2) / max(corner, 1.0)
    sx = np.clip(cx + nx * f * cx, 0, w - 1)
    sy = np.clip(cy + ny * f * cy, 0, h - 1)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
    bottom = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
    return _img(top * (1 - fy) + bottom * fy)


def shake(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Motion blur along one direction (a hand-held re-photograph)."""
    a = _arr(img)
    length = max(3, round(max(img.size) * rng.uniform(0.006, 0.015)))
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle), math.sin(angle)
    out = np.zeros_like(a)
    for t in range(length):
        s = t - (length - 1) / 2.0
        out += np.roll(a, (round(s * dy), round(s * dx)), axis=(0, 1))
    return _img(out / length)


def page(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Reproduced on a printed page: paper around it and a block of caption lines on one side."""
    w, h = img.size
    m = round(min(w, h) * rng.uniform(0.04, 0.08))
    text_h = round(h * rng.uniform(0.12, 0.25))
    below = rng.random() < 0.7
    paper = tuple(int(v) for v in rng.uniform(225, 250, 3))
    canvas = Image.new("RGB", (w + 2 * m, h + text_h + 3 * m), paper)
    canvas.paste(img, (m, m + (0 if below else text_h + m)))
    d = ImageDraw.Draw(canvas)
    y0 = (h + 2 * m) if below else m
    ink = int(rng.uniform(20, 60))
    line_h = max(3, text_h // 5)
    for i in range(int(text_h // line_h)):
        x: float = m
        y = y0 + i * line_h
        end = m + w * rng.uniform(0.5, 1.0)
        while x < end:  # words as short bars of ink
            word = w * rng.uniform(0.03, 0.1)
            d.rectangle([x, y, min(end, x + word), y + max(1, line_h // 2)], fill=(ink,) * 3)
            x += word + w * 0.015
    return canvas


def watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A translucent diagonal band of lettering across the picture (an agency's web copy)."""
    w, h = img.size
    layer = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(layer)
    band = max(4, round(min(w, h) * rng.uniform(0.06, 0.12)))
    cy = h * rng.uniform(0.3, 0.7)
    slope = rng.uniform(-0.5, 0.5)
    x = 0.0
    while x < w:
        glyph = band * rng.uniform(0.4, 0.8)
        y = cy + slope * (x - w / 2)
        d.rectangle([x, y, x + glyph, y + band], fill=255)
        x += glyph + band * 0.3
    alpha = (np.asarray(layer, np.float32) / 255.0 * rng.uniform(0.2, 0.4))[..., None]
    tint = 255.0 if rng.random() < 0.6 else 0.0
    return _img(_arr(img) * (1 - alpha) + tint * alpha)


def corner_loss(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A torn-off corner, showing the scanner background."""
    w, h = img.size
    out = img.copy()
    d = ImageDraw.Draw(out)
    cw, ch = w * rng.uniform(0.08, 0.22), h * rng.uniform(0.08, 0.22)
    corner = int(rng.integers(4))
    cx, cy = (0 if corner in (0, 3) else w), (0 if corner in (0, 1) else h)
    sx, sy = (1 if cx == 0 else -1), (1 if cy == 0 else -1)
    n = 6  # a ragged tear between the two edge points
    pts: list[tuple[float, float]] = [(cx, cy), (cx + sx * cw, cy)]
    for i in range(1, n):
        t = i / n
        jitter = rng.uniform(-0.08, 0.08) * min(cw, ch)
        pts.append((cx + sx * cw * (1 - t) + jitter, cy + sy * ch * t + jitter))
    pts.append((cx, cy + sy * ch))
    d.polygon(pts, fill=tuple(int(v) for v in rng.uniform(0, 60, 3)))
    return out


def grain(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Film grain or sensor noise: clumped Gaussian noise, stronger in the mid-tones."""
    a = _arr(img)
    noise = rng.normal(0.0, 1.0, a.shape[:2]).astype(np.float32)
    noise_img = Image.fromarray(np.clip(noise * 40 + 128, 0, 255).astype(np.uint8), "L")
    clumped = (
        np.asarray(noise_img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2))), np.float32)
        - 128.0
    )
    y = _luma(a) / 255.0
    amount = rng.uniform(0.3, 0.7) * (4.0 * y * (1.0 - y) + 0.2)  # mid-tones grainiest
    return _img(a + (clumped * amount)[..., None])


def posterise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Few levels per channel: an early digital copy."""
    levels = int(rng.integers(6, 12))
    a = _arr(img) / 255.0
    return _img(np.round(a * (levels - 1)) / (levels - 1) * 255.0)


def webp(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Saved as lossy WebP."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="WEBP", quality=int(rng.integers(30, 70)), method=0)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


#: Each process with its probability of being among a copy's processes, in physical order
#: (what happens to the object before what happens to its digital copy).
PROCESSES: tuple[tuple[str, Op, float], ...] = (
    ("corner_loss", corner_loss, 0.5),
    ("dye_fade", dye_fade, 1.0),
    ("page", page, 0.8),
    ("watermark", watermark, 0.6),
    ("microfilm", microfilm, 0.7),
    ("photocopy", photocopy, 0.4),
    ("lens", lens, 0.8),
    ("shake", shake, 0.6),
    ("grain", grain, 0.9),
    ("thumbnail", thumbnail, 0.9),
    ("palette", palette, 0.6),
    ("posterise", posterise, 0.5),
    ("webp", webp, 1.0),
)
NAMES = tuple(name for name, _, _ in PROCESSES)
# Processes that replace the tones: one of them per copy is enough.
_TONE_REPLACING = {"microfilm", "photocopy", "palette", "posterise"}


def choose(rng: np.random.Generator, lo: int = 2, hi: int = 4) -> list[str]:
    """Which processes one copy goes through (lo..hi of them, physical order)."""
    p = np.array([w for _, _, w in PROCESSES])
    n = int(rng.integers(lo, hi + 1))
    picked = set(rng.choice(len(PROCESSES), size=n, replace=False, p=p / p.sum()).tolist())
    names = [NAMES[i] for i in sorted(picked)]
    tonal = [x for x in names if x in _TONE_REPLACING]
    return [x for x in names if x not in _TONE_REPLACING or x == (tonal[0] if tonal else None)]


def held_out_copy(
    img: Image.Image, rng: np.random.Generator, processes: list[str] | None = None
) -> Image.Image:
    """One near-duplicate of `img` made by 2-4 held-out processes (or the named ones)."""
    ops = dict((name, op) for name, op, _ in PROCESSES)
    out = img.convert("RGB")
    for name in processes if processes is not None else choose(rng):
        out = ops[name](out, rng)
    return out
