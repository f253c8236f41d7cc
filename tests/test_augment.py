"""cbir.augment: square RGB views, deterministic, recognisable; heritage does its archive work."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from PIL import Image

from cbir import augment, degrade
from cbir.augment import STRATEGIES, make_augmenter, preview_grid
from cbir.steps.demo import paint_original

RES = 64  # small views keep the suite fast; sizes are checked at training resolutions too


def _painting(seed: int, size: int = 192) -> Image.Image:
    """A procedural old photograph from the demo painter (scenes are asymmetric and distinct)."""
    return paint_original(np.random.default_rng(seed), size)


def _colourful(w: int = 160, h: int = 120) -> Image.Image:
    """A colour picture with asymmetric blocks: flips and colour casts are easy to measure."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([40 + 180 * x / w, 60 + 150 * y / h, 200 - 120 * x / w], axis=-1)
    arr[h // 6 : h // 2, w // 8 : w // 3] = (235, 225, 60)
    arr[h // 2 : 5 * h // 6, 3 * w // 5 : 9 * w // 10] = (20, 30, 140)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _thumb(img: Image.Image) -> np.ndarray:
    g = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float64)
    return g.ravel()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def _views(strategy: str, img: Image.Image, n: int, seed: int = 0, **kw) -> list[Image.Image]:
    aug = make_augmenter(strategy, RES, **kw)
    rng = np.random.default_rng(seed)
    return [aug(img, rng) for _ in range(n)]


# ------------------------------------------------------------------------------ contract

INPUTS = {
    "L-small": lambda: _painting(1, 48).convert("L"),
    "RGB-large": lambda: _painting(2, 900),
    "portrait": lambda: _painting(3, 160).transpose(Image.Transpose.ROTATE_90),
    "landscape-wide": lambda: _colourful(300, 80),
    "tiny": lambda: _colourful(12, 9),
    "panorama": lambda: _colourful(400, 20),
    "RGBA": lambda: _colourful(90, 70).convert("RGBA"),
    "P": lambda: _painting(4, 96).convert("P"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_view_is_square_rgb_uint8(strategy: str, kind: str) -> None:
    img = INPUTS[kind]()
    before = img.tobytes()
    aug = make_augmenter(strategy, RES)
    rng = np.random.default_rng(5)
    for _ in range(6):  # several views, so several branches of the chain run
        out = aug(img, rng)
        assert out.mode == "RGB"
        assert out.size == (RES, RES)
        arr = np.asarray(out)
        assert arr.dtype == np.uint8 and arr.shape == (RES, RES, 3)
    assert img.tobytes() == before  # the input is never modified


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("resolution", [112, 224])
def test_training_resolutions(strategy: str, resolution: int) -> None:
    out = make_augmenter(strategy, resolution)(_painting(6, 300), np.random.default_rng(0))
    assert out.mode == "RGB" and out.size == (resolution, resolution)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_per_seed_and_varied_across_seeds(strategy: str) -> None:
    img = _painting(7)
    aug = make_augmenter(strategy, RES)
    views = []
    for seed in range(10):
        random.seed(seed)  # global random state must not matter
        np.random.seed(seed)
        a = aug(img, np.random.default_rng(seed)).tobytes()
        random.seed(seed + 100)
        np.random.seed(seed + 100)
        b = aug(img, np.random.default_rng(seed)).tobytes()
        assert a == b
        views.append(a)
    assert len(set(views)) == len(views)
    # successive calls on one generator continue its stream: two different views
    rng = np.random.default_rng(0)
    assert aug(img, rng).tobytes() != aug(img, rng).tobytes()


def test_global_torch_rng_is_not_used() -> None:
    torch = pytest.importorskip("torch")
    img = _painting(8)
    for strategy in STRATEGIES:
        aug = make_augmenter(strategy, RES)
        torch.manual_seed(1)
        a = aug(img, np.random.default_rng(3)).tobytes()
        torch.manual_seed(2)
        b = aug(img, np.random.default_rng(3)).tobytes()
        assert a == b


def test_make_augmenter_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown augmentation strategy"):
        make_augmenter("autoaugment", RES)
    with pytest.raises(ValueError, match="strength"):
        make_augmenter("heritage", RES, strength=-0.5)
    with pytest.raises(ValueError, match="resolution"):
        make_augmenter("simclr", 4)
    assert set(STRATEGIES) == {"simclr", "heritage"}


# ------------------------------------------------------------------------------ content


@pytest.mark.parametrize(("strategy", "margin"), [("heritage", 0.4), ("simclr", 0.15)])
def test_views_stay_recognisable(strategy: str, margin: float) -> None:
    """Mean thumbnail correlation with the source clearly beats that with an unrelated picture."""
    same, other = [], []
    for k in range(3):
        img, unrelated = _painting(20 + k), _painting(40 + k)
        t_img, t_unrelated = _thumb(img), _thumb(unrelated)
        for v in _views(strategy, img, 20, seed=k):
            same.append(_corr(_thumb(v), t_img))
            other.append(_corr(_thumb(v), t_unrelated))
    assert np.mean(same) > np.mean(other) + margin, (np.mean(same), np.mean(other))


def test_heritage_keeps_more_of_the_picture_than_simclr() -> None:
    img = _painting(11)
    t = _thumb(img)
    mean = {s: np.mean([_corr(_thumb(v), t) for v in _views(s, img, 30)]) for s in STRATEGIES}
    assert mean["heritage"] > mean["simclr"], mean


def test_heritage_applies_archive_effects() -> None:
    """Across 50 views of a colour picture some are mirrored, some lose or change their colours."""
    img = _colourful()
    t, t_mirror = _thumb(img), _thumb(degrade.mirror(img))
    views = _views("heritage", img, 50, seed=1)
    mirrored = sum(_corr(_thumb(v), t_mirror) > _corr(_thumb(v), t) for v in views)
    assert 4 <= mirrored <= 25, mirrored  # p = 0.25

    def saturation(im: Image.Image) -> float:
        return float(np.asarray(im.convert("HSV"))[..., 1].mean())

    s0 = saturation(img.resize((RES, RES)))
    washed = sum(saturation(v) < 0.6 * s0 for v in views)  # toned, faded, halftoned
    assert 10 <= washed <= 40, washed


def test_heritage_on_greyscale_adds_tones() -> None:
    grey = _painting(12).convert("L")
    views = _views("heritage", grey, 40, seed=2)
    cast = [np.abs(np.diff(np.asarray(v, np.float64).mean(axis=(0, 1)))).max() for v in views]
    toned = sum(c > 6 for c in cast)
    assert 8 <= toned <= 36, cast


def test_heritage_strength_scales_the_damage() -> None:
    img = _painting(13)
    base = np.asarray(img.resize((RES, RES), Image.Resampling.BILINEAR), np.float64)

    def mean_change(strength: float) -> float:
        vs = _views("heritage", img, 25, seed=3, strength=strength)
        return float(np.mean([np.abs(np.asarray(v, np.float64) - base).mean() for v in vs]))

    none, mild, default, harsh = (mean_change(s) for s in (0.0, 0.4, 1.0, 2.0))
    assert none < 5.0  # strength 0: only the resizes
    assert none < mild < default < harsh, (none, mild, default, harsh)
    # at strength 0 every seed gives the same picture
    assert len({v.tobytes() for v in _views("heritage", img, 5, seed=4, strength=0.0)}) == 1


def test_simclr_crops_can_be_small_and_flip() -> None:
    """The crop scale goes down to 8% of the area, and about half the views are flipped."""
    aug = augment.SimCLRAugmenter(RES)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        x0, y0, x1, y1 = aug._crop_box(400, 300, rng)
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        areas.append((x1 - x0) * (y1 - y0) / (400 * 300))
    assert min(areas) < 0.15 and max(areas) > 0.85
    assert aug._crop_box(1000, 10, rng)[2] <= 1000  # falls back to a centre crop


# ------------------------------------------------------------------------------ preview, timing


def test_preview_grid_size() -> None:
    pad, label = augment.PREVIEW_PAD, augment.PREVIEW_LABEL_H
    grid = preview_grid(_painting(14), n=3, resolution=48, seed=1)
    assert grid.mode == "RGB"
    assert grid.size == (pad + 4 * (48 + pad), pad + 2 * (label + 48 + pad))
    one = preview_grid(_painting(14).convert("L"), strategies=("heritage",), n=2, resolution=40)
    assert one.size == (pad + 3 * (40 + pad), pad + (label + 40 + pad))
    # reproducible, and a row does not depend on the other rows
    again = preview_grid(_painting(14), n=3, resolution=48, seed=1)
    assert grid.tobytes() == again.tobytes()


def test_report_per_view_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Not asserted (machines differ): printed so the cost of augmentation stays visible."""
    img = _painting(15, 512)
    lines = []
    for strategy in STRATEGIES:
        for res in (112, 224):
            aug = make_augmenter(strategy, res)
            rng = np.random.default_rng(0)
            aug(img, rng)
            n = 40
            t = time.perf_counter()
            for _ in range(n):
                aug(img, rng)
            lines.append(f"{strategy} @ {res}px: {(time.perf_counter() - t) / n * 1e3:.2f} ms/view")
    with capsys.disabled():
        print("\naugment timing (512 px input): " + "; ".join(lines))
