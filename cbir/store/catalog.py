"""The DuckDB catalogue: views over the pipeline's Parquet outputs.

The Parquet files are the single source of truth (each written atomically). `data/catalog.duckdb`
holds only views that read them, so it can never disagree with them and is cheap to keep current:
it is rebuilt (in a temporary file, then renamed) only when the set of views or their locations
change. Open it with the duckdb CLI or `duckdb.connect(path, read_only=True)`. The two views that
join pairs or clusters with the whole manifest read their result stored under data.cache_dir,
computed again whenever its inputs have changed (refresh_stored).

Longer than 400 lines: the SQL of every view, beside the guards of the connections that read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError
from ..fsutil import TMP_PREFIX, DiskFull, ReadOnly, atomic_path, clean_stale_tmp, write_text
from .decisions import DECISIONS_FIX, DECISIONS_SCHEMA, parts
from .layout import DECISION_PART_GLOB, Layout, layout
from .manifest import (
    FILES_SCHEMA,
    MANIFEST_FIX,
    QUARANTINE_SCHEMA,
    RUNS_SCHEMA,
    ImageRows,
    rows_mark,
)
from .pairs import (
    CLUSTERS_SCHEMA,
    FULL_SHARE,
    PAIRS_FIX,
    PAIRS_SCHEMA,
    PARTIAL,
    clusters_files,
    current_cluster_ids,
    pair_files,
)
from .tables import check_schema, metadata_value, one_line

if TYPE_CHECKING:
    from ..config import Settings

# 2: paths relative to the workspace, DOUBLE scores; 3: pair_report parted; 4: cluster_report
# parted, its rows of clusters no longer listed left out (`alive`)
SCHEMA_VERSION = 4


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _read(path: Path, root: Path | None) -> str:
    """read_parquet of a file, relative to the workspace root where it lies inside it, so the
    workspace can move (the duckdb CLI started in the workspace resolves relative paths against
    the current folder); in full when `root` is None."""
    full = Path(os.path.abspath(path))
    try:
        text = full.relative_to(Path(os.path.abspath(root or "/-"))).as_posix()
    except ValueError:
        text = str(full)
    return f"read_parquet({_sql_str(text)})"


def _read_many(paths: Sequence[Path], root: Path | None) -> str:
    """read_parquet of several files (one query over all, as for one file)."""
    if len(paths) == 1:
        return _read(paths[0], root)
    return "read_parquet([" + ", ".join(_read(p, root)[13:-1] for p in paths) + "])"


_DUCKDB_TYPES = {"string": "VARCHAR", "float": "FLOAT", "double": "DOUBLE", "int32": "INTEGER"}


def _empty(schema: pa.Schema) -> str:
    """A query with `schema`'s columns and no row (a log with no part yet)."""
    cols = []
    for f in schema:
        kind = "TIMESTAMPTZ" if pa.types.is_timestamp(f.type) else _DUCKDB_TYPES[str(f.type)]
        cols.append(f"NULL::{kind} AS {f.name}")
    return f"SELECT {', '.join(cols)} WHERE false"


@dataclass(frozen=True)
class View:
    """A catalogue view: over one Parquet file, over several (`many`: the partitioned pairs),
    over the parts of a log (`parquet` a folder, `glob` its parts' names), or SQL over other
    views."""

    name: str
    parquet: Path | None = None
    many: tuple[Path, ...] | None = None
    glob: str | None = None
    sql: str | None = None
    needs: tuple[str, ...] = ()
    sources: dict[str, Path] | None = None  # Parquet files the SQL reads as {name}
    comment: str = ""
    replace: str = ""  # a REPLACE clause for a Parquet view (e.g. FLOAT scores as DOUBLE)
    schema: pa.Schema | None = None  # what its Parquet file holds (the one file it reads)
    fix: str = ""  # what rebuilds that file
    stored: Path | None = None  # where its SQL's result is kept (see refresh_stored)
    parted: str = ""  # a condition: the stored rows meeting it are kept in parts (PARTS)
    # a condition: the stored rows that still count (the others are left out), `{clusters}`
    # naming the clusters view it reads (a growth's connection names the whole one otherwise)
    alive: str = ""

    def files(self) -> list[Path]:
        if self.many is not None:
            return list(self.many)
        if self.glob is not None:
            assert self.parquet is not None
            return parts(self.parquet)
        return ([self.parquet] if self.parquet else []) + list((self.sources or {}).values())

    def check(self) -> None:
        """A damaged or foreign file: one line naming it, not a DuckDB error mid-query."""
        for path in self.files() if self.schema is not None else ():
            check_schema(path, self.schema, self.fix)

    def body(self, root: Path | None) -> str:
        """What the view selects: its stored result where it has one, else `live`."""
        files = stored_files(self.stored) if self.stored is not None else None
        if files:
            where = f" WHERE {self.alive.format(clusters='clusters')}" if self.alive else ""
            return f"SELECT * FROM {_read_many(files, root)}{where}"
        return self.live(root)

    def live(self, root: Path | None) -> str:
        """The view's query over the Parquet outputs (or the views it needs)."""
        if self.glob is not None:
            assert self.parquet is not None and self.schema is not None
            if not self.files():
                return _empty(self.schema)
            return f"SELECT * FROM {_read(self.parquet / self.glob, root)}"
        if self.many:
            replace = f" {self.replace}" if self.replace else ""
            return f"SELECT *{replace} FROM {_read_many(self.many, root)}"
        if self.parquet is not None:
            replace = f" {self.replace}" if self.replace else ""
            return f"SELECT *{replace} FROM {_read(self.parquet, root)}"
        assert self.sql is not None
        return self.sql.format(**{k: _read(p, root) for k, p in (self.sources or {}).items()})


# A present file was seen by every run since the manifest was last rewritten (a run that changes
# anything rewrites it; an unchanged rerun only appends to the run log), so its last_run is the
# latest run's id. Deriving it keeps unchanged reruns cheap.
_FILES_SQL = """
SELECT * REPLACE (CASE WHEN status IN ('ok', 'duplicate')
                       THEN greatest(last_run, (SELECT max(run_id) FROM ingest_runs))
                       ELSE last_run END AS last_run)
FROM {files}
"""
_IMAGES_SQL = "SELECT * EXCLUDE (path_raw, is_canonical) FROM files WHERE is_canonical"
_EXACT_DUPLICATES_SQL = """
SELECT d.path, d.image_id, c.path AS canonical_path, d.bytes, d.first_run, d.last_run
FROM files d JOIN files c ON c.image_id = d.image_id AND c.is_canonical
WHERE d.status = 'duplicate'
"""

