"""Archival copies of a synthetic original: 1-3 processes drawn by weight (rescans, crops, mounts,
toning, fading, damage, marks, rephotography, halftone, recompression), applied in physical order
with the demo's parameter ranges, composed from `cbir.degrade`."""

from __future__ import annotations

from typing import cast

import numpy as np
from PIL import Image

from .. import degrade

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
        kind = cast(
            degrade.ToneKind,
            str(rng.choice(["sepia", "grey", "selenium", "cyan"], p=[0.6, 0.25, 0.1, 0.05])),
        )
        return degrade.tone(img, kind, float(rng.uniform(0.5, 1.0)))
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
