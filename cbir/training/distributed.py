"""Several processes under torchrun: the ranks (`Dist`), setting up the process group, and the
collective operations the loop needs (gathering embeddings with gradients, a barrier, rank 0's
value on every rank, the mean over ranks). With one process they do nothing."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import CbirError
from ..model import pick_device


@dataclass(frozen=True)
class Dist:
    """This process's rank among `world` (and among the `local_world` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Dist()  # a run without torchrun


def setup(device_name: str) -> tuple[Dist, torch.device, bool]:
    """(ranks, this rank's device, whether we created the process group)."""
    try:
        device = pick_device(device_name)
    except CbirError:
        raise CbirError(f"unknown device {device_name!r} (train.device: auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CbirError(f"train.device is {device_name!r} but no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ONE_PROCESS, device, False
    d = Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        # Long timeout: the other ranks wait while rank 0 decodes the training cache.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(hours=2),
            device_id=device if device.type == "cuda" else None,
        )
    return d, device, created


def gather(z: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world == 1:
        return z
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # deprecated in torch 2.14 for a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(z))  # differentiable: other ranks' losses reach z


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def agree(value: float, d: Dist, device: torch.device) -> float:
    """Rank 0's value, on every rank (so all ranks take the same decisions)."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world
