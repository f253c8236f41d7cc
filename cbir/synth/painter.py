"""The painter of the synthetic old photographs: random choices, drawing shorthands, backgrounds
(sky, hills, ground, water, bricks) and the objects scenes are made of (buildings, facades, trees,
people, boats, signs, captions). The scenes themselves are in `cbir.synth.paintings`.

Every choice comes from the painter's ``rng``, in a fixed order: the same generator paints the
same picture, byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, ...]  # (r, g, b)
Box = tuple[float, float, float, float]
Points = Sequence[tuple[float, float]]

SIGNS = (
    "HOTEL", "BAKERY", "POST", "CAFE", "BANK", "SCHOOL", "STATION", "MARKET", "GARAGE",
    "APOTHEKE", "TABAC", "BRASSERIE", "GROCER", "PHARMACY", "THEATRE", "CINEMA", "DRAPER",
    "SADDLER", "BUTCHER", "INN", "GASTHAUS", "BOULANGERIE", "TAILOR", "HARDWARE", "BARBER",
    "CHEMIST", "DAIRY", "SMITHY",
)  # fmt: skip

# mild hues added to a grey level: colour photos look plausible, greyscale ones keep contrast
_HUES: dict[str, tuple[float, float, float]] = {
    "sky": (-22, -4, 26), "foliage": (-14, 10, -22), "grass": (-8, 12, -24),
    "brick": (34, -6, -26), "wood": (24, 6, -24), "stone": (6, 3, -6), "earth": (16, 6, -18),
    "water": (-18, 0, 14), "cloth": (0, 0, 0), "skin": (30, 6, -20),
}  # fmt: skip


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


class Painter:
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
            self.poly([*pts, (self.w, y_h + 2), (0, y_h + 2)], fill)

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
            self.text_box(sign, self.pick(SIGNS), bg, fg)

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