#: "Seen first", the one order that picks the canonical file among byte-identical copies (ingest)
#: and settles the likely master of a pair or cluster of equal size here: the earlier ingest run,
#: then the older modification time, then the path. Below, for sides a and b of a pair (after the
#: run their picture arrived, `_ARRIVED`) and for a cluster member.
SEEN_FIRST = ("first_run", "mtime_ns", "path")
# A pair's side arrived in the run that first brought its picture (image id) under any path, so
# that moving a scan brings no new pair; an exact copy's side is its file (same picture on both).
_ARRIVED = "CASE WHEN p.kind = 'exact' THEN {s}.first_run ELSE {s}.arrived END"
_SIDE = {"path": "p.path_{side}"}
_NEWER_A, _NEWER_B = (
    "row("
    + ", ".join(
        [_ARRIVED.format(s=side)]
        + [_SIDE.get(c, side + "." + c).format(side=side) for c in SEEN_FIRST]
    )
    + ")"
    for side in "ab"
)
_SEEN_FIRST_F = ", ".join("c.path" if c == "path" else "f." + c for c in SEEN_FIRST)
#: Image modes of reduced tone: bilevel (a halftone or line reproduction scanned in black and
#: white) and palette (a GIF or web derivative). A photograph's continuous-tone copy is the
#: likelier master whatever their sizes, so the likely master rule weighs tone before pixels.
REDUCED_TONE = ("1", "P", "PA")
#: A picture shown on a blank margin (FULL_SHARE) gives way, as the likely master, to a copy of
#: it without the margin that has at least its pixels on the margin (the box) divided by this:
#: the fitted box's slack (a trial's card mount: 642x625 px for the 622x640 original).
MARGIN_RESOLUTION = 1.05
_FULL_TONE = "coalesce(mode NOT IN ({}), true)".format(", ".join(f"'{m}'" for m in REDUCED_TONE))
#: Formats that store a picture lossily (Pillow's names): a TIFF or PNG of the same pixels is the
#: likelier master (an archive's preservation file; a JPEG is its access copy or a re-save). Its
#: bytes would say so too, but the rule weighs format before the run a copy arrived in.
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
_LOSSLESS = "coalesce(format NOT IN ({}), false)".format(", ".join(f"'{m}'" for m in LOSSY_FORMATS))

# Reviewing duplicates (see README "Reviewing duplicates"). A pair's two files are looked up by
# image id and path: the present version of that path when there is one, else its latest.
_PAIR_FILE_SQL = f"""
    SELECT image_id, path, width, height, width::BIGINT * height AS pixels, bytes, format,
           {_FULL_TONE} AS full_tone, {_LOSSLESS} AS lossless, first_run, mtime,
           mtime_ns, arrived
    FROM i SEMI JOIN ({{keys}}) k USING (image_id, path)
    QUALIFY row_number() OVER (PARTITION BY image_id, path
                               ORDER BY status IN ('ok', 'duplicate') DESC, version DESC) = 1
"""
_PAIR_KEYS = """SELECT image_a AS image_id, path_a AS path FROM duplicate_pairs
    UNION ALL SELECT image_b, path_b FROM duplicate_pairs"""
_PAIR_IMAGES = """SELECT image_a AS image_id FROM duplicate_pairs
    UNION ALL SELECT image_b FROM duplicate_pairs"""
_CLUSTER_KEYS = "SELECT image_id, path FROM clusters"


def _files_arrived(images: str, keys: str) -> str:
    """The WITH clause of the likely master's views: `f`, the file of each (image id, path) of
    `keys` (_PAIR_FILE_SQL) with `arrived`, the run that first brought its picture under any
    path (a moved scan keeps it), over the files of the image ids `images` lists."""
    return f"""WITH i AS (SELECT *, min(first_run) OVER (PARTITION BY image_id) AS arrived
           FROM files SEMI JOIN ({images}) k USING (image_id)),
f AS ({_PAIR_FILE_SQL.format(keys=keys)})"""


