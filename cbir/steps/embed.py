"""Sharded, resumable, incremental descriptor extraction.

Embeddings live under `data/embeddings/<model fingerprint>/`, one Parquet file per shard
(image_id, vector), each written atomically. Planning lists the canonical images that have no
embedding yet for the current fingerprint and cuts them into shards of `embed.shard_size`; a
killed run leaves only whole shards behind, so the next plan holds exactly what is missing. The
shard is the unit a Prefect task or a distributed worker handles.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import faults, imaging
from ..config import Settings
from ..fsutil import clean_stale_tmp, write_json, write_parquet
from ..model import Descriptor, Preprocess, pick_device, retrieval_model, to_tensor
from ..parallel import start_method
from ..progress import bar as progress_bar
from ..store.embeddings import embedded_ids
from ..store.layout import MODEL_CARD, layout
from ..store.manifest import canonical_images


class ScanDataset(Dataset):
    """Decodes scans for the network (JPEG draft mode at about the input size)."""

    def __init__(self, files: list[bytes], pp: Preprocess, max_pixels: int | None) -> None:
        self.files, self.pp, self.max_pixels = files, pp, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | None, str | None]:
        try:
            rgb = imaging.load_rgb(
                os.fsdecode(self.files[i]), max(self.pp.sizes), max_pixels=self.max_pixels
            )
        except imaging.ImageRejected as exc:
            return i, None, exc.reason
        except OSError as exc:  # deleted or moved since ingest
            return i, None, f"cannot read the file: {exc.strerror or exc}"
        return i, [to_tensor(rgb, self.pp, size) for size in self.pp.sizes], None


def _collate(
    batch: list[tuple[int, list[torch.Tensor] | None, str | None]],
) -> tuple[list[int], list[torch.Tensor] | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in batch if x is not None]
    # __getitem__ gives a reason whenever it gives no tensors
    failed = [(i, why or "unreadable") for i, x, why in batch if x is None]
    # one batch tensor per scale
    xs = (
        [torch.stack(per_scale) for per_scale in zip(*(x for _, x in ok), strict=True)]
        if ok
        else None
    )
    return [i for i, _ in ok], xs, failed


def describe(model: Descriptor, xs: list[torch.Tensor]) -> torch.Tensor:
    """The (multi-scale) descriptor: the L2-normalised sum of the descriptors of each scale."""
    z = model(xs[0])
    for x in xs[1:]:
        z = z + model(x)
    return torch.nn.functional.normalize(z.float(), dim=-1) if len(xs) > 1 else z


def embed_files(
    model: Descriptor,
    files: list[bytes],
    pp: Preprocess,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    max_pixels: int | None = None,
    progress: Any = None,
) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """Descriptors of the given files: (indices embedded, float32 [n, dim], failures)."""
    loader = DataLoader(
        ScanDataset(files, pp, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        multiprocessing_context=start_method(["cbir.steps.embed"]) if workers else None,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    model = model.to(device).eval()
    done: list[int] = []
    chunks: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    use_amp = device.type == "cuda"
    with torch.inference_mode():
        for idx, xs, bad in loader:
            failed += bad
            if xs is not None:
                with torch.autocast(device.type, enabled=use_amp):
                    z = describe(model, [x.to(device, non_blocking=True) for x in xs])
                chunks.append(z.float().cpu().numpy())
                done += idx
            faults.point("embed.batch")
            if progress is not None:
                progress.update(len(idx) + len(bad))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32)
    return done, vectors.astype(np.float32, copy=False), failed


def embed_pictures(
    model: Descriptor,
    pictures: list[Image.Image],
    pp: Preprocess,
    *,
    batch_size: int,
    device: torch.device | None = None,
) -> np.ndarray:
    """Descriptors of pictures already in memory (RGB), preprocessed as scans are."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start : start + batch_size]
            xs = [
                torch.stack([to_tensor(p, pp, size) for p in chunk]).to(device) for size in pp.sizes
            ]
            out.append(describe(model, xs).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


# --------------------------------------------------------------------------- shards on disk


@dataclass(frozen=True)
class Shard:
    name: str
    image_ids: tuple[str, ...]
    files: tuple[bytes, ...]  # absolute paths as the file system spells them


@dataclass
class EmbedPlan:
    fingerprint: str
    source: str
    folder: Path
    shards: list[Shard]
    already: int  # images that already have an embedding for this fingerprint


def plan_shards(
    settings: Settings,
    fp: str,
    source: str = "",
    *,
    baseline: bool = False,
) -> EmbedPlan:
    """The shards still to embed for model `fp`: canonical images without an embedding."""
    lay = layout(settings)
    folder = lay.embeddings(fp, baseline=baseline)
    done = embedded_ids(folder) if folder.is_dir() else set()
    root = os.fsencode(lay.scans)
    todo = [r for r in canonical_images(settings) if r["image_id"] not in done]
    size = settings.embed.shard_size
    shards = []
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        # Named after its content: a rerun after a kill plans the same names for the same work.
        shards.append(
            Shard(
                name=f"shard-{chunk[0]['image_id']}-{len(chunk):05d}",
                image_ids=tuple(r["image_id"] for r in chunk),
                files=tuple(os.path.join(root, r["path_raw"]) for r in chunk),
            )
        )
    return EmbedPlan(fingerprint=fp, source=source, folder=folder, shards=shards, already=len(done))


def embed_shard(
    settings: Settings,
    model: Descriptor,
    pp: Preprocess,
    folder: Path,
    shard: Shard,
    progress: Any = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Embed one shard and write it atomically. Returns (images embedded, failures)."""
    e = settings.embed
    idx, vectors, failed = embed_files(
        model,
        list(shard.files),
        pp,
        batch_size=e.batch_size,
        workers=e.workers,
        device=pick_device(e.device),
        max_pixels=settings.ingest.max_pixels,
        progress=progress,
    )
    ids = [shard.image_ids[i] for i in idx]
    dim = vectors.shape[1]
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), dim
            ),
        }
    )
    faults.point("embed.shard")
    write_parquet(table, folder / f"{shard.name}.parquet")
    return len(ids), [(shard.image_ids[i], why) for i, why in failed]


@dataclass
class EmbedSummary:
    fingerprint: str
    source: str
    folder: Path
    embedded: int = 0
    already: int = 0
    shards: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"embed: model {self.fingerprint} ({self.source})",
            f"  {self.embedded} images embedded in {self.shards} shards, {self.already} "
            f"already embedded; {self.seconds:.1f} s",
            f"  embeddings in {self.folder}",
        ]
        for image_id, why in self.failed[:10]:
            out.append(f"  not embedded: {image_id}: {why}")
        if len(self.failed) > 10:
            out.append(f"  ... and {len(self.failed) - 10} more not embedded")
        return out


def write_model_card(settings: Settings, plan: EmbedPlan, model: Descriptor) -> None:
    from dataclasses import asdict

    write_json(
        {
            "fingerprint": plan.fingerprint,
            "source": plan.source,
            "config": asdict(model.config),
            "dim": model.dim,
            "resolution": settings.embed_resolution,
            "scales": settings.embed.scales,
        },
        plan.folder / MODEL_CARD,
    )


def run_embed(
    settings: Settings,
    *,
    progress: bool = False,
    baseline: bool = False,
) -> EmbedSummary:
    """Embed every canonical image that has no embedding for the current model.

    `baseline=True` embeds with the untrained backbone (the configured init) instead, into the
    cache; when no training checkpoint exists that is the current model, and nothing is redone.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, pp, fp, source = retrieval_model(settings, untrained=baseline)
    # Without a training checkpoint the untrained backbone is the current model: same folder.
    trained = layout(settings).checkpoint.is_file()
    plan = plan_shards(settings, fp, source, baseline=baseline and trained)
    plan.folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(plan.folder)
    write_model_card(settings, plan, model)
    summary = EmbedSummary(fingerprint=fp, source=source, folder=plan.folder, already=plan.already)
    total = sum(len(s.image_ids) for s in plan.shards)
    bar = progress_bar(total, "embed", "img", progress)
    try:
        for shard in plan.shards:
            n, failed = embed_shard(settings, model, pp, plan.folder, shard, progress=bar)
            summary.embedded += n
            summary.failed += failed
            summary.shards += 1
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
