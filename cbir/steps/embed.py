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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import faults, imaging, regions
from ..config import Settings
from ..fsutil import clean_stale_tmp, write_json, write_parquet
from ..model import Descriptor, Preprocess, pick_device, retrieval_model, to_tensor
from ..parallel import start_method
from ..progress import bar as progress_bar
from ..regions import RegionScheme
from ..safetext import counted
from ..store.embeddings import embedded_ids
from ..store.fingerprint import ModelKey, remember_fingerprint
from ..store.layout import MODEL_CARD, REGIONS_PREFIX, layout
from ..store.manifest import canonical_images
from ..store.vectors import sync_vectors

Item = tuple[int, list[torch.Tensor] | None, list[torch.Tensor] | None, str | None]


class ScanDataset(Dataset):
    """Decodes scans for the network (JPEG draft mode at about the input size). With a region
    scheme, also the windows of each picture (decoded large enough for the smallest one)."""

    def __init__(
        self,
        files: list[bytes],
        pp: Preprocess,
        max_pixels: int | None,
        scheme: RegionScheme | None = None,
    ) -> None:
        self.files, self.pp, self.max_pixels, self.scheme = files, pp, max_pixels, scheme
        self.region_pp = replace(pp, scales=scheme.scales) if scheme is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        path = os.fsdecode(self.files[i])
        try:
            # decoded as without regions, so the global descriptor does not depend on them
            rgb = imaging.load_rgb(path, max(self.pp.sizes), max_pixels=self.max_pixels)
            xs = [to_tensor(rgb, self.pp, s) for s in self.pp.sizes]
            rs = None
            if self.scheme is not None and self.region_pp is not None:
                size = self.scheme.decode_size(max(self.region_pp.sizes))
                if size > min(rgb.size):  # a JPEG was drafted small: decode it larger
                    rgb = imaging.load_rgb(path, size, max_pixels=self.max_pixels)
                pieces = regions.crops(rgb, self.scheme.boxes())
                rs = [
                    torch.stack([to_tensor(p, self.region_pp, s) for p in pieces])
                    for s in self.region_pp.sizes
                ]
        except imaging.ImageRejected as exc:
            return i, None, None, exc.reason
        except OSError as exc:  # deleted or moved since ingest
            return i, None, None, f"cannot read the file: {exc.strerror or exc}"
        return i, xs, rs, None


Batch = tuple[
    list[int], list[torch.Tensor] | None, list[torch.Tensor] | None, list[tuple[int, str]]
]


def _collate(batch: list[Item]) -> Batch:
    ok = [(i, x, r) for i, x, r, _ in batch if x is not None]
    # __getitem__ gives a reason whenever it gives no tensors
    failed = [(i, why or "unreadable") for i, x, _, why in batch if x is None]
    # one batch tensor per scale
    xs = (
        [torch.stack(per_scale) for per_scale in zip(*(x for _, x, _ in ok), strict=True)]
        if ok
        else None
    )
    # the windows of every picture, one after the other: [pictures x windows, 3, s, s]
    rs = (
        [torch.cat(per_scale) for per_scale in zip(*(r for _, _, r in ok), strict=True)]
        if ok and ok[0][2] is not None
        else None
    )
    return [i for i, _, _ in ok], xs, rs, failed


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
    turns: int = 1,
) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """Descriptors of the given files: (indices embedded, float32 [n, dim], failures); with
    `turns` > 1, [n, turns, dim]: the picture turned by 0, 90, 180... degrees anticlockwise."""
    done, vectors, _, failed = embed_files_and_regions(
        model,
        files,
        pp,
        None,
        batch_size=batch_size,
        workers=workers,
        device=device,
        max_pixels=max_pixels,
        progress=progress,
        turns=turns,
    )
    return done, vectors, failed


def _turned(
    model: Descriptor, xs: list[torch.Tensor], t: int, device: torch.device
) -> torch.Tensor:
    """The descriptor of the batch's pictures turned by t quarter turns anticlockwise."""
    return describe(model, [torch.rot90(x.to(device), t, (-2, -1)) for x in xs])


