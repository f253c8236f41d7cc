"""Degradations a historical photograph picks up in an archive, one function per concept.

Every primitive is pure: it takes a PIL image (RGB or L; anything else is converted) plus explicit
parameters and, where marks must be placed, a ``numpy.random.Generator``; it returns a new 8-bit
RGB image and never touches global random state. Choosing parameter values is left to callers (the
"heritage" training augmentation and the benchmark/demo generators use different ranges), so the
primitives only draw from ``rng`` for the placement and shape of marks.

All work is done with PIL operations and vectorised numpy, so each call takes a few milliseconds
on a 512 px image.

Longer than 400 lines: one short function per archival process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

RGB = tuple[int, int, int]
ToneKind = Literal["sepia", "cyan", "selenium", "grey"]

#: Typical mount board / scanner-lid colours, by name.
MOUNT_COLOURS: dict[str, RGB] = {
    "white": (243, 241, 236),
    "cream": (232, 220, 190),
    "grey": (128, 127, 123),
    "black": (22, 21, 20),
}

#: Shadow -> highlight colour ramps for toning, applied to the print's luminance.
TONES: dict[str, tuple[RGB, RGB]] = {
    "sepia": ((44, 24, 10), (255, 240, 208)),  # sulphide toning: warm brown
    "cyan": ((8, 34, 86), (226, 238, 246)),  # cyanotype: Prussian blue
    "selenium": ((34, 20, 34), (250, 247, 242)),  # selenium: cool purple-brown shadows
    "grey": ((0, 0, 0), (255, 255, 255)),  # neutral: drop the colour
}

#: Ink colours for stamps and inscriptions.
STAMP_INKS: tuple[RGB, ...] = ((96, 58, 138), (168, 42, 40), (38, 60, 142), (34, 34, 40))
# pencil, iron-gall ink, blue-black ink
WRITING_INKS: tuple[RGB, ...] = ((92, 92, 98), (78, 50, 28), (30, 36, 72))

_STAMP_WORDS = ("ARCHIV", "MUSEUM", "ARCHIVES", "COLLECTION", "PHOTOTHEK", "BIBLIOTHEK", "DEPOT")
_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR  # rotations/warps: half bicubic's cost; the blur is realistic


# --------------------------------------------------------------------------------- helpers


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _colour(colour: str | Sequence[int]) -> RGB:
    if isinstance(colour, str):
        try:
            return MOUNT_COLOURS[colour]
        except KeyError:
            names = sorted(MOUNT_COLOURS)
            msg = f"unknown colour {colour!r}; use one of {names} or an RGB tuple"
            raise ValueError(msg) from None
    r, g, b = (int(c) for c in colour)
    return (r, g, b)


def _scale(img: Image.Image) -> float:
    """Mark sizes are specified for a 512 px long side and scale with the image."""
    return max(img.size) / 512.0


def _lut(fn: np.ndarray) -> list[int]:
    return np.clip(np.rint(fn), 0, 255).astype(np.uint8).tolist()


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


def _blend_marks(
    img: Image.Image, light: Image.Image, dark: Image.Image, light_rgb: RGB, dark_rgb: RGB
) -> Image.Image:
    """Paint a light-mark mask and a dark-mark mask (L, 0..255 = opacity) onto the image."""
    if light.getbbox() is not None:
        img = Image.composite(Image.new("RGB", img.size, light_rgb), img, light)
    if dark.getbbox() is not None:
        img = Image.composite(Image.new("RGB", img.size, dark_rgb), img, dark)
    return img


def _apply_ink(img: Image.Image, mask: Image.Image, pos: tuple[int, int], ink: RGB) -> Image.Image:
    """Multiply-blend an ink mask onto the image at ``pos``: ink darkens, as on paper."""
    arr = np.array(img, dtype=np.uint8)  # a copy: the input stays untouched
    h, w = arr.shape[:2]
    x0, y0 = pos
    m = np.asarray(mask, dtype=np.float32) / 255.0
    # clip the mask to the image (marks may hang over the edge)
    mx0, my0 = max(0, -x0), max(0, -y0)
    x1, y1 = min(w, x0 + m.shape[1]), min(h, y0 + m.shape[0])
    x0, y0 = max(0, x0), max(0, y0)
    if x1 <= x0 or y1 <= y0:
        return Image.fromarray(arr)
    a = m[my0 : my0 + (y1 - y0), mx0 : mx0 + (x1 - x0), None]
    absorb = 1.0 - np.asarray(ink, dtype=np.float32) / 255.0
    region = arr[y0:y1, x0:x1].astype(np.float32) * (1.0 - a * absorb)
    arr[y0:y1, x0:x1] = np.clip(np.rint(region), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _perspective_coeffs(
    dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]
) -> tuple[float, ...]:
    """Coefficients for ``Image.transform(PERSPECTIVE)`` taking output points ``dst`` to ``src``."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    sol = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return tuple(float(c) for c in sol)