# The likely master: the whole picture of a partial copy (the other is a detail cut from it),
# else the one without a blank margin (MARGIN_RESOLUTION), else continuous tone (REDUCED_TONE),
# else more pixels, else a lossless format (LOSSY_FORMATS), else, of two lossy files, the one the
# archive held first (its earlier run: a JPEG of one resolution that arrives later, a donor's
# re-save or a turned copy, lost a generation whatever its bytes), else more bytes (of two
# lossless files, such as a 48-bit rescan of a 24-bit TIFF, which Pillow reads as RGB too), else
# seen first (run, then mtime, then path).
_PAIR_REPORT_SQL = f"""
{_files_arrived(_PAIR_IMAGES, _PAIR_KEYS)},
p AS (
    SELECT p.score::DOUBLE AS score, p.kind, p.path_a, p.path_b,  -- round(score, 3) shows 0.996
           a.width AS width_a, a.height AS height_a, b.width AS width_b, b.height AS height_b,
           a.bytes AS bytes_a, b.bytes AS bytes_b, a.format AS format_a, b.format AS format_b,
           a.first_run AS first_run_a, b.first_run AS first_run_b,
           {_ARRIVED.format(s="a")} AS arrived_a, {_ARRIVED.format(s="b")} AS arrived_b,
           a.mtime AS mtime_a, b.mtime AS mtime_b, a.pixels AS pixels_a, b.pixels AS pixels_b,
           a.full_tone AS tone_a, b.full_tone AS tone_b, a.lossless AS lossless_a,
           b.lossless AS lossless_b,
           coalesce({_NEWER_A} > {_NEWER_B}, false) AS a_is_newer,
           p.inliers, p.relation, p.covered::DOUBLE AS covered, p.box_on,
           CASE p.box_on WHEN 'a' THEN p.path_a WHEN 'b' THEN p.path_b END AS box_path,
           p.box_x0, p.box_y0, p.box_x1, p.box_y1,
           CASE p.relation WHEN 'a_in_b' THEN p.path_a WHEN 'b_in_a' THEN p.path_b
           END AS detail_path,
           CASE p.relation WHEN 'a_in_b' THEN p.path_b WHEN 'b_in_a' THEN p.path_a
           END AS whole_path,
           p.image_a, p.image_b, p.rank
    FROM duplicate_pairs p
    LEFT JOIN f a ON a.image_id = p.image_a AND a.path = p.path_a
    LEFT JOIN f b ON b.image_id = p.image_b AND b.path = p.path_b
),
g AS (  -- a picture on a blank margin gives way to a copy without it (MARGIN_RESOLUTION)
    SELECT *,
           coalesce(margin AND box_on = 'a' AND pixels_b * {MARGIN_RESOLUTION} >= box_pixels
                    AND (tone_b OR NOT tone_a), false) AS a_gives_way,
           coalesce(margin AND box_on = 'b' AND pixels_a * {MARGIN_RESOLUTION} >= box_pixels
                    AND (tone_a OR NOT tone_b), false) AS b_gives_way
    FROM (SELECT *, relation = 'full' AND covered < {FULL_SHARE} AS margin,
                 (box_x1 - box_x0)::BIGINT * (box_y1 - box_y0) AS box_pixels FROM p)
),
m AS (
    SELECT *,
           CASE WHEN relation = 'a_in_b' THEN false
                WHEN relation = 'b_in_a' THEN true
                WHEN a_gives_way THEN false
                WHEN b_gives_way THEN true
                WHEN tone_a <> tone_b THEN tone_a
                WHEN pixels_a <> pixels_b THEN pixels_a > pixels_b
                WHEN lossless_a <> lossless_b THEN lossless_a
                WHEN NOT lossless_a AND arrived_a <> arrived_b THEN arrived_a < arrived_b
                WHEN bytes_a <> bytes_b THEN bytes_a > bytes_b
                ELSE NOT a_is_newer END AS a_is_master,
           CASE WHEN relation IN ('a_in_b', 'b_in_a') THEN 'the whole picture'
                WHEN a_gives_way OR b_gives_way THEN 'no blank margin'
                WHEN tone_a <> tone_b THEN 'continuous tone'
                WHEN pixels_a <> pixels_b THEN 'higher resolution'
                WHEN lossless_a <> lossless_b THEN 'lossless file'
                WHEN NOT lossless_a AND arrived_a <> arrived_b THEN 'arrived first'
                WHEN bytes_a <> bytes_b THEN 'larger file'
                ELSE 'earlier' END AS master_reason
    FROM g
)
SELECT * EXCLUDE (pixels_a, pixels_b, tone_a, tone_b, lossless_a, lossless_b, a_is_newer,
                  a_is_master, image_a, image_b, margin, box_pixels, a_gives_way, b_gives_way,
                  rank, inliers, relation, covered, box_on, box_path, box_x0, box_y0, box_x1,
                  box_y1, detail_path, whole_path),
       CASE WHEN a_is_master THEN path_a ELSE path_b END AS master_path,
       greatest(arrived_a, arrived_b) AS new_run,
       CASE WHEN a_is_newer THEN path_a ELSE path_b END AS new_path,
       relation, inliers, covered, detail_path, whole_path,
       box_on, box_path, box_x0, box_y0, box_x1, box_y1,
       image_a, image_b, rank
FROM m
"""
# A pair is new in the run that brought its newer image; `match_path` is the other image.
# A pair a reviewer has decided (same, different or unsure; not undone) is no longer new.
_NEW_PAIRS_SQL = """
SELECT new_run, new_path, CASE WHEN new_path = path_a THEN path_b ELSE path_a END AS match_path,
       least(arrived_a, arrived_b) AS match_run, score, kind, master_path, master_reason,
       relation, covered, inliers, detail_path, whole_path, image_a, image_b
FROM pair_report p
WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.image_a = p.image_a
                                              AND d.image_b = p.image_b)
"""
# Partial copies confirmed by geometric verification: the detail, the picture it was cut from,
# and the detail's region on it (box_*, in that picture's pixels), each pair once.
_PARTIAL_COPIES_SQL = f"""
SELECT detail_path, whole_path, covered, inliers, score, box_x0, box_y0, box_x1, box_y1,
       new_run, CASE relation WHEN 'a_in_b' THEN image_a ELSE image_b END AS detail_id,
       CASE relation WHEN 'a_in_b' THEN image_b ELSE image_a END AS whole_id
FROM pair_report
WHERE relation IN ({", ".join(map(_sql_str, PARTIAL))})
"""
# Decisions (cbir/store/decisions.py): each row once (a compaction cut short leaves some twice),
# and each pair's current decision: its latest row that is not undone, with where its two
# images are now (they may have moved since).
_DECISION_LOG_SQL = """
SELECT * REPLACE (score::DOUBLE AS score) FROM decision_parts
QUALIFY row_number() OVER (PARTITION BY decision_id ORDER BY time) = 1
"""
_DECISIONS_SQL = """
WITH d AS (
    SELECT l.* FROM decision_log l
    WHERE l.decision <> 'undo'
      AND NOT EXISTS (SELECT 1 FROM decision_log u WHERE u.decision = 'undo'
                                                    AND u.undoes = l.decision_id)
    QUALIFY row_number() OVER (PARTITION BY l.image_a, l.image_b
                               ORDER BY l.time DESC, l.decision_id DESC) = 1
)
SELECT d.image_a, d.image_b, coalesce(a.path, d.path_a) AS path_a,
       coalesce(b.path, d.path_b) AS path_b, d.decision, d.master,
       CASE d.master WHEN d.image_a THEN coalesce(a.path, d.path_a)
                     WHEN d.image_b THEN coalesce(b.path, d.path_b) END AS master_path,
       d.reviewer, d.note, d.time, d.model, d.score, d.source, d.decision_id,
       d.path_a AS decided_path_a, d.path_b AS decided_path_b
FROM d
LEFT JOIN images a ON a.image_id = d.image_a
LEFT JOIN images b ON b.image_id = d.image_b
"""
_CLUSTER_REPORT_SQL = f"""
{_files_arrived("SELECT image_id FROM clusters", _CLUSTER_KEYS)}
SELECT c.cluster_id, any_value(c.size) AS size,
       any_value(c.weakest_link)::DOUBLE AS weakest_link,
       list(c.path ORDER BY c.path) AS members,
       list(c.path ORDER BY f.full_tone DESC, f.pixels DESC, f.lossless DESC,
                            CASE WHEN NOT f.lossless THEN f.arrived END,
                            f.bytes DESC, {_SEEN_FIRST_F})[1] AS master_path,
       min(f.first_run) AS first_run, max(f.first_run) AS newest_run,
       sum(f.bytes)::BIGINT AS total_bytes,  -- a HUGEINT would be stored as a DOUBLE
       list(c.image_id ORDER BY c.path) AS member_ids
FROM clusters c LEFT JOIN f ON f.image_id = c.image_id AND f.path = c.path
GROUP BY c.cluster_id
"""


