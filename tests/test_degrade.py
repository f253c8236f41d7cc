"""cbir.degrade: each primitive returns fresh 8-bit RGB, is deterministic and does what it says."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from cbir import degrade

Op = Callable[[Image.Image, np.random.Generator], Image.Image]

# every primitive with typical parameters; rng is ignored by the ones that take none
OPS: dict[str, Op] = {
    "rescan": lambda im, rng: degrade.rescan(im, 0.7, 1.15, 0.9),
    "jpeg_recompress": lambda im, rng: degrade.jpeg_recompress(im, 30),
    "crop_fraction": lambda im, rng: degrade.crop_fraction(im, (0.1, 0.05, 0.85, 0.9)),
    "mount_border": lambda im, rng: degrade.mount_border(im, rng, 0.06, "cream", 2.5),
    "tone": lambda im, rng: degrade.tone(im, "sepia", 0.8),
    "fade": lambda im, rng: degrade.fade(im, 0.5),
    "scratches": lambda im, rng: degrade.scratches(im, rng, 8),
    "dust": lambda im, rng: degrade.dust(im, rng, 80),
    "foxing": lambda im, rng: degrade.foxing(im, rng, 20),
    "halftone": lambda im, rng: degrade.halftone(im, 4),
    "rephotograph": lambda im, rng: degrade.rephotograph(im, rng, 0.7),
    "mirror": lambda im, rng: degrade.mirror(im),
    "stamp": lambda im, rng: degrade.stamp(im, rng),
    "handwriting": lambda im, rng: degrade.handwriting(im, rng),
}


def _photo(w: int = 192, h: int = 144, seed: int = 0) -> Image.Image:
    """A small colour test picture: gradients, a few blocks, grain; nothing symmetric."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([60 + 150 * x / w, 40 + 170 * y / h, 120 + 60 * np.sin(x / 9.0)], axis=-1)
    arr[h // 5 : h // 2, w // 6 : w // 3] = (230, 220, 200)
    arr[h // 2 : 4 * h // 5, w // 2 : 5 * w // 6] = (25, 30, 35)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return _photo()


@pytest.mark.parametrize("name", list(OPS))
def test_returns_rgb_uint8_of_sensible_size(name: str, photo: Image.Image) -> None:
    out = OPS[name](photo, np.random.default_rng(1))
    assert out.mode == "RGB"
    assert np.asarray(out).dtype == np.uint8
    w, h = photo.size
    assert 0.3 * w <= out.width <= 1.6 * w and 0.3 * h <= out.height <= 1.6 * h


@pytest.mark.parametrize("name", list(OPS))
def test_accepts_greyscale_input(name: str, photo: Image.Image) -> None:
    out = OPS[name](photo.convert("L"), np.random.default_rng(1))
    assert out.mode == "RGB"


@pytest.mark.parametrize("name", list(OPS))
def test_deterministic_for_seeded_rng(name: str, photo: Image.Image) -> None:
    a = OPS[name](photo, np.random.default_rng(7))
    b = OPS[name](photo, np.random.default_rng(7))
    assert a.size == b.size and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", list(OPS))
def test_changes_the_image_and_leaves_input_alone(name: str, photo: Image.Image) -> None:
    before = photo.tobytes()
    out = OPS[name](photo, np.random.default_rng(3))
    assert photo.tobytes() == before
    if out.size == photo.size:
        # local marks change few pixels but change them clearly
        changed = (np.abs(_arr(out) - _arr(photo)).max(-1) > 8).mean()
        assert changed > 0.005
    else:
        assert out.size != photo.size


RNG_OPS = ["scratches", "dust", "foxing", "stamp", "handwriting", "mount_border", "rephotograph"]


@pytest.mark.parametrize("name", RNG_OPS)
def test_marks_depend_on_rng(name: str, photo: Image.Image) -> None:
    a = OPS[name](photo, np.random.default_rng(1))
    b = OPS[name](photo, np.random.default_rng(2))
    assert a.size != b.size or a.tobytes() != b.tobytes()


@pytest.mark.parametrize("name", list(OPS))
def test_fast_at_512px(name: str) -> None:
    img = _photo(512, 384)
    OPS[name](img, np.random.default_rng(0))  # warm caches (fonts)
    # CPU time, not wall-clock time: other work on the machine does not count against it
    t0 = time.process_time()
    for i in range(3):
        OPS[name](img, np.random.default_rng(i))
    assert (time.process_time() - t0) / 3 < 0.25  # a few ms in practice


def test_mirror_twice_is_identity(photo: Image.Image) -> None:
    once = degrade.mirror(photo)
    assert once.tobytes() != photo.tobytes()
    assert degrade.mirror(once).tobytes() == photo.tobytes()


def test_rescan_identity_size_and_exposure(photo: Image.Image) -> None:
    assert degrade.rescan(photo).tobytes() == photo.tobytes()
    assert degrade.rescan(photo, 0.5).size == (photo.width // 2, photo.height // 2)
    brighter = degrade.rescan(photo, 1.0, exposure=1.3)
    darker = degrade.rescan(photo, 1.0, gamma=1.5)
    assert _arr(brighter).mean() > _arr(photo).mean() > _arr(darker).mean()
    with pytest.raises(ValueError):
        degrade.rescan(photo, 0)


def test_jpeg_lower_quality_means_more_error(photo: Image.Image) -> None:
    def err(q: int) -> float:
        return float(np.abs(_arr(degrade.jpeg_recompress(photo, q)) - _arr(photo)).mean())

    assert err(10) > err(90) > 0


def test_crop_fraction_size_and_content(photo: Image.Image) -> None:
    out = degrade.crop_fraction(photo, (0.25, 0.5, 0.75, 1.0))
    assert out.size == (photo.width // 2, photo.height // 2)
    w, h = photo.size
    assert out.tobytes() == photo.crop((w // 4, h // 2, 3 * w // 4, h)).tobytes()
    for bad in [(0.5, 0, 0.4, 1), (0, 0, 1.2, 1), (-0.1, 0, 1, 1)]:
        with pytest.raises(ValueError):
            degrade.crop_fraction(photo, bad)


def test_mount_border_surrounds_print_with_colour(photo: Image.Image) -> None:
    out = degrade.mount_border(photo, np.random.default_rng(0), 0.1, "black", 0.0)
    border = round(0.1 * photo.width)
    assert out.size == (photo.width + 2 * border, photo.height + 2 * border)
    assert out.getpixel((0, 0)) == degrade.MOUNT_COLOURS["black"]
    tilted = degrade.mount_border(photo, np.random.default_rng(0), 0.05, (10, 200, 10), 3.0)
    assert tilted.width > photo.width + 2 * round(0.05 * photo.width)  # rotation grows the box
    assert tilted.getpixel((1, 1)) == (10, 200, 10)
    with pytest.raises(ValueError):
        degrade.mount_border(photo, np.random.default_rng(0), 0.05, "purple", 0.0)


def test_tone_colours(photo: Image.Image) -> None:
    sepia = _arr(degrade.tone(photo, "sepia"))
    assert sepia[..., 0].mean() > sepia[..., 2].mean() + 10
    cyan = _arr(degrade.tone(photo, "cyan"))
    assert cyan[..., 2].mean() > cyan[..., 0].mean() + 10
    grey = _arr(degrade.tone(photo, "grey"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    half = _arr(degrade.tone(photo, "sepia", 0.5))
    assert np.abs(half - _arr(photo)).mean() < np.abs(sepia - _arr(photo)).mean()
    with pytest.raises(ValueError):
        degrade.tone(photo, "magenta")  # type: ignore[arg-type]


def test_fade_lowers_contrast_lifts_blacks_and_yellows(photo: Image.Image) -> None:
    assert degrade.fade(photo, 0.0).tobytes() == photo.tobytes()
    faded = _arr(degrade.fade(photo, 0.8))
    grey_in = _arr(photo.convert("L"))
    assert faded.mean(-1).std() < grey_in.std()
    assert faded.min() > _arr(photo).min() + 30
    assert faded[..., 0].mean() > faded[..., 2].mean()  # yellowed: blue lost most


def test_halftone_is_near_binary_and_keeps_tone(photo: Image.Image) -> None:
    out = _arr(degrade.halftone(photo, 4, ink=20, paper=240))
    g = out[..., 0]
    assert (np.minimum(np.abs(g - 20), np.abs(g - 240)) <= 10).mean() > 0.95
    # coarse tone survives: dark and light regions of the input stay dark and light
    h, w = g.shape
    light = g[h // 5 : h // 2, w // 6 : w // 3].mean()
    dark = g[h // 2 : 4 * h // 5, w // 2 : 5 * w // 6].mean()
    assert light > dark + 100


def test_foxing_is_brown(photo: Image.Image) -> None:
    white = Image.new("RGB", (200, 150), (240, 240, 240))
    out = _arr(degrade.foxing(white, np.random.default_rng(0), 30))
    changed = np.abs(out - 240).sum(-1) > 20
    assert changed.any()
    spots = out[changed]
    assert spots[:, 0].mean() > spots[:, 1].mean() > spots[:, 2].mean()


def test_zero_marks_change_nothing(photo: Image.Image) -> None:
    rng = np.random.default_rng(0)
    for op in (degrade.scratches, degrade.dust, degrade.foxing):
        assert op(photo, rng, 0).tobytes() == photo.tobytes()


@pytest.mark.parametrize("op", [degrade.stamp, degrade.handwriting])
def test_ink_only_darkens(op: Op, photo: Image.Image) -> None:
    out = _arr(op(photo, np.random.default_rng(5)))
    assert (out <= _arr(photo)).all()
    assert (out < _arr(photo) - 10).any()


def test_rephotograph_uneven_light_and_same_size(photo: Image.Image) -> None:
    flat = Image.new("RGB", (160, 120), (200, 200, 200))
    out = _arr(degrade.rephotograph(flat, np.random.default_rng(0), 1.0))
    assert out.shape == (120, 160, 3)
    assert out.max() - out.min() > 20  # the light falls off somewhere
    with pytest.raises(ValueError):
        degrade.rephotograph(flat, np.random.default_rng(0), 1.5)
