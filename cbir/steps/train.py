"""Self-supervised fine-tuning of the descriptor on the collection itself (SimCLR, SSCD-style).

Each canonical image gives two augmented views; NT-Xent pulls the views of an image together
and pushes other images apart, optionally with the KoLeo entropy regulariser (SSCD).

* Decode once: scans are decoded, in parallel, into a uint8 cache at 1.25 x the training
  resolution (`cache_dir/train-<size>/`), squashed to a square like the embedding
  preprocessing (`Preprocess.resize = "square"`), so an epoch never touches the scans. The cache
  is keyed by the set of image ids: when images come or go it is rebuilt, reusing the rows it
  already holds, and it is replaced atomically.
* Deterministic: the shuffle of epoch e is seeded by (seed, e), the view v of image i in epoch e
  by (seed, e, i, v), cutmix/mixup of step s by (seed, e, s, 2, rank); the model init by
  model.seed. Nothing else is random, so a run resumed from the last epoch checkpoint
  (`models_dir/last.pt`) ends exactly where an uninterrupted run ends (on CPU; cuDNN kernels can
  differ in the last bits).
* Several GPUs: launched by `torchrun`, every rank takes a disjoint slice of each global batch
  (train.batch_size is the global batch, so the recipe does not depend on the GPU count), and the
  losses use the embeddings gathered from all ranks (with gradients) as negatives.
* Time budget: a half-annealed model retrieves far worse than a shorter schedule run to its end,
  so when train.time_budget_minutes binds, the cosine schedule is fitted to it (and fitted again
  if epochs get slower): the LR decays to 0 by the last epoch that fits. The fit is stored in
  last.pt, so a resumed run continues it. Stopping mid-schedule is the last resort.
* Fair share of a busy machine: torch threads follow the CPUs this process may use (affinity,
  cgroup quota), and idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE).

The pieces of the loop are kernels in `cbir.training` (schedule, data, contrastive, loop,
cpu, distributed); this module decodes the cache (it knows the workspace), resumes, runs the epochs
and writes the checkpoints. Longer than 400 lines: the decoded cache, resuming
and the checkpoints are this step's own; the loop's pieces are in cbir/training/.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

# Before torch loads OpenMP (it reads this once): idle OpenMP threads sleep rather than spin.
# Spinning threads burn the CPU that the augmentation worker and other processes need, and on an
# oversubscribed machine they delay the very threads they wait for. Only takes effect where this
# module is the first to import torch (`cbir train`, torchrun); a user's setting wins. The
# training kernels (cbir.training) import torch too: they are imported below, after this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .. import faults, imaging
from ..config import Settings
from ..errors import CbirError, IncompatibleCheckpoint
from ..fsutil import atomic_path, clean_stale_tmp, write_json, write_text
from ..model import (
    ModelConfig,
    build_model,
    retrieval_preprocess,
    safe_load,
    save_checkpoint,
)
from ..parallel import end_with, start_method, worker_map
from ..progress import bar as progress_bar
from ..safetext import counted
from ..store.layout import Layout, layout
from ..store.manifest import canonical_images, why_no_images
from ..training.contrastive import Contrastive, optimizer
from ..training.cpu import available_cpus, cpu_bf16, torch_threads
from ..training.data import EpochBatches, TwoViews
from ..training.distributed import Dist, barrier, setup
from ..training.loop import Trainer, TrainState, batching, fit_to_budget, run_epoch
from ..training.schedule import Schedule

CACHE_SCALE = 1.25  # cache side / training resolution: room for crops without upsampling
CACHE_FORMAT = "cbir-train-cache/1"
STATE_FORMAT = "cbir-train-state/1"
# Settings that change how fast a run goes, not what it computes: resume ignores them.
_NOT_RECIPE = {"workers", "device", "time_budget_minutes"}

Log = Callable[[str], None]


# --------------------------------------------------------------------------- decoded cache


def cache_side(resolution: int) -> int:
    return round(resolution * CACHE_SCALE)


@dataclass(frozen=True)
class TrainCache:
    """uint8 [rows, side, side, 3] on disk; `ids[r]` is row r's image; failed rows are unused."""

    folder: Path
    file: Path
    side: int
    ids: list[str]
    failed: dict[str, str]  # image_id -> why it could not be decoded

    @property
    def rows(self) -> list[int]:
        """The rows to train on (decoded images), in id order."""
        return [r for r, i in enumerate(self.ids) if i not in self.failed]

    @property
    def key(self) -> str:
        """Identifies the training set (which images, at which size)."""
        return _ids_key(self.ids, self.side)


