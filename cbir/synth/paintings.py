"""The synthetic old photographs: six kinds of scene (street, landscape, harbour, studio portrait,
group photo, interior) composed from the painter's objects, finished as a print (lens softness,
grain, vignetting, then grey, toned or faded colour).

`paint_original(rng)` paints one; the same generator gives the same picture, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from .. import degrade
from .painter import SIGNS, Painter

_PLACES = (
    "Main Street", "Harbour", "Market Square", "Station Road", "Mill Lane", "Church Hill",
    "The Quay", "Bridge Street", "High Street", "Old Town", "Fish Market", "Town Hall",
    "Lake Shore", "Riverside", "North Pier", "Castle Gate", "Rue de la Gare", "Grand Place",
    "Marktplatz", "Hauptstrasse", "Via Roma", "Kirchgasse", "Seestrasse", "Harbour Road",
    "West End", "Upper Mill",
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


class _Scene(Painter):
    """A painter that composes whole scenes, then finishes the print."""

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
            noise = self.blotches((0, 0, self.w, y_f), (4, 5))
            region = np.asarray(self.img.crop((0, 0, self.w, y_f)), np.float32)
            region += (noise[..., None] - 0.5) * 255.0 * self.u(0.2, 0.5)
            self.img.paste(Image.fromarray(np.clip(region, 0, 255).astype(np.uint8)), (0, 0))
        floor = (0, y_f, self.w, self.h)
        self.gradient(floor, self.col(40, 140, "wood"), self.col(20, 100, "wood"))
        if self.chance(0.5):  # a curtain on one side: shaded vertical folds
            cw = self.w * self.u(0.1, 0.3)
            x0 = 0.0 if self.chance(0.5) else self.w - cw
            base = self.col(30, 150, "cloth")
            for k, fx in enumerate(np.linspace(x0, x0 + cw, 12)):
                shade = int(25 * math.sin(k * 1.3))
                fold = tuple(int(np.clip(c + shade, 0, 255)) for c in base)
                self.rect((fx, 0, fx + cw / 11 + 1, y_f), fold)
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
        self._room(y_f)
        # an empty room looks too alike between photographs: always furnish it with 3-5 things
        n_things = self.i(3, 5)
        things = set(self.rng.choice(_ROOM_THINGS, size=n_things, replace=False).tolist())
        furnish = (("door", self._door), ("window", self._window), ("pictures", self._pictures),
                   ("poster", self._poster), ("shelf", self._shelf), ("lamp", self._lamp),
                   ("table", self._table), ("people", self._room_people))  # fmt: skip
        for thing, paint in furnish:  # in this order, whatever order the draw gave
            if thing in things:
                paint(y_f)

    def _room(self, y_f: int) -> None:
        """The walls (maybe papered) and a plank floor in perspective."""
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

    def _door(self, y_f: int) -> None:
        dx, dw = self.u(0.05, 0.85) * self.w, self.u(0.1, 0.16) * self.w
        box = (dx, y_f * self.u(0.15, 0.3), dx + dw, y_f)
        self.rect(box, self.col(15, 90, "wood"), self.col(10, 50), self.lw(2))

    def _window(self, y_f: int) -> None:
        wx, ww = self.u(0.05, 0.6) * self.w, self.u(0.15, 0.3) * self.w
        wy, wh = y_f * self.u(0.1, 0.3), y_f * self.u(0.4, 0.6)
        frame = self.col(20, 100, "wood")
        self.rect((wx, wy, wx + ww, wy + wh), self.col(220, 252, "sky"), frame, self.lw(4))
        self.line([(wx + ww / 2, wy), (wx + ww / 2, wy + wh)], frame, self.lw(3))
        self.line([(wx, wy + wh / 2), (wx + ww, wy + wh / 2)], frame, self.lw(3))

    def _pictures(self, y_f: int) -> None:
        for _ in range(self.i(1, 3)):
            fx, fy = self.u(0, 0.85) * self.w, y_f * self.u(0.05, 0.5)
            fw, fh = self.w * self.u(0.06, 0.15), y_f * self.u(0.1, 0.25)
            box = (fx, fy, fx + fw, fy + fh)
            self.rect(box, self.col(20, 200), self.col(10, 60, "wood"), self.lw(3))

    def _poster(self, y_f: int) -> None:
        px, pw = self.u(0.05, 0.7) * self.w, self.u(0.15, 0.25) * self.w
        py, ph = y_f * self.u(0.1, 0.3), y_f * self.u(0.25, 0.4)
        self.rect((px, py, px + pw, py + ph), self.col(190, 245, "stone"))
        ink = self.col(10, 60)
        title = self.pick(SIGNS)
        self.text_box((px, py + ph * 0.05, px + pw, py + ph * 0.3), title, None, ink)
        year = str(self.i(1870, 1955))
        self.text_box((px, py + ph * 0.35, px + pw, py + ph * 0.55), year, None, ink)

    def _shelf(self, y_f: int) -> None:
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

    def _lamp(self, y_f: int) -> None:
        lx, ly = self.u(0.15, 0.85) * self.w, y_f * self.u(0.15, 0.4)
        lr = self.w * self.u(0.04, 0.08)
        self.line([(lx, 0), (lx, ly)], self.col(10, 50), self.lw(2))
        shade = [(lx - lr * 0.4, ly), (lx + lr * 0.4, ly), (lx + lr, ly + lr * 0.8),
                 (lx - lr, ly + lr * 0.8)]  # fmt: skip
        self.poly(shade, self.col(20, 240, "cloth"))

    def _table(self, y_f: int) -> None:
        tx, tw = self.u(0.05, 0.6) * self.w, self.u(0.2, 0.4) * self.w
        ty = y_f + (self.h - y_f) * self.u(0.1, 0.4)
        c = self.col(20, 100, "wood")
        self.rect((tx, ty - self.h * 0.18, tx + tw, ty - self.h * 0.16), c)
        for lx in (tx + 4, tx + tw - 8):
            self.rect((lx, ty - self.h * 0.16, lx + self.lw(4), ty), c)

    def _room_people(self, y_f: int) -> None:
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


_SCENES: dict[str, Callable[[_Scene], None]] = {
    "street": _Scene.street,
    "landscape": _Scene.landscape,
    "harbour": _Scene.harbour,
    "portrait": _Scene.portrait,
    "group": _Scene.group,
    "interior": _Scene.interior,
}
_ASPECTS = (4 / 3, 3 / 2, 5 / 4, 7 / 5, 16 / 10, 1.0)


def paint_original(rng: np.random.Generator, size: int = 512) -> Image.Image:
    """Paint one procedural old photograph (RGB, long side ``size``) from ``rng``."""
    scene = str(rng.choice(list(_SCENES)))
    aspect = float(rng.choice(_ASPECTS))
    upright = rng.random() < (0.8 if scene == "portrait" else 0.2)
    w, h = (round(size / aspect), size) if upright else (size, round(size / aspect))
    painter = _Scene(rng, max(16, w), max(16, h))
    _SCENES[scene](painter)
    look = str(rng.choice(["grey", "toned", "colour"], p=[0.6, 0.28, 0.12]))
    return painter.finish(look)
