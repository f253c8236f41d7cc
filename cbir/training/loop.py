"""The training loop's moving parts: the model with its optimiser (`Trainer`), where training
stands (`TrainState`: the schedule, the epochs done, the history, the fits to the time budget),
the batch size for a number of images and processes, the fit to the time budget before an
epoch, one epoch and one optimiser step. The `train` step (`cbir.steps.train`) builds them from
the settings, resumes them from last.pt and checkpoints them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import faults
from ..errors import CbirError
from ..model import Descriptor
from ..progress import bar as progress_bar
from .contrastive import contrastive_loss
from .data import MIX_STREAM, mix_views
from .distributed import Dist, agree, mean
from .schedule import Schedule, fit_epochs

if TYPE_CHECKING:  # the kernel never imports the settings at runtime
    from ..config import TrainSettings

Log = Callable[[str], None]


@dataclass
class Trainer:
    """The model being trained and what trains it."""

    model: Descriptor
    source: str  # where its initial weights came from
    net: nn.Module  # the training forward (what DDP wraps)
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    channels_last: bool
    precision: str


@dataclass
class TrainState:
    """Where the training stands: what last.pt carries from one run to the next."""

    sched: Schedule
    start: int = 0  # epochs done when this run started
    history: list[dict[str, Any]] = field(default_factory=list)
    fits: list[dict[str, Any]] = field(default_factory=list)  # each fit to the time budget


def batching(n: int, batch_size: int, d: Dist) -> tuple[int, int]:
    """(the global batch, steps an epoch) for `n` images."""
    if batch_size <= n:
        batch = batch_size
        if batch % d.world:
            raise CbirError(
                f"train.batch_size {batch} (the global batch) must be a multiple "
                f"of the number of processes ({d.world})"
            )
    else:  # a small collection: the whole of it is one batch
        batch = n - n % d.world
    if batch < max(2, d.world):
        raise CbirError(f"{n} images are too few for {d.world} processes")
    return batch, n // batch


def fit_to_budget(
    state: TrainState,
    epoch: int,
    elapsed: float,
    epoch_cost: float,
    t: TrainSettings,
    lr: float,
    d: Dist,
    device: torch.device,
    log: Log,
) -> str:
    """Before epoch `epoch`: fit the schedule to the time budget (state.sched, state.fits);
    returns why the run stops here when even one more epoch would exceed it, else ""."""
    budget = t.time_budget_minutes * 60.0
    sched = state.sched
    fitted = int(agree(float(fit_epochs(sched, epoch, elapsed, epoch_cost, budget)), d, device))
    if fitted < sched.epochs:
        why = (
            f"{sched.epochs} epochs of ~{epoch_cost:.0f} s would take "
            f"{_minutes(elapsed + (sched.epochs - epoch) * epoch_cost)} "
            f"(budget {t.time_budget_minutes:g} min, {epoch} done); fitted to "
            f"{fitted} epochs"
        )
        log(f"time budget: {why}")
        state.sched = sched.fitted(epoch, fitted)
        state.fits.append(
            {
                "after_epoch": epoch,
                "epoch_seconds": round(epoch_cost, 3),
                "epochs": fitted,
                "reason": why,
            }
        )
    if agree(float(elapsed + epoch_cost > budget), d, device):  # the last resort
        stop_reason = (
            f"time budget of {t.time_budget_minutes:g} min ran out before "
            f"the schedule's end: another epoch (~{epoch_cost:.0f} s) would "
            f"exceed it, so the LR stopped at {lr:.3g} instead of 0"
        )
        log(f"time budget: stopping after epoch {epoch} of {state.sched.epochs}: {stop_reason}")
        return stop_reason
    return ""


def run_epoch(
    ddp: nn.Module,
    net: Trainer,
    loader: DataLoader,
    sched: Schedule,
    epoch: int,
    steps: int,
    t: TrainSettings,
    d: Dist,
    device: torch.device,
    progress: bool,
    lr: float,
) -> tuple[float, float]:
    """One epoch: (its mean loss over the ranks, the LR of its last step)."""
    ddp.train()
    bar = progress_bar(steps, f"train {epoch + 1}/{sched.epochs}", "batch", progress)
    loss_sum = 0.0
    for i, (x1, x2) in enumerate(loader):
        step = epoch * steps + i
        lr = sched.lr(step)
        for group in net.opt.param_groups:
            group["lr"] = lr
        value = train_step(ddp, net, x1, x2, t, d, device, epoch, step)
        if not math.isfinite(value):
            raise CbirError(
                f"training diverged (loss {value} at epoch {epoch + 1}, step "
                f"{i + 1}): lower train.lr or raise train.temperature"
            )
        loss_sum += value
        faults.point("train.step")
        bar.update(1)
        bar.set_postfix_str(f"loss {value:.4f}")
    bar.close()
    return mean(loss_sum / steps, d, device), lr


def train_step(
    ddp: nn.Module,
    net: Trainer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    t: TrainSettings,
    d: Dist,
    device: torch.device,
    epoch: int,
    step: int,
) -> float:
    """One optimiser step on a batch of view pairs; returns its loss."""
    if t.mix_prob > 0:
        rng = np.random.default_rng([t.seed, epoch, step, MIX_STREAM, d.rank])
        if rng.random() < t.mix_prob:
            x2 = mix_views(x2, rng)
    x = torch.cat([x1, x2]).to(device, non_blocking=True)
    if net.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, enabled=net.use_amp):
        z = ddp(x)
    loss = contrastive_loss(z.float(), t.temperature, t.koleo_weight, d)
    net.opt.zero_grad(set_to_none=True)
    net.scaler.scale(loss).backward()
    net.scaler.step(net.opt)
    net.scaler.update()
    return float(loss.item())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
