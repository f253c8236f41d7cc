"""A deterministic synthetic demo collection: procedural old photographs and archival copies.

``generate_demo_collection`` paints originals (street scenes, landscapes, harbours, studio
portraits, group photos, interiors; mostly greyscale or toned, some faded colour), writes each
original with 1..max_copies-1 near-duplicates made the way archives make them (rescans, crops,
mounts, toning, fading, damage, recompression; composed from ``cbir.degrade``), plus distractor
originals without copies, and a ``ground_truth.csv`` mapping every file to its group.

Layout under ``out_dir``::

    scans/box-01/scan-000123.jpg   (also .png and .tif; shuffled numbers hide the groups)
    ground_truth.csv               path,group  (path relative to out_dir)
    demo_manifest.json             parameters and file sizes; lets a rerun skip the work

Same arguments give byte-identical files: every original has its own seed derived from ``seed``
with ``numpy.random.SeedSequence``, encoders get fixed settings and no metadata, and the worker
pool only changes which process paints an image, never what it paints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .. import degrade
from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_json
from ..parallel import start_method
from ..progress import bar

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]
Points = list[tuple[float, float]]

MANIFEST = "demo_manifest.json"
GROUND_TRUTH = "ground_truth.csv"
SCANS = "scans"
_MANIFEST_VERSION = 1  # bump when the painting or the copy recipes change
_SCAN_RE = re.compile(r"scan-\d{6}\.(jpg|png|tif)")
_BOX_RE = re.compile(r"box-\d{2}")
_FORMATS = {"jpg": "JPEG", "png": "PNG", "tif": "TIFF"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "JPEG": {"quality": 90},
    "PNG": {"compress_level": 6},
    "TIFF": {"compression": "tiff_lzw"},
}


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate_demo_collection`` wrote."""

    n_images: int
    n_groups: int
    n_distractors: int
    ground_truth: Path
    scans_dir: Path


@dataclass(frozen=True)
class _Job:
    """One original and its copies: painted and written by one worker."""

    seed: np.random.SeedSequence
    group: str
    paths: tuple[str, ...]  # [0] is the original, the rest are copies; relative to out_dir


# ====================================================================================== painting

_PLACES = (
    "Main Street", "Harbour", "Market Square", "Station Road", "Mill Lane", "Church Hill",
    "The Quay", "Bridge Street", "High Street", "Old Town", "Fish Market", "Town Hall",
    "Lake Shore", "Riverside", "North Pier", "Castle Gate", "Rue de la Gare", "Grand Place",
    "Marktplatz", "Hauptstrasse", "Via Roma", "Kirchgasse", "Seestrasse", "Harbour Road",
    "West End", "Upper Mill",
)  # fmt: skip
_SIGNS = (
    "HOTEL", "BAKERY", "POST", "CAFE", "BANK", "SCHOOL", "STATION", "MARKET", "GARAGE",
    "APOTHEKE", "TABAC", "BRASSERIE", "GROCER", "PHARMACY", "THEATRE", "CINEMA", "DRAPER",
    "SADDLER", "BUTCHER", "INN", "GASTHAUS", "BOULANGERIE", "TAILOR", "HARDWARE", "BARBER",
    "CHEMIST", "DAIRY", "SMITHY",
)  # fmt: skip
_STUDIOS = (
    "Atelier Weber", "Studio Lumiere", "J. Brown & Sons", "Foto Keller", "Atelier Martin",
    "Photo Moderne", "A. Schmidt", "Royal Studio", "Gebr. Hofmann", "E. Larsen", "Studio Rossi",
)  # fmt: skip
_EVENTS = (
    "Class of", "Fire Brigade", "Football Club", "Choir", "Harvest", "Wedding", "Regatta",
    "Parade", "Brass Band", "Staff outing", "Rowing Club", "Cyclists", "Workers", "Dairy Co-op",
)  # fmt: skip
_ROOM_THINGS = ("window", "pictures", "shelf", "table", "people", "door", "lamp", "poster")

# mild hues added to a grey level: colour photos look plausible, greyscale ones keep contrast
_HUES: dict[str, tuple[float, float, float]] = {
    "sky": (-22, -4, 26), "foliage": (-14, 10, -22), "grass": (-8, 12, -24),
    "brick": (34, -6, -26), "wood": (24, 6, -24), "stone": (6, 3, -6), "earth": (16, 6, -18),
    "water": (-18, 0, 14), "cloth": (0, 0, 0), "skin": (30, 6, -20),
}  # fmt: skip


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


