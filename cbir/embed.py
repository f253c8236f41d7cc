"""Sharded, resumable, incremental descriptor extraction.

Embeddings live under `data/embeddings/<model fingerprint>/`, one Parquet file per shard
(image_id, vector), each written atomically. Planning lists the canonical images that have no
embedding yet for the current fingerprint and cuts them into shards of `embed.shard_size`; a
killed run leaves only whole shards behind, so the next plan holds exactly what is missing. The
shard is the unit a Prefect task or a distributed worker handles.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import faults, imaging
from .config import Settings
from .errors import CbirError
from .fsutil import clean_stale_tmp, write_json, write_parquet
from .ingest import canonical_images
from .model import Descriptor, Preprocess, retrieval_model
from .parallel import start_method
from .progress import bar as progress_bar
from .stored import DamagedFile, one_line

SHARD_GLOB = "shard-*.parquet"


def to_tensor(rgb: Image.Image, pp: Preprocess, size: int | None = None) -> torch.Tensor:
    """An RGB picture as the network's normalised input (squashed to a square of `size`, by
    default pp.resolution)."""
    size = size or pp.resolution
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.float().div_(255.0)
    mean = torch.tensor(pp.mean).view(3, 1, 1)
    std = torch.tensor(pp.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class ScanDataset(Dataset):
    """Decodes scans for the network (JPEG draft mode at about the input size)."""

    def __init__(self, files: list[bytes], pp: Preprocess, max_pixels: int | None) -> None:
        self.files, self.pp, self.max_pixels = files, pp, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | None, str | None]:
        try:
            rgb = imaging.load_rgb(os.fsdecode(self.files[i]), max(self.pp.sizes),
                                   max_pixels=self.max_pixels)
        except imaging.ImageRejected as exc:
            return i, None, exc.reason
        except OSError as exc:  # deleted or moved since ingest
            return i, None, f"cannot read the file: {exc.strerror or exc}"
        return i, [to_tensor(rgb, self.pp, size) for size in self.pp.sizes], None


def _collate(batch: list[tuple[int, list[torch.Tensor] | None, str | None]],
             ) -> tuple[list[int], list[torch.Tensor] | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, why) for i, x, why in batch if x is None]
    # one batch tensor per scale
    xs = [torch.stack(per_scale) for per_scale in zip(*(x for _, x in ok))] if ok else None
    return [i for i, _ in ok], xs, failed


def describe(model: Descriptor, xs: list[torch.Tensor]) -> torch.Tensor:
    """The (multi-scale) descriptor: the L2-normalised sum of the descriptors of each scale."""
    z = model(xs[0])
    for x in xs[1:]:
        z = z + model(x)
    return torch.nn.functional.normalize(z.float(), dim=-1) if len(xs) > 1 else z


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CbirError(f"unknown device {name!r} (embed.device: auto, cpu, cuda, cuda:1...)"
                        ) from None


def embed_files(model: Descriptor, files: list[bytes], pp: Preprocess, *, batch_size: int,
                workers: int, device: torch.device, max_pixels: int | None = None,
                progress: Any = None) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """Descriptors of the given files: (indices embedded, float32 [n, dim], failures)."""
    loader = DataLoader(
        ScanDataset(files, pp, max_pixels), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate,
        multiprocessing_context=start_method(["cbir.embed"]) if workers else None,
        persistent_workers=False, prefetch_factor=4 if workers else None)
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


def embed_pictures(model: Descriptor, pictures: list[Image.Image], pp: Preprocess, *,
                   batch_size: int, device: torch.device | None = None) -> np.ndarray:
    """Descriptors of pictures already in memory (RGB), preprocessed as scans are."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(pictures), batch_size):
            chunk = pictures[start:start + batch_size]
            xs = [torch.stack([to_tensor(p, pp, size) for p in chunk]).to(device)
                  for size in pp.sizes]
            out.append(describe(model, xs).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


# --------------------------------------------------------------------------- shards on disk

def embeddings_dir(settings: Settings, fp: str, *, baseline: bool = False) -> Path:
    """Where the embeddings of model `fp` live. Baselines (used only by evaluation) go to the
    cache, so that evaluating never changes the embed step's outputs."""
    if baseline:
        return settings.path(settings.data.cache_dir) / "baseline-embeddings" / fp
    return settings.path(settings.data.embeddings_dir) / fp


def read_shard(shard: Path, columns: list[str] | None = None) -> pa.Table:
    """One embeddings shard. Shards are written atomically, so a damaged or foreign one is
    damage on disk: a clear error saying what to do, not a pyarrow traceback."""
    try:
        table = pq.read_table(shard, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise _damaged_shard(shard, exc) from None
    problem = _shard_problem(table.schema, columns or ["image_id", "vector"])
    if problem:
        raise _damaged_shard(shard, problem)
    return table


def _shard_problem(schema: pa.Schema, columns: list[str]) -> str | None:
    """Why a shard's columns are not (image_id string, vector of float32), or None."""
    for name in columns:
        if name not in schema.names:
            return f"it has no column {name!r}"
    t = schema.field("vector").type if "vector" in columns else None
    if t is not None and not (pa.types.is_fixed_size_list(t)
                              and pa.types.is_floating(t.value_type)):
        return f"column 'vector' holds {t}, not fixed-size lists of floats"
    if "image_id" in columns and not pa.types.is_string(schema.field("image_id").type):
        return f"column 'image_id' holds {schema.field('image_id').type}, not strings"
    return None


def _damaged_shard(shard: Path, problem: object) -> DamagedFile:
    return DamagedFile(f"embeddings shard {shard} is damaged ({one_line(problem)}); delete it "
                       f"(or restore it with `dvc checkout`) and run `cbir embed` to embed its "
                       f"images again")


def embedded_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for shard in sorted(folder.glob(SHARD_GLOB)):
        ids.update(read_shard(shard, columns=["image_id"]).column(0).to_pylist())
    return ids


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


def plan_shards(settings: Settings, fp: str, source: str = "", *, baseline: bool = False,
                ) -> EmbedPlan:
    """The shards still to embed for model `fp`: canonical images without an embedding."""
    folder = embeddings_dir(settings, fp, baseline=baseline)
    done = embedded_ids(folder) if folder.is_dir() else set()
    root = os.fsencode(settings.path(settings.data.scans_dir))
    todo = [r for r in canonical_images(settings) if r["image_id"] not in done]
    size = settings.embed.shard_size
    shards = []
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        # Named after its content: a rerun after a kill plans the same names for the same work.
        shards.append(Shard(name=f"shard-{chunk[0]['image_id']}-{len(chunk):05d}",
                            image_ids=tuple(r["image_id"] for r in chunk),
                            files=tuple(os.path.join(root, r["path_raw"]) for r in chunk)))
    return EmbedPlan(fingerprint=fp, source=source, folder=folder, shards=shards,
                     already=len(done))


def embed_shard(settings: Settings, model: Descriptor, pp: Preprocess, folder: Path,
                shard: Shard, progress: Any = None) -> tuple[int, list[tuple[str, str]]]:
    """Embed one shard and write it atomically. Returns (images embedded, failures)."""
    e = settings.embed
    idx, vectors, failed = embed_files(
        model, list(shard.files), pp, batch_size=e.batch_size, workers=e.workers,
        device=pick_device(e.device), max_pixels=settings.ingest.max_pixels, progress=progress)
    ids = [shard.image_ids[i] for i in idx]
    dim = vectors.shape[1]
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                                    dim),
    })
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
        out = [f"embed: model {self.fingerprint} ({self.source})",
               f"  {self.embedded} images embedded in {self.shards} shards, {self.already} "
               f"already embedded; {self.seconds:.1f} s",
               f"  embeddings in {self.folder}"]
        for image_id, why in self.failed[:10]:
            out.append(f"  not embedded: {image_id}: {why}")
        if len(self.failed) > 10:
            out.append(f"  ... and {len(self.failed) - 10} more not embedded")
        return out


