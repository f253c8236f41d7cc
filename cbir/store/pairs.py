"""Near-duplicate pairs and their clusters (`data.pairs_dir`, written by `cbir pairs`).

The pairs are stored partitioned, so that a nightly run writes only what it found:
- `pairs.parquet` and `searched.parquet`, the base: the near pairs and the searched images as
  of the last full run (or the last run that folded the partitions in);
- `runs/pairs-<seq>.parquet` and `runs/searched-<seq>.parquet`, one partition per incremental
  run since: the pairs it added and the images it searched (each searched file in id order,
  with the ids' hex_keys beside them, `SEARCHED_KEY`);
- `exact.parquet`, the byte-identical copies, from the manifest on every run;
- `pairs.json`, the commit: which partitions count, the base's tokens (also in the metadata of
  the base files) and what the pairs and clusters depend on. A token changes only with its
  file's content: rerunning on unchanged data rewrites nothing.
A run that writes a new base stages it (`pairs.next.parquet`, `searched.next.parquet`), commits
it, then renames it over the old one: until the rename, readers find the staged file by its
token. New clusters are staged the same way (`clusters.next.parquet`), so a run killed before
its commit leaves the clusters as they were too. An incremental run rewrites no cluster it
does not touch: the clusters of `clusters.parquet` stay, and `runs/clusters-<token>.parquet`
holds the clusters the incremental runs since formed and the ids of those they replaced
(clusters_files, read_clusters), written whole by each run that changes it (it holds only the
nights' clusters) and named by the commit. A partition or a staged file no commit names
is a killed run's, and is removed by the next run, which then does the same work again from the
state as it was.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import CbirError
from ..fsutil import write_json
from .layout import Layout, layout
from .manifest import ImageIds, hex_keys
from .tables import metadata_value, read_table

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
#: A `full` pair whose `covered` is below this (cbir.verify.FULL, not imported: the catalogue
#: needs no OpenCV) shows one picture on a blank margin of the other, the one `box_on` names.
FULL_SHARE = 0.8
#: A pair's verification, as recorded beside it (cbir.verify.Match's fields).
CHECK_COLUMNS = (
    "inliers", "relation", "covered", "box_on", "box_x0", "box_y0", "box_x1", "box_y1"
)  # fmt: skip


def on_margin(relation: str | None, covered: float | None) -> bool:
    """Whether a recorded verification says one picture shows the other on a blank margin
    (cbir.verify.BLANK_MARGIN): the same picture, covering less than FULL_SHARE of it."""
    return relation == "full" and covered is not None and covered < FULL_SHARE


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


#: The clusters' ids (clusters.parquet's metadata key): a whole clustering numbers them by
#: size from 1; a night's update keeps every cluster it does not touch under its id and gives
#: the clusters it forms new ids from `next`, never one given before in that `lineage` (drawn
#: afresh by each whole clustering that changes them). So a cluster id names one group of
#: images for as long as it is listed, and the stored cluster_report keeps its rows.
CLUSTER_IDS = "cbir_cluster_ids"


@dataclass(frozen=True)
class ClusterIds:
    """How a clusters file's ids were given (CLUSTER_IDS)."""

    lineage: str
    next: int  # the id the next cluster formed takes

    def meta(self) -> dict[str, str]:
        return {CLUSTER_IDS: json.dumps({"lineage": self.lineage, "next": self.next})}


def cluster_ids(path: Path) -> ClusterIds | None:
    """The ids' lineage and next id of the clusters file at `path` (None: missing, unreadable,
    or written before ids were kept)."""
    return parse_cluster_ids(metadata_value(path, CLUSTER_IDS))


def parse_cluster_ids(raw: str | None) -> ClusterIds | None:
    """ClusterIds from its CLUSTER_IDS metadata value (None: none, or not one)."""
    try:
        value = json.loads(raw or "null")
        return ClusterIds(str(value["lineage"]), int(value["next"]))
    except (ValueError, KeyError, TypeError):
        return None


#: Partitions kept before a run folds them into the base (a month of nightly runs): bounds the
#: files a query opens.
MAX_RUNS = 32
TOKEN = "cbir_base"  # the key of the base's token in its files' Parquet metadata


@dataclass
class PairsState:
    """What `pairs.json` commits."""

    base: str  # the token of pairs.parquet
    searched: str  # the token of searched.parquet
    search: dict[str, str]  # what the recorded pairs depend on (steps.pairs._search_state)
    runs: list[int] = field(default_factory=list)  # committed partitions, oldest first
    clusters: str = ""  # clusters.parquet's token and what its clusters depend on
    # the token of the incremental runs' clusters file (runs/clusters-<token>.parquet; "": none)
    clusters_delta: str = ""
    # the manifest's canonical epoch the recorded paths were taken under ("": none known)
    epoch: str = ""
    # the embeddings' stamp when every image then present had been searched (store.vectors:
    # Vectors.stamp), so that a night finds its unsearched images in the rows appended since
    opened: dict[str, Any] | None = None

    def next_run(self) -> int:
        return max(self.runs, default=0) + 1