class _Painter:
    """Paints one procedural photograph; every choice comes from ``rng``."""

    def __init__(self, rng: np.random.Generator, w: int, h: int) -> None:
        self.rng, self.w, self.h = rng, w, h
        self.s = max(w, h) / 512.0  # sizes below are given for a 512 px long side
        self.img = Image.new("RGB", (w, h), (128, 128, 128))
        self.draw = ImageDraw.Draw(self.img)

    # ---- random helpers
    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def i(self, a: int, b: int) -> int:
        """Integer in a..b inclusive."""
        return int(self.rng.integers(a, b + 1))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def col(self, lo: float, hi: float, hue: str = "stone") -> RGB:
        """A colour of grey level lo..hi tinted by a jittered ``hue``."""
        v = self.u(lo, hi)
        dh = np.asarray(_HUES[hue]) * self.u(0.5, 1.3) + self.rng.normal(0, 5, 3)
        r, g, b = (int(c) for c in np.clip(v + dh, 0, 255))
        return (r, g, b)

    def lw(self, px: float) -> int:
        return max(1, round(px * self.s))

    # ---- drawing shorthands
    def rect(self, box: Box, fill: RGB, outline: RGB | None = None, width: int = 0) -> None:
        self.draw.rectangle(box, fill=fill, outline=outline, width=width)

    def oval(self, box: Box, fill: RGB) -> None:
        self.draw.ellipse(box, fill=fill)

    def poly(self, pts: Points, fill: RGB) -> None:
        self.draw.polygon(pts, fill=fill)

    def line(self, pts: Points, fill: RGB, width: int = 1) -> None:
        self.draw.line(pts, fill=fill, width=width, joint="curve" if len(pts) > 2 else None)

    # ---- backgrounds
    def gradient(self, box: tuple[int, int, int, int], top: RGB, bottom: RGB) -> None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return
        t = np.linspace(0.0, 1.0, y1 - y0, dtype=np.float32)[:, None, None]
        arr = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
        arr = np.broadcast_to(arr, (y1 - y0, x1 - x0, 3))
        self.img.paste(Image.fromarray(np.rint(arr).astype(np.uint8)), (x0, y0))

    def blotches(self, box: tuple[int, int, int, int], grid: tuple[int, int]) -> np.ndarray:
        """Smooth noise in 0..1 over ``box``: bicubic upsampling of a coarse random grid."""
        x0, y0, x1, y1 = box
        coarse = Image.fromarray((self.rng.random(grid) * 255).astype(np.uint8))
        smooth = coarse.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)
        return np.asarray(smooth, np.float32) / 255.0

    def sky(self, y_h: int) -> None:
        top, bottom = self.col(110, 215, "sky"), self.col(185, 248, "sky")
        self.gradient((0, 0, self.w, y_h + 2), top, bottom)
        if y_h > 4 and self.chance(0.65):  # clouds: thresholded low-frequency noise
            n = self.blotches((0, 0, self.w, y_h), (self.i(3, 6), self.i(5, 12)))
            cloud = np.clip((n - self.u(0.4, 0.65)) * 3.0, 0.0, 1.0)[..., None]
            region = np.asarray(self.img.crop((0, 0, self.w, y_h)), np.float32)
            region += cloud * (250.0 - region) * self.u(0.4, 0.85)
            self.img.paste(Image.fromarray(np.clip(region, 0, 255).astype(np.uint8)), (0, 0))

    def hills(self, y_h: int, layers: int) -> None:
        xs = np.linspace(-0.02 * self.w, 1.02 * self.w, 48)
        for k in range(layers):
            amp = self.h * self.u(0.03, 0.16) * (layers - k) / layers
            ys = np.full_like(xs, y_h - amp * 0.6)
            for _ in range(3):
                ys -= amp * 0.35 * np.sin(xs / self.w * self.u(2, 9) + self.u(0, 6.3))
            lum = 200 - 120 * (k + 1) / (layers + 1) + self.u(-20, 20)  # haze: far hills paler
            pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
            fill = self.col(lum - 10, lum + 10, "foliage")
            self.poly(pts + [(self.w, y_h + 2), (0, y_h + 2)], fill)

    def ground(self, y_h: int, hue: str = "grass") -> None:
        self.gradient((0, y_h, self.w, self.h), self.col(110, 190, hue), self.col(50, 140, hue))
        if self.chance(0.45):  # ploughed furrows or field boundaries, in perspective
            c = self.col(40, 110, "earth")
            vp = self.u(-0.3, 1.3) * self.w
            for x in np.linspace(-self.w, 2 * self.w, self.i(10, 40)):
                self.line([(vp, y_h), (float(x), self.h)], c, self.lw(1))
        elif self.chance(0.5):
            c = self.col(50, 130, "earth")
            for t in np.linspace(0.05, 1.0, self.i(6, 18)) ** 2:
                y = y_h + t * (self.h - y_h)
                self.line([(0, y), (self.w, y)], c, self.lw(1 + 2 * t))

    def water(self, y0: int, y1: int) -> None:
        self.gradient((0, y0, self.w, y1), self.col(150, 220, "water"), self.col(60, 140, "water"))
        light, dark = self.col(190, 240, "water"), self.col(30, 90, "water")
        for _ in range(self.i(40, 140)):  # ripples, longer and thicker nearer the camera
            t = self.u(0, 1) ** 1.6
            y = y0 + t * (y1 - y0)
            x = self.u(-0.1, 1.0) * self.w
            length = self.w * self.u(0.02, 0.15) * (0.3 + t)
            c = light if self.chance(0.5) else dark
            self.line([(x, y), (x + length, y)], c, self.lw(0.6 + 2 * t))

    def bricks(self, box: Box, colour: RGB) -> None:
        x0, y0, x1, y1 = box
        bh = self.u(5, 10) * self.s
        bw = bh * self.u(2.0, 3.0)
        mortar = tuple(max(0, c - self.i(25, 60)) for c in colour)
        for r, y in enumerate(np.arange(y0 + bh, y1, bh)):
            self.line([(x0, y), (x1, y)], mortar)
            off = (r % 2) * bw / 2
            for x in np.arange(x0 + off, x1, bw):
                self.line([(x, y - bh), (x, y)], mortar)

    # ---- objects
    def text_box(self, box: Box, text: str, bg: RGB | None, fg: RGB) -> None:
        """``text`` centred in ``box``, shrunk to fit; on a board of colour ``bg`` unless None."""
        x0, y0, x1, y1 = box
        if bg is not None:
            self.rect(box, bg, fg, self.lw(1))
        size = int((y1 - y0) * 0.7)
        if size < 6:
            return
        font = _font(size)
        width = font.getlength(text)
        if width > (x1 - x0) * 0.9:
            size = int(size * (x1 - x0) * 0.9 / width)
            if size < 6:
                return
            font = _font(size)
        self.draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=fg, font=font, anchor="mm")

    def building(self, x0: float, y_base: float, bw: float, bh: float) -> None:
        hue = self.pick(("stone", "brick", "wood", "stone"))
        c = self.col(70, 215, hue)
        top = y_base - bh
        self.rect((x0, top, x0 + bw, y_base), c)
        if hue == "brick" and self.chance(0.6):
            self.bricks((x0, top, x0 + bw, y_base), c)
        roof = self.col(25, 110, "stone")
        if self.chance(0.45):
            peak = bh * self.u(0.15, 0.45)
            gable = [(x0 - bw * 0.04, top), (x0 + bw / 2, top - peak), (x0 + bw * 1.04, top)]
            self.poly(gable, roof)
        else:
            self.rect((x0 - bw * 0.02, top - self.lw(3), x0 + bw * 1.02, top), roof)
        floors = max(1, min(6, int(bh / (self.u(0.07, 0.12) * self.h))))
        cols = max(1, int(bw / (self.u(0.05, 0.09) * self.w)))
        fh, cw = bh / floors, bw / cols
        wcol = self.col(10, 70, "cloth") if self.chance(0.75) else self.col(170, 235, "sky")
        frame = self.col(150, 240, "stone")
        for f in range(max(1, floors - 1)):  # the ground floor keeps a door and maybe a shop
            for k in range(cols):
                wx, wy = x0 + k * cw + cw * 0.28, top + f * fh + fh * 0.25
                self.rect((wx, wy, wx + cw * 0.44, wy + fh * 0.5), wcol, frame, self.lw(1))
                if self.chance(0.5):
                    mid = wx + cw * 0.22
                    self.line([(mid, wy), (mid, wy + fh * 0.5)], frame, self.lw(1))
        door_w = min(bw * 0.25, fh * 0.45)
        dx = x0 + self.u(0.1, 0.9) * (bw - door_w)
        self.rect((dx, y_base - fh * 0.7, dx + door_w, y_base), self.col(15, 70, "wood"))
        if floors > 1 and bw > 0.12 * self.w and self.chance(0.55):  # shop sign
            sy = y_base - fh * self.u(0.95, 1.1)
            if self.chance(0.6):
                bg, fg = self.col(180, 240, "stone"), self.col(10, 50)
            else:
                bg, fg = self.col(10, 60), self.col(200, 250)
            sign = (x0 + bw * 0.08, sy, x0 + bw * 0.92, sy + fh * 0.28)
            self.text_box(sign, self.pick(_SIGNS), bg, fg)

    def facade(self, side: int, y_h: float, vp_x: float) -> None:
        """A street facade receding towards the vanishing point; side -1 = left, +1 = right."""
        near_x = 0.0 if side < 0 else float(self.w)
        far_x = near_x + (vp_x - near_x) * self.u(0.55, 0.85)
        yt = y_h - self.u(0.5, 1.3) * y_h
        yb = y_h + self.u(0.35, 0.9) * (self.h - y_h)
        f = (far_x - near_x) / (vp_x - near_x)
        quad = np.array(
            [[near_x, yt], [far_x, yt + (y_h - yt) * f], [far_x, yb + (y_h - yb) * f], [near_x, yb]]
        )
        hue = self.pick(("stone", "brick", "wood"))
        self.poly([(float(x), float(y)) for x, y in quad], self.col(60, 200, hue))

        def at(uu: float, vv: float) -> tuple[float, float]:
            top = quad[0] + (quad[1] - quad[0]) * uu
            bot = quad[3] + (quad[2] - quad[3]) * uu
            p = top + (bot - top) * vv
            return (float(p[0]), float(p[1]))

        cols, rows = self.i(4, 12), self.i(2, 5)
        wcol = self.col(10, 80, "cloth")
        for ci in range(cols):
            # foreshortening: columns crowd together in the distance
            u0, u1 = ((ci + 0.25) / cols) ** 1.5, ((ci + 0.75) / cols) ** 1.5
            for r in range(rows):
                v0 = 0.08 + r * 0.8 / rows
                v1 = v0 + 0.45 / rows
                self.poly([at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)], wcol)
        self.line([at(0, 0.02), at(1, 0.02)], self.col(20, 90), self.lw(3))

    def tree(self, x: float, y_base: float, height: float) -> None:
        dark = self.col(20, 100, "foliage")
        trunk = max(1.0, height * 0.06)
        kind = self.i(0, 2)
        if kind == 0:  # broadleaf: a cloud of ellipses on a trunk
            top = y_base - height * 0.55
            self.rect((x - trunk / 2, top, x + trunk / 2, y_base), self.col(15, 70, "wood"))
            for _ in range(self.i(4, 8)):
                cx, cy = x + self.u(-0.25, 0.25) * height, y_base - height * self.u(0.55, 0.85)
                r = height * self.u(0.15, 0.28)
                self.oval((cx - r, cy - r, cx + r, cy + r * 0.9), self.col(20, 110, "foliage"))
        elif kind == 1:  # poplar
            top = y_base - height * 0.2
            self.rect((x - trunk / 3, top, x + trunk / 3, y_base), self.col(15, 60, "wood"))
            r = height * 0.12
            self.oval((x - r, y_base - height, x + r, y_base - r), dark)
        else:  # conifer
            top = y_base - height * 0.15
            self.rect((x - trunk / 3, top, x + trunk / 3, y_base), self.col(15, 60, "wood"))
            for k in range(3):
                yb = y_base - height * (0.1 + 0.28 * k)
                half = height * (0.3 - 0.07 * k)
                self.poly([(x - half, yb), (x, yb - height * 0.45), (x + half, yb)], dark)

    def person(self, x: float, y_feet: float, height: float) -> None:
        """A standing figure: legs, jacket or coat/dress, arms in one of four poses, head, hat."""
        H = height
        if H < 4:
            return
        clothes, skin = self.col(15, 120, "cloth"), self.col(140, 215, "skin")
        legs = self.col(10, 70)
        limb = max(1, round(H * 0.07))
        head_r = H * 0.065
        hy = y_feet - H + head_r
        sh_y, hip_y = y_feet - H * 0.81, y_feet - H * 0.47
        sh, hip = H * 0.13, H * 0.10
        stride = self.u(-0.12, 0.12) * H
        self.line([(x - hip * 0.5, hip_y), (x - hip * 0.5 - stride, y_feet)], legs, limb)
        self.line([(x + hip * 0.5, hip_y), (x + hip * 0.5 + stride, y_feet)], legs, limb)
        long_coat = self.chance(0.5)
        hem = y_feet - H * self.u(0.08, 0.3) if long_coat else hip_y
        flare = self.u(1.3, 2.2) if long_coat else 1.0
        body = [(x - sh, sh_y), (x + sh, sh_y), (x + hip * flare, hem), (x - hip * flare, hem)]
        self.poly(body, clothes)
        for side in (-1, 1):  # arms: down, raised, akimbo or reaching forward
            pose = self.i(0, 3)
            sx = x + side * sh * 0.9
            if pose == 0:
                pts = [(sx, sh_y), (sx + side * H * 0.04, hip_y + H * 0.02)]
            elif pose == 1:
                pts = [(sx, sh_y), (sx + side * H * 0.1, sh_y - H * 0.12),
                       (sx + side * H * 0.12, sh_y - H * 0.3)]  # fmt: skip
            elif pose == 2:
                pts = [(sx, sh_y), (sx + side * H * 0.13, sh_y + H * 0.15), (x + side * hip, hip_y)]
            else:
                pts = [(sx, sh_y), (sx + side * H * 0.08, sh_y + H * 0.14),
                       (sx + side * H * 0.22, sh_y + H * 0.12)]  # fmt: skip
            self.line(pts, clothes, limb)
        self.oval((x - head_r, hy - head_r, x + head_r, hy + head_r), skin)
        if self.chance(0.55):  # hat: brim and crown
            hat = self.col(5, 80, "cloth")
            r = head_r
            self.rect((x - r * 1.6, hy - r * 0.75, x + r * 1.6, hy - r * 0.5), hat)
            crown = hy - r * (1.2 + self.u(0, 0.8))
            self.rect((x - r * 0.9, crown, x + r * 0.9, hy - r * 0.5), hat)

    def people(self, n: int, y_h: float, y_max: float, scale: float) -> None:
        """``n`` figures on the ground, sized by distance below the horizon, far ones first."""
        for y in sorted(self.u(y_h + 0.05 * (y_max - y_h), y_max) for _ in range(n)):
            self.person(self.u(0.03, 0.97) * self.w, y, (y - y_h) * scale * self.u(0.85, 1.15))

    def boat(self, x: float, y: float, length: float) -> None:
        hull = self.col(15, 90, "wood")
        n = length
        self.poly([(x - n / 2, y - n * 0.12), (x + n / 2, y - n * 0.15), (x + n * 0.38, y),
                   (x - n * 0.4, y)], hull)  # fmt: skip
        if self.chance(0.7):
            mast = n * self.u(0.6, 1.3)
            self.line([(x, y - n * 0.12), (x, y - mast)], hull, self.lw(1.2))
            sail = [(x + n * 0.03, y - mast * 0.95), (x + n * 0.03, y - n * 0.18),
                    (x + n * self.u(0.25, 0.45), y - n * 0.18)]  # fmt: skip
            self.poly(sail, self.col(170, 245, "stone"))

    def caption(self, text: str) -> None:
        """Write on the print's margin, as photographers and owners did."""
        band = max(10, round(self.h * self.u(0.05, 0.08)))
        y0 = self.h - band if self.chance(0.7) else 0
        dark = self.chance(0.5)
        bg = self.col(10, 40) if dark else self.col(220, 250, "stone")
        fg = self.col(220, 250) if dark else self.col(15, 50)
        self.rect((0, y0, self.w, y0 + band), bg)
        box = (self.w * 0.05, y0 + band * 0.1, self.w * 0.95, y0 + band * 0.95)
        self.text_box(box, text, None, fg)

    # ---- scenes
    def street(self) -> None:
        y_h = round(self.h * self.u(0.35, 0.55))
        vp_x = self.w * self.u(0.3, 0.7)
        self.sky(y_h)
        if self.chance(0.3):
            self.hills(y_h, 1)
        x = -self.u(0, 0.1) * self.w
        while x < self.w:  # the row of houses at the end of the street
            bw = self.w * self.u(0.08, 0.25)
            self.building(x, y_h + self.lw(2), bw, self.h * self.u(0.08, 0.3))
            x += bw + self.w * self.u(0, 0.05)
        self.ground(y_h, "stone")
        xl, xr = self.w * self.u(-0.2, 0.3), self.w * self.u(0.7, 1.2)
        road = [(vp_x - 2, y_h), (vp_x + 2, y_h), (xr, self.h), (xl, self.h)]
        self.poly(road, self.col(90, 200, "earth"))
        track = self.col(40, 110, "earth")
        for t in (0.35, 0.65):  # cart tracks
            self.line([(vp_x, y_h), (xl + t * (xr - xl), self.h)], track, self.lw(2))
        for side in (-1, 1):
            if self.chance(0.75):
                self.facade(side, y_h, vp_x)
        if self.chance(0.5):  # lamp posts along the kerb
            for t in np.linspace(0.15, 1.0, self.i(2, 5)):
                px, py = vp_x + (xl - vp_x) * t, y_h + (self.h - y_h) * t
                ph = (py - y_h) * 2.2
                self.line([(px, py), (px, py - ph)], self.col(10, 50), self.lw(3 * t))
                r = ph * 0.05
                self.oval((px - r, py - ph - r, px + r, py - ph + r), self.col(180, 240))
        self.people(self.i(1, 12), y_h, self.h, self.u(0.9, 1.6))

    def landscape(self) -> None:
        y_h = round(self.h * self.u(0.3, 0.65))
        self.sky(y_h)
        self.hills(y_h, self.i(1, 3))
        self.ground(y_h, self.pick(("grass", "earth")))
        if self.chance(0.5):  # a winding path, widening towards the camera
            xs = self.w * (self.u(0.2, 0.8) + np.cumsum(self.rng.normal(0, 0.05, 12)))
            ys = np.linspace(y_h, self.h, 12).tolist()
            half = np.linspace(0.005, 0.12, 12) * self.w
            left = list(zip((xs - half).tolist(), ys, strict=True))
            right = list(zip((xs + half).tolist(), ys, strict=True))
            self.poly(left + right[::-1], self.col(140, 215, "earth"))
        if self.chance(0.45):
            bw = self.w * self.u(0.06, 0.15)
            x, y = self.u(0.05, 0.8) * self.w, y_h + self.h * self.u(0.02, 0.08)
            self.building(x, y, bw, bw * self.u(0.5, 0.9))
        for y in sorted(self.u(y_h, self.h) for _ in range(self.i(1, 10))):
            self.tree(self.u(0, 1) * self.w, y, (y - y_h + 4) * self.u(1.5, 3.5))
        if self.chance(0.4):  # a fence in perspective
            y0, y1 = self.u(y_h, self.h), self.u(y_h, self.h)
            c = self.col(20, 80, "wood")
            for t in np.linspace(0, 1, self.i(6, 16)):
                y = y0 + (y1 - y0) * t
                self.line([(t * self.w, y), (t * self.w, y - (y - y_h) * 0.25)], c, self.lw(2))
            rail = [(0, y0 - (y0 - y_h) * 0.18), (self.w, y1 - (y1 - y_h) * 0.18)]
            self.line(rail, c, self.lw(1.5))
        self.people(self.i(0, 3), y_h, self.h, self.u(0.5, 1.2))

    def harbour(self) -> None:
        y_h = round(self.h * self.u(0.3, 0.55))
        self.sky(y_h)
        self.hills(y_h, self.i(0, 2))
        x = self.u(0, 0.3) * self.w
        while x < self.w * self.u(0.5, 1.0):  # the far shore: a row of small houses
            bw = self.w * self.u(0.03, 0.08)
            self.building(x, y_h + 1, bw, bw * self.u(0.6, 1.6))
            x += bw + self.u(0, 0.03) * self.w
        self.water(y_h, self.h)
        for y in sorted(self.u(y_h + 5, self.h) for _ in range(self.i(1, 6))):
            self.boat(self.u(0.05, 0.95) * self.w, y, (y - y_h) * self.u(0.6, 1.4))
        if self.chance(0.6):  # a pier from one side
            top = self.h * self.u(0.7, 0.88)
            reach = self.w * self.u(0.3, 0.7)
            x0, x1 = (0.0, reach) if self.chance(0.5) else (reach, float(self.w))
            self.rect((x0, top, x1, top + self.h * 0.03), self.col(60, 160, "wood"))
            for px in np.arange(x0 + 5, x1, self.w * 0.06):
                self.rect((px, top, px + self.lw(4), self.h), self.col(10, 60, "wood"))
            for _ in range(self.i(0, 5)):
                self.person(self.u(x0, x1), top + 2, self.h * self.u(0.12, 0.25))

    def portrait(self) -> None:
        y_f = round(self.h * self.u(0.72, 0.92))
        self.gradient((0, 0, self.w, y_f), self.col(60, 200, "stone"), self.col(60, 200, "stone"))
        if self.chance(0.5):  # painted backdrop: soft blotches
            n = self.blotches((0, 0, self.w, y_f), (4, 5))
            region = np.asarray(self.img.crop((0, 0, self.w, y_f)), np.float32)
            region += (n[..., None] - 0.5) * 255.0 * self.u(0.2, 0.5)
            self.img.paste(Image.fromarray(np.clip(region, 0, 255).astype(np.uint8)), (0, 0))
        floor = (0, y_f, self.w, self.h)
        self.gradient(floor, self.col(40, 140, "wood"), self.col(20, 100, "wood"))
        if self.chance(0.5):  # a curtain on one side: shaded vertical folds
            cw = self.w * self.u(0.1, 0.3)
            x0 = 0.0 if self.chance(0.5) else self.w - cw
            base = self.col(30, 150, "cloth")
            for k, x in enumerate(np.linspace(x0, x0 + cw, 12)):
                shade = int(25 * math.sin(k * 1.3))
                fold = tuple(int(np.clip(c + shade, 0, 255)) for c in base)
                self.rect((x, 0, x + cw / 11 + 1, y_f), fold)
        if self.chance(0.5):  # a chair
            cx, c = self.u(0.1, 0.8) * self.w, self.col(20, 120, "wood")
            seat, leg = self.h * 0.25, self.w * 0.02
            self.rect((cx, y_f - seat, cx + self.w * 0.15, y_f - seat + self.h * 0.03), c)
            self.rect((cx, y_f - self.h * 0.55, cx + leg, y_f), c)
            self.rect((cx + self.w * 0.15 - leg, y_f - seat, cx + self.w * 0.15, y_f), c)
        n = self.i(1, 3)
        for k in range(n):
            y = y_f + self.h * self.u(0, 0.05)
            x = self.w * (k + 0.5 + self.u(-0.2, 0.2)) / n
            self.person(x, y, min(0.92 * y, self.h * self.u(0.55, 0.85)))
        if self.chance(0.55):
            self.caption(f"{self.pick(_STUDIOS)}, {self.pick(_PLACES)}")

    def group(self) -> None:
        y_g = round(self.h * self.u(0.5, 0.7))
        if self.chance(0.5):  # in front of a brick building
            c = self.col(80, 190, "brick")
            self.rect((0, 0, self.w, y_g), c)
            self.bricks((0, 0, self.w, y_g), c)
            for x in np.linspace(0, self.w, self.i(2, 5))[1:-1]:
                window = (x - self.w * 0.05, y_g * 0.15, x + self.w * 0.05, y_g * 0.55)
                self.rect(window, self.col(10, 60))
        else:  # in front of trees
            self.sky(y_g)
            for x in np.linspace(0, self.w, self.i(3, 8)):
                self.tree(float(x) + self.u(-20, 20), y_g, self.h * self.u(0.3, 0.6))
        self.ground(y_g, self.pick(("grass", "stone", "earth")))
        rows = self.i(1, 3)
        for r in range(rows):  # back row first; front rows stand lower and larger
            y = y_g + (self.h - y_g) * (0.25 + 0.6 * r / max(1, rows - 1))
            n = self.i(3, 9)
            height = self.h * self.u(0.3, 0.42) * (1 + 0.12 * r)
            for k in range(n):
                x = self.w * ((k + 0.5) / n + self.u(-0.02, 0.02))
                self.person(x, y, height * self.u(0.9, 1.1))
        if self.chance(0.6):  # a board held up in front
            label = f"{self.pick(_EVENTS)} {self.i(1870, 1955)}"
            bw, bh = self.w * self.u(0.3, 0.5), self.h * self.u(0.06, 0.09)
            bx, by = self.u(0.05, 0.95) * (self.w - bw), self.h - bh * self.u(1.2, 2.5)
            self.text_box((bx, by, bx + bw, by + bh), label, self.col(10, 60), self.col(200, 250))

    def interior(self) -> None:
        y_f = round(self.h * self.u(0.55, 0.8))
        wall = self.col(90, 210, self.pick(("stone", "wood", "brick")))
        self.rect((0, 0, self.w, y_f), wall)
        pattern = self.i(0, 2)
        darker = tuple(max(0, c - self.i(15, 45)) for c in wall)
        if pattern == 0:  # striped wallpaper
            step = self.u(8, 20) * self.s
            for x in np.arange(0, self.w, step):
                self.rect((x, 0, x + step * 0.35, y_f), darker)
        elif pattern == 1:  # dotted wallpaper
            step = self.u(12, 24) * self.s
            r = step * 0.15
            for y in np.arange(step / 2, y_f, step):
                for x in np.arange(step / 2 + (y // step % 2) * step / 2, self.w, step):
                    self.oval((x - r, y - r, x + r, y + r), darker)
        floor = (0, y_f, self.w, self.h)
        self.gradient(floor, self.col(60, 160, "wood"), self.col(30, 120, "wood"))
        vp = self.u(0.2, 0.8) * self.w
        plank = self.col(20, 80, "wood")
        for x in np.linspace(-self.w, 2 * self.w, self.i(10, 30)):
            self.line([(vp + (x - vp) * 0.3, y_f), (float(x), self.h)], plank, self.lw(1))
        # an empty room looks too alike between photographs: always furnish it with 3-5 things
        n_things = self.i(3, 5)
        things = set(self.rng.choice(_ROOM_THINGS, size=n_things, replace=False).tolist())
        if "door" in things:
            dx, dw = self.u(0.05, 0.85) * self.w, self.u(0.1, 0.16) * self.w
            box = (dx, y_f * self.u(0.15, 0.3), dx + dw, y_f)
            self.rect(box, self.col(15, 90, "wood"), self.col(10, 50), self.lw(2))
        if "window" in things:
            wx, ww = self.u(0.05, 0.6) * self.w, self.u(0.15, 0.3) * self.w
            wy, wh = y_f * self.u(0.1, 0.3), y_f * self.u(0.4, 0.6)
            frame = self.col(20, 100, "wood")
            self.rect((wx, wy, wx + ww, wy + wh), self.col(220, 252, "sky"), frame, self.lw(4))
            self.line([(wx + ww / 2, wy), (wx + ww / 2, wy + wh)], frame, self.lw(3))
            self.line([(wx, wy + wh / 2), (wx + ww, wy + wh / 2)], frame, self.lw(3))
        if "pictures" in things:
            for _ in range(self.i(1, 3)):
                fx, fy = self.u(0, 0.85) * self.w, y_f * self.u(0.05, 0.5)
                fw, fh = self.w * self.u(0.06, 0.15), y_f * self.u(0.1, 0.25)
                box = (fx, fy, fx + fw, fy + fh)
                self.rect(box, self.col(20, 200), self.col(10, 60, "wood"), self.lw(3))
        if "poster" in things:
            px, pw = self.u(0.05, 0.7) * self.w, self.u(0.15, 0.25) * self.w
            py, ph = y_f * self.u(0.1, 0.3), y_f * self.u(0.25, 0.4)
            self.rect((px, py, px + pw, py + ph), self.col(190, 245, "stone"))
            ink = self.col(10, 60)
            title = self.pick(_SIGNS)
            self.text_box((px, py + ph * 0.05, px + pw, py + ph * 0.3), title, None, ink)
            year = str(self.i(1870, 1955))
            self.text_box((px, py + ph * 0.35, px + pw, py + ph * 0.55), year, None, ink)
        if "shelf" in things:
            sx, sw = self.u(0, 0.7) * self.w, self.u(0.2, 0.3) * self.w
            sy = y_f * self.u(0.2, 0.4)
            for shelf in range(self.i(2, 4)):
                base = sy + shelf * self.h * 0.1
                x = sx
                while x < sx + sw:  # books of varied width, height and binding
                    bwid = self.u(2, 7) * self.s
                    top = base - self.h * self.u(0.06, 0.09)
                    binding = self.col(20, 200, self.pick(("wood", "brick", "cloth")))
                    self.rect((x, top, x + bwid, base), binding)
                    x += bwid + 1
                self.rect((sx - 2, base, sx + sw + 2, base + self.lw(3)), self.col(20, 80, "wood"))
        if "lamp" in things:
            lx, ly = self.u(0.15, 0.85) * self.w, y_f * self.u(0.15, 0.4)
            lr = self.w * self.u(0.04, 0.08)
            self.line([(lx, 0), (lx, ly)], self.col(10, 50), self.lw(2))
            shade = [(lx - lr * 0.4, ly), (lx + lr * 0.4, ly), (lx + lr, ly + lr * 0.8),
                     (lx - lr, ly + lr * 0.8)]  # fmt: skip
            self.poly(shade, self.col(20, 240, "cloth"))
        if "table" in things:
            tx, tw = self.u(0.05, 0.6) * self.w, self.u(0.2, 0.4) * self.w
            ty = y_f + (self.h - y_f) * self.u(0.1, 0.4)
            c = self.col(20, 100, "wood")
            self.rect((tx, ty - self.h * 0.18, tx + tw, ty - self.h * 0.16), c)
            for lx in (tx + 4, tx + tw - 8):
                self.rect((lx, ty - self.h * 0.16, lx + self.lw(4), ty), c)
        if "people" in things:
            feet = sorted(self.u(y_f + 0.05 * (self.h - y_f), self.h) for _ in range(self.i(1, 3)))
            for y in feet:
                nearness = (y - y_f) / (self.h - y_f)
                height = self.h * self.u(0.3, 0.5) * (1 + 0.4 * nearness)
                self.person(self.u(0.05, 0.95) * self.w, y, min(y * 0.9, height))

    def finish(self, look: str) -> Image.Image:
        """Lens softness, film grain, vignetting, then the print's colour: grey, toned or faded."""
        img = self.img.filter(ImageFilter.GaussianBlur(self.u(0.4, 1.1) * self.s))
        arr = np.asarray(img, np.float32)
        h, w = arr.shape[:2]
        grain = self.rng.standard_normal((h, w), dtype=np.float32) * self.u(2.5, 8.0)
        x = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        y = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        vignette = 1.0 - self.u(0.05, 0.35) * (x * x + y * y) / 2
        arr = arr * vignette[..., None] + grain[..., None]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        if look == "grey":
            return degrade.tone(img, "grey")
        if look == "toned":
            kind = self.pick(("sepia", "sepia", "sepia", "selenium", "cyan"))
            return degrade.tone(img, kind, self.u(0.35, 0.9))
        return degrade.fade(img, self.u(0.05, 0.35))


_SCENES: dict[str, Callable[[_Painter], None]] = {
    "street": _Painter.street,
    "landscape": _Painter.landscape,
    "harbour": _Painter.harbour,
    "portrait": _Painter.portrait,
    "group": _Painter.group,
    "interior": _Painter.interior,
}
_ASPECTS = (4 / 3, 3 / 2, 5 / 4, 7 / 5, 16 / 10, 1.0)


def paint_original(rng: np.random.Generator, size: int = 512) -> Image.Image:
    """Paint one procedural old photograph (RGB, long side ``size``) from ``rng``."""
    scene = str(rng.choice(list(_SCENES)))
    aspect = float(rng.choice(_ASPECTS))
    upright = rng.random() < (0.8 if scene == "portrait" else 0.2)
    w, h = (round(size / aspect), size) if upright else (size, round(size / aspect))
    painter = _Painter(rng, max(16, w), max(16, h))
    _SCENES[scene](painter)
    look = str(rng.choice(["grey", "toned", "colour"], p=[0.6, 0.28, 0.12]))
    return painter.finish(look)


# ====================================================================================== copies

# op -> weight when drawing which 1-3 operations make one archival copy. mirror is left out: the
# demo's copies should stay near-duplicates under plain pixel measures.
_COPY_OPS: dict[str, float] = {
    "rescan": 0.18, "jpeg": 0.12, "crop": 0.12, "mount": 0.12, "tone": 0.10, "fade": 0.10,
    "damage": 0.10, "foxing": 0.05, "mark": 0.05, "rephoto": 0.04, "halftone": 0.02,
}  # fmt: skip
# physical order: trim the print, it ages and is marked, maybe reprinted, captured, then encoded
_COPY_ORDER = (
    "crop", "tone", "fade", "foxing", "damage", "mark", "halftone", "mount", "rephoto", "rescan",
    "jpeg",
)  # fmt: skip


def _copy_op(op: str, img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    """Apply one archival process with the demo's parameter ranges (``s``: size / 512 px)."""
    if op == "crop":
        fw, fh = rng.uniform(0.72, 0.95, size=2)
        left, top = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        return degrade.crop_fraction(img, (left, top, left + fw, top + fh))
    if op == "tone":
        kind = str(rng.choice(["sepia", "grey", "selenium", "cyan"], p=[0.6, 0.25, 0.1, 0.05]))
        return degrade.tone(img, kind, float(rng.uniform(0.5, 1.0)))  # type: ignore[arg-type]
    if op == "fade":
        return degrade.fade(img, float(rng.uniform(0.2, 0.6)))
    if op == "foxing":
        return degrade.foxing(img, rng, int(rng.integers(5, 40)))
    if op == "damage":
        img = degrade.scratches(img, rng, int(rng.integers(2, 12)))
        return degrade.dust(img, rng, int(rng.integers(20, 200)))
    if op == "mark":
        return degrade.stamp(img, rng) if rng.random() < 0.5 else degrade.handwriting(img, rng)
    if op == "halftone":
        cell = max(2.0, float(rng.uniform(3.0, 5.0)) * s)
        return degrade.halftone(img, cell, float(rng.choice([15.0, 45.0, 75.0])))
    if op == "mount":
        colour = str(rng.choice(["white", "cream", "grey", "black"], p=[0.35, 0.3, 0.15, 0.2]))
        angle = float(np.clip(rng.normal(0, 1.5), -4, 4))
        return degrade.mount_border(img, rng, float(rng.uniform(0.02, 0.1)), colour, angle)
    if op == "rephoto":
        return degrade.rephotograph(img, rng, float(rng.uniform(0.3, 0.9)))
    if op == "rescan":
        scale, exposure, gamma = rng.uniform((0.55, 0.8, 0.75), (1.35, 1.2, 1.3))
        return degrade.rescan(img, float(scale), float(exposure), float(gamma))
    if op == "jpeg":
        return degrade.jpeg_recompress(img, int(rng.integers(25, 71)))
    raise ValueError(f"unknown copy operation {op!r}")


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def archival_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One near-duplicate of ``img`` made by 1-3 archival processes, with demo parameter ranges."""
    names = list(_COPY_OPS)
    p = np.asarray([_COPY_OPS[n] for n in names])
    k = int(rng.integers(1, 4))
    chosen = set(rng.choice(names, size=k, replace=False, p=p / p.sum()).tolist())
    s = max(img.size) / 512.0
    out = img
    for op in _COPY_ORDER:
        if op in chosen:
            out = _copy_op(op, out, rng, s)
    if out.size == img.size and _mean_abs_diff(out, img) < 1.0:
        # e.g. neutral toning of a grey print changes nothing: a copy must not be pixel-identical
        out = degrade.rescan(out, float(rng.choice([0.8, 1.2])), float(rng.uniform(0.9, 1.1)), 1.0)
    return out


# ====================================================================================== writing


def _save(img: Image.Image, target: Path) -> int:
    """Write atomically in the format named by the suffix, with fixed settings; return the size."""
    fmt = _FORMATS[target.suffix[1:]]
    arr = np.asarray(img)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        img = img.convert("L")  # greyscale scans are commonly stored with one channel
    buf = io.BytesIO()
    img.save(buf, format=fmt, **_SAVE_OPTIONS[fmt])
    data = buf.getvalue()
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _run_job(job: _Job, out_dir: Path, size: int) -> list[tuple[str, int]]:
    # children built explicitly (SeedSequence.spawn counts its calls) so a job always repeats
    key = job.seed.spawn_key
    scene_seed, *copy_seeds = (
        np.random.SeedSequence(job.seed.entropy, spawn_key=(*key, i)) for i in range(len(job.paths))
    )
    original = paint_original(np.random.default_rng(scene_seed), size)
    written = [(job.paths[0], _save(original, out_dir / job.paths[0]))]
    for path, ss in zip(job.paths[1:], copy_seeds, strict=True):
        copy = archival_copy(original, np.random.default_rng(ss))
        written.append((path, _save(copy, out_dir / path)))
    return written


def _run_job_star(args: tuple[_Job, Path, int]) -> list[tuple[str, int]]:
    return _run_job(*args)


def _plan(n_groups: int, n_distractors: int, max_copies: int, seed: int) -> list[_Job]:
    """Decide group sizes, file names, boxes and formats; all from ``seed``."""
    plan_ss, originals_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(plan_ss)
    n_orig = n_groups + n_distractors
    members = np.ones(n_orig, dtype=np.int64)
    members[:n_groups] += rng.integers(1, max_copies, size=n_groups)  # + 1..max_copies-1 copies
    n_images = int(members.sum())
    numbers = rng.permutation(n_images) + 1  # shuffled scan numbers hide who belongs together
    n_boxes = min(99, n_images, max(2, math.ceil(n_images / 100)))
    formats = rng.choice(["jpg", "png", "tif"], size=n_images, p=[0.8, 0.13, 0.07])
    labels = rng.permutation(n_orig)  # group ids do not tell groups from distractors either
    width = max(4, len(str(n_orig - 1)))
    seeds = originals_ss.spawn(n_orig)
    jobs: list[_Job] = []
    k = 0
    for j in range(n_orig):
        paths = []
        for _ in range(int(members[j])):
            num = int(numbers[k])
            box = 1 + (num - 1) * n_boxes // n_images  # a box holds a contiguous number range
            paths.append(f"{SCANS}/box-{box:02d}/scan-{num:06d}.{formats[k]}")
            k += 1
        jobs.append(_Job(seed=seeds[j], group=f"g{int(labels[j]):0{width}d}", paths=tuple(paths)))
    return jobs


def _existing_complete(out_dir: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or not (out_dir / GROUND_TRUTH).is_file():
        return False
    files: dict[str, int] = manifest.get("files", {})
    try:
        return bool(files) and all((out_dir / p).stat().st_size == n for p, n in files.items())
    except OSError:
        return False


def _refuse_foreign(out_dir: Path) -> None:
    """A folder that holds anything and no demo manifest is not the demo's: writing there would
    overwrite scans and a ground truth named like the demo's own."""
    if (out_dir / MANIFEST).is_file() or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CbirError(f"{out_dir} is a file, not a folder: choose a new or empty folder for "
                        f"the demo collection")
    held = next(iter(sorted(p.name for p in out_dir.iterdir())), None)
    if held is not None:
        raise CbirError(f"{out_dir} already holds {held!r} and is not a demo collection (no "
                        f"{MANIFEST}): choose a new or empty folder for the demo collection")


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete demo scans of an earlier, different run: they would be images without ground truth.

    Only ``scans/box-NN/scan-NNNNNN.{jpg,png,tif}`` files are touched; anything else is left.
    """
    scans = out_dir / SCANS
    if not scans.is_dir():
        return
    for box in scans.iterdir():
        if not (box.is_dir() and _BOX_RE.fullmatch(box.name)):
            continue
        clean_stale_tmp(box)
        for f in box.iterdir():
            if _SCAN_RE.fullmatch(f.name) and f.relative_to(out_dir).as_posix() not in keep:
                f.unlink()


def generate_demo_collection(
    out_dir: Path,
    *,
    n_groups: int = 150,
    n_distractors: int = 150,
    max_copies: int = 4,
    size: int = 512,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
) -> DemoSummary:
    """Write a synthetic collection with known near-duplicate groups under ``out_dir``.

    ``n_groups`` originals get 1..``max_copies``-1 copies each; ``n_distractors`` originals get
    none. ``workers``: painting processes (None = all cores, 1 = in this process). A rerun with
    the same arguments on a complete output returns at once.
    """
    if n_groups < 0 or n_distractors < 0 or n_groups + n_distractors == 0:
        raise ValueError("need at least one group or distractor")
    if max_copies < 2:
        raise ValueError("max_copies must be >= 2 (an original plus at least one copy)")
    if size < 32:
        raise ValueError("size must be >= 32 pixels")
    out_dir = Path(out_dir)
    params = {
        "version": _MANIFEST_VERSION, "n_groups": n_groups, "n_distractors": n_distractors,
        "max_copies": max_copies, "size": size, "seed": seed,
    }  # fmt: skip
    jobs = _plan(n_groups, n_distractors, max_copies, seed)
    all_paths = {p for job in jobs for p in job.paths}
    summary = DemoSummary(
        len(all_paths), n_groups, n_distractors, out_dir / GROUND_TRUTH, out_dir / SCANS
    )
    if _existing_complete(out_dir, params):
        return summary
    _refuse_foreign(out_dir)

    # empty the manifest's file list first, so an interrupted run is never mistaken for a
    # complete one (the manifest stays: it says the folder is the demo's)
    write_json({"params": params, "files": {}}, out_dir / MANIFEST)
    _remove_stale(out_dir, all_paths)
    tasks = [(job, out_dir, size) for job in jobs]
    n_workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    n_workers = min(n_workers, max(1, len(tasks) // 8))  # a pool is not worth it for a handful
    sizes: dict[str, int] = {}
    pbar = bar(total=len(tasks), desc="demo", unit="original", enabled=progress)
    try:
        if n_workers == 1:
            for result in map(_run_job_star, tasks):
                sizes.update(result)
                pbar.update()
        else:
            ctx = mp.get_context(start_method(["cbir.steps.demo"]))
            with ctx.Pool(n_workers) as pool:
                for result in pool.imap_unordered(_run_job_star, tasks, chunksize=4):
                    sizes.update(result)
                    pbar.update()
    finally:
        pbar.close()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "group"])
    writer.writerows(sorted((p, job.group) for job in jobs for p in job.paths))
    with atomic_path(out_dir / GROUND_TRUTH) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    write_json({"params": params, "files": dict(sorted(sizes.items()))}, out_dir / MANIFEST)
    return summary
