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
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

# Before torch loads OpenMP (it reads this once): idle OpenMP threads sleep rather than spin.
# Spinning threads burn the CPU that the augmentation worker and other processes need, and on an
# oversubscribed machine they delay the very threads they wait for. Only takes effect where this
# module is the first to import torch (`cbir train`, torchrun); a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from .. import faults, imaging
from ..config import Settings
from ..model import pick_device, to_tensor
from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_json, write_text
from ..store.manifest import canonical_images
from ..losses import koleo, nt_xent
from ..model import (Descriptor, ModelConfig, Preprocess, build_model, retrieval_preprocess,
                    safe_load, save_checkpoint)
from ..parallel import start_method
from ..progress import bar as progress_bar
from ..store.layout import layout

CACHE_SCALE = 1.25  # cache side / training resolution: room for crops without upsampling
CACHE_FORMAT = "cbir-train-cache/1"
STATE_FORMAT = "cbir-train-state/1"
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
    lay = layout(settings)
    folder = lay.train_cache(side)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(folder)
    scans = os.fsencode(lay.scans)
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
            from ..augment import make_augmenter

            self._images = np.load(self.file, mmap_mode="r")
            self._augment = make_augmenter(self.strategy, self.pp.resolution,
                                           strength=self.strength)
        picture = Image.fromarray(np.array(self._images[self.rows[index]]), "RGB")
        views = [self._tensor(self._augment(picture, np.random.default_rng(
                     [self.seed, epoch, index, v]))) for v in (0, 1)]
        return views[0], views[1]

    def _tensor(self, view: Image.Image) -> torch.Tensor:
        """`embed.to_tensor`'s values (the same float32 operations), computed by numpy: torch
        would start its thread pool for each small tensor when this runs in the main process."""
        pp = self.pp
        if view.size != (pp.resolution, pp.resolution):
            return to_tensor(view, pp)
        x = np.asarray(view, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        return torch.from_numpy(x).permute(2, 0, 1)


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


FIT_SLACK = 0.05  # a fitted schedule leaves this share of each epoch's time for noise


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then cosine decay reaching 0 at the end of epoch `epochs`.

    Unfitted (`anchor` None) it is exactly `lr_at`. Fitted to a time budget, the decay ends
    earlier without a jump in the LR: from step `anchor` on, the cosine's remaining progress
    (from `progress` there, to 1) is spread over the steps left.
    """

    base: float
    steps: int  # per epoch
    warmup: int  # steps
    epochs: int
    anchor: int | None = None
    progress: float = 0.0

    @property
    def total(self) -> int:
        return self.epochs * self.steps

    def lr(self, step: int) -> float:
        if self.anchor is None or step < self.warmup:
            return lr_at(step, self.total, self.warmup, self.base)
        return self.base * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """Cosine progress at `step` (>= warm-up): 0 where the decay starts, 1 at its end."""
        if self.anchor is None:
            return (step - self.warmup) / max(1, self.total - self.warmup)
        return self.progress + (1.0 - self.progress) * (step - self.anchor) / max(
            1, self.total - self.anchor)

    def fewest_epochs(self, done: int) -> int:
        """The shortest schedule still possible after `done` epochs: one that ends at least one
        step after the warm-up."""
        return max(done * self.steps, self.warmup) // self.steps + 1

    def fitted(self, done: int, epochs: int) -> Schedule:
        """This schedule, continued from the end of epoch `done`, ending after `epochs`."""
        if epochs < self.fewest_epochs(done):
            raise ValueError(f"cannot end after epoch {epochs} once {done} are done")
        at = max(done * self.steps, self.warmup)
        return replace(self, epochs=epochs, anchor=at, progress=self._progress(at))

    def state(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "anchor": self.anchor, "progress": self.progress}


def fit_epochs(schedule: Schedule, done: int, elapsed: float, epoch_seconds: float,
               budget: float) -> int:
    """The epochs the schedule should span so that it ends within `budget` seconds of the run:
    its length if that fits at `epoch_seconds` an epoch, else as many as fit (leaving FIT_SLACK
    for noise), but never fewer than `Schedule.fewest_epochs`. Only ever shortens."""
    left = schedule.epochs - done
    if budget <= 0 or left <= 0 or elapsed + left * epoch_seconds <= budget:
        return schedule.epochs
    fits = done + int(max(0.0, budget - elapsed) / (epoch_seconds * (1.0 + FIT_SLACK)))
    return min(schedule.epochs, max(schedule.fewest_epochs(done), fits))


# --------------------------------------------------------------------------- CPU

def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"),
                   proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (what a
    container, `taskset` or a systemd slice grants), not the machine's core count. More threads
    than that only wait for each other at every parallel step."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def torch_threads(cpus: int, workers: int, ranks: int = 1) -> int:
    """Intra-op threads for each rank: its share of the CPUs, less those its augmentation workers
    run on. OpenMP threads meet at the end of every operation, so a thread that has to share a
    core (with a worker, or another process) holds up the others hundreds of times a step:
    on 2 busy cores, 2 threads ran a step slower than 1 did."""
    return max(1, cpus // max(1, ranks) - workers)


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroup grants (the smallest along its path), or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max in the cgroup and each of its parents
            folder = root / path.lstrip("/")
            while True:
                limits.append(_read_quota(folder / "cpu.max", None))
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                for folder in (base / path.lstrip("/"), base):
                    limits.append(_read_quota(folder / "cpu.cfs_quota_us",
                                              folder / "cpu.cfs_period_us"))
    found = [q for q in limits if q]
    return min(found) if found else None


def _read_quota(quota_file: Path, period_file: Path | None) -> float | None:
    try:
        if period_file is None:  # v2: "max 100000" or "150000 100000"
            quota, period = quota_file.read_text().split()[:2]
        else:  # v1: quota -1 = none
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        q, per = float(quota), float(period)
    except (OSError, ValueError):
        return None
    return q / per if q > 0 and per > 0 else None


def _native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16, AMX): there bf16 convolutions take
    half the time of fp32 ones; elsewhere oneDNN emulates them, no faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) \
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (OSError, AttributeError, RuntimeError):
        return False


def cpu_bf16(device: torch.device, precision: str, threads: int) -> bool:
    """Whether the trunk runs in bf16 on this CPU: train.precision auto, native bf16, and one
    torch thread. oneDNN's bf16 weight gradients slow down as threads are added (layer4's 3x3
    convolution at 112 px: 0.19 s with 1 thread, 1.2 s with 2, 4.7 s with 4; AVX512-BF16,
    oneDNN 3.12), while fp32 ones speed up."""
    return device.type == "cpu" and precision == "auto" and threads == 1 and _native_bf16()


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
        out = [f"train: {self.epochs_done}/{self.epochs} epochs on {self.images} images, "
               f"final loss {loss}, {self.seconds:.1f} s on {self.device}"
               f"{f' x{self.world_size}' if self.world_size > 1 else ''}{resumed}"]
        if self.fit_reason:
            out.append(f"  schedule fitted to the time budget: {self.fit_reason}")
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


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_train(settings: Settings, *, resume: bool = False, progress: bool = False,
              max_epochs: int | None = None, log: Log = print,
              clock: Callable[[], float] = time.perf_counter) -> TrainSummary:
    """Fine-tune the descriptor on the collection; write last.pt each epoch and the final
    retrieval checkpoint (model.checkpoint). `max_epochs` stops after that many epochs in all
    (the LR schedule still spans train.epochs; `resume` continues later). `clock` (seconds) is
    read when the run starts and at the start and end of each epoch; tests inject one."""
    d, device, created = _setup(settings.train.device)
    try:
        return _run(settings, d, device, resume=resume, progress=progress and d.main,
                    max_epochs=max_epochs, log=log if d.main else (lambda _: None), clock=clock)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(settings: Settings, d: Dist, device: torch.device, *, resume: bool, progress: bool,
         max_epochs: int | None, log: Log, clock: Callable[[], float]) -> TrainSummary:
    t0 = clock()
    t = settings.train
    if t.seed < 0 or settings.model.seed < 0:
        raise CbirError("train.seed and model.seed must be >= 0")
    lay = layout(settings)
    models_dir, last = lay.models_dir, lay.last_state
    if d.main:
        models_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(models_dir)
        cache = build_cache(settings, progress=progress, log=log)
    _barrier(d)
    if not d.main:
        cache = _read_cache(lay.train_cache(cache_side(t.resolution)))
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
    sched = Schedule(base=t.lr, steps=steps, warmup=int(round(t.warmup_epochs * steps)),
                     epochs=t.epochs)

    if device.type == "cpu":  # the CPUs this process may use, shared between the ranks here
        torch.set_num_threads(torch_threads(available_cpus(), t.workers, d.local_world))
    use_amp = device.type == "cuda" and t.precision == "auto"
    bf16 = cpu_bf16(device, t.precision, torch.get_num_threads())
    precision = "fp16 mixed" if use_amp else "bf16 trunk" if bf16 else "fp32"
    if use_amp:  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    model, source = build_model(ModelConfig.from_settings(settings.model), settings.model.init,
                                seed=settings.model.seed, base=settings.root)
    net: nn.Module = Contrastive(model, bf16_trunk=bf16)
    if d.world > 1 and device.type == "cuda":  # SSCD: BN statistics over the global batch
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # channels_last: the layout mixed-precision convolutions are fastest in (GPU and CPU)
    channels_last = use_amp or bf16
    net = net.to(device,
                 memory_format=torch.channels_last if channels_last else torch.preserve_format)
    opt = _optimizer(net.parameters(), t)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log(f"train: {n} images, {steps} steps an epoch, {precision} on {device}"
        f"{f' with {torch.get_num_threads()} threads' if device.type == 'cpu' else ''}, "
        f"{t.workers} augmentation workers")

    recipe = _recipe(settings)
    history: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []  # each time the schedule was fitted to the time budget
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
        if state.get("schedule"):  # the schedule as fitted so far: continue it, not the plan
            sched = replace(sched, **state["schedule"])
            fits = list(state.get("fits", []))
        log(f"resuming after epoch {start}/{sched.epochs} from {last}")
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
        multiprocessing_context=start_method(["cbir.augment", "cbir.steps.train"])
        if t.workers else None)

    stop_at = max_epochs if max_epochs is not None else t.epochs
    budget = t.time_budget_minutes * 60.0
    epoch_cost = history[-1]["seconds"] if history else None  # an epoch, checkpoint included
    stop_reason = ""
    lr = opt.param_groups[0]["lr"]
    epoch = start
    now = clock()
    while epoch < min(sched.epochs, stop_at):
        elapsed = now - t0
        if budget and epoch_cost is not None:
            fitted = int(_agree(float(fit_epochs(sched, epoch, elapsed, epoch_cost, budget)),
                                d, device))
            if fitted < sched.epochs:
                why = (f"{sched.epochs} epochs of ~{epoch_cost:.0f} s would take "
                       f"{_minutes(elapsed + (sched.epochs - epoch) * epoch_cost)} "
                       f"(budget {t.time_budget_minutes:g} min, {epoch} done); fitted to "
                       f"{fitted} epochs")
                log(f"time budget: {why}")
                sched = sched.fitted(epoch, fitted)
                fits.append({"after_epoch": epoch, "epoch_seconds": round(epoch_cost, 3),
                             "epochs": fitted, "reason": why})
            if _agree(float(elapsed + epoch_cost > budget), d, device):  # the last resort
                stop_reason = (f"time budget of {t.time_budget_minutes:g} min ran out before "
                               f"the schedule's end: another epoch (~{epoch_cost:.0f} s) would "
                               f"exceed it, so the LR stopped at {lr:.3g} instead of 0")
                log(f"time budget: stopping after epoch {epoch} of {sched.epochs}: "
                    f"{stop_reason}")
                break
        te = now
        sampler.epoch = epoch
        ddp.train()
        bar = progress_bar(steps, f"train {epoch + 1}/{sched.epochs}", "batch", progress)
        loss_sum = 0.0
        for i, (x1, x2) in enumerate(loader):
            step = epoch * steps + i
            lr = sched.lr(step)
            for group in opt.param_groups:
                group["lr"] = lr
            if t.mix_prob > 0:
                rng = np.random.default_rng([t.seed, epoch, step, MIX_STREAM, d.rank])
                if rng.random() < t.mix_prob:
                    x2 = mix_views(x2, rng)
            x = torch.cat([x1, x2]).to(device, non_blocking=True)
            if channels_last:
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
        epoch_seconds = clock() - te
        epoch += 1
        history.append({"epoch": epoch, "step": epoch * steps,
                        "loss": round(epoch_loss, 6), "lr": lr,
                        "seconds": round(epoch_seconds, 3)})
        if d.main:
            faults.point("train.epoch")
            with atomic_path(last) as tmp:
                torch.save({"format": STATE_FORMAT, "epoch": epoch, "history": history,
                            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                            "recipe": recipe, "params": settings.train.model_dump(mode="json"),
                            "images": cache.key, "n_images": n, "world_size": d.world,
                            "schedule": sched.state(), "fits": fits}, tmp)
            write_text(_history_csv(history), lay.history)
        log(f"epoch {epoch}/{sched.epochs}: loss {epoch_loss:.4f}, lr {lr:.3g}, "
            f"{epoch_seconds:.1f} s")
        now = clock()
        epoch_cost = now - te
    if d.main and history:  # also when this run had nothing left to do, or was killed before
        write_text(_history_csv(history), lay.history)
    done = len(history)
    if not stop_reason and done < sched.epochs:
        stop_reason = f"max_epochs={max_epochs}"

    final_loss = history[-1]["loss"] if history else None
    seconds = clock() - t0
    fit_reason = fits[-1]["reason"] if fits else ""
    summary = TrainSummary(
        checkpoint=lay.checkpoint, fingerprint="", epochs_done=done,
        epochs=sched.epochs, images=n, seconds=seconds, final_loss=final_loss,
        stopped_early=done < sched.epochs, stop_reason=stop_reason,
        resumed_from=start if start else None, device=str(device), world_size=d.world,
        skipped=dict(cache.failed), history=history, epochs_planned=t.epochs,
        fit_reason=fit_reason, precision=precision)
    if d.main:
        info = {"epochs": done, "epochs_planned": t.epochs, "epochs_fitted": sched.epochs,
                "fit_reason": fit_reason, "fits": fits, "final_loss": final_loss,
                "images": n, "stopped_early": summary.stopped_early,
                "stop_reason": stop_reason, "init": source, "history": history,
                "params": recipe, "world_size": d.world, "precision": precision}
        summary.fingerprint = save_checkpoint(summary.checkpoint, model,
                                              retrieval_preprocess(settings),
                                              extra={"training": info})
        write_json({"loss": final_loss, "epochs": done, "images": n,
                    "seconds": round(seconds, 3), "stopped_early": summary.stopped_early,
                    "epochs_planned": t.epochs, "epochs_fitted": sched.epochs,
                    "fit_reason": fit_reason}, lay.train_metrics)
    _barrier(d)
    return summary


# --------------------------------------------------------------------------- torchrun entry

def main_torchrun(argv: Sequence[str] | None = None) -> int:
    """`torchrun --nproc_per_node=N -m cbir.steps.train --params params.yaml [--resume]`; also runs
    as a single process with plain `python -m cbir.steps.train`."""
    from ..config import DEFAULT_PARAMS, load_settings

    p = argparse.ArgumentParser(prog="cbir.steps.train", description=__doc__.splitlines()[0])
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
