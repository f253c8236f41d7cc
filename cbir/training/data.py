"""What the training loop iterates over: two augmented views of each cached image (`TwoViews`),
this rank's share of each global batch of an epoch's seeded shuffle (`EpochBatches`), and the
cutmix/mixup of a batch of views (`mix_views`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..model import Preprocess, to_tensor

MIX_STREAM = 2  # rng key slot for cutmix/mixup; views use 0 and 1


class DecodedImages(Protocol):
    """Decoded training images: a uint8 [rows, side, side, 3] .npy file and the rows to use."""

    @property
    def file(self) -> Path: ...

    @property
    def rows(self) -> list[int]: ...


class TwoViews(Dataset):
    """Two augmented views of a cached image; items are keyed by (epoch, index)."""

    def __init__(
        self, cache: DecodedImages, strategy: str, resolution: int, strength: float, seed: int
    ) -> None:
        self.file, self.rows = cache.file, cache.rows
        self.strategy, self.strength, self.seed = strategy, strength, seed
        self.pp = Preprocess(resolution=resolution, scales=(1.0,))  # one view, one scale
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
            self._augment = make_augmenter(
                self.strategy, self.pp.resolution, strength=self.strength
            )
        assert self._augment is not None  # set with _images, just above
        picture = Image.fromarray(np.array(self._images[self.rows[index]]), "RGB")
        views = [
            self._tensor(
                self._augment(picture, np.random.default_rng([self.seed, epoch, index, v]))
            )
            for v in (0, 1)
        ]
        return views[0], views[1]

    def _tensor(self, view: Image.Image) -> torch.Tensor:
        """`embed.to_tensor`'s values (the same float32 operations), computed by numpy: torch
        would start its thread pool for each small tensor when this runs in the main process."""
        pp = self.pp
        if view.size != (pp.resolution, pp.resolution):
            return to_tensor(view, pp)
        x = np.asarray(view, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        y = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        return torch.from_numpy(y).permute(2, 0, 1)


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
            yield [(self.epoch, int(i)) for i in order[start : start + self.local]]


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
    ph, pw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = x.clone()
    out[..., y0 : y0 + ph, x0 : x0 + pw] = partner[..., y0 : y0 + ph, x0 : x0 + pw]
    return out