def new_token() -> str:
    return uuid.uuid4().hex


def file_token(path: Path) -> str | None:
    """The token in a file's Parquet metadata (None: none, or unreadable)."""
    return metadata_value(path, TOKEN)


def read_state(lay: Layout) -> PairsState | None:
    """The committed state: None when nothing is recorded, the commit is damaged, or the base
    is not the one it names (then the base alone counts: see base_only)."""
    try:
        raw = json.loads(lay.pairs_state.read_text())
        state = PairsState(
            base=str(raw["base"]),
            searched=str(raw["searched"]),
            search={str(k): str(v) for k, v in dict(raw["search"]).items()},
            runs=[int(r) for r in raw["runs"]],
            clusters=str(raw.get("clusters", "")),
            clusters_delta=str(raw.get("clusters_delta", "")),
            epoch=str(raw.get("epoch", "")),
            opened=raw["opened"] if isinstance(raw.get("opened"), dict) else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if base_files(lay, state) is None:
        return None
    return state


def _holding(token: str, *paths: Path) -> Path | None:
    return next((p for p in paths if file_token(p) == token), None)


def base_files(lay: Layout, state: PairsState) -> tuple[Path, Path] | None:
    """The files of the committed base (pairs, searched): in place, or staged where a run was
    killed between its commit and the renames; None when neither holds it."""
    pairs = _holding(state.base, lay.pairs, lay.pairs_next)
    searched = _holding(state.searched, lay.searched, lay.searched_next)
    return None if pairs is None or searched is None else (pairs, searched)


def finish_commit(lay: Layout) -> None:
    """Rename a committed staged base (and clusters) over the old one (a run killed after its
    commit), remove a staged one no commit names (one killed before), and the partitions no
    commit names."""
    state = read_state(lay)
    tokens = (
        (state.base, state.searched, state.clusters.partition(":")[0])
        if state is not None
        else ("", "", "")
    )
    staged = (
        (lay.pairs_next, lay.pairs),
        (lay.searched_next, lay.searched),
        (lay.clusters_next, lay.clusters),
    )
    for (next_, final), token in zip(staged, tokens, strict=True):
        if token and next_.is_file() and file_token(next_) == token:
            os.replace(next_, final)
        else:
            next_.unlink(missing_ok=True)
    for path in stray_runs(lay):
        path.unlink(missing_ok=True)


def write_state(lay: Layout, state: PairsState) -> None:
    write_json(asdict(state), lay.pairs_state)


def pair_files(lay: Layout) -> list[Path]:
    """The files that hold the recorded pairs, those that exist: exact copies, the base, then
    the committed partitions."""
    state = read_state(lay)
    files = [lay.exact, lay.pairs]
    if state is not None:
        base = base_files(lay, state)
        files = [lay.exact, base[0] if base else lay.pairs]
        files += [lay.run_pairs(r) for r in state.runs]
    return [f for f in files if f.is_file()]


def searched_files(lay: Layout) -> list[Path]:
    """The files that list the searched images: the base, then the committed partitions'."""
    state = read_state(lay)
    if state is None:
        return [lay.searched]
    base = base_files(lay, state)
    return [base[1] if base else lay.searched] + [lay.run_searched(r) for r in state.runs]


#: The column of a searched file that holds each id's hex_keys: what a nightly run reads (10^7
#: ids: 0.1 s, against 1.8 s to read the strings and 0.7 s to convert them). A file without it
#: (written before it existed, or of ids that are not cbir's) is read by its strings.
SEARCHED_KEY = "id_key"


def searched_table(ids: ImageIds, rows: np.ndarray | None = None) -> pa.Table:
    """A searched file's rows: the ids (those at `rows`), and their hex_keys where they are
    cbir's ids."""
    keys = ids.hex_keys()
    if keys is None:
        strings = ids.arrow if rows is None else pa.array(ids.take(rows), pa.string())
        return pa.table({"image_id": strings})
    chosen = ids if rows is None else ImageIds.from_keys(keys[rows])
    return pa.table(
        {"image_id": chosen.arrow, SEARCHED_KEY: pa.array(chosen.hex_keys(), pa.uint64())}
    )


def searched_count(files: list[Path]) -> int | None:
    """How many ids the searched `files` list, from their footers; None where one is
    unreadable."""
    try:
        return sum(pq.read_metadata(f).num_rows for f in files)
    except (OSError, pa.ArrowException):
        return None


def read_searched(files: list[Path]) -> ImageIds:
    """The ids the searched `files` list, in file order: by their keys where every file holds
    them or its ids convert, else as strings. Raises OSError or an Arrow error where a file
    cannot be read."""
    keys: list[np.ndarray] = []
    for f in files:
        schema = pq.read_schema(f)
        at = schema.get_field_index(SEARCHED_KEY)
        if at >= 0 and schema.field(at).type == pa.uint64():
            column = pq.read_table(f, columns=[SEARCHED_KEY]).column(0)
            if not column.null_count:
                keys.append(column.to_numpy())
                continue
        made = hex_keys(_strings(f))
        if made is None:  # ids of another form: all of them as strings
            return ImageIds(pa.chunked_array([_strings(f) for f in files], pa.string()))
        keys.append(made)
    return ImageIds.from_keys(np.concatenate(keys) if keys else np.zeros(0, np.uint64))


def _strings(path: Path) -> pa.Array:
    column = pq.read_table(path, columns=["image_id"]).column(0).cast(pa.string())
    return column.combine_chunks()


def delta_file(lay: Layout, state: PairsState | None) -> Path | None:
    """The incremental runs' clusters file `state` commits (None: none)."""
    if state is None or not state.clusters_delta:
        return None
    return lay.run_clusters(state.clusters_delta)


def clusters_files(lay: Layout) -> tuple[Path, Path | None]:
    """The files that hold the clusters: clusters.parquet, and the committed incremental runs'
    changes to it (None: none, or not there)."""
    delta = delta_file(lay, read_state(lay))
    return lay.clusters, delta if delta is not None and delta.is_file() else None


def current_cluster_ids(lay: Layout) -> ClusterIds | None:
    """The current clusters' ids (cluster_ids): the incremental runs' file's, where there is one,
    else clusters.parquet's."""
    base, delta = clusters_files(lay)
    return cluster_ids(delta if delta is not None else base)


def dropped_mask(delta: pa.Table) -> pa.ChunkedArray:
    """Which rows of an incremental runs' clusters file name a cluster of clusters.parquet that
    no longer is (its cluster_id, no member: dropped_rows) rather than a member of a cluster
    formed since."""
    return pc.is_null(delta.column("image_id"))


def dropped_rows(cluster_ids: pa.Array) -> pa.Table:
    """The rows of an incremental runs' clusters file that say the clusters `cluster_ids` of
    clusters.parquet no longer are: the id, no member."""
    n = len(cluster_ids)
    columns = [cluster_ids.cast(pa.int32())]
    columns += [pa.nulls(n, f.type) for f in list(CLUSTERS_SCHEMA)[1:]]
    return pa.Table.from_arrays(columns, schema=CLUSTERS_SCHEMA)


def with_delta(base: pa.Table, delta: pa.Table | None) -> pa.Table:
    """The current clusters: `base`'s rows but those of the clusters `delta` replaced, then
    `delta`'s members."""
    if delta is None:
        return base
    gone = dropped_mask(delta)
    dropped = delta.filter(gone).column("cluster_id")
    kept = base.filter(pc.invert(pc.is_in(base.column("cluster_id"), value_set=dropped)))
    return pa.concat_tables([kept, delta.filter(pc.invert(gone)).cast(kept.schema)])


def read_clusters(lay: Layout) -> pa.Table:
    """Every cluster's members (CLUSTERS_SCHEMA), from the files that hold them."""
    base, delta = clusters_files(lay)
    table = read_table(base, CLUSTERS_SCHEMA, PAIRS_FIX)
    changes = read_table(delta, CLUSTERS_SCHEMA, PAIRS_FIX) if delta is not None else None
    return with_delta(table.replace_schema_metadata(None), changes)


def stray_runs(lay: Layout) -> list[Path]:
    """Partition files no commit names (a killed run's)."""
    state = read_state(lay)
    runs = state.runs if state is not None else []
    keep = {p.name for r in runs for p in (lay.run_pairs(r), lay.run_searched(r))}
    if (delta := delta_file(lay, state)) is not None:
        keep.add(delta.name)
    try:
        return sorted(p for p in lay.pairs_runs.iterdir() if p.name not in keep)
    except OSError:
        return []


def read_pairs(settings: Any, columns: list[str] | None = None) -> pa.Table:
    """Every recorded pair (exact copies, then near pairs), from all the files that hold them."""
    lay = layout(settings)
    files = pair_files(lay)
    if lay.pairs not in files and lay.exact not in files:
        raise CbirError(f"no pairs at {lay.pairs}: run `cbir pairs` first")
    tables = [read_table(f, PAIRS_SCHEMA, PAIRS_FIX, columns) for f in files]
    return pa.concat_tables(tables) if tables else PAIRS_SCHEMA.empty_table()


def scores_fingerprint(settings: Any) -> str | None:
    """The model fingerprint whose scores the recorded pairs hold (`cbir pairs` records it in
    its commit, and in the metadata of searched.parquet), or None when unknown."""
    lay = layout(settings)
    state = read_state(lay)
    if state is not None:
        return state.search.get("fingerprint")
    return metadata_value(lay.searched, "fingerprint")