# --------------------------------------------------------------------------------- capture


def rescan(
    img: Image.Image, scale: float = 1.0, exposure: float = 1.0, gamma: float = 1.0
) -> Image.Image:
    """Scan again: resample by ``scale``, multiply intensities by ``exposure``, apply ``gamma``.

    ``gamma`` > 1 darkens midtones, < 1 lightens them; 1, 1, 1 leaves the pixels as they are.
    """
    if scale <= 0 or exposure <= 0 or gamma <= 0:
        raise ValueError("scale, exposure and gamma must be positive")
    img = _rgb(img)
    w, h = img.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != img.size:
        img = img.resize(size, _BICUBIC)
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = _lut(255.0 * np.clip(x * exposure, 0.0, 1.0) ** gamma)
    return img.point(lut * 3)


def jpeg_recompress(img: Image.Image, quality: int) -> Image.Image:
    """Save as JPEG at ``quality`` (1..95) and decode again: blocking and ringing artefacts."""
    if not 1 <= quality <= 100:
        raise ValueError("quality must be in 1..100")
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def crop_fraction(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Keep the part inside ``box`` = (left, top, right, bottom), as fractions of width/height."""
    left, top, right, bottom = box
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ValueError(f"box must satisfy 0 <= left < right <= 1, 0 <= top < bottom <= 1: {box}")
    img = _rgb(img)
    w, h = img.size
    x0, y0 = round(left * w), round(top * h)
    x1, y1 = max(x0 + 1, round(right * w)), max(y0 + 1, round(bottom * h))
    return img.crop((x0, y0, min(w, x1), min(h, y1)))


def mount_border(
    img: Image.Image,
    rng: np.random.Generator,
    width_frac: float,
    colour: str | Sequence[int] = "white",
    angle_deg: float = 0.0,
) -> Image.Image:
    """Lay the print, rotated by ``angle_deg``, on a mount or scanner bed of ``colour``.

    ``width_frac`` is the border width as a fraction of the print's long side; ``rng`` places the
    print off-centre inside the border (never over its edge) and a soft cast shadow is added.
    """
    if width_frac < 0:
        raise ValueError("width_frac must be >= 0")
    img = _rgb(img)
    fill = _colour(colour)
    w, h = img.size
    rotated = img.rotate(angle_deg, resample=_BILINEAR, expand=True, fillcolor=fill)
    mask = Image.new("L", img.size, 255).rotate(angle_deg, resample=_BILINEAR, expand=True)
    rw, rh = rotated.size
    border = round(width_frac * max(w, h))
    jitter = border // 2
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
    pos = (border + dx, border + dy)
    canvas = Image.new("RGB", (rw + 2 * border, rh + 2 * border), fill)
    if border >= 2:
        # the print lifts off the bed a little and casts a soft shadow down-right
        off = max(1, round(border * 0.15))
        shadow = Image.new("L", canvas.size, 0)
        shadow.paste(mask.point(lambda v: v * 45 // 100), (pos[0] + off, pos[1] + off))
        shadow = shadow.filter(ImageFilter.BoxBlur(off))
        canvas = Image.composite(Image.new("RGB", canvas.size, (0, 0, 0)), canvas, shadow)
    canvas.paste(rotated, pos, mask)
    return canvas


def rephotograph(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Copy-stand reproduction: slight keystone/perspective, soft focus and uneven lighting.

    ``strength`` in 0..1 scales all three; ``rng`` draws the corner shifts and the light layout.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be in 0..1")
    img = _rgb(img)
    w, h = img.size
    # the output frame shows a quadrilateral slightly inside the print: no fill at the edges
    m = 0.07 * strength
    d = rng.uniform(0.0, m, size=(4, 2)) * np.array([w, h])
    src = [(d[0, 0], d[0, 1]), (w - d[1, 0], d[1, 1]), (w - d[2, 0], h - d[2, 1]),
           (d[3, 0], h - d[3, 1])]  # fmt: skip
    coeffs = _perspective_coeffs([(0, 0), (w, 0), (w, h), (0, h)], src)
    img = img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, _BILINEAR)
    blur = 0.8 * strength * _scale(img)
    if blur >= 0.3:
        img = img.filter(ImageFilter.BoxBlur(blur))
    # lamps off-axis: a displaced vignette times a linear gradient. Smooth, so it is computed on
    # a small grid and upsampled; normalised to darken only, so the brightest spot keeps its level.
    gw, gh = max(2, min(w, 64)), max(2, min(h, 64))
    x = np.linspace(-1.0, 1.0, gw, dtype=np.float32)[None, :]
    y = np.linspace(-1.0, 1.0, gh, dtype=np.float32)[:, None]
    cx, cy = rng.uniform(-0.5, 0.5, size=2)
    direction = rng.normal(size=2)
    gx, gy = 0.22 * strength * direction / (np.linalg.norm(direction) + 1e-9)
    vignette = 1.0 - 0.35 * strength * ((x - cx) ** 2 + (y - cy) ** 2) / 2.0
    field = vignette * (1.0 + gx * x + gy * y)
    field = np.clip(field / field.max(), 0.0, 1.0)
    light = Image.fromarray(np.rint(255.0 * field).astype(np.uint8)).resize((w, h), _BILINEAR)
    return ImageChops.multiply(img, Image.merge("RGB", (light, light, light)))


def mirror(img: Image.Image) -> Image.Image:
    """Flip left-right, as when a negative is printed from the wrong side."""
    return ImageOps.mirror(_rgb(img))


# --------------------------------------------------------------------------------- chemistry


def tone(img: Image.Image, kind: ToneKind, strength: float = 1.0) -> Image.Image:
    """Chemical toning: map luminance onto the ``kind`` colour ramp, blend by ``strength`` (0..1).

    Kinds: ``sepia``, ``cyan`` (cyanotype), ``selenium``, ``grey`` (neutral, removes colour).
    """
    if kind not in TONES:
        raise ValueError(f"unknown tone {kind!r}; use one of {sorted(TONES)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be in 0..1")
    img = _rgb(img)
    dark, light = TONES[kind]
    lum = img.convert("L")
    x = np.arange(256, dtype=np.float64) / 255.0
    bands = [lum.point(_lut(dark[c] + (light[c] - dark[c]) * x)) for c in range(3)]
    toned = Image.merge("RGB", bands)
    return toned if strength >= 1.0 else Image.blend(img, toned, float(strength))


def fade(img: Image.Image, amount: float) -> Image.Image:
    """Age the print: lower contrast, lifted blacks, yellowed highlights, washed-out colour.

    ``amount`` in 0..1; 0 leaves the image unchanged.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError("amount must be in 0..1")
    img = _rgb(img)
    if amount > 0:
        # dyes fade before the silver: desaturate first
        img = Image.blend(img, img.convert("L").convert("RGB"), 0.6 * amount)
    lo, hi = 255.0 * 0.32 * amount, 255.0 * (1.0 - 0.06 * amount)
    tint = (1.0, 1.0 - 0.05 * amount, 1.0 - 0.2 * amount)  # paper base yellows: blue drops most
    x = np.arange(256, dtype=np.float64) / 255.0
    lut: list[int] = []
    for c in range(3):
        lut += _lut((lo + (hi - lo) * x) * tint[c])
    return img.point(lut)


def halftone(
    img: Image.Image, cell: float, angle_deg: float = 45.0, ink: int = 24, paper: int = 240
) -> Image.Image:
    """Newspaper reprint: greyscale dot screen with a period of ``cell`` pixels at ``angle_deg``.

    Output pixels are either ``ink`` or ``paper`` grey.
    """
    if cell < 2:
        raise ValueError("cell must be >= 2 pixels")
    lum = _rgb(img).convert("L").filter(ImageFilter.BoxBlur(cell / 2.0))
    g = np.asarray(lum, dtype=np.float32) / 255.0
    h, w = g.shape
    theta = math.radians(angle_deg)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    u = (x * math.cos(theta) + y * math.sin(theta)) * (2.0 * math.pi / cell)
    v = (-x * math.sin(theta) + y * math.cos(theta)) * (2.0 * math.pi / cell)
    # a smooth threshold screen: dark areas grow dots that merge into a grid of holes
    screen = 0.5 + 0.25 * (np.cos(u) + np.cos(v))
    out = np.where(g > screen, np.uint8(paper), np.uint8(ink)).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


# --------------------------------------------------------------------------------- damage


def scratches(img: Image.Image, rng: np.random.Generator, n: int) -> Image.Image:
    """Draw ``n`` thin scratches: long near-vertical ones (negative), random short ones (print)."""
    img = _rgb(img)
    w, h = img.size
    s = _scale(img)
    light, dark = Image.new("L", img.size, 0), Image.new("L", img.size, 0)
    dl, dd = ImageDraw.Draw(light), ImageDraw.Draw(dark)
    for _ in range(int(n)):
        if rng.random() < 0.5:  # film scratch: runs along the strip
            length = rng.uniform(0.25, 1.0) * h
            x0, y0 = rng.uniform(0, w), rng.uniform(-0.1 * h, h - 0.5 * length)
            angle = math.pi / 2 + rng.normal(0, 0.04)
        else:
            length = rng.uniform(0.05, 0.4) * max(w, h)
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            angle = rng.uniform(0, 2 * math.pi)
        k = 6
        t = np.linspace(0.0, length, k)
        wobble = np.cumsum(rng.normal(0, 0.6 * s, k))
        xs = x0 + t * math.cos(angle) - wobble * math.sin(angle)
        ys = y0 + t * math.sin(angle) + wobble * math.cos(angle)
        width = max(1, round(rng.uniform(0.6, 2.0) * s))
        alpha = int(rng.integers(90, 231))
        draw = dl if rng.random() < 0.75 else dd
        pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
        draw.line(pts, fill=alpha, width=width, joint="curve")
    return _blend_marks(img, light, dark, (250, 248, 242), (22, 20, 18))


def dust(img: Image.Image, rng: np.random.Generator, n: int) -> Image.Image:
    """Scatter ``n`` specks of dust and a few hairs, light and dark."""
    img = _rgb(img)
    w, h = img.size
    s = _scale(img)
    light, dark = Image.new("L", img.size, 0), Image.new("L", img.size, 0)
    dl, dd = ImageDraw.Draw(light), ImageDraw.Draw(dark)
    for _ in range(int(n)):
        draw = dl if rng.random() < 0.6 else dd
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        alpha = int(rng.integers(120, 256))
        if rng.random() < 0.08:  # a hair or fibre
            k = 5
            length = rng.uniform(6, 30) * s
            ang = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.5, k))
            step = length / k
            xs = x + np.cumsum(step * np.cos(ang))
            ys = y + np.cumsum(step * np.sin(ang))
            pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
            draw.line(pts, fill=alpha, width=max(1, round(s)))
        else:
            r = s * min(4.0, rng.lognormal(-0.3, 0.5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=alpha)
    return _blend_marks(img, light, dark, (246, 244, 238), (28, 26, 24))


def foxing(img: Image.Image, rng: np.random.Generator, n: int) -> Image.Image:
    """Add ``n`` foxing spots: soft reddish-brown stains with darker cores and small satellites."""
    img = _rgb(img)
    w, h = img.size
    s = _scale(img)
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(n)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = max(1.5, s * min(14.0, rng.lognormal(1.1, 0.5)))  # below ~1.5 px a spot is invisible
        squash = rng.uniform(0.7, 1.0)
        draw.ellipse((x - r, y - r * squash, x + r, y + r), fill=int(rng.integers(60, 150)))
        core = 0.4 * r  # the darker centre of the stain
        draw.ellipse((x - core, y - core, x + core, y + core), fill=int(rng.integers(150, 220)))
        for _ in range(int(rng.integers(0, 4))):
            sx, sy = x + rng.normal(0, 1.5 * r), y + rng.normal(0, 1.5 * r)
            sr = r * rng.uniform(0.1, 0.3)
            draw.ellipse((sx - sr, sy - sr, sx + sr, sy + sr), fill=int(rng.integers(80, 180)))
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.8, 1.5 * s)))
    stained = ImageChops.multiply(img, Image.new("RGB", img.size, (150, 96, 52)))
    return Image.composite(stained, img, mask)


