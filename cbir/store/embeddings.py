"""Embeddings on disk (`data.embeddings_dir/<model fingerprint>/shard-*.parquet`, written by
`cbir embed`): one folder per model, Parquet shards of (image_id, vector), read back checked."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError
from .layout import MODEL_CARD, SHARD_GLOB, layout
from .manifest import canonical_images
from .tables import DamagedFile, one_line

if TYPE_CHECKING:
    from ..config import Settings


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
    if t is not None and not (
        pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)
    ):
        return f"column 'vector' holds {t}, not fixed-size lists of floats"
    if "image_id" in columns and not pa.types.is_string(schema.field("image_id").type):
        return f"column 'image_id' holds {schema.field('image_id').type}, not strings"
    return None


def _damaged_shard(shard: Path, problem: object) -> DamagedFile:
    return DamagedFile(
        f"embeddings shard {shard} is damaged ({one_line(problem)}); delete it "
        f"(or restore it with `dvc checkout`) and run `cbir embed` to embed its "
        f"images again"
    )


def embedded_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for shard in sorted(folder.glob(SHARD_GLOB)):
        ids.update(read_shard(shard, columns=["image_id"]).column(0).to_pylist())
    return ids


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
        want = int(json.loads((folder / MODEL_CARD).read_text(encoding="utf-8"))["dim"])
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


def current_embeddings(
    settings: Settings,
    fingerprint: str | None = None,
) -> tuple[str, list[str], np.ndarray, int]:
    """The current model's embeddings of the present canonical images.

    Pass `fingerprint` when the caller has already built the model (it saves building it again).
    Returns (fingerprint, ids, vectors, number of present images without an embedding).
    """
    if fingerprint is None:
        from ..model import retrieval_model  # torch: only when the caller has no model

        fingerprint = retrieval_model(settings)[2]
    fp = fingerprint
    folder = layout(settings).embeddings(fp)
    present = {r["image_id"] for r in canonical_images(settings)}
    empty: tuple[list[str], np.ndarray] = ([], np.zeros((0, 0), np.float32))
    ids, vectors = load_embeddings(folder, present) if folder.is_dir() else empty
    if not ids:
        raise CbirError(f"no embeddings for the current model {fp}: run `cbir embed` first")
    return fp, ids, vectors, len(present) - len(ids)
