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
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import faults, imaging
from .config import Settings
from .embed import pick_device, to_tensor
from .errors import CbirError
from .fsutil import atomic_path, clean_stale_tmp, write_json, write_text
from .ingest import canonical_images
from .losses import koleo, nt_xent
from .model import (Descriptor, ModelConfig, Preprocess, build_model, retrieval_preprocess,
                    safe_load, save_checkpoint)
from .parallel import start_method
from .progress import bar as progress_bar

CACHE_SCALE = 1.25  # cache side / training resolution: room for crops without upsampling
CACHE_FORMAT = "cbir-train-cache/1"
STATE_FORMAT = "cbir-train-state/1"
LAST = "last.pt"
HISTORY = "history.csv"
METRICS = "train_metrics.json"
MIX_STREAM = 2  # rng key slot for cutmix/mixup; views use 0 and 1
# Settings that change how fast a run goes, not what it computes: resume ignores them.
_NOT_RECIPE = {"workers", "device", "time_budget_minutes"}

Log = Callable[[str], None]


# --------------------------------------------------------------------------- decoded cache

def cache_side(resolution: int) -> int:
    return int(round(resolution * CACHE_SCALE))


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
        cache = TrainCache(folder=folder, file=folder / meta["file"], side=int(meta["side"]),
                           ids=list(meta["ids"]), failed=dict(meta["failed"]))
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
    folder = settings.path(settings.data.cache_dir) / f"train-{side}"
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(folder)
    scans = os.fsencode(settings.path(settings.data.scans_dir))
    rows = canonical_images(settings)
    ids = [r["image_id"] for r in rows]
    if not ids:
        raise CbirError("no images to train on: the manifest is empty (run `cbir ingest`)")
    old = _read_cache(folder)
    if old is not None and old.side == side and old.ids == ids:
        return old

    wanted = set(ids)
    reuse = {i: r for r, i in enumerate(old.ids) if i in wanted and i not in old.failed} \
        if old else {}
    todo = [(r, os.path.join(scans, row["path_raw"]), side, settings.ingest.max_pixels)
            for r, row in enumerate(rows) if row["image_id"] not in reuse]
    failed: dict[str, str] = {}
    name = f"images-{_ids_key(ids, side)}.npy"
    t0 = time.perf_counter()
    with atomic_path(folder / name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(ids), side, side, 3))
        if reuse:
            previous = np.load(old.file, mmap_mode="r")
            for r, i in enumerate(ids):
                if i in reuse:
                    out[r] = previous[reuse[i]]
            del previous
        workers = min(settings.workers, max(1, len(todo) // 8))
        bar = progress_bar(len(todo), "train cache", "img", progress)
        pool = None
        try:
            if workers > 1:
                pool = mp.get_context(start_method(["cbir.imaging"])).Pool(workers)
                results: Iterator = pool.imap_unordered(_decode_one, todo, chunksize=4)
            else:
                results = map(_decode_one, todo)
            for r, pixels, why in results:
                if pixels is None:
                    failed[ids[r]] = why or "cannot be decoded"
                else:
                    out[r] = np.frombuffer(pixels, np.uint8).reshape(side, side, 3)
                faults.point("train.cache")
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        out.flush()
        del out
    # index.json is the commit point: it names the array file it describes.
    write_json({"format": CACHE_FORMAT, "side": side, "file": name, "ids": ids,
                "failed": failed, "resize": "square"}, folder / "index.json")
    for stale in folder.glob("images-*.npy"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    log(f"train cache: {len(todo) - len(failed)} images decoded, {len(reuse)} reused, "
        f"{len(failed)} failed, {time.perf_counter() - t0:.1f} s ({folder})")
    return TrainCache(folder=folder, file=folder / name, side=side, ids=ids, failed=failed)


# --------------------------------------------------------------------------- data

class TwoViews(Dataset):
    """Two augmented views of a cached image; items are keyed by (epoch, index)."""

    def __init__(self, cache: TrainCache, strategy: str, resolution: int, strength: float,
                 seed: int) -> None:
        self.file, self.rows = cache.file, cache.rows
        self.strategy, self.strength, self.seed = strategy, strength, seed
        self.pp = Preprocess(resolution=resolution)
        self._images: np.ndarray | None = None
        self._augment: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:  # workers open their own memmap
        return {**self.__dict__, "_images": None, "_augment": None}

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        if self._images is None:
            from .augment import make_augmenter

            self._images = np.load(self.file, mmap_mode="r")
            self._augment = make_augmenter(self.strategy, self.pp.resolution,
                                           strength=self.strength)
        picture = Image.fromarray(np.array(self._images[self.rows[index]]), "RGB")
        views = [to_tensor(self._augment(picture, np.random.default_rng(
                     [self.seed, epoch, index, v])), self.pp) for v in (0, 1)]
        return views[0], views[1]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's share of each global batch of the epoch's seeded shuffle (drop_last)."""

    def __init__(self, n: int, batch: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.local = batch // world
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for s in range(len(self)):
            start = s * self.batch + self.rank * self.local
            yield [(self.epoch, int(i)) for i in order[start:start + self.local]]


def mix_views(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Cutmix (or, half the time, mixup) of each view with its neighbour's in the batch.

    The simple variant: an image keeps at least half of its own pixels and stays the positive of
    its own source only; the partner's content counts as a negative as usual.
    """
    partner = x.roll(1, dims=0)
    lam = float(rng.uniform(0.5, 1.0))  # the share of the image's own content
    if rng.random() < 0.5:
        return lam * x + (1.0 - lam) * partner
    h, w = x.shape[-2:]
    ph, pw = int(round(h * math.sqrt(1 - lam))), int(round(w * math.sqrt(1 - lam)))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = x.clone()
    out[..., y0:y0 + ph, x0:x0 + pw] = partner[..., y0:y0 + ph, x0:x0 + pw]
    return out


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay reaching 0 after `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(device_name: str) -> tuple[Dist, torch.device, bool]:
    """(ranks, this rank's device, whether we created the process group)."""
    try:
        device = pick_device(device_name)
    except CbirError:
        raise CbirError(f"unknown device {device_name!r} (train.device: auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CbirError(f"train.device is {device_name!r} but no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device, False
    d = Dist(rank=int(os.environ["RANK"]), world=world,
             local_rank=int(os.environ.get("LOCAL_RANK", "0")),
             local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        # Long timeout: the other ranks wait while rank 0 decodes the training cache.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)
    return d, device, created


def _gather(z: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world == 1:
        return z
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # deprecated in torch 2.14 for a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(z))  # differentiable: other ranks' losses reach z


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _agree(value: float, d: Dist, device: torch.device) -> float:
    """Rank 0's value, on every rank (so all ranks take the same decisions)."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def _mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


# --------------------------------------------------------------------------- model and loss

class Contrastive(nn.Module):
    """The training forward: normalised projection of the pooled trunk (what DDP wraps)."""

    def __init__(self, model: Descriptor) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.head(self.model.pooled(x)), dim=-1)


def contrastive_loss(z: torch.Tensor, temperature: float, koleo_weight: float,
                     d: Dist = Dist()) -> torch.Tensor:
    """NT-Xent (+ KoLeo) of a [2b, dim] batch (view 1 rows, then view 2), global negatives."""
    b = z.shape[0] // 2
    parts = _gather(z, d).view(d.world, 2, b, -1)  # rank-major, then view
    g1, g2 = parts[:, 0].reshape(d.world * b, -1), parts[:, 1].reshape(d.world * b, -1)
    offset = d.rank * b
    loss = nt_xent(z[:b], z[b:], temperature, gathered=(g1, g2), offset=offset)
    if koleo_weight > 0:
        own = torch.arange(b, device=z.device) + offset
        every = torch.arange(d.world * b, device=z.device)
        loss = loss + koleo_weight * koleo(z, torch.cat([own, own]),
                                           keys=torch.cat([g1, g2]),
                                           key_labels=torch.cat([every, every]))
    return loss


def _optimizer(params: Any, t: Any) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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


# --------------------------------------------------------------------------- the run

@dataclass
class TrainSummary:
    checkpoint: Path
    fingerprint: str
    epochs_done: int  # epochs in the checkpoint's training, resumed ones included
    epochs: int  # train.epochs
    images: int
    seconds: float  # this run
    final_loss: float | None
    stopped_early: bool = False
    stop_reason: str = ""
    resumed_from: int | None = None  # epochs already done when this run started
    device: str = "cpu"
    world_size: int = 1
    skipped: dict[str, str] = field(default_factory=dict)  # image_id -> why not decodable
    history: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        out = [f"train: {self.epochs_done}/{self.epochs} epochs on {self.images} images, "
               f"final loss {loss}, {self.seconds:.1f} s on {self.device}"
               f"{f' x{self.world_size}' if self.world_size > 1 else ''}{resumed}"]
        if self.stopped_early:
            out.append(f"  stopped early ({self.stop_reason}); `cbir train --resume` continues")
        out.append(f"  checkpoint {self.checkpoint} (model {self.fingerprint}); "
                   f"run `cbir embed` to re-embed with it")
        for image_id, why in list(self.skipped.items())[:10]:
            out.append(f"  not trained on: {image_id}: {why}")
        if len(self.skipped) > 10:
            out.append(f"  ... and {len(self.skipped) - 10} more not trained on")
        return out


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["epoch", "step", "loss", "lr", "seconds"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def run_train(settings: Settings, *, resume: bool = False, progress: bool = False,
              max_epochs: int | None = None, log: Log = print) -> TrainSummary:
    """Fine-tune the descriptor on the collection; write last.pt each epoch and the final
    retrieval checkpoint (model.checkpoint). `max_epochs` stops after that many epochs in all
    (the LR schedule still spans train.epochs; `resume` continues later)."""
    d, device, created = _setup(settings.train.device)
    try:
        return _run(settings, d, device, resume=resume, progress=progress and d.main,
                    max_epochs=max_epochs, log=log if d.main else (lambda _: None))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(settings: Settings, d: Dist, device: torch.device, *, resume: bool, progress: bool,
         max_epochs: int | None, log: Log) -> TrainSummary:
    t0 = time.perf_counter()
    t = settings.train
    if t.seed < 0 or settings.model.seed < 0:
        raise CbirError("train.seed and model.seed must be >= 0")
    models_dir = settings.path(settings.data.models_dir)
    last = models_dir / LAST
    if d.main:
        models_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(models_dir)
        cache = build_cache(settings, progress=progress, log=log)
    _barrier(d)
    if not d.main:
        cache = _read_cache(settings.path(settings.data.cache_dir)
                            / f"train-{cache_side(t.resolution)}")
        if cache is None:
            raise CbirError("rank 0 did not leave a readable training cache")
    n = len(cache.rows)
    if n < 2:
        raise CbirError(f"training needs at least 2 decodable images, the manifest has {n}: "
                        f"run `cbir ingest` first")
    if t.batch_size <= n:
        batch = t.batch_size
        if batch % d.world:
            raise CbirError(f"train.batch_size {batch} (the global batch) must be a multiple "
                            f"of the number of processes ({d.world})")
    else:  # a small collection: the whole of it is one batch
        batch = n - n % d.world
    if batch < max(2, d.world):
        raise CbirError(f"{n} images are too few for {d.world} processes")
    steps = n // batch
    total = steps * t.epochs
    warmup = int(round(t.warmup_epochs * steps))

    if device.type == "cpu":  # all cores by default, shared between the ranks on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))
    use_amp = device.type == "cuda"
    if use_amp:  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    model, source = build_model(ModelConfig.from_settings(settings.model), settings.model.init,
                                seed=settings.model.seed, base=settings.root)
    net: nn.Module = Contrastive(model)
    if d.world > 1 and device.type == "cuda":  # SSCD: BN statistics over the global batch
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # channels_last: tensor-core friendly layout for mixed-precision convolutions
    net = net.to(device, memory_format=torch.channels_last if use_amp else torch.preserve_format)
    opt = _optimizer(net.parameters(), t)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    recipe = _recipe(settings)
    history: list[dict[str, Any]] = []
    start = 0
    if resume and last.is_file():
        state = safe_load(last)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CbirError(f"{last} is not a cbir training state; remove it or train without "
                            f"--resume")
        diff = _differences(state["recipe"], recipe)
        if diff:
            raise CbirError(f"cannot resume: {last} was trained with other params ("
                            f"{'; '.join(diff[:5])}); train without --resume to start again")
        if state["images"] != cache.key:
            raise CbirError(f"cannot resume: the training images changed since {last} "
                            f"({state['n_images']} then, {n} now); train without --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, history = int(state["epoch"]), list(state["history"])
        log(f"resuming after epoch {start}/{t.epochs} from {last}")
    else:
        if resume:
            log(f"no {last}: starting from the beginning")
        if d.main:
            last.unlink(missing_ok=True)  # a kill before epoch 1 ends must not resume it

    ddp: nn.Module = net
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochBatches(n, batch, seed=t.seed, rank=d.rank, world=d.world)
    data = TwoViews(cache, t.augmentation, t.resolution, t.augment_strength, t.seed)
    loader = DataLoader(
        data, batch_sampler=sampler, num_workers=t.workers, pin_memory=use_amp,
        persistent_workers=t.workers > 0, prefetch_factor=2 if t.workers else None,
        multiprocessing_context=start_method(["cbir.augment", "cbir.train"])
        if t.workers else None)

    end = t.epochs if max_epochs is None else max(0, min(t.epochs, max_epochs))
    budget = t.time_budget_minutes * 60.0
    epoch_seconds = history[-1]["seconds"] if history else None
    stop_reason = ""
    lr = opt.param_groups[0]["lr"]
    for epoch in range(start, end):
        elapsed = time.perf_counter() - t0
        over = bool(budget and epoch_seconds is not None and elapsed + epoch_seconds > budget)
        if _agree(float(over), d, device):
            stop_reason = (f"time budget of {t.time_budget_minutes:g} min: another epoch "
                           f"(~{epoch_seconds:.0f} s) would exceed it")
            break
        te = time.perf_counter()
        sampler.epoch = epoch
        ddp.train()
        bar = progress_bar(steps, f"train {epoch + 1}/{t.epochs}", "batch", progress)
        loss_sum = 0.0
        for i, (x1, x2) in enumerate(loader):
            step = epoch * steps + i
            lr = lr_at(step, total, warmup, t.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            if t.mix_prob > 0:
                rng = np.random.default_rng([t.seed, epoch, step, MIX_STREAM, d.rank])
                if rng.random() < t.mix_prob:
                    x2 = mix_views(x2, rng)
            x = torch.cat([x1, x2]).to(device, non_blocking=True)
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=use_amp):
                z = ddp(x)
            loss = contrastive_loss(z.float(), t.temperature, t.koleo_weight, d)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = float(loss.item())
            if not math.isfinite(value):
                raise CbirError(f"training diverged (loss {value} at epoch {epoch + 1}, step "
                                f"{i + 1}): lower train.lr or raise train.temperature")
            loss_sum += value
            faults.point("train.step")
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.4f}")
        bar.close()
        epoch_loss = _mean(loss_sum / steps, d, device)
        epoch_seconds = time.perf_counter() - te
        history.append({"epoch": epoch + 1, "step": (epoch + 1) * steps,
                        "loss": round(epoch_loss, 6), "lr": lr,
                        "seconds": round(epoch_seconds, 3)})
        if d.main:
            faults.point("train.epoch")
            with atomic_path(last) as tmp:
                torch.save({"format": STATE_FORMAT, "epoch": epoch + 1, "history": history,
                            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                            "recipe": recipe, "params": settings.train.model_dump(mode="json"),
                            "images": cache.key, "n_images": n,
                            "world_size": d.world}, tmp)
            write_text(_history_csv(history), models_dir / HISTORY)
        log(f"epoch {epoch + 1}/{t.epochs}: loss {epoch_loss:.4f}, lr {lr:.3g}, "
            f"{epoch_seconds:.1f} s")
    if d.main and history:  # also when this run had nothing left to do, or was killed before
        write_text(_history_csv(history), models_dir / HISTORY)
    done = len(history)
    if not stop_reason and done < t.epochs:
        stop_reason = f"max_epochs={max_epochs}"

    final_loss = history[-1]["loss"] if history else None
    seconds = time.perf_counter() - t0
    summary = TrainSummary(
        checkpoint=settings.path(settings.model.checkpoint), fingerprint="", epochs_done=done,
        epochs=t.epochs, images=n, seconds=seconds, final_loss=final_loss,
        stopped_early=done < t.epochs, stop_reason=stop_reason,
        resumed_from=start if start else None, device=str(device), world_size=d.world,
        skipped=dict(cache.failed), history=history)
    if d.main:
        info = {"epochs": done, "epochs_planned": t.epochs, "final_loss": final_loss,
                "images": n, "stopped_early": summary.stopped_early,
                "stop_reason": stop_reason, "init": source, "history": history,
                "params": recipe, "world_size": d.world}
        summary.fingerprint = save_checkpoint(summary.checkpoint, model,
                                              retrieval_preprocess(settings),
                                              extra={"training": info})
        write_json({"loss": final_loss, "epochs": done, "images": n,
                    "seconds": round(seconds, 3), "stopped_early": summary.stopped_early},
                   models_dir / METRICS)
    _barrier(d)
    return summary


# --------------------------------------------------------------------------- torchrun entry

def main_torchrun(argv: Sequence[str] | None = None) -> int:
    """`torchrun --nproc_per_node=N -m cbir.train --params params.yaml [--resume]`; also runs
    as a single process with plain `python -m cbir.train`."""
    from .config import DEFAULT_PARAMS, load_settings

    p = argparse.ArgumentParser(prog="cbir.train", description=__doc__.splitlines()[0])
    p.add_argument("--params", default=DEFAULT_PARAMS, metavar="PATH")
    p.add_argument("--resume", action="store_true", help="continue from models_dir/last.pt")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="stop after this many epochs in all (the schedule still spans "
                        "train.epochs)")
    args = p.parse_args(argv)
    try:
        summary = run_train(load_settings(args.params), resume=args.resume,
                            progress=sys.stderr.isatty(), max_epochs=args.max_epochs)
    except CbirError as exc:
        print(f"cbir train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main_torchrun())