def write_model_card(settings: Settings, plan: EmbedPlan, model: Descriptor) -> None:
    from dataclasses import asdict

    write_json({"fingerprint": plan.fingerprint, "source": plan.source,
                "config": asdict(model.config), "dim": model.dim,
                "resolution": settings.embed_resolution, "scales": settings.embed.scales},
               plan.folder / "model.json")


def run_embed(settings: Settings, *, progress: bool = False, baseline: bool = False,
              ) -> EmbedSummary:
    """Embed every canonical image that has no embedding for the current model.

    `baseline=True` embeds with the untrained backbone (the configured init) instead, into the
    cache; when no training checkpoint exists that is the current model, and nothing is redone.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, pp, fp, source = retrieval_model(settings, untrained=baseline)
    # Without a training checkpoint the untrained backbone is the current model: same folder.
    trained = settings.path(settings.model.checkpoint).is_file()
    plan = plan_shards(settings, fp, source, baseline=baseline and trained)
    plan.folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(plan.folder)
    write_model_card(settings, plan, model)
    summary = EmbedSummary(fingerprint=fp, source=source, folder=plan.folder,
                           already=plan.already)
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


def _check_dimensions(folder: Path, shards: list[Path]) -> None:
    """One model, one dimension (model.json's, else most shards'): a shard whose vectors differ
    is the damaged one. From the footers alone; read_shard reports any other damage."""
    dims: dict[Path, int] = {}
    for shard in shards:
        try:
            t = pq.read_schema(shard).field("vector").type
        except (OSError, KeyError, pa.ArrowException):
            continue
        if pa.types.is_fixed_size_list(t):
            dims[shard] = t.list_size
    try:
        want = int(json.loads((folder / "model.json").read_text(encoding="utf-8"))["dim"])
    except (OSError, ValueError, KeyError, TypeError):
        want = Counter(dims.values()).most_common(1)[0][0] if dims else 0
    for shard, dim in dims.items():
        if dim != want:
            raise _damaged_shard(shard, f"vectors of dimension {dim}, the model's have {want}")


def load_embeddings(folder: Path, only: set[str] | None = None) -> tuple[list[str], np.ndarray]:
    """All (image_id, vector) pairs in a fingerprint folder, sorted by image_id."""
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    shards = sorted(folder.glob(SHARD_GLOB))
    _check_dimensions(folder, shards)
    for shard in shards:
        t = read_shard(shard)
        col = t.column("vector").combine_chunks()
        dim = col.type.list_size
        vec = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        shard_ids = t.column("image_id").to_pylist()
        if only is not None:
            keep = [i for i, x in enumerate(shard_ids) if x in only]
            vec, shard_ids = vec[keep], [shard_ids[i] for i in keep]
        ids += shard_ids
        chunks.append(vec)
    if not chunks:
        return [], np.zeros((0, 0), np.float32)
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    row_of = {image_id: row for row, image_id in enumerate(ids)}  # one row per id, whatever happens
    order = sorted(row_of)
    return order, vectors[[row_of[i] for i in order]]


def current_embeddings(settings: Settings, fingerprint: str | None = None,
                       ) -> tuple[str, list[str], np.ndarray, int]:
    """The current model's embeddings of the present canonical images.

    Pass `fingerprint` when the caller has already built the model (it saves building it again).
    Returns (fingerprint, ids, vectors, number of present images without an embedding).
    """
    fp = fingerprint or retrieval_model(settings)[2]
    folder = embeddings_dir(settings, fp)
    present = {r["image_id"] for r in canonical_images(settings)}
    ids, vectors = load_embeddings(folder, present) if folder.is_dir() else ([], None)
    if not ids:
        raise CbirError(f"no embeddings for the current model {fp}: run `cbir embed` first")
    return fp, ids, vectors, len(present) - len(ids)
