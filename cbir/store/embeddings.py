"""Embeddings on disk (`data.embeddings_dir/<model fingerprint>/shard-*.parquet`, written by
`cbir embed`): one folder per model, Parquet shards of (image_id, vector), read back checked.
With `embed.regions`, the regional descriptors lie in a subfolder per region scheme
(`regions-<scheme>/regions-*.parquet`: image_id, box, vector; several rows per image)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError
from .layout import MODEL_CARD, REGION_SHARD_GLOB, SHARD_GLOB, layout
from .manifest import canonical_images
from .tables import DamagedFile, one_line

if TYPE_CHECKING:
    from ..config import Settings
    from ..regions import RegionScheme


def read_shard(shard: Path, columns: list[str] | None = None, *, regions: bool = False) -> pa.Table:
    """One embeddings shard (`regions`: a regional descriptors' shard). Shards are written
    atomically, so a damaged or foreign one is damage on disk: a clear error saying what to do,
    not a pyarrow traceback."""
    try:
        table = pq.read_table(shard, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise _damaged_shard(shard, exc) from None
    every = ["image_id", "box", "vector"] if regions else ["image_id", "vector"]
    problem = _shard_problem(table.schema, columns or every)
    if problem:
        raise _damaged_shard(shard, problem)
    return table


def _shard_problem(schema: pa.Schema, columns: list[str]) -> str | None:
    """Why a shard's columns are not (image_id string, [box of 4 floats,] vector of floats),
    or None."""
    for name in columns:
        if name not in schema.names:
            return f"it has no column {name!r}"
    b = schema.field("box").type if "box" in columns else None
    if b is not None and not (
        pa.types.is_fixed_size_list(b) and b.list_size == 4 and pa.types.is_floating(b.value_type)
    ):
        return f"column 'box' holds {b}, not boxes of 4 floats"
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


def embedded_ids(folder: Path, *, regions: bool = False) -> set[str]:
    """The images with an embedding in `folder` (`regions`: with regional descriptors)."""
    ids: set[str] = set()
    for shard in sorted(folder.glob(REGION_SHARD_GLOB if regions else SHARD_GLOB)):
        ids.update(read_shard(shard, columns=["image_id"], regions=regions).column(0).to_pylist())
    return ids


def check_dimensions(folder: Path, shards: list[Path]) -> int:
    """One model, one dimension (model.json's, else most shards'): a shard whose vectors differ
    is the damaged one. From the footers alone; read_shard reports any other damage. Returns
    the dimension (0 when nothing says)."""
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
    return want


def shard_vectors(table: pa.Table) -> np.ndarray:
    """A shard table's vector column as one [rows, dim] array (as stored: float32)."""
    col = table.column("vector").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def load_embeddings(folder: Path, only: set[str] | None = None) -> tuple[list[str], np.ndarray]:
    """All (image_id, vector) pairs in a fingerprint folder, sorted by image_id."""
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    shards = sorted(folder.glob(SHARD_GLOB))
    check_dimensions(folder, shards)
    for shard in shards:
        t = read_shard(shard)
        vec = shard_vectors(t)
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


def load_regions(
    folder: Path, only: set[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The regional descriptors in a scheme's folder: (image id of each region, boxes [n, 4] as
    fractions of the picture's width and height, vectors [n, dim]), grouped by image id in
    sorted order. An image found in two shards (which a kill cannot cause: names follow the
    content) keeps the rows of the last shard only, so no region is ever counted twice."""
    tables = [read_shard(s, regions=True) for s in sorted(folder.glob(REGION_SHARD_GLOB))]
    last: dict[str, int] = {}
    for n, t in enumerate(tables):
        for image_id in t.column("image_id").to_pylist():
            last[image_id] = n
    owners: list[str] = []
    boxes, vectors = [], []
    dims = {t.schema.field("vector").type.list_size for t in tables if t.num_rows}
    if len(dims) > 1:
        raise DamagedFile(
            f"regional descriptors in {folder} have dimensions {sorted(dims)}; delete the "
            f"folder and run `cbir embed` to compute them again"
        )
    for n, t in enumerate(tables):
        ids = t.column("image_id").to_pylist()
        keep = [i for i, x in enumerate(ids) if last[x] == n and (only is None or x in only)]
        if not keep:
            continue
        vec = shard_vectors(t)
        box = t.column("box").combine_chunks().values.to_numpy(zero_copy_only=False)
        owners += [ids[i] for i in keep]
        vectors.append(vec[keep])
        boxes.append(box.reshape(-1, 4)[keep])
    if not owners:
        return [], np.zeros((0, 4), np.float32), np.zeros((0, 0), np.float32)
    order = sorted(range(len(owners)), key=lambda i: owners[i])  # stable: regions keep order
    return (
        [owners[i] for i in order],
        np.concatenate(boxes).astype(np.float32, copy=False)[order],
        np.concatenate(vectors).astype(np.float32, copy=False)[order],
    )


def current_regions(
    settings: Settings, fingerprint: str, scheme: RegionScheme
) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """The regional descriptors of the present canonical images for model `fingerprint` under
    `scheme`: (their tag, `<fingerprint>/<scheme key>`, which the region index records; the
    owner of each region; boxes; vectors). Raises when there are none (`cbir embed` first)."""
    folder = layout(settings).regions(fingerprint, scheme.key)
    present = {r["image_id"] for r in canonical_images(settings)}
    owners, boxes, vectors = (
        load_regions(folder, present)
        if folder.is_dir()
        else ([], np.zeros((0, 4), np.float32), np.zeros((0, 0), np.float32))
    )
    if not owners:
        raise CbirError(
            f"no regional descriptors ({scheme.name}) for the current model {fingerprint}: run "
            f"`cbir embed` first (embed.regions: {scheme.name})"
        )
    return f"{fingerprint}/{scheme.key}", owners, boxes, vectors
