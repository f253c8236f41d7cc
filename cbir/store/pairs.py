"""Near-duplicate pairs and their clusters (`data.pairs_dir`, written by `cbir pairs`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError
from .layout import layout
from .tables import read_table

PAIRS_SCHEMA = pa.schema(
    [
        ("image_a", pa.string()),
        ("image_b", pa.string()),
        ("path_a", pa.string()),
        ("path_b", pa.string()),
        ("score", pa.float32()),
        ("rank", pa.int32()),
        ("kind", pa.string()),
        # Geometric verification (cbir.verify), null where the pair was not checked. relation:
        # full (the same picture), a_in_b / b_in_a (one side is a detail of the other), none
        # (checked and not confirmed: a contradiction, marked and kept). covered: the fraction
        # of the larger picture's area the other maps onto; box_on ("a" or "b") names that
        # picture and box_* the matched region on it, in its own pixels (as cbir decodes it,
        # EXIF orientation applied).
        ("inliers", pa.int32()),
        ("relation", pa.string()),
        ("covered", pa.float32()),
        ("box_on", pa.string()),
        ("box_x0", pa.int32()),
        ("box_y0", pa.int32()),
        ("box_x1", pa.int32()),
        ("box_y1", pa.int32()),
    ]
)
#: Relations that confirm a pair; `none` contradicts it.
CONFIRMED = ("full", "a_in_b", "b_in_a")
#: A detail of the other picture (a partial copy).
PARTIAL = ("a_in_b", "b_in_a")
CLUSTERS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int32()),
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("size", pa.int32()),
        ("weakest_link", pa.float32()),
    ]
)

PAIRS_FIX = "run `cbir pairs` to write it again"


def read_pairs(settings: Any) -> pa.Table:
    """Every recorded pair (near and exact)."""
    path = layout(settings).pairs
    if not path.is_file():
        raise CbirError(f"no pairs at {path}: run `cbir pairs` first")
    return read_table(path, PAIRS_SCHEMA, PAIRS_FIX)


def scores_fingerprint(settings: Any) -> str | None:
    """The model fingerprint whose scores pairs.parquet holds (`cbir pairs` records it in the
    metadata of searched.parquet beside it), or None when unknown."""
    try:
        meta = pq.read_schema(layout(settings).searched).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = meta.get(b"fingerprint")
    return value.decode("utf-8", "replace") if value else None
