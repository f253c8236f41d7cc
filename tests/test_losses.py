"""NT-Xent and KoLeo: hand computations, limits, gradients, the global-batch (DDP) form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cbir.losses import koleo, nt_xent


def _ce(pos: float, others: list[float]) -> float:
    """-log softmax at the positive: -log(e^pos / (e^pos + sum e^others))."""
    return -pos + math.log(math.exp(pos) + sum(math.exp(o) for o in others))


def test_nt_xent_matches_a_hand_computed_case():
    # 2 images, 2-D unit vectors, tau = 0.5. Views: a1=(1,0), b1=(0,1) ; a2=(.6,.8), b2=(-.6,.8).
    # Cosines: a1.b1=0, a1.a2=.6, a1.b2=-.6, b1.a2=.8, b1.b2=.8, a2.b2=-.36+.64=.28
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    tau = 0.5
    s = lambda c: c / tau  # noqa: E731
    per_anchor = [
        _ce(s(0.6), [s(0.0), s(-0.6)]),  # a1: positive a2; negatives b1, b2
        _ce(s(0.8), [s(0.0), s(0.8)]),  # b1: positive b2; negatives a1, a2
        _ce(s(0.6), [s(0.8), s(0.28)]),  # a2: positive a1; negatives b1, b2
        _ce(s(0.8), [s(-0.6), s(0.28)]),  # b2: positive b1; negatives a1, a2
    ]
    expected = sum(per_anchor) / 4
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, abs=1e-6)
    # the first anchor spelled out: -log(e^1.2 / (e^1.2 + e^0 + e^-1.2))
    assert per_anchor[0] == pytest.approx(-math.log(math.exp(1.2) / (math.exp(1.2) + 1
                                                                      + math.exp(-1.2))))
    # unnormalised inputs are normalised first
    assert nt_xent(3 * z1, 0.5 * z2, tau).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_is_symmetric_in_the_views_and_in_the_order_of_images():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    loss = nt_xent(z1, z2, 0.2)
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(loss.item(), abs=1e-6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert nt_xent(z1[perm], z2[perm], 0.2).item() == pytest.approx(loss.item(), abs=1e-6)


def test_nt_xent_perfect_alignment_with_orthogonal_images_reaches_its_bound():
    # Views identical, images mutually orthogonal: every anchor sees its positive at cos 1 and
    # 2N-2 negatives at cos 0, so the loss is log(1 + (2N-2) e^(-1/tau)) and goes to 0 with tau.
    n = 4
    z = torch.eye(n)
    for tau in (1.0, 0.1):
        expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
        assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expected, abs=1e-6)
    assert nt_xent(z, z.clone(), 0.01).item() < 1e-6
    # collapse (every vector the same) is the uninformative case: log(2N - 1)
    same = torch.ones(n, 3)
    assert nt_xent(same, same, 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)
    # aligned views score better than mismatched ones
    shuffled = z[torch.tensor([1, 2, 3, 0])]
    assert nt_xent(z, z, 0.1) < nt_xent(z, shuffled, 0.1)


def test_nt_xent_gradients_flow_and_pull_views_together():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 4, generator=g).requires_grad_()
    z2 = torch.randn(5, 4, generator=g).requires_grad_()
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    assert z1.grad is not None and z2.grad is not None
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    # a small step against the gradient raises the positives' similarity and lowers the loss
    with torch.no_grad():
        a1, a2 = z1 - 0.5 * z1.grad, z2 - 0.5 * z2.grad
        before = F.cosine_similarity(z1, z2).mean()
        after = F.cosine_similarity(a1, a2).mean()
        assert after > before
        assert nt_xent(a1, a2, 0.5) < loss


def test_nt_xent_global_batch_split_over_ranks_equals_the_whole_batch():
    # What DDP computes: each rank's anchors against the gathered batch; the mean over ranks is
    # the single-device loss, and so is the gradient.
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 5, generator=g).requires_grad_()
    z2 = torch.randn(6, 5, generator=g).requires_grad_()
    whole = nt_xent(z1, z2, 0.3)
    (g_whole,) = torch.autograd.grad(whole, z1)
    per_rank = [nt_xent(z1[r * 2:(r + 1) * 2], z2[r * 2:(r + 1) * 2], 0.3,
                        gathered=(z1, z2), offset=r * 2) for r in range(3)]
    split = torch.stack(per_rank).mean()
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)
    (g_split,) = torch.autograd.grad(split, z1)
    assert torch.allclose(g_split, g_whole, atol=1e-6)
    with pytest.raises(ValueError):
        nt_xent(z1[:2], z2[:2], 0.3, gathered=(z1, z2), offset=5)


def test_koleo_matches_a_hand_computed_case():
    # Points on a line: 0, 1, 3, 7. Nearest-neighbour distances: 1, 1, 2, 4.
    z = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    expected = -(math.log(1) + math.log(1) + math.log(2) + math.log(4)) / 4
    assert koleo(z).item() == pytest.approx(expected, abs=1e-6)
    # unit vectors at 0, 90 and 180 degrees: distances sqrt(2) each
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo(u).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_koleo_excludes_same_label_neighbours_and_spreads_vectors():
    # With labels, a vector's own other view is not its neighbour (SSCD excludes positives).
    z = torch.tensor([[0.0], [0.5], [3.0], [3.5]])
    labels = torch.tensor([0, 0, 1, 1])
    # without labels the neighbours are at 0.5 each; with them, the other group: 3, 2.5, 2.5, 3
    assert koleo(z).item() == pytest.approx(-math.log(0.5), abs=1e-6)
    expected = -(2 * math.log(3) + 2 * math.log(2.5)) / 4
    assert koleo(z, labels).item() == pytest.approx(expected, abs=1e-6)
    # keys form (a gathered batch): rows 2-3 of the batch against all of it
    assert koleo(z[2:], labels[2:], keys=z, key_labels=labels).item() == pytest.approx(
        -(math.log(2.5) + math.log(3)) / 2, abs=1e-6)
    # gradient descent on KoLeo moves close points apart; identical points give no NaN
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]], requires_grad=True)
    koleo(x).backward()
    assert x.grad[0, 0] > 0 and x.grad[1, 0] < 0  # ascend the distance: 0 moves left, 1 right
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    value = koleo(dup)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(dup.grad).all()
    with pytest.raises(ValueError):
        koleo(z, torch.zeros(4, dtype=torch.long))