def embed_files_and_regions(
    model: Descriptor,
    files: list[bytes],
    pp: Preprocess,
    scheme: RegionScheme | None,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    max_pixels: int | None = None,
    progress: Any = None,
    turns: int = 1,
) -> tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Global and (with a scheme) regional descriptors of the given files, from one decode:
    (indices embedded, float32 [n, dim], float32 [n, regions, dim] or [n, 0, dim], failures).
    `turns` > 1 (no scheme): global descriptors of the picture turned by 0, 90, 180 and 270
    degrees anticlockwise, [n, turns, dim]. The network's input is the picture squashed to a
    square, so turning that square is turning the picture."""
    if turns > 1 and scheme is not None:
        raise ValueError("turned descriptors are global ones only")
    loader = DataLoader(
        ScanDataset(files, pp, max_pixels, scheme),
        # with regions, a picture is many network inputs: fewer pictures per batch
        batch_size=batch_size if scheme is None else max(1, batch_size // scheme.count),
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
    region_chunks: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    use_amp = device.type == "cuda"
    n_regions = scheme.count if scheme is not None else 0
    with torch.inference_mode():
        for idx, xs, rs, bad in loader:
            failed += bad
            if xs is not None:
                with torch.autocast(device.type, enabled=use_amp):
                    z = describe(model, [x.to(device, non_blocking=True) for x in xs])
                    if turns > 1:
                        z = torch.stack(
                            [z] + [_turned(model, xs, t, device) for t in range(1, turns)], 1
                        )
                    if rs is not None:
                        zr = describe(model, [r.to(device, non_blocking=True) for r in rs])
                        region_chunks.append(
                            zr.float().cpu().numpy().reshape(len(idx), n_regions, -1)
                        )
                chunks.append(z.float().cpu().numpy())
                done += idx
            faults.point("embed.batch")
            if progress is not None:
                progress.update(len(idx) + len(bad))
    vectors = (
        np.concatenate(chunks)
        if chunks
        else np.zeros((0, model.dim) if turns == 1 else (0, turns, model.dim), np.float32)
    )
    region_vectors = (
        np.concatenate(region_chunks)
        if region_chunks
        else np.zeros((len(done), n_regions, model.dim), np.float32)
    )
    return (
        done,
        vectors.astype(np.float32, copy=False),
        region_vectors.astype(np.float32, copy=False),
        failed,
    )


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
    # per image: whether its global descriptor / its regional descriptors are missing (empty:
    # the global one for every image, no regions)
    need_global: tuple[bool, ...] = ()
    need_regions: tuple[bool, ...] = ()
    region_folder: Path | None = None  # where this model's scheme keeps its regions


@dataclass
class EmbedPlan:
    fingerprint: str
    source: str
    folder: Path
    shards: list[Shard]
    already: int  # images that already have an embedding for this fingerprint
    region_folder: Path | None = None  # None: no regional descriptors (embed.regions: none)
    regions_already: int = 0


def region_scheme(settings: Settings) -> RegionScheme | None:
    """The region scheme embed.regions names (None: none)."""
    return regions.scheme(settings.embed.regions)


def plan_shards(
    settings: Settings,
    fp: str,
    source: str = "",
    *,
    baseline: bool = False,
) -> EmbedPlan:
    """The shards still to embed for model `fp`: canonical images without an embedding, or
    (with embed.regions) without regional descriptors. Baselines get no regions."""
    lay = layout(settings)
    folder = lay.embeddings(fp, baseline=baseline)
    done = embedded_ids(folder) if folder.is_dir() else set()
    scheme = None if baseline else region_scheme(settings)
    region_folder = lay.regions(fp, scheme.key) if scheme is not None else None
    done_r = (
        embedded_ids(region_folder, regions=True)
        if region_folder is not None and region_folder.is_dir()
        else set()
    )
    root = os.fsencode(lay.scans)
    todo = [
        r
        for r in canonical_images(settings)
        if r["image_id"] not in done or (scheme is not None and r["image_id"] not in done_r)
    ]
    size = settings.embed.shard_size
    shards = []
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        ids = tuple(r["image_id"] for r in chunk)
        # Named after its content: a rerun after a kill plans the same names for the same work.
        shards.append(
            Shard(
                name=f"shard-{chunk[0]['image_id']}-{len(chunk):05d}",
                image_ids=ids,
                files=tuple(os.path.join(root, r["path_raw"]) for r in chunk),
                need_global=tuple(i not in done for i in ids),
                need_regions=tuple(scheme is not None and i not in done_r for i in ids),
                region_folder=region_folder,
            )
        )
    return EmbedPlan(
        fingerprint=fp,
        source=source,
        folder=folder,
        shards=shards,
        already=len(done),
        region_folder=region_folder,
        regions_already=len(done_r),
    )


def _vector_table(ids: list[str], vectors: np.ndarray, boxes: np.ndarray | None) -> pa.Table:
    dim = vectors.shape[1]
    columns = {"image_id": pa.array(ids, pa.string())}
    if boxes is not None:
        columns["box"] = pa.FixedSizeListArray.from_arrays(
            pa.array(boxes.reshape(-1), pa.float32()), 4
        )
    columns["vector"] = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), pa.float32()), dim
    )
    return pa.table(columns)


def _subset_name(prefix: str, ids: list[str]) -> str:
    """A shard's file name from what it holds (the same work is always the same name)."""
    return f"{prefix}{ids[0]}-{len(ids):05d}.parquet"


