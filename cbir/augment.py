"""Two-view augmentations for SimCLR training: the generic recipe and an archive-informed one.

``make_augmenter(strategy, resolution)`` returns a callable ``aug(img, rng) -> view``: one random
view of a picture, 8-bit RGB, exactly ``resolution x resolution``. Every random choice is drawn from
the ``numpy.random.Generator`` passed in (never from torch's or Python's global RNG), so the same
image and the same generator state always give the same view, whichever worker process runs it.

* ``simclr``: the recipe of Chen et al. (2020): random resized crop, flip, colour jitter, greyscale,
  Gaussian blur. Generic photographic invariances; crops can be tiny patches.
* ``heritage``: what actually happens to a photograph in an archive, composed in physical order from
  the primitives in ``cbir.degrade`` (this module only chooses *whether* and *how much*): the print
  is trimmed and possibly printed mirrored or reprinted as halftone, it is toned and fades, picks up
  foxing, scratches and dust, is mounted (slightly crooked), stamped and numbered, rephotographed or
  scanned at another resolution/exposure and saved as JPEG. Crops keep most of the picture, because
  composition and figures are what identify a photograph.

Both squash the final picture to a square, as retrieval does (``cbir.model.to_tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from . import degrade
from .imaging import to_rgb

#: The augmentation strategies: the one spelling of their names (train.augmentation's type in
#: cbir.config, the choices of `cbir augment-preview --strategy`).
Strategy = Literal["simclr", "heritage"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

_BILINEAR = Image.Resampling.BILINEAR
_REDUCING_GAP = 2.0  # the same fast, antialiased downscale retrieval uses for its square input


class Augmenter(Protocol):
    """Makes one random view of a picture; all randomness comes from ``rng``."""

    resolution: int

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image: ...


def _squash(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize the whole picture to ``size`` ignoring its aspect ratio, like retrieval's input."""
    wh = (size, size) if isinstance(size, int) else size
    if img.size == wh:
        return img
    return img.resize(wh, _BILINEAR, reducing_gap=_REDUCING_GAP)


def _chance(rng: np.random.Generator, p: float) -> bool:
    # always draw, so a probability of 0 or 1 does not shift the rest of the random stream
    return bool(rng.random() < p)


# ============================================================================= simclr


