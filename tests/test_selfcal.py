"""Self-calibration's estimators (cbir.selfcal) and the held-out copy generator (cbir.heldout)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from PIL import Image

from cbir import heldout, selfcal
from conftest import photo


def _planted(n: int = 400, depth: int = 40, dup_share: float = 0.5, seed: int = 0):
    """Neighbour lists with an exact answer: non-duplicate scores from a Gaussian bulk (each
    image's top `depth` of 5,000 draws), and for half the images one or two duplicates scoring
    high; returns (scores, is_duplicate)."""
    rng = np.random.default_rng(seed)
    rows, dups = [], []
    for _ in range(n):
        neg = np.sort(rng.normal(0.3, 0.08, 5000))[::-1][:depth]
        k_dup = int(rng.integers(1, 3)) if rng.random() < dup_share else 0
        pos = np.clip(rng.normal(0.88, 0.04, k_dup), -1, 1)
        vals = np.concatenate([pos, neg])
        flags = np.concatenate([np.ones(k_dup, bool), np.zeros(len(neg), bool)])
        order = np.argsort(-vals, kind="stable")[:depth]
        rows.append(vals[order])
        dups.append(flags[order])
    return np.array(rows), np.array(dups)


def _truth(scores: np.ndarray, dup: np.ndarray, k: int, t: float) -> tuple[float, float]:
    keep = scores[:, :k] >= t
    tp = (dup[:, :k] & keep).sum()
    return (tp / keep.sum() if keep.sum() else 1.0), tp / dup[:, :k].sum()


@pytest.mark.parametrize("share", [0.5, 0.1])
def test_estimated_precision_follows_the_truth(share):
    """Duplicates planted among strangers: the mixture's precision tracks the real one at every
    threshold, and the threshold it picks for 0.95 keeps its promise with all the recall."""
    scores, dup = _planted(dup_share=share)
    k = 10
    copies = np.clip(np.random.default_rng(1).normal(0.86, 0.05, 300), -1, 1)
    curve = selfcal.estimate(scores, k, copies, np.ones(len(copies), bool))
    for t in (0.55, 0.6, 0.62, 0.65, 0.7):
        true_precision, _ = _truth(scores, dup, k, t)
        assert curve.at(t)[0] == pytest.approx(true_precision, abs=0.05), t
    i = curve.choose(0.95)
    assert i is not None
    t = float(curve.thresholds[i])
    precision, recall = _truth(scores, dup, k, t)
    assert precision >= 0.93 and recall >= 0.95
    assert curve.at(t)[1] == pytest.approx((copies >= t).mean())  # recall from the copies
    mix = selfcal.fit_mixture(scores, k, copies)
    assert mix.prior[0] == pytest.approx(dup[:, 0].mean(), abs=0.05)


def test_a_collection_without_duplicates_gets_a_threshold_above_its_neighbours():
    scores, _ = _planted(dup_share=0.0)
    copies = np.full(100, 0.9)
    curve = selfcal.estimate(scores, 10, copies, np.ones(100, bool))
    i = curve.choose(0.95)
    t = 1.0 if i is None else curve.thresholds[i]  # none: the step keeps nothing
    assert (scores[:, :10] >= t).sum() <= 0.01 * scores.shape[0]  # (almost) no false pairs


def test_copies_that_score_like_strangers_leave_no_useful_threshold():
    """A model that cannot tell copies from other images: precision never reaches 0.95 where
    the copies are, so the threshold keeps (almost) none of them."""
    scores, _ = _planted(dup_share=0.0)
    copies = np.random.default_rng(3).normal(0.3, 0.08, 200)
    curve = selfcal.estimate(scores, 10, copies, np.ones(200, bool))
    i = curve.choose(0.95)
    assert i is None or curve.recall[i] < 0.05


def test_too_few_neighbours_or_no_copies_are_refused():
    scores, _ = _planted(n=20, depth=12)
    with pytest.raises(ValueError, match="neighbours per image"):
        selfcal.fit_mixture(scores, 10, np.full(10, 0.9))
    scores, _ = _planted(n=20)
    with pytest.raises(ValueError, match="no held-out copies"):
        selfcal.fit_mixture(scores, 10, np.zeros(0))


def test_held_out_copies_are_deterministic_pictures_of_the_same_scene():
    img = photo(3, (160, 120))
    a = heldout.held_out_copy(img, np.random.default_rng(7))
    b = heldout.held_out_copy(img, np.random.default_rng(7))
    assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    for name, op, _ in heldout.PROCESSES:
        out = op(img, np.random.default_rng(1))
        assert out.mode == "RGB", name
        small = np.asarray(out.resize((32, 24)).convert("L"), np.float32)
        ref = np.asarray(img.resize((32, 24)).convert("L"), np.float32)
        assert not np.array_equal(np.asarray(out.resize(img.size)), np.asarray(img)), name
        if name != "page":  # a page adds paper and text around the picture
            assert np.corrcoef(small.ravel(), ref.ravel())[0, 1] > 0.5, name


def test_held_out_processes_are_independent_of_the_training_augmentations():
    """The generator must not share code with what the model was trained on."""
    tree = ast.parse(inspect.getsource(heldout))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(m and ("degrade" in m or "augment" in m) for m in imported), imported
    names = heldout.choose(np.random.default_rng(0))
    assert 1 <= len(names) <= 4 and set(names) <= set(heldout.NAMES)
    tonal = [n for n in names if n in {"microfilm", "photocopy", "palette", "posterise"}]
    assert len(tonal) <= 1


def test_recall_quantile_threshold_keeps_that_share_of_the_copies():
    copies = np.linspace(0.5, 1.0, 101)
    t = selfcal.recall_quantile_threshold(copies, 0.95)
    assert (copies >= t).mean() >= 0.95
    assert selfcal.recall_quantile_threshold(np.zeros(0), 0.95) == 1.0


def test_the_generator_handles_small_and_grey_pictures():
    for img in (photo(1, (40, 30)), photo(2, (90, 60)).convert("L").convert("RGB"),
                Image.new("RGB", (64, 64), (128, 128, 128))):
        for seed in range(5):
            out = heldout.held_out_copy(img, np.random.default_rng(seed))
            assert out.mode == "RGB" and min(out.size) >= 8