def views(settings: Settings) -> list[View]:
    """Every view the catalogue can hold, in creation order."""
    lay = layout(settings)
    v = [
        View(
            "ingest_runs",
            parquet=lay.runs,
            comment="one row per ingest run",
            schema=RUNS_SCHEMA,
            fix=MANIFEST_FIX,
        ),
        View(
            "files",
            sql=_FILES_SQL,
            needs=("ingest_runs",),
            sources={"files": lay.files},
            schema=FILES_SCHEMA,
            fix=MANIFEST_FIX,
            comment="every file version ever ingested, with its status",
        ),
        View(
            "quarantine",
            parquet=lay.quarantine,
            schema=QUARANTINE_SCHEMA,
            fix=MANIFEST_FIX,
            comment="files that could not be used, with the reason",
        ),
        View(
            "images",
            sql=_IMAGES_SQL,
            needs=("files",),
            comment="one row per distinct image (by content), canonical path",
        ),
        View(
            "exact_duplicates",
            sql=_EXACT_DUPLICATES_SQL,
            needs=("files",),
            comment="byte-identical copies of a canonical image",
        ),
        View(
            "decision_parts",
            parquet=lay.decisions_dir,
            glob=DECISION_PART_GLOB,
            schema=DECISIONS_SCHEMA,
            fix=DECISIONS_FIX,
            comment="the decisions log's rows as stored (use decision_log or decisions)",
        ),
        View(
            "decision_log",
            sql=_DECISION_LOG_SQL,
            needs=("decision_parts",),
            comment="every decision ever recorded on a pair, undos too, oldest first",
        ),
        View(
            "decisions",
            sql=_DECISIONS_SQL,
            needs=("decision_log", "images"),
            comment="each decided pair's current decision (the latest not undone), with "
            "where both images are now",
        ),
    ]
    v += [
        # scores as DOUBLE: round(score, 3) of a FLOAT shows as 0.9980000257492065
        View(
            "duplicate_pairs",
            many=tuple(pair_files(lay)),
            replace="REPLACE (score::DOUBLE AS score)",
            schema=PAIRS_SCHEMA,
            fix=PAIRS_FIX,
            comment="near-duplicate pairs (kind 'near') and exact copies (kind 'exact', score 1)",
        ),
        _clusters_view(lay),
        View(
            "pair_report",
            sql=_PAIR_REPORT_SQL,
            needs=("files", "duplicate_pairs"),
            stored=lay.stored_view("pair_report"),
            parted="kind <> 'exact'",  # the near pairs: a part per night (PARTS)
            comment="each pair with both files' dimensions, sizes, formats, first run and "
            "mtime, the likely master (the whole picture, no blank margin, continuous tone, "
            "higher resolution, lossless file, arrived first, larger file, or earlier) and the "
            "geometric verification (relation, inliers, covered, the matched box)",
        ),
        View(
            "partial_copies",
            sql=_PARTIAL_COPIES_SQL,
            needs=("pair_report",),
            comment="pairs where one picture is a detail of the other (geometric "
            "verification): detail_path, whole_path, covered, the box on the whole picture",
        ),
        View(
            "new_pairs",
            sql=_NEW_PAIRS_SQL,
            needs=("pair_report", "decisions"),
            comment="pairs by the ingest run that brought their newer image (new_run), "
            "less those a reviewer has decided",
        ),
        View(
            "cluster_report",
            sql=_CLUSTER_REPORT_SQL,
            needs=("files", "clusters"),
            stored=lay.stored_view("cluster_report"),
            # a cluster's row is kept while its id is listed (store.pairs.CLUSTER_IDS: an id
            # names one group of images), a night's new clusters in a part of their own
            parted="true",
            alive="cluster_id IN (SELECT cluster_id FROM {clusters})",
            comment="one row per cluster: members, size, weakest link, likely master",
        ),
    ]
    return v


_DOUBLE_LINK = "REPLACE (weakest_link::DOUBLE AS weakest_link)"
# clusters.parquet less the clusters the incremental runs replaced, and those they formed
# (store.pairs.clusters_files: a row without a member names a replaced cluster)
_CLUSTERS_SQL = f"""
SELECT * {_DOUBLE_LINK} FROM {{base}}
WHERE cluster_id NOT IN (SELECT cluster_id FROM {{delta}} WHERE image_id IS NULL)
UNION ALL
SELECT * {_DOUBLE_LINK} FROM {{delta}} WHERE image_id IS NOT NULL
"""


def _clusters_view(lay: Layout) -> View:
    """The clusters' view: over clusters.parquet, and the incremental runs' changes to it."""
    base, delta = clusters_files(lay)
    common: dict[str, Any] = {
        "schema": CLUSTERS_SCHEMA,
        "fix": PAIRS_FIX,
        "comment": "connected groups of near-duplicates: one row per member",
    }
    if delta is None:
        return View("clusters", parquet=base, replace=_DOUBLE_LINK, **common)
    return View("clusters", sql=_CLUSTERS_SQL, sources={"base": base, "delta": delta}, **common)


def _plan(settings: Settings) -> list[View]:
    present: set[str] = set()
    chosen = []
    for view in views(settings):
        if view.many is not None and not view.many:  # no pairs recorded yet
            continue
        if not all(p.is_file() for p in view.files()):
            continue
        if any(n not in present for n in view.needs):
            continue
        chosen.append(view)
        present.add(view.name)
    return chosen


