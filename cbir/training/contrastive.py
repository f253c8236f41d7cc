"""The training forward and loss: the normalised projection of the pooled trunk (optionally with
a bf16 trunk on the CPU), NT-Xent (+ KoLeo) against the negatives of every rank, and the
optimiser."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import koleo, nt_xent
from ..model import Descriptor
from .distributed import ONE_PROCESS, Dist, gather


class Contrastive(nn.Module):
    """The training forward: normalised projection of the pooled trunk (what DDP wraps).

    `bf16_trunk`: the convolutions (nearly all the work) run in bf16 on the CPU, while pooling,
    projection and loss stay in fp32, where the small differences between descriptors live.
    """

    def __init__(self, model: Descriptor, bf16_trunk: bool = False) -> None:
        super().__init__()
        self.model = model
        self.bf16_trunk = bf16_trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16_trunk:
            return F.normalize(self.model.head(self.model.pooled(x)), dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = self.model.trunk(x)
        return F.normalize(self.model.head(self.model.pool(f.float())), dim=-1)


def contrastive_loss(
    z: torch.Tensor, temperature: float, koleo_weight: float, d: Dist = ONE_PROCESS
) -> torch.Tensor:
    """NT-Xent (+ KoLeo) of a [2b, dim] batch (view 1 rows, then view 2), global negatives."""
    b = z.shape[0] // 2
    parts = gather(z, d).view(d.world, 2, b, -1)  # rank-major, then view
    g1, g2 = parts[:, 0].reshape(d.world * b, -1), parts[:, 1].reshape(d.world * b, -1)
    offset = d.rank * b
    loss = nt_xent(z[:b], z[b:], temperature, gathered=(g1, g2), offset=offset)
    if koleo_weight > 0:
        own = torch.arange(b, device=z.device) + offset
        every = torch.arange(d.world * b, device=z.device)
        loss = loss + koleo_weight * koleo(
            z, torch.cat([own, own]), keys=torch.cat([g1, g2]), key_labels=torch.cat([every, every])
        )
    return loss


def optimizer(params: Any, t: Any) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