def embed_shard(
    settings: Settings,
    model: Descriptor,
    pp: Preprocess,
    folder: Path,
    shard: Shard,
    progress: Any = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Embed one shard and write it atomically (the global descriptors, then the regional
    ones: a kill between the two leaves whole files, and the next plan holds what is missing).
    Returns (images embedded, failures)."""
    e = settings.embed
    need_g = shard.need_global or (True,) * len(shard.image_ids)
    need_r = shard.need_regions or (False,) * len(shard.image_ids)
    scheme = region_scheme(settings) if any(need_r) else None
    idx, vectors, region_vectors, failed = embed_files_and_regions(
        model,
        list(shard.files),
        pp,
        scheme,
        batch_size=e.batch_size,
        workers=e.workers,
        device=pick_device(e.device),
        max_pixels=settings.ingest.max_pixels,
        progress=progress,
    )
    faults.point("embed.shard")
    rows = [r for r, i in enumerate(idx) if need_g[i]]
    if rows:
        ids = [shard.image_ids[idx[r]] for r in rows]
        write_parquet(_vector_table(ids, vectors[rows], None), folder / _subset_name("shard-", ids))
    rows_r = [r for r, i in enumerate(idx) if need_r[i]]
    if rows_r and scheme is not None and shard.region_folder is not None:
        faults.point("embed.regions")
        k = scheme.count
        ids = [shard.image_ids[idx[r]] for r in rows_r]
        shard.region_folder.mkdir(parents=True, exist_ok=True)
        write_parquet(
            _vector_table(
                [i for i in ids for _ in range(k)],
                region_vectors[rows_r].reshape(len(rows_r) * k, -1),
                np.tile(scheme.boxes(), (len(rows_r), 1)),
            ),
            shard.region_folder / _subset_name(REGIONS_PREFIX, ids),
        )
    return len(set(rows) | set(rows_r)), [(shard.image_ids[i], why) for i, why in failed]


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
    region_folder: Path | None = None
    regions_already: int = 0
    vectors_written: int = 0  # rows written to the memory-mapped vector file

    def lines(self) -> list[str]:
        out = [
            f"embed: model {self.fingerprint} ({self.source})",
            f"  {counted(self.embedded, 'image')} embedded in {counted(self.shards, 'shard')}, "
            f"{self.already} already embedded; {self.seconds:.1f} s",
            f"  embeddings in {self.folder}",
        ]
        if self.vectors_written:
            out.append(
                f"  {counted(self.vectors_written, 'vector')} written to the memory-mapped "
                f"vector file beside the shards"
            )
        if self.region_folder is not None:
            out.append(
                f"  regional descriptors ({self.region_folder.name}) in {self.region_folder}; "
                f"{counted(self.regions_already, 'image')} had them already"
            )
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
    key = ModelKey(settings, untrained=baseline)  # what the fingerprint depends on
    model, pp, fp, source = retrieval_model(settings, untrained=baseline)
    # Without a training checkpoint the untrained backbone is the current model: same folder.
    trained = layout(settings).checkpoint.is_file()
    plan = plan_shards(settings, fp, source, baseline=baseline and trained)
    plan.folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(plan.folder)
    if plan.region_folder is not None and plan.region_folder.is_dir():
        clean_stale_tmp(plan.region_folder)
    write_model_card(settings, plan, model)
    summary = EmbedSummary(
        fingerprint=fp,
        source=source,
        folder=plan.folder,
        already=plan.already,
        region_folder=plan.region_folder,
        regions_already=plan.regions_already,
    )
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
    summary.vectors_written = sync_vectors(plan.folder, progress=progress)
    remember_fingerprint(key, fp)  # the steps that read these embeddings need not build it
    summary.seconds = time.perf_counter() - t0
    return summary