def _signature(chosen: Sequence[View], root: Path) -> str:
    desc = [(v.name, v.body(root), v.live(root)) for v in chosen]
    blob = json.dumps([SCHEMA_VERSION, desc], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------- stored view results

STAMP = "cbir_inputs"  # the key of a stored result's inputs stamp in its Parquet metadata


def _inputs(view: View, by_name: dict[str, View]) -> list[Path]:
    """The Parquet files a view's result depends on: its own and those of the views it needs."""
    return sorted({p for v in _needed(view, list(by_name.values())) for p in v.files()})


def _file_stamp(path: Path, root: Path | None = None) -> list[Any]:
    st = path.stat()
    name = os.path.relpath(path, root) if root is not None else str(path)
    return [name, st.st_size, st.st_mtime_ns, st.st_ino]


def _stamp(view: View, by_name: dict[str, View], root: Path) -> str:
    """What a stored result was computed from: the view's SQL and its input files as they are
    (each written by renaming a new file over the old, so a new inode and time on change)."""
    files = [_file_stamp(path) for path in _inputs(view, by_name)]
    blob = json.dumps([SCHEMA_VERSION, view.live(root), files])
    return hashlib.sha256(blob.encode()).hexdigest()


# The stored reports grow with their inputs. A pair_report row depends on its pair and its two
# files' manifest rows alone, a cluster_report row on its cluster's members and their rows; while
# the manifest's rows epoch (manifest.ROWS_EPOCH) is the same, a row computed from a pair or a
# cluster still recorded holds. So a night computes the rows of its new pairs partition (and of
# the exact copies, rewritten by every run) and of the clusters its update formed (the ids from
# the one the result was computed up to: store.pairs.CLUSTER_IDS), each in a part of its own,
# keeps the others' parts as they are, and does not join everything with the manifest again. A
# cluster the update dropped keeps its row in an older part, left out by `alive`.
GROWS = "cbir_grows"  # the key of what a stored result's rows were computed from
_ALL = "{}_all"  # in a growth's connection, the whole view whose rows it computes a part of
#: The parts the stored cluster_report grows to before it is computed whole again (a month of
#: nights): bounds the files a query opens and the rows `alive` leaves out. (pair_report's
#: follow the pairs' partitions, folded into the base at store.pairs.MAX_RUNS.)
MAX_PARTS = 32


@dataclass(frozen=True)
class _Growth:
    """How a parted stored result grows: its view `over` is computed over `part` of its rows
    only (None: none to compute), the whole being `{over}_all`, into a new part beside the
    `parts` that still hold; `expected` counts the rows the result must have, `counted` (with
    `{files}` its files) those it has where not all of them count (else it is computed
    whole)."""

    over: str
    part: View | None
    expected: str
    parts: tuple[str, ...]
    counted: str = ""
    images: str = ""  # the images of the part, whose manifest rows its rows are computed from


def _growth_key(
    settings: Settings, view: View, by_name: dict[str, View], mark: tuple[str, int] | None
) -> dict[str, Any] | None:
    """What a stored result computed now is computed from (GROWS): its SQL, the manifest's rows
    epoch and number of rows (`mark`), and the pairs' files (their stamps, named relative to
    the workspace, which may move) or the clusters' ids (lineage and next id). None: it cannot
    grow (a manifest with no rows epoch; the epoch is ingest's word that no row changed, which
    a manifest edited by other means should not keep, as for CANONICAL_EPOCH; clusters written
    before their ids were kept)."""
    lay = layout(settings)
    if mark is None or view.name not in ("pair_report", "cluster_report"):
        return None
    sql = hashlib.sha256(view.live(None).encode()).hexdigest()
    key: dict[str, Any] = {"version": SCHEMA_VERSION, "sql": sql, "rows": mark[0], "n": mark[1]}
    if view.name == "pair_report":
        pairs = by_name.get("duplicate_pairs")
        if pairs is None:
            return None
        key["near"] = [_file_stamp(p, settings.root) for p in pairs.files() if p != lay.exact]
    else:
        ids = current_cluster_ids(lay)
        if ids is None:
            return None
        key["clusters"] = {"lineage": ids.lineage, "next": ids.next}
    return key


def _growth(
    settings: Settings, view: View, by_name: dict[str, View], now: dict[str, Any]
) -> _Growth | None:
    """How the stored result of `view` grows to what it would be computed from `now`, where
    its rows were computed under the same SQL and rows epoch, from pairs files all still there
    as they were, or from clusters of the same ids' lineage (None: computed whole)."""
    assert view.stored is not None
    try:
        was = json.loads(metadata_value(view.stored, GROWS) or "null")
    except ValueError:
        return None
    if not isinstance(was, dict) or any(was.get(k) != now[k] for k in ("version", "sql", "rows")):
        return None
    if not isinstance(was.get("n"), int) or was["n"] > now["n"]:
        return None  # fewer rows under the same epoch: an older manifest put back
    files = stored_files(view.stored)
    if files is None or metadata_value(view.stored, PARTS) is None:
        return None  # written before its rows were parted: all of them in the file
    parts = tuple(f.name for f in files[1:])
    lay = layout(settings)
    if view.name == "pair_report":
        had = {json.dumps(s) for s in was.get("near") or []}
        if not had <= {json.dumps(s) for s in now["near"]}:
            return None  # a file folded away or rewritten: its rows would be gone or stale
        new = [settings.root / s[0] for s in now["near"] if json.dumps(s) not in had]
        part = tuple(new + ([lay.exact] if lay.exact.is_file() else []))
        pairs = by_name["duplicate_pairs"]
        return _Growth(
            over=pairs.name,
            part=dataclasses.replace(pairs, many=part) if part else None,
            expected=f"SELECT count(*) FROM {_ALL.format(pairs.name)}",
            parts=parts,
            images=_PAIR_IMAGES,
        )
    if len(parts) >= MAX_PARTS:
        return None  # computed whole: one part again
    held, ids = was.get("clusters"), now["clusters"]
    if not isinstance(held, dict) or held.get("lineage") != ids["lineage"]:
        return None  # numbered whole since: an id may name another group now
    upto = held.get("next")
    if not isinstance(upto, int) or upto > ids["next"]:
        return None
    whole = _ALL.format("clusters")
    formed = f"SELECT * FROM {whole} WHERE cluster_id >= {upto}"  # ids are never given twice
    return _Growth(
        over="clusters",
        part=(
            dataclasses.replace(by_name["clusters"], parquet=None, sql=formed, sources=None)
            if upto < ids["next"]
            else None
        ),
        expected=f"SELECT count(DISTINCT cluster_id) FROM {whole}",
        parts=parts,
        counted=f"SELECT count(*) FILTER (WHERE {view.alive.format(clusters=whole)}), count(*) "
        "FROM {files}",
        images="SELECT image_id FROM clusters",
    )


_CWD_LOCK = threading.Lock()  # held while a thread works in another current folder


#: The manifest's columns the stored reports read (their SQL and `files`'): a growth reads
#: these alone (the hashes and raw paths of 10^7 rows are most of the manifest's bytes).
REPORTED = (
    "image_id", "path", "version", "status", "bytes", "mtime", "mtime_ns", "width", "height",
    "mode", "format", "first_run", "last_run",
)  # fmt: skip


def _connect_views(
    settings: Settings,
    chosen: Sequence[View],
    growths: Sequence[_Growth] = (),
    rows: ImageRows | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection holding every view as its live query, the files named in full;
    with `growths`, each one's view `over` restricted to the part computed (the whole as
    `{over}_all`), and the manifest's rows (`files`) to those of the parts' images: all the
    rows the reports' SQL reads for them (every row of each image), in one pass over the
    manifest for both reports (10^7 rows: about 0.6 s a pass), or none where `rows` (the
    pairs step's read of the manifest: store.manifest.rows_of_images) holds every one of
    those images and the manifest is still the file it was read from."""
    con = duckdb.connect(":memory:")
    try:
        # a query lasting seconds: no progress bar on the user's terminal; spills beside the
        # catalogue, not in the current folder
        con.execute("SET enable_progress_bar = false")
        con.execute("SET temp_directory = ?", [str(layout(settings).catalog) + ".tmp"])
        over = {g.over: g for g in growths}
        for view in chosen:  # the parts first (views of files alone): they choose the rows
            if (growth := over.get(view.name)) is None:
                continue
            assert not view.needs, view.name
            body, kind = view.live(None), "VIEW"
            con.execute(f'CREATE TEMP VIEW "{_ALL.format(view.name)}" AS {body}')
            if growth.part is not None:
                body = growth.part.live(None)
                # the formed clusters, a query over all of them that the report reads
                # twice: computed once
                kind = "TABLE" if growth.part.sql is not None else "VIEW"
            con.execute(f'CREATE TEMP {kind} "{view.name}" AS {body}')
        for view in chosen:
            if view.name in over:
                continue
            body, kind = view.live(None), "VIEW"
            if view.name == "files" and growths:
                con.execute(f'CREATE TEMP VIEW "{_ALL.format(view.name)}" AS {body}')
                images = [g.images for g in growths if g.part is not None]
                wanted = " UNION ALL ".join(f"({q})" for q in images) or "SELECT NULL::VARCHAR"
                source = _ALL.format("files")
                if rows is not None and _holds(con, rows, wanted, settings):
                    source = "cbir_read_rows"
                body = f"SELECT {', '.join(REPORTED)} FROM {source} WHERE image_id IN ({wanted})"
                kind = "TABLE"
            con.execute(f'CREATE TEMP {kind} "{view.name}" AS {body}')
    except BaseException:
        con.close()
        raise
    return con


def _holds(
    con: duckdb.DuckDBPyConnection, rows: ImageRows, wanted: str, settings: Settings
) -> bool:
    """Whether `rows` hold every image of `wanted` (a query of image ids) in the columns the
    reports read, read from the manifest as it is; then registered as `cbir_read_rows`."""
    if not set(REPORTED) <= set(rows.table.column_names) or not rows.current(settings):
        return False
    con.register("cbir_read_ids", pa.table({"image_id": rows.ids}))
    missing = con.execute(
        f"SELECT count(*) FROM ({wanted}) w(image_id) "
        "WHERE image_id NOT IN (SELECT image_id FROM cbir_read_ids)"
    ).fetchall()  # all: DuckDB keeps a result not fetched to the end open on the connection
    if missing != [(0,)]:
        return False
    con.register("cbir_read_rows", rows.table)
    return True


def _grower(
    settings: Settings,
    chosen: Sequence[View],
    plans: Sequence[tuple[View, _Growth | None]],
    rows: ImageRows | None = None,
) -> duckdb.DuckDBPyConnection | None:
    """One connection for every growth planned (_connect_views), holding only the views they
    read (binding all of them costs 0.1-0.2 s a connection); None where there is none, or it
    cannot be made (an input damaged meanwhile, say: they are computed whole)."""
    grown = [(v, g) for v, g in plans if g is not None]
    if not grown:
        return None
    names = {n.name for v, _ in grown for n in _needed(v, chosen)}
    try:
        return _connect_views(
            settings, [v for v in chosen if v.name in names], [g for _, g in grown], rows
        )
    except duckdb.Error:
        return None


def _grow(
    con: duckdb.DuckDBPyConnection,
    view: View,
    growth: _Growth,
    tmp: Path,
    meta: dict[str, str],
) -> bool:
    """Write to `tmp` the stored result of `view` naming the parts that still hold and a new
    one of the rows computed for the growth's part, on the connection of the growths (_grower);
    False (and `tmp` left to be written whole) where the count is not right, or where the rows
    left out outnumber those that count."""
    try:
        query = f'SELECT * FROM "{view.name}"' + (" LIMIT 0" if growth.part is None else "")
        parts = _write_stored(con, view, query, tmp, meta, list(growth.parts))
        expected = con.execute(growth.expected).fetchone()
        counted = None
        if growth.counted:
            files = _read_many([tmp, *parts], None)
            counted = con.execute(growth.counted.format(files=files)).fetchone()
    except duckdb.Error:  # a stored file damaged meanwhile, say: computed whole instead
        return False
    if counted is not None:
        rows, total = counted
        return expected is not None and rows == expected[0] and total - rows <= rows
    rows = sum(pq.read_metadata(f).num_rows for f in [tmp, *parts])
    return expected is not None and rows == expected[0]


def _needed(view: View, chosen: Sequence[View]) -> list[View]:
    """`view` and the views it reads, in creation order."""
    by_name = {v.name: v for v in chosen}
    names: set[str] = set()
    todo = [view.name]
    while todo:
        name = todo.pop()
        if name in by_name and name not in names:
            names.add(name)
            todo += by_name[name].needs
    return [v for v in chosen if v.name in names]


def _write_stored(
    con: duckdb.DuckDBPyConnection,
    view: View,
    query: str,
    tmp: Path,
    meta: dict[str, str],
    parts: list[str] | None = None,
) -> list[Path]:
    """Write the rows of `query` to `tmp` with `meta`; for a parted view, those meeting its
    condition to a new part first, and the file naming `parts` and the new one. Returns the
    parts named."""
    assert view.stored is not None
    named: list[Path] = []
    if view.parted:
        con.execute(f"CREATE OR REPLACE TEMP TABLE parted_rows AS {query}")
        query = "SELECT * FROM parted_rows"
        names = list(parts or [])
        found = con.execute(f"SELECT count(*) FROM parted_rows WHERE {view.parted}").fetchone()
        if found and found[0]:
            part = _new_part(view.stored)
            with atomic_path(part) as part_tmp:
                con.execute(
                    f"COPY ({query} WHERE {view.parted}) TO {_sql_str(str(part_tmp))} "
                    f"(FORMAT parquet)"
                )
            names.append(part.name)
        query += f" WHERE ({view.parted}) IS NOT TRUE"
        meta = {**meta, PARTS: json.dumps(names)}
        named = [view.stored.with_name(n) for n in names]
    kv = "{" + ", ".join(f"{k}: {_sql_str(v)}" for k, v in meta.items()) + "}"
    con.execute(f"COPY ({query}) TO {_sql_str(str(tmp))} (FORMAT parquet, KV_METADATA {kv})")
    return named


def stored_stamp(path: Path) -> str | None:
    """The stamp a stored result was written with (None: missing, damaged, foreign, or a part
    it names is missing)."""
    return metadata_value(path, STAMP) if stored_files(path) else None


# A stored result whose view is `parted` keeps the rows meeting its condition (pair_report:
# the near pairs) in parts beside it, written once each, and only the others (the exact copies,
# computed again by every run) in the file itself, whose metadata names the parts (PARTS). A
# night adds a part of its new pairs' rows and rewrites the small file: the rows kept are not
# read and written again (10^6 at 10^7 images). The file is the commit: a part it does not
# name (a killed refresh's, or one a refresh computing everything again left behind) is
# removed by the next writer (clean_stale).
PARTS = "cbir_parts"
_PART = "{stem}-{token}.parquet"


def stored_files(path: Path) -> list[Path] | None:
    """A stored result's files: the file itself, then the parts it names; None where it is
    missing or unreadable, or names a part that is not there."""
    raw = metadata_value(path, PARTS)
    if raw is None:
        return [path] if path.is_file() else None
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _is_part(path, n) for n in names
    ):
        return None
    files = [path, *(path.with_name(n) for n in names)]
    return files if all(f.is_file() for f in files[1:]) else None


def _is_part(path: Path, name: str) -> bool:
    stem, token = path.stem + "-", name.removesuffix(".parquet")
    return name.endswith(".parquet") and token.startswith(stem) and token[len(stem) :].isalnum()


def _new_part(path: Path) -> Path:
    return path.with_name(_PART.format(stem=path.stem, token=uuid.uuid4().hex))


def _stray_parts(path: Path) -> list[Path]:
    """Parts of the stored result at `path` that it does not name (a missing or unreadable
    result names none)."""
    named = set(stored_files(path) or [])
    return sorted(
        p
        for p in path.parent.glob(f"{glob.escape(path.stem)}-*.parquet")
        if _is_part(path, p.name) and p not in named
    )


def _stale(
    settings: Settings, chosen: Sequence[View], *, missing_only: bool = False
) -> list[tuple[View, str]]:
    """The views whose stored result is not their live query's now, with the inputs' stamp
    (`missing_only`: only those with no stored result at all)."""
    by_name = {v.name: v for v in chosen}
    out = []
    for view in chosen:
        if view.stored is None:
            continue
        have = stored_stamp(view.stored)
        if missing_only and have is not None:
            continue
        stamp = _stamp(view, by_name, settings.root)
        if have != stamp:
            out.append((view, stamp))
    return out


def refresh_stored(
    settings: Settings,
    chosen: Sequence[View],
    *,
    missing_only: bool = False,
    rows: ImageRows | None = None,
) -> set[str]:
    """Compute again the stored result of each view that keeps one (pair_report,
    cluster_report) whose inputs changed since (`missing_only`: only those with none yet, the
    others not looked at), and return the names of those it could not write (a read-only data
    folder, a full disk: their live query is the current one).

    Those views join the pairs or clusters with the whole manifest: seconds at 10^7 images
    (benchmarks/scale.py), which every query would pay, the review queue and the nightly report
    too. Their result is kept as Parquet under data.cache_dir and read from there while it is
    current: each stored file carries a stamp of the view's SQL and its input files, and one
    whose stamp is not the inputs' stamp now is written again (atomically, so a reader never
    sees half a file). Deleting them only costs the time to compute them again. `rows`: the
    manifest's rows that a growth may read instead of reading the manifest (_connect_views)."""
    stale = _stale(settings, chosen, missing_only=missing_only)
    if not stale:
        return set()
    for view in chosen:  # a damaged or foreign input: its one line, not a DuckDB error
        view.check()
    left = {view.name for view, _ in stale}
    name = "views"
    by_name = {view.name: view for view in chosen}
    mark = rows_mark(settings)  # the manifest's footer, read once
    con = None  # connected for the first result computed whole
    grower = None  # the growths' own
    try:
        plans: list[tuple[View, dict[str, str], _Growth | None]] = []
        for view, stamp in stale:
            assert view.stored is not None
            name = view.name
            meta = {STAMP: stamp}
            key = _growth_key(settings, view, by_name, mark)
            growth = None
            if key is not None:
                meta[GROWS] = json.dumps(key)
                growth = _growth(settings, view, by_name, key) if view.stored.is_file() else None
            plans.append((view, meta, growth))
        grower = _grower(settings, chosen, [(v, g) for v, _, g in plans], rows)
        for view, meta, growth in plans:
            assert view.stored is not None
            name = view.name
            try:
                with atomic_path(view.stored) as tmp:
                    if (
                        growth is None
                        or grower is None
                        or not _grow(grower, view, growth, tmp, meta)
                    ):
                        con = con or _connect_views(settings, chosen)
                        _write_stored(con, view, f'SELECT * FROM "{view.name}"', tmp, meta)
                left.discard(view.name)
            except (ReadOnly, DiskFull):  # a reader may not write here: it queries live
                continue
    except duckdb.Error as exc:
        raise CbirError(f"cannot compute the catalogue's {name}: {_message(exc)}") from None
    finally:
        for c in (con, grower):
            if c is not None:
                c.close()
    return left


def refresh_catalog(
    settings: Settings, *, stored: bool = True, rows: ImageRows | None = None
) -> Path:
    """Make data/catalog.duckdb hold a view for every Parquet output that exists, and the
    stored view results current (`stored` False: only those missing; `rows`: see
    refresh_stored)."""
    return _refresh(settings, stored=stored, rows=rows)[0]


def _refresh(
    settings: Settings, *, stored: bool = True, rows: ImageRows | None = None
) -> tuple[Path, list[View], set[str]]:
    """refresh_catalog, and the views planned and the stored ones left stale (refresh_stored)."""
    target = layout(settings).catalog
    chosen = _plan(settings)
    left = refresh_stored(settings, chosen, missing_only=not stored, rows=rows)
    signature = _signature(chosen, settings.root)
    sidecar = _sidecar(target)
    if target.is_file() and sidecar.is_file() and sidecar.read_text() == signature:
        return target, chosen, left
    with atomic_path(target) as tmp:
        tmp.unlink()  # DuckDB wants to create the file itself
        con = duckdb.connect(str(tmp))
        try:
            con.execute(f"SET file_search_path = {_sql_str(str(settings.root))}")
            # DuckDB binds a view when it is created, reading its files' schemas, and looks for a
            # relative name in the current folder before file_search_path: started from another
            # workspace's folder, it bound pair_report to that workspace's pairs. Created from
            # the workspace's own folder (the views keep relative names, so the catalogue moves
            # with the workspace).
            # The current folder is the process's: two threads of the review server rebuilding
            # at once restored it under each other ("Cannot open file data/manifest/..."),
            # so one at a time.
            with _CWD_LOCK, contextlib.chdir(settings.root):
                for view in chosen:
                    con.execute(f"CREATE VIEW {view.name} AS {view.body(settings.root)}")
                    if view.comment:
                        con.execute(f"COMMENT ON VIEW {view.name} IS {_sql_str(view.comment)}")
            con.execute("CREATE TABLE cbir_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            con.execute(
                "INSERT INTO cbir_meta VALUES ('signature', ?), ('schema_version', ?)",
                [signature, str(SCHEMA_VERSION)],
            )
            con.execute("CHECKPOINT")
        finally:
            try:
                con.close()
            finally:  # its write-ahead log too, also when a write failed (a full disk)
                Path(str(tmp) + ".wal").unlink(missing_ok=True)
    write_text(signature, sidecar)
    return target, chosen, left


def clean_stale(settings: Settings) -> None:
    """Remove the temporary files of a refresh that was killed. For the steps that write (they
    hold the writer lock); a reader's refresh, which takes no lock, may be under way."""
    target = layout(settings).catalog
    for path in (target, _sidecar(target)):
        clean_stale_tmp(path.parent, path.name)
    for view in views(settings):
        if view.stored is not None:
            clean_stale_tmp(view.stored.parent, view.stored.name)
            if view.parted:
                _clean_parts(view.stored)


def _clean_parts(path: Path) -> None:
    """Remove the parts of the stored result at `path` it does not name, and their temporary
    files (a killed refresh's)."""
    folder = path.parent
    for p in [*_stray_parts(path), *folder.glob(f"{TMP_PREFIX}{glob.escape(path.stem)}-*")]:
        with contextlib.suppress(OSError):
            p.unlink()


def _sidecar(catalog: Path) -> Path:
    # Comparing a small text file is far cheaper than opening DuckDB on every step.
    return catalog.with_name(catalog.name + ".signature")


def connect(settings: Settings, *, refresh: bool = True) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed connection to the catalogue (refreshed first so new outputs show
    up), whose views find their Parquet files relative to the workspace, wherever it now is.

    Every connection cbir hands out for queries is guarded by DuckDB itself, so no query can
    change or read anything but the catalogue: the file is attached read only; external access
    is off except for the workspace's own Parquet outputs (no COPY/EXPORT, no reading other
    files, no extensions); and the configuration is locked, so a query cannot undo that. It is
    a DuckDB instance of its own (an in-memory one that attaches the file): the lock binds no
    other connection to the same file in this process.
    """
    if refresh:
        path, chosen, live = _refresh(settings)
    else:
        path, chosen = layout(settings).catalog, _plan(settings)
        live = {view.name for view, _ in _stale(settings, chosen)}
    if not path.is_file():
        raise CbirError(f"no catalogue at {path}: run `cbir ingest` first")
    for view in chosen:
        view.check()
    con = duckdb.connect(":memory:")
    try:
        con.execute("ATTACH ? AS catalog (READ_ONLY)", [str(path)])
        con.execute("USE catalog")
        # The file's views name their Parquet files relative to the workspace, and DuckDB
        # looks for a relative name in the current folder first: another workspace's data/
        # there would be read instead. Temporary views of the same names, naming this
        # workspace's files in full, come first in name resolution.
        for view in chosen:  # a stored result that could not be updated here: the live query
            body = view.live(None) if view.name in live else view.body(None)
            con.execute(f'CREATE TEMP VIEW "{view.name}" AS {body}')
        # a relative name in a user's query: the workspace's file (when the current folder
        # has none of that name)
        con.execute("SET file_search_path = ?", [str(settings.root)])
        con.execute("SET temp_directory = ?", [str(path) + ".tmp"])  # as a file-backed one
        con.execute("SET allowed_paths = ?", [_allowed_paths(settings, chosen)])
        # the decisions log gains parts while a connection is open (the review server); the
        # embedding shards as their folder (listed, the 10^4 of 10^7 images made SET
        # allowed_paths take 0.4 s a connection)
        con.execute("SET allowed_directories = ?", [_allowed_directories(settings)])
        for option in (
            "enable_progress_bar",  # DuckDB's own bar on the user's terminal (a long query)
            "enable_external_access",
            "autoinstall_known_extensions",
            "autoload_known_extensions",
            "allow_community_extensions",
        ):
            con.execute(f"SET {option} = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise CbirError(
            f"cannot open the catalogue {path} ({one_line(exc)}); run `cbir "
            f"ingest` to write it again"
        ) from None
    return con


def _allowed_paths(settings: Settings, chosen: Sequence[View]) -> list[str]:
    """The workspace's Parquet outputs, spelt as the views name them (relative to the
    workspace: DuckDB checks the name it is given) and in full."""
    files = {p for view in chosen for p in view.files()}
    for view in chosen:
        files.update(stored_files(view.stored) or [] if view.stored is not None else [])
    lay = layout(settings)
    for folder in (lay.manifest_dir, lay.pairs_dir, lay.reports_dir):
        files.update(folder.glob("*.parquet"))
    files.update(lay.pairs_runs.glob("*.parquet"))
    return sorted(set(_spellings(settings, [os.path.abspath(p) for p in files])))


def _allowed_directories(settings: Settings) -> list[str]:
    """The folders whose every file a query may read: the decisions log's and the embeddings'
    (each model's shards of Parquet), in full and relative to the workspace."""
    lay = layout(settings)
    folders = (lay.decisions_dir, lay.embeddings_dir)
    return _spellings(settings, [os.path.join(os.path.abspath(f), "") for f in folders])


def _spellings(settings: Settings, paths: list[str]) -> list[str]:
    """Each absolute path, and, inside the workspace, relative to it (as the views name
    files). As strings, not Paths: 10^4 embedding shards at 10^7 images took 0.5 s as Paths."""
    root = os.path.join(os.path.abspath(settings.root), "")
    out = []
    for full in paths:
        out.append(full)
        if full.startswith(root):
            out.append(full[len(root) :])
    return out


def _statement(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    """The one query in `sql`. Anything but a query (COPY, ATTACH, SET, CREATE, PRAGMA...) is
    refused before it runs: the guards of `connect` stop it anyway, this says why in words."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise CbirError(f"query failed: {_message(exc)}") from None
    if not statements:
        raise CbirError("no query to run: the SQL is empty or only comments")
    if len(statements) > 1:
        raise CbirError(f"one query at a time: the SQL holds {len(statements)} statements")
    try:
        kind = statements[0].type
    except ValueError:  # a statement type this duckdb's Python API has no name for
        raise CbirError(
            "only queries can run on the catalogue (it is read only): SELECT, "
            "FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE"
        ) from None
    if kind != duckdb.StatementType.SELECT:
        raise CbirError(
            f"only queries can run on the catalogue (it is read only): SELECT, "
            f"FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE; not {kind.name}"
        )
    return statements[0]


def _message(exc: duckdb.Error) -> str:
    """DuckDB's message without the quoted query and carets that follow it, on one line."""
    return one_line(str(exc).split("\n\nLINE ")[0])


def query(
    settings: Settings,
    sql: str,
    params: Iterable[Any] | None = None,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one SQL query on the catalogue; user values go in as parameters (`?`)."""
    cols, rows, _ = query_page(settings, sql, params)
    return cols, rows


def query_page(
    settings: Settings, sql: str, params: Iterable[Any] | None = None, limit: int | None = None
) -> tuple[list[str], list[tuple[Any, ...]], int]:
    """Like `query`, but only the first `limit` rows (all when None), and the total count."""
    parser = duckdb.connect(":memory:")  # refused before the catalogue is refreshed
    try:
        _statement(parser, sql)
    finally:
        parser.close()
    con = connect(settings)
    try:
        cur = con.execute(_statement(con, sql), list(params or []))
        cols = [d[0] for d in cur.description] if cur.description else []
        if limit is None:
            rows = cur.fetchall()
            return cols, rows, len(rows)
        rows = cur.fetchmany(limit)
        total = len(rows)
        while chunk := cur.fetchmany(65536):  # count what is left without holding it
            total += len(chunk)
        return cols, rows, total
    except duckdb.Error as exc:
        raise CbirError(f"query failed: {_message(exc)}") from None
    finally:
        con.close()


# --------------------------------------------------------------------------- the review gallery

_ALL_ROWS = 1 << 62  # a LIMIT that keeps every row (fits DuckDB's BIGINT)

# The strongest near pairs within each cluster (both images in it), with the cluster's count.
_CLUSTER_PAIRS_SQL = """
    SELECT ca.cluster_id, p.*, count(*) OVER (PARTITION BY ca.cluster_id) AS n_in_cluster
    FROM pair_report p
    JOIN clusters ca ON ca.image_id = p.image_a
    JOIN clusters cb ON cb.image_id = p.image_b AND cb.cluster_id = ca.cluster_id
    WHERE p.kind = 'near'
    QUALIFY row_number() OVER (PARTITION BY ca.cluster_id
                               ORDER BY p.score DESC, p.path_a, p.path_b) <= ?
    ORDER BY ca.cluster_id, p.score DESC, p.path_a, p.path_b"""


@dataclass(frozen=True)
class ReportRows:
    """What the review gallery shows, read through one connection so its parts agree."""

    n_pairs_total: int
    pairs: list[dict[str, Any]]  # pair_report rows, strongest first
    clusters: list[dict[str, Any]]  # cluster_report rows, largest first
    cluster_pairs: list[dict[str, Any]]  # pair_report rows with cluster_id and n_in_cluster
    n_images: int  # images read without error


def _dicts(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """The rows of a query as dicts by column name (what the gallery's templates read)."""
    cur = con.execute(sql, list(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """The one number a `SELECT count(*)` returns."""
    row = con.execute(sql).fetchone()
    assert row is not None  # a count always has its one row
    return int(row[0])


def report_rows(settings: Settings, max_pairs: int, per_cluster: int) -> ReportRows:
    """The gallery's rows from the `pair_report` and `cluster_report` views: the strongest
    `max_pairs` pairs (0: all), every cluster, and the strongest `per_cluster` near pairs of
    each cluster. Sorted here, so the pages and a SQL user see the same order."""
    con = connect(settings)
    try:
        names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        if "pair_report" not in names or "cluster_report" not in names:
            raise CbirError("no pairs in the catalogue: run `cbir pairs` first")
        return ReportRows(
            n_pairs_total=_count(con, "SELECT count(*) FROM pair_report"),
            pairs=_dicts(
                con,
                "SELECT * FROM pair_report ORDER BY score DESC, kind, path_a, path_b LIMIT ?",
                [max_pairs or _ALL_ROWS],
            ),
            clusters=_dicts(con, "SELECT * FROM cluster_report ORDER BY size DESC, cluster_id"),
            cluster_pairs=_dicts(con, _CLUSTER_PAIRS_SQL, [per_cluster]),
            n_images=_count(con, "SELECT count(*) FROM images WHERE status = 'ok'"),
        )
    finally:
        con.close()