class SimCLRAugmenter:
    """SimCLR's augmentation (Chen et al. 2020, appendix A), with numpy sampling and PIL ops.

    Matches torchvision's ``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))``,
    ``RandomHorizontalFlip()``, ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``,
    ``RandomGrayscale(0.2)`` and ``RandomApply([GaussianBlur(~10% kernel, (0.1, 2.0))], p=0.5)``;
    ``strength`` scales the jitter magnitudes and the blur sigma (1.0 = the paper).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __init__(self, resolution: int, strength: float = 1.0) -> None:
        self.resolution = int(resolution)
        self.strength = float(strength)
        s = self.strength
        self.jitter = (0.4 * s, 0.4 * s, 0.4 * s, min(0.5, 0.1 * s))  # b, c, s, hue
        self.sigma = (0.1, max(0.1, 2.0 * s))

    def __repr__(self) -> str:
        return f"SimCLRAugmenter(resolution={self.resolution}, strength={self.strength})"

    def _crop_box(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop."""
        area = w * h
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x = int(rng.integers(0, w - cw + 1))
                y = int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
        in_ratio = w / h  # fallback: the largest centre crop with an allowed aspect ratio
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            cw, ch = round(h * self.ratio[1]), h
        else:
            cw, ch = w, h
        x, y = (w - cw) // 2, (h - ch) // 2
        return x, y, x + cw, y + ch

    def _colour_jitter(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Brightness, contrast, saturation and hue, each by a random factor, in random order."""
        b, c, s, hue = self.jitter
        factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c),
                   rng.uniform(1 - s, 1 + s), rng.uniform(-hue, hue))  # fmt: skip
        for k in rng.permutation(4).tolist():
            f = float(factors[k])
            if k == 0:
                img = ImageEnhance.Brightness(img).enhance(f)
            elif k == 1:
                img = ImageEnhance.Contrast(img).enhance(f)  # blends with the mean grey
            elif k == 2:
                img = ImageEnhance.Color(img).enhance(f)
            else:
                img = _shift_hue(img, f)
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        res = self.resolution
        box = self._crop_box(*img.size, rng)
        # crop and resize in one resampling pass, straight from the full-size input
        out = img.resize((res, res), _BILINEAR, box=box, reducing_gap=_REDUCING_GAP)
        if _chance(rng, 0.5):
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if _chance(rng, 0.8):
            out = self._colour_jitter(out, rng)
        if _chance(rng, 0.2):
            out = out.convert("L").convert("RGB")
        if _chance(rng, 0.5):
            # PIL blurs with the given standard deviation and no kernel size of its own; the paper's
            # kernel of ~10% of the image (23 px at 224) holds > 99.9% of a sigma <= 2 Gaussian,
            # so the two agree in effect
            out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(*self.sigma))))
        return out


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns (-0.5..0.5), like torchvision's PIL ``adjust_hue``."""
    h, s, v = img.convert("HSV").split()
    k = round(shift * 255)  # torchvision's 8-bit hue step; the hue circle wraps at 256
    h = h.point([(i + k) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


# ============================================================================= heritage

_TONE_KINDS: tuple[degrade.ToneKind, ...] = ("sepia", "grey", "selenium", "cyan")
_TONE_P = (0.5, 0.25, 0.15, 0.1)  # sulphide sepia was by far the commonest toning
_MOUNT_COLOURS = ("white", "cream", "grey", "black")
_MOUNT_P = (0.35, 0.3, 0.15, 0.2)


class HeritageAugmenter:
    """Archive-informed views of a historical photograph, built from ``cbir.degrade``.

    Works at a reduced working size (short side ``work_scale x resolution``), applies each archival
    process with a probability and parameters drawn from a range, in physical order, and squashes
    the result to ``resolution x resolution``. ``strength`` multiplies every probability and every
    magnitude (0 leaves only the resize, 1 is the default mix, > 1 is harsher).
    """

    work_scale = 1.25  # room for a partial crop before the final resize needs to upsample
    max_aspect = 2.5  # panoramas: cap the long side so they cost no more than a 2.5:1 print

    # probability of each process per view at strength 1
    p_crop, p_mirror, p_halftone = 0.7, 0.25, 0.05
    p_tone, p_fade = 0.45, 0.3
    p_foxing, p_scratches, p_dust = 0.15, 0.2, 0.25
    p_mount, p_stamp, p_handwriting = 0.35, 0.1, 0.15
    p_rephoto, p_rescan, p_jpeg = 0.15, 0.6, 0.5
    min_crop_area = 0.45  # at strength 1: a trimmed print, never a detail; composition identifies

    def __init__(self, resolution: int, strength: float = 1.0) -> None:
        self.resolution = int(resolution)
        self.strength = float(strength)

    def __repr__(self) -> str:
        return f"HeritageAugmenter(resolution={self.resolution}, strength={self.strength})"

    def _p(self, p: float) -> float:
        return min(1.0, p * self.strength)

    def _working_size(self, w: int, h: int) -> tuple[int, int]:
        """Aspect-preserving size with short side ``work_scale * resolution`` (long side capped)."""
        short = self.work_scale * self.resolution
        k = short / min(w, h)
        k = min(k, self.max_aspect * short / max(w, h))
        return max(8, round(w * k)), max(8, round(h * k))

    # ---- one process each: what it models, and the parameter range it is drawn from

    def _crop(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A trimmed print or a copy of part of it: keeps >= ``min_crop_area`` of the picture."""
        lo = max(0.1, 1.0 - (1.0 - self.min_crop_area) * self.strength)
        area = rng.uniform(lo, 1.0)
        aspect = math.exp(rng.uniform(-0.2, 0.2))  # trimming may change the print's proportions
        fw = min(1.0, math.sqrt(area * aspect))
        fh = min(1.0, area / fw)
        left, top = rng.uniform(0.0, 1.0 - fw), rng.uniform(0.0, 1.0 - fh)
        return degrade.crop_fraction(img, (left, top, left + fw, top + fh))

    def _halftone(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A newspaper or book reprint: a dot screen a few pixels wide at a standard angle."""
        cell = max(2.0, rng.uniform(2.0, 3.5) * max(img.size) / 256)
        return degrade.halftone(img, cell, float(rng.choice([15.0, 45.0, 75.0])))

    def _tone(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Chemical toning of the print (sepia, neutral grey, selenium, cyanotype)."""
        kind = _TONE_KINDS[int(rng.choice(len(_TONE_KINDS), p=_TONE_P))]
        return degrade.tone(img, kind, min(1.0, rng.uniform(0.4, 1.0) * self.strength))

    def _fade(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Age: lost contrast, lifted blacks, yellowed paper."""
        return degrade.fade(img, min(1.0, rng.uniform(0.1, 0.55) * self.strength))

    def _n(self, rng: np.random.Generator, lo: int, hi: int) -> int:
        """A count of marks in lo..hi, scaled by strength."""
        return max(1, round(int(rng.integers(lo, hi + 1)) * self.strength))

    def _mount(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Mount board or scanner lid around the print, laid slightly crooked on the flatbed.

        Border width 0 still shows the lid in the corners of a rotated print.
        """
        colour = _MOUNT_COLOURS[int(rng.choice(len(_MOUNT_COLOURS), p=_MOUNT_P))]
        width = rng.uniform(0.0, 0.1) * self.strength
        angle = float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0)) * self.strength
        return degrade.mount_border(img, rng, width, colour, angle)

    def _rephoto(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Copy-stand reproduction: slight perspective, soft focus, uneven lamps."""
        return degrade.rephotograph(img, rng, min(1.0, rng.uniform(0.2, 0.8) * self.strength))

    def _rescan(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Another scan: lower resolution (detail lost before the final resize), exposure, gamma."""
        s = self.strength
        scale = max(0.2, rng.uniform(1.0 - 0.5 * s, 1.0))  # only down: up-sampling adds nothing
        exposure = max(0.3, rng.uniform(1.0 - 0.2 * s, 1.0 + 0.2 * s))
        gamma = math.exp(rng.uniform(-0.3, 0.3) * s)
        return degrade.rescan(img, scale, exposure, gamma)

    def _jpeg(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Saved (again) as JPEG for the web or a catalogue: quality 25..95 at strength 1."""
        lo = max(5, round(95 - 70 * self.strength))
        return degrade.jpeg_recompress(img, int(rng.integers(min(lo, 95), 96)))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        img = _squash(img, self._working_size(*img.size))  # every process below costs per pixel
        # the print: trimmed, printed from the wrong side, or reprinted in a publication
        if _chance(rng, self._p(self.p_crop)):
            img = self._crop(img, rng)
        if _chance(rng, self._p(self.p_mirror)):
            img = degrade.mirror(img)
        if _chance(rng, self._p(self.p_halftone)):
            img = self._halftone(img, rng)
        # chemistry and age
        if _chance(rng, self._p(self.p_tone)):
            img = self._tone(img, rng)
        if _chance(rng, self._p(self.p_fade)):
            img = self._fade(img, rng)
        # damage to the print
        if _chance(rng, self._p(self.p_foxing)):
            img = degrade.foxing(img, rng, self._n(rng, 3, 25))
        if _chance(rng, self._p(self.p_scratches)):
            img = degrade.scratches(img, rng, self._n(rng, 1, 10))
        if _chance(rng, self._p(self.p_dust)):
            img = degrade.dust(img, rng, self._n(rng, 10, 150))
        # handling in the collection: mounted, then stamped and numbered (on print or mount)
        if _chance(rng, self._p(self.p_mount)):
            img = self._mount(img, rng)
        if _chance(rng, self._p(self.p_stamp)):
            img = degrade.stamp(img, rng)
        if _chance(rng, self._p(self.p_handwriting)):
            img = degrade.handwriting(img, rng)
        # capture and encoding of the digital copy
        if _chance(rng, self._p(self.p_rephoto)):
            img = self._rephoto(img, rng)
        if _chance(rng, self._p(self.p_rescan)):
            img = self._rescan(img, rng)
        if _chance(rng, self._p(self.p_jpeg)):
            img = self._jpeg(img, rng)
        return _squash(img, self.resolution)


# ============================================================================= factory, preview


def make_augmenter(strategy: str, resolution: int, *, strength: float = 1.0) -> Augmenter:
    """The augmenter for ``strategy`` ("simclr" or "heritage") producing ``resolution``² views."""
    if int(resolution) < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strategy == "simclr":
        return SimCLRAugmenter(resolution, strength)
    if strategy == "heritage":
        return HeritageAugmenter(resolution, strength)
    raise ValueError(f"unknown augmentation strategy {strategy!r}; use one of {list(STRATEGIES)}")


PREVIEW_PAD = 4  # pixels between cells and around the grid
PREVIEW_LABEL_H = 18  # height of the caption strip above each row


def preview_grid(
    img: Image.Image,
    strategies: Sequence[str] = STRATEGIES,
    n: int = 8,
    resolution: int = 160,
    seed: int = 0,
) -> Image.Image:
    """Original plus ``n`` views per strategy, one captioned row per strategy, for inspection.

    Each row uses its own generator seeded with ``seed``, so a row does not depend on which other
    strategies are shown. Size: ``(pad + (n + 1) * (resolution + pad))`` wide,
    ``pad + rows * (label + resolution + pad)`` high.
    """
    pad, label_h, res = PREVIEW_PAD, PREVIEW_LABEL_H, int(resolution)
    rows = list(strategies)
    width = pad + (n + 1) * (res + pad)
    height = pad + len(rows) * (label_h + res + pad)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    original = _squash(to_rgb(img), res)  # as retrieval sees it
    for r, name in enumerate(rows):
        aug = make_augmenter(name, res)
        rng = np.random.default_rng(seed)
        y = pad + r * (label_h + res + pad)
        draw.text(
            (pad, y + 2),
            f"{name}  (original, then {n} views, seed {seed})",
            fill=(0, 0, 0),
            font=font,
        )
        y += label_h
        grid.paste(original, (pad, y))
        for i in range(n):
            grid.paste(aug(img, rng), (pad + (i + 1) * (res + pad), y))
    return grid