# --------------------------------------------------------------------------------- marks


def stamp(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Press an institution's ink stamp (round or rectangular, with text) somewhere on the print."""
    img = _rgb(img)
    w, h = img.size
    short = min(w, h)
    ink = STAMP_INKS[int(rng.integers(len(STAMP_INKS)))]
    word = _STAMP_WORDS[int(rng.integers(len(_STAMP_WORDS)))]
    number = f"No {int(rng.integers(1, 10000))}"
    d = max(24, round(short * rng.uniform(0.18, 0.28)))
    line = max(2, d // 28)
    if rng.random() < 0.5:
        size = (d, d)
        layer = Image.new("L", size, 0)
        draw = ImageDraw.Draw(layer)
        draw.ellipse((0, 0, d - 1, d - 1), outline=255, width=line)
        inset = round(d * 0.1)
        inner = (inset, inset, d - 1 - inset, d - 1 - inset)
        draw.ellipse(inner, outline=255, width=max(1, line // 2))
        text_w = d * 0.62
    else:
        size = (round(d * 1.6), round(d * 0.75))
        layer = Image.new("L", size, 0)
        draw = ImageDraw.Draw(layer)
        draw.rectangle((0, 0, size[0] - 1, size[1] - 1), outline=255, width=line)
        text_w = size[0] * 0.8
    font_px = max(6, int(min(size[1] * 0.22, d * 0.2)))
    width_at = _font(font_px).getlength(word)
    font_px = max(6, int(font_px * min(1.0, text_w / max(1.0, width_at))))
    font = _font(font_px)
    cx, cy = size[0] / 2, size[1] / 2
    draw.text((cx, cy - size[1] * 0.08), word, fill=255, font=font, anchor="ms")
    small = _font(max(6, round(font_px * 0.8)))
    draw.text((cx, cy + size[1] * 0.08), number, fill=255, font=small, anchor="mt")
    # uneven inking: the pad leaves patchy, partly transparent strokes
    patch = rng.uniform(0.45, 1.0, size=(size[1], size[0])).astype(np.float32)
    alpha = np.asarray(layer, dtype=np.float32) * patch * rng.uniform(0.65, 0.9)
    layer = Image.fromarray(np.clip(alpha, 0, 255).astype(np.uint8))
    layer = layer.rotate(float(rng.uniform(-25, 25)), resample=_BICUBIC, expand=True)
    lw, lh = layer.size
    # anywhere, even hanging a little over the edge as a hurried stamp does
    x = int(rng.integers(-lw // 4, max(1, w - 3 * lw // 4)))
    y = int(rng.integers(-lh // 4, max(1, h - 3 * lh // 4)))
    pos = (x, y)
    return _apply_ink(img, layer, pos, ink)


def handwriting(img: Image.Image, rng: np.random.Generator, text: str | None = None) -> Image.Image:
    """Write a catalogue number (e.g. ``Inv. 1234``) in pencil or ink near a corner of the print."""
    img = _rgb(img)
    w, h = img.size
    if text is None:
        n = int(rng.integers(1, 100000))
        style = int(rng.integers(4))
        year = int(rng.integers(1, 100))
        neg = f"Neg. {chr(65 + n % 26)}{n % 1000}"
        styles = (f"Inv. {n}", f"No {n}", f"{n % 10000}/{year:02d}", neg)
        text = styles[style]
    ink = WRITING_INKS[int(rng.integers(len(WRITING_INKS)))]
    font_px = max(8, round(min(w, h) * rng.uniform(0.045, 0.075)))
    font = _font(font_px)
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    pad = font_px // 2
    size = (right - left + 2 * pad, bottom - top + 2 * pad)
    layer = Image.new("L", size, 0)
    draw = ImageDraw.Draw(layer)
    draw.text((pad - left, pad - top), text, fill=255, font=font)
    if rng.random() < 0.5:  # a quick underline
        xs = np.linspace(pad, size[0] - pad, 5)
        ys = size[1] - pad * 0.6 + rng.normal(0, 0.8, 5)
        pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
        draw.line(pts, fill=255, width=max(1, font_px // 14))
    # forward slant of handwriting, then a slightly crooked baseline
    shear = float(rng.uniform(0.15, 0.35))
    slanted = (size[0] + round(shear * size[1]), size[1])
    layer = layer.transform(
        slanted, Image.Transform.AFFINE, (1, shear, -shear * size[1], 0, 1, 0), _BICUBIC
    )
    layer = layer.rotate(float(rng.uniform(-6, 6)), resample=_BICUBIC, expand=True)
    layer = layer.point(_lut(np.arange(256) * rng.uniform(0.7, 0.95)))
    lw, lh = layer.size
    margin = round(0.03 * min(w, h))
    right_side, bottom_side = rng.random() < 0.6, rng.random() < 0.7
    x = w - lw - margin if right_side else margin
    y = h - lh - margin if bottom_side else margin
    pos = (x + int(rng.integers(-margin, margin + 1)), y + int(rng.integers(-margin, margin + 1)))
    return _apply_ink(img, layer, pos, ink)