def _ids_key(ids: Sequence[str], side: int) -> str:
    return hashlib.sha256("\n".join([str(side), *ids]).encode()).hexdigest()[:16]


def _read_cache(folder: Path) -> TrainCache | None:
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        cache = TrainCache(
            folder=folder,
            file=folder / meta["file"],
            side=int(meta["side"]),
            ids=list(meta["ids"]),
            failed=dict(meta["failed"]),
        )
        if meta.get("format") != CACHE_FORMAT:
            return None
        shape = np.load(cache.file, mmap_mode="r").shape
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cache if shape == (len(cache.ids), cache.side, cache.side, 3) else None


def _decode_one(args: tuple[int, bytes, int, int | None]) -> tuple[int, bytes | None, str | None]:
    """(row, pixels of the side x side square, or None and why) for one scan."""
    row, path, side, max_pixels = args
    try:
        rgb = imaging.load_rgb(os.fsdecode(path), side, max_pixels=max_pixels)
    except imaging.ImageRejected as exc:
        return row, None, exc.reason
    except OSError as exc:  # deleted or moved since ingest
        return row, None, f"cannot read the file: {exc.strerror or exc}"
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return row, np.asarray(rgb, dtype=np.uint8).tobytes(), None


def build_cache(settings: Settings, *, progress: bool = False, log: Log = print) -> TrainCache:
    """The decoded training images of the current manifest, decoding only what is not cached."""
    side = cache_side(settings.train.resolution)
    lay = layout(settings)
    folder = lay.train_cache(side)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(folder)
    scans = os.fsencode(lay.scans)
    rows = canonical_images(settings)
    ids = [r["image_id"] for r in rows]
    if not ids:
        why = why_no_images(settings) or "the manifest holds no canonical image"
        raise CbirError(f"no images to train on: {why}")
    old = _read_cache(folder)
    if old is not None and old.side == side and old.ids == ids:
        return old

    wanted = set(ids)
    reuse = (
        {i: r for r, i in enumerate(old.ids) if i in wanted and i not in old.failed} if old else {}
    )
    todo = [
        (r, os.path.join(scans, row["path_raw"]), side, settings.ingest.max_pixels)
        for r, row in enumerate(rows)
        if row["image_id"] not in reuse
    ]
    name = f"images-{_ids_key(ids, side)}.npy"
    t0 = time.perf_counter()
    with atomic_path(folder / name) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(ids), side, side, 3)
        )
        if reuse and old is not None:  # (reuse is empty without an old cache)
            previous = np.load(old.file, mmap_mode="r")
            for r, i in enumerate(ids):
                if i in reuse:
                    out[r] = previous[reuse[i]]
            del previous
        workers = min(settings.decode_workers, max(1, len(todo) // 8))
        failed = _decode_into(out, todo, ids, workers, progress)
        out.flush()
        del out
    # index.json is the commit point: it names the array file it describes.
    write_json(
        {
            "format": CACHE_FORMAT,
            "side": side,
            "file": name,
            "ids": ids,
            "failed": failed,
            "resize": "square",
        },
        folder / "index.json",
    )
    for stale in folder.glob("images-*.npy"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    log(
        f"train cache: {counted(len(todo) - len(failed), 'image')} decoded, {len(reuse)} reused, "
        f"{len(failed)} failed, {time.perf_counter() - t0:.1f} s ({folder})"
    )
    return TrainCache(folder=folder, file=folder / name, side=side, ids=ids, failed=failed)


def _decode_into(
    out: np.ndarray,
    todo: Sequence[tuple[int, bytes, int, int | None]],
    ids: list[str],
    workers: int,
    progress: bool,
) -> dict[str, str]:
    """Decode the scans of `todo` into their rows of `out`; returns image_id -> why not."""
    side = out.shape[1]
    failed: dict[str, str] = {}
    bar = progress_bar(len(todo), "train cache", "img", progress)
    with (
        contextlib.closing(bar),
        worker_map(_decode_one, todo, workers, preload=["cbir.imaging"]) as results,
    ):
        for r, pixels, why in results:
            if pixels is None:
                failed[ids[r]] = why or "cannot be decoded"
            else:
                out[r] = np.frombuffer(pixels, np.uint8).reshape(side, side, 3)
            faults.point("train.cache")
            bar.update(1)
    return failed


def _recipe(settings: Settings) -> dict[str, Any]:
    """Every setting that changes the trained weights (what a resume must agree with)."""
    t = {k: v for k, v in settings.train.model_dump(mode="json").items() if k not in _NOT_RECIPE}
    m = {k: v for k, v in settings.model.model_dump(mode="json").items() if k != "checkpoint"}
    return {"train": t, "model": m}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section, {}), b.get(section, {})
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                out.append(f"{section}.{k}: {x.get(k)!r} -> {y.get(k)!r}")
    return out


@dataclass
class TrainSummary:
    checkpoint: Path
    fingerprint: str
    epochs_done: int  # epochs in the checkpoint's training, resumed ones included
    epochs: int  # the schedule's length: train.epochs, or fewer when fitted to the time budget
    images: int
    seconds: float  # this run
    final_loss: float | None
    stopped_early: bool = False  # before the schedule's end (its LR had not reached 0)
    stop_reason: str = ""
    resumed_from: int | None = None  # epochs already done when this run started
    device: str = "cpu"
    world_size: int = 1
    skipped: dict[str, str] = field(default_factory=dict)  # image_id -> why not decodable
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_planned: int = 0  # train.epochs
    fit_reason: str = ""  # why the schedule was shortened ("" when it was not)
    precision: str = "fp32"

    def lines(self) -> list[str]:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        out = [
            f"train: {self.epochs_done}/{self.epochs} epochs on {self.images} images, "
            f"final loss {loss}, {self.seconds:.1f} s on {self.device}"
            f"{f' x{self.world_size}' if self.world_size > 1 else ''}{resumed}"
        ]
        if self.fit_reason:
            out.append(f"  schedule fitted to the time budget: {self.fit_reason}")
        if self.stopped_early:
            out.append(f"  stopped early ({self.stop_reason}); `cbir train --resume` continues")
        out.append(
            f"  checkpoint {self.checkpoint} (model {self.fingerprint}); "
            f"run `cbir embed` to re-embed with it"
        )
        for image_id, why in list(self.skipped.items())[:10]:
            out.append(f"  not trained on: {image_id}: {why}")
        if len(self.skipped) > 10:
            out.append(f"  ... and {len(self.skipped) - 10} more not trained on")
        return out


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=["epoch", "step", "loss", "lr", "seconds"], lineterminator="\n"
    )
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def run_train(
    settings: Settings,
    *,
    resume: bool = False,
    restart: bool = False,
    progress: bool = False,
    max_epochs: int | None = None,
    log: Log = print,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainSummary:
    """Fine-tune the descriptor on the collection; write last.pt each epoch and the final
    retrieval checkpoint (model.checkpoint). `max_epochs` stops after that many epochs in all
    (the LR schedule still spans train.epochs; `resume` continues later). `clock` (seconds) is
    read when the run starts and at the start and end of each epoch; tests inject one.
    `IncompatibleCheckpoint` when `resume` finds a last.pt of other params or other images;
    with `restart`, training starts again from the beginning instead (resume_or_restart)."""
    d, device, created = setup(settings.train.device)
    try:
        return _run(
            settings,
            d,
            device,
            resume=resume,
            restart=restart,
            progress=progress and d.main,
            max_epochs=max_epochs,
            log=log if d.main else (lambda _: None),
            clock=clock,
        )
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def resume_or_restart(
    settings: Settings, *, progress: bool = False, log: Log = print
) -> TrainSummary:
    """Train as a rerun of a pipeline does (`cbir build`, `cbir find-duplicates`): resume
    from last.pt where it fits (nothing to do after a finished training on the same images
    and params), else start again from the beginning, as `dvc repro` does when the training
    images or params changed."""
    return run_train(settings, resume=True, restart=True, progress=progress, log=log)


def _run(
    settings: Settings,
    d: Dist,
    device: torch.device,
    *,
    resume: bool,
    restart: bool,
    progress: bool,
    max_epochs: int | None,
    log: Log,
    clock: Callable[[], float],
) -> TrainSummary:
    t0 = clock()
    t = settings.train
    if t.seed < 0 or settings.model.seed < 0:
        raise CbirError("train.seed and model.seed must be >= 0")
    lay = layout(settings)
    cache = _prepare(settings, lay, d, progress, log)
    n = len(cache.rows)
    batch, steps = batching(n, t.batch_size, d)
    sched = Schedule(base=t.lr, steps=steps, warmup=round(t.warmup_epochs * steps), epochs=t.epochs)
    net = _build(settings, d, device)
    threads = f" with {counted(torch.get_num_threads(), 'thread')}" if device.type == "cpu" else ""
    log(
        f"train: {n} images, {counted(steps, 'step')} an epoch, {net.precision} on "
        f"{device}{threads}, {counted(t.workers, 'augmentation worker')}"
    )
    recipe = _recipe(settings)
    state = _resume(
        lay.last_state,
        net,
        TrainState(sched),
        recipe,
        cache,
        d,
        resume=resume,
        restart=restart,
        log=log,
    )

    ddp: nn.Module = net.net
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            net.net, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = EpochBatches(n, batch, seed=t.seed, rank=d.rank, world=d.world)
    loader = _loader(cache, settings, sampler, net.use_amp)

    stop_at = max_epochs if max_epochs is not None else t.epochs
    budget = t.time_budget_minutes * 60.0
    epoch_cost = state.history[-1]["seconds"] if state.history else None  # with checkpoint
    stop_reason = ""
    lr = net.opt.param_groups[0]["lr"]
    epoch = state.start
    now = clock()
    while epoch < min(state.sched.epochs, stop_at):
        if budget and epoch_cost is not None:
            stop_reason = fit_to_budget(state, epoch, now - t0, epoch_cost, t, lr, d, device, log)
            if stop_reason:
                break
        te = now
        sampler.epoch = epoch
        epoch_loss, lr = run_epoch(
            ddp, net, loader, state.sched, epoch, steps, t, d, device, progress, lr
        )
        epoch_seconds = clock() - te
        epoch += 1
        state.history.append(
            {
                "epoch": epoch,
                "step": epoch * steps,
                "loss": round(epoch_loss, 6),
                "lr": lr,
                "seconds": round(epoch_seconds, 3),
            }
        )
        if d.main:
            _checkpoint(lay, net, state, epoch, recipe, settings, cache, d)
        log(
            f"epoch {epoch}/{state.sched.epochs}: loss {epoch_loss:.4f}, lr {lr:.3g}, "
            f"{epoch_seconds:.1f} s"
        )
        now = clock()
        epoch_cost = now - te
    if d.main and state.history:  # also when this run had nothing left to do, or was killed
        write_text(_history_csv(state.history), lay.history)
    summary = _finish(
        settings,
        lay,
        d,
        device,
        cache,
        net,
        state,
        recipe,
        stop_reason=stop_reason,
        max_epochs=max_epochs,
        seconds=clock() - t0,
    )
    barrier(d)
    return summary


def _prepare(settings: Settings, lay: Layout, d: Dist, progress: bool, log: Log) -> TrainCache:
    """The decoded training images: rank 0 builds the cache, the other ranks read it."""
    if d.main:
        lay.models_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(lay.models_dir)
        cache = build_cache(settings, progress=progress, log=log)
    barrier(d)
    if not d.main:
        read = _read_cache(lay.train_cache(cache_side(settings.train.resolution)))
        if read is None:
            raise CbirError("rank 0 did not leave a readable training cache")
        cache = read
    n = len(cache.rows)
    if n < 2:
        raise CbirError(
            f"training needs at least 2 decodable images, the manifest has {n}: "
            f"run `cbir ingest` first"
        )
    return cache


def _build(settings: Settings, d: Dist, device: torch.device) -> Trainer:
    """The model on its device, with its precision, optimiser and gradient scaler."""
    t = settings.train
    if device.type == "cpu":  # the CPUs this process may use, shared between the ranks here
        torch.set_num_threads(torch_threads(available_cpus(), t.workers, d.local_world))
    use_amp = device.type == "cuda" and t.precision == "auto"
    bf16 = cpu_bf16(device, t.precision, torch.get_num_threads())
    precision = "fp16 mixed" if use_amp else "bf16 trunk" if bf16 else "fp32"
    if use_amp:  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    model, source = build_model(
        ModelConfig.from_settings(settings.model),
        settings.model.init,
        seed=settings.model.seed,
        base=settings.root,
    )
    net: nn.Module = Contrastive(model, bf16_trunk=bf16)
    if d.world > 1 and device.type == "cuda":  # SSCD: BN statistics over the global batch
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # channels_last: the layout mixed-precision convolutions are fastest in (GPU and CPU)
    channels_last = use_amp or bf16
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = optimizer(net.parameters(), t)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return Trainer(
        model=model,
        source=source,
        net=net,
        opt=opt,
        scaler=scaler,
        use_amp=use_amp,
        channels_last=channels_last,
        precision=precision,
    )


def _resume(
    last: Path,
    net: Trainer,
    state: TrainState,
    recipe: dict[str, Any],
    cache: TrainCache,
    d: Dist,
    *,
    resume: bool,
    restart: bool = False,
    log: Log,
) -> TrainState:
    """The state of `last` (weights, optimiser and scaler loaded into `net`) when resuming from
    a compatible one, else `state` (and the stale last.pt removed). An incompatible one is
    refused (IncompatibleCheckpoint), or with `restart` set aside: training starts again."""
    if not (resume and last.is_file()):
        if resume:
            log(f"no {last}: starting from the beginning")
        if d.main:
            last.unlink(missing_ok=True)  # a kill before epoch 1 ends must not resume it
        return state
    saved = safe_load(last)
    why = advice = ""
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        why, advice = f"{last} is not a cbir training state", "remove it or train without --resume"
    elif diff := _differences(saved["recipe"], recipe):
        why = f"cannot resume: {last} was trained with other params ({'; '.join(diff[:5])})"
        advice = "train without --resume to start again"
    elif saved["images"] != cache.key:
        why = (
            f"cannot resume: the training images changed since {last} "
            f"({saved['n_images']} then, {len(cache.rows)} now)"
        )
        advice = "train without --resume"
    if why and not restart:
        raise IncompatibleCheckpoint(f"{why}; {advice}")
    if why:  # a pipeline's rerun: as `dvc repro` would, from the beginning
        log(f"{why}: training again from the beginning")
        if d.main:
            last.unlink(missing_ok=True)
        return state
    net.model.load_state_dict(saved["model"])
    net.opt.load_state_dict(saved["optimizer"])
    net.scaler.load_state_dict(saved["scaler"])
    state = TrainState(state.sched, start=int(saved["epoch"]), history=list(saved["history"]))
    if saved.get("schedule"):  # the schedule as fitted so far: continue it, not the plan
        state.sched = replace(state.sched, **saved["schedule"])
        state.fits = list(saved.get("fits", []))
    log(f"resuming after epoch {state.start}/{state.sched.epochs} from {last}")
    return state


def _loader(
    cache: TrainCache, settings: Settings, sampler: EpochBatches, pin_memory: bool
) -> DataLoader:
    t = settings.train
    data = TwoViews(cache, t.augmentation, t.resolution, t.augment_strength, t.seed)
    return DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=t.workers,
        pin_memory=pin_memory,
        persistent_workers=t.workers > 0,
        prefetch_factor=2 if t.workers else None,
        multiprocessing_context=start_method(["cbir.augment", "cbir.training.data"])
        if t.workers
        else None,
        worker_init_fn=partial(end_with, os.getpid()) if t.workers else None,
    )


def _checkpoint(
    lay: Layout,
    net: Trainer,
    state: TrainState,
    epoch: int,
    recipe: dict[str, Any],
    settings: Settings,
    cache: TrainCache,
    d: Dist,
) -> None:
    """last.pt after epoch `epoch` (all a resume needs), and the history so far."""
    faults.point("train.epoch")
    model = net.model
    with atomic_path(lay.last_state) as tmp:
        torch.save(
            {
                "format": STATE_FORMAT,
                "epoch": epoch,
                "history": state.history,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": net.opt.state_dict(),
                "scaler": net.scaler.state_dict(),
                "recipe": recipe,
                "params": settings.train.model_dump(mode="json"),
                "images": cache.key,
                "n_images": len(cache.rows),
                "world_size": d.world,
                "schedule": state.sched.state(),
                "fits": state.fits,
            },
            tmp,
        )
    write_text(_history_csv(state.history), lay.history)


def _finish(
    settings: Settings,
    lay: Layout,
    d: Dist,
    device: torch.device,
    cache: TrainCache,
    net: Trainer,
    state: TrainState,
    recipe: dict[str, Any],
    *,
    stop_reason: str,
    max_epochs: int | None,
    seconds: float,
) -> TrainSummary:
    """The summary; on rank 0, the retrieval checkpoint and train_metrics.json."""
    t, history, sched, fits = settings.train, state.history, state.sched, state.fits
    n = len(cache.rows)
    done = len(history)
    if not stop_reason and done < sched.epochs:
        stop_reason = f"max_epochs={max_epochs}"
    final_loss = history[-1]["loss"] if history else None
    fit_reason = fits[-1]["reason"] if fits else ""
    summary = TrainSummary(
        checkpoint=lay.checkpoint,
        fingerprint="",
        epochs_done=done,
        epochs=sched.epochs,
        images=n,
        seconds=seconds,
        final_loss=final_loss,
        stopped_early=done < sched.epochs,
        stop_reason=stop_reason,
        resumed_from=state.start if state.start else None,
        device=str(device),
        world_size=d.world,
        skipped=dict(cache.failed),
        history=history,
        epochs_planned=t.epochs,
        fit_reason=fit_reason,
        precision=net.precision,
    )
    if d.main:
        info = {
            "epochs": done,
            "epochs_planned": t.epochs,
            "epochs_fitted": sched.epochs,
            "fit_reason": fit_reason,
            "fits": fits,
            "final_loss": final_loss,
            "images": n,
            "stopped_early": summary.stopped_early,
            "stop_reason": stop_reason,
            "init": net.source,
            "history": history,
            "params": recipe,
            "world_size": d.world,
            "precision": net.precision,
        }
        summary.fingerprint = save_checkpoint(
            summary.checkpoint, net.model, retrieval_preprocess(settings), extra={"training": info}
        )
        write_json(
            {
                "loss": final_loss,
                "epochs": done,
                "images": n,
                "seconds": round(seconds, 3),
                "stopped_early": summary.stopped_early,
                "epochs_planned": t.epochs,
                "epochs_fitted": sched.epochs,
                "fit_reason": fit_reason,
            },
            lay.train_metrics,
        )
    return summary


# --------------------------------------------------------------------------- torchrun entry


def main_torchrun(argv: Sequence[str] | None = None) -> int:
    """`torchrun --nproc_per_node=N -m cbir.steps.train --params params.yaml [--resume]`; also runs
    as a single process with plain `python -m cbir.steps.train`."""
    from ..config import DEFAULT_PARAMS, load_settings

    p = argparse.ArgumentParser(prog="cbir.steps.train", description=__doc__.splitlines()[0])
    p.add_argument("--params", default=DEFAULT_PARAMS, metavar="PATH")
    p.add_argument("--resume", action="store_true", help="continue from models_dir/last.pt")
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="stop after this many epochs in all (the schedule still spans train.epochs)",
    )
    args = p.parse_args(argv)
    try:
        summary = run_train(
            load_settings(args.params),
            resume=args.resume,
            progress=sys.stderr.isatty(),
            max_epochs=args.max_epochs,
        )
    except CbirError as exc:
        print(f"cbir train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main_torchrun())
