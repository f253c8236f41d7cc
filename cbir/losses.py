"""Self-supervised losses: SimCLR's NT-Xent and the KoLeo entropy regulariser (as in SSCD).

Both take an optional *global* batch for data-parallel training: each rank computes the loss of
its own anchors against the embeddings gathered from every rank (gathered with
`torch.distributed.nn.functional.all_gather`, which keeps gradients). The mean of the per-rank
losses is then exactly the loss of the whole global batch on one device, and DDP's gradient
averaging gives exactly its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    *,
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """NT-Xent (SimCLR) over two views: z1[i] and z2[i] are the two views of image i.

    Every one of the 2n anchors has one positive (the other view of its image) and the other
    2m-2 vectors as negatives, where m is the number of images in the (global) batch; the result
    is the mean over the 2n local anchors of -log softmax(sim/τ)[positive], with cosine
    similarity (inputs are L2-normalised here, so normalised inputs are unchanged).

    `gathered=(g1, g2)`: both views of the global batch, [m, d] each, with this rank's images at
    rows offset..offset+n-1; default: the local batch (m = n, offset = 0).
    """
    n = z1.shape[0]
    if z2.shape != z1.shape:
        raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    g1, g2 = gathered if gathered is not None else (z1, z2)
    m = g1.shape[0]
    if offset < 0 or offset + n > m:
        raise ValueError(f"local rows {offset}..{offset + n} are outside the gathered batch of {m}")
    # float32: under autocast the logits / temperature can overflow half precision
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2n, d]
    keys = F.normalize(torch.cat([g1, g2]).float(), dim=-1)  # [2m, d]
    logits = anchors @ keys.T / temperature  # [2n, 2m]
    rows = torch.arange(n, device=logits.device) + offset
    own = torch.cat([rows, rows + m])  # each anchor's own column: never its own negative
    positive = torch.cat([rows + m, rows])
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(2 * n, device=logits.device), own] = True
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), positive)


def koleo(
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    keys: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Kozachenko–Leonenko entropy regulariser (Sablayrolles et al., "Spreading vectors").

    −mean over the rows of z of log(distance to the nearest neighbour), where neighbours are the
    rows of `keys` (default: z itself) whose label differs: with labels, the other views of the
    same image are not neighbours (SSCD excludes positives this way, so the regulariser spreads
    different images apart without fighting the contrastive pull between views). Without labels
    each row is its own label, i.e. plain KoLeo over the batch. The nearest neighbour is chosen
    without gradient; the gradient flows through the distance to it.
    """
    n = z.shape[0]
    if labels is None:
        labels = torch.arange(n, device=z.device)
    if keys is None:
        keys, key_labels = z, labels
    elif key_labels is None:
        raise ValueError("key_labels are needed with keys (which key is which row's own)")
    z, keys = z.float(), keys.float()
    with torch.no_grad():
        d2 = torch.cdist(z, keys).square()
        d2.masked_fill_(labels[:, None] == key_labels[None, :], float("inf"))
        if torch.isinf(d2).all(dim=1).any():
            raise ValueError("koleo needs at least two different labels among the keys")
        nearest = d2.argmin(dim=1)
    # sqrt(d² + eps²): smooth at 0, so identical vectors give a large but finite loss and no NaN
    dist = ((z - keys[nearest]).square().sum(dim=1) + eps * eps).sqrt()
    return -dist.log().mean()
