"""The manifest (`data.manifest_dir`, written by `cbir ingest`): every file version ever seen,
the files that could not be used, and one row per ingest run; their schemas and statuses, and
reading them back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..arrays import found_at
from ..errors import CbirError
from ..fsutil import Stamp, file_stamps
from .layout import layout
from .tables import metadata_value, one_line, read_table

# A file version's status
OK = "ok"  # present; the canonical file of its content
DUPLICATE = "duplicate"  # present; byte-identical to a canonical file
MISSING = "missing"  # no longer in the scans folder (kept, never dropped)
REPLACED = "replaced"  # an older version of a path whose content changed
PRESENT = (OK, DUPLICATE)

# The manifest (cbir ingest)
FILES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("path_raw", pa.binary()),
        ("version", pa.int32()),
        ("status", pa.string()),
        ("is_canonical", pa.bool_()),
        ("duplicate_of", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("mtime", pa.timestamp("us", tz="UTC")),
        ("mtime_ns", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("format", pa.string()),
        ("pages", pa.int32()),
        ("phash", pa.uint64()),
        ("first_run", pa.int32()),
        ("last_run", pa.int32()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("path_raw", pa.binary()),
        ("reason", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("first_run", pa.int32()),
        ("last_run", pa.int32()),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.int32()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("scans_dir", pa.string()),
        ("files_seen", pa.int64()),
        ("new", pa.int64()),
        ("changed", pa.int64()),
        ("unchanged", pa.int64()),
        ("new_duplicates", pa.int64()),
        ("newly_missing", pa.int64()),
        ("quarantined", pa.int64()),
        ("decoded", pa.int64()),
        ("seconds", pa.float64()),
    ]
)

#: The key, in the manifest file's Parquet metadata, of its canonical epoch: a token that ingest
#: draws afresh whenever a run changes which path an image is known by (a canonical file moved,
#: went missing, or gave way to a copy) and carries over otherwise. Paths recorded under one
#: epoch (the pairs') are still every image's canonical path while the epoch is the same.
CANONICAL_EPOCH = "cbir_canonical_epoch"

#: The key of its rows epoch: drawn afresh whenever a run changes a row (but for its last_run,
#: which the catalogue derives) or adds one for a path and content a row already has; a run that
#: only appends new rows carries it over. What was computed from the rows under one epoch (the
#: catalogue's stored report rows of recorded pairs and clusters) holds while it is the same.
ROWS_EPOCH = "cbir_rows_epoch"

#: What to do about a damaged manifest file: ingest cannot rebuild what it would extend.
MANIFEST_FIX = (
    "restore it from DVC (`dvc checkout`), or move it away and run `cbir ingest` "
    "to start a new manifest"
)


def load_manifest(settings: Any, columns: list[str] | None = None) -> pa.Table:
    """The manifest table (every file version; only `columns`, when given: 10^7 rows of all
    columns take seconds to read). Raises CbirError when ingest has not run."""
    path = layout(settings).files
    if not os.path.lexists(path):
        raise CbirError(f"no manifest at {path}: run `cbir ingest` first")
    return read_table(path, FILES_SCHEMA, MANIFEST_FIX, columns)  # damaged or foreign: one line


def canonical_images(settings: Any) -> list[dict[str, Any]]:
    """The images to embed: one present, canonical file per distinct content, sorted by id."""
    cols = ["image_id", "path", "path_raw", "status", "is_canonical", "width", "height"]
    table = load_manifest(settings, cols)
    rows = [r for r in table.to_pylist() if r["is_canonical"] and r["status"] == OK]
    rows.sort(key=lambda r: r["image_id"])
    return rows


def _canonical(settings: Any, columns: list[str]) -> pa.Table:
    table = load_manifest(settings, ["status", "is_canonical", *columns])
    return table.filter(canonical_mask(table)).select(columns)


def canonical_mask(table: pa.Table) -> pa.Array:
    """Which of the manifest rows (status, is_canonical) are canonical_images'."""
    return pc.and_(pc.equal(table.column("status"), OK), table.column("is_canonical"))


def canonical_ids(settings: Any) -> pa.Array:
    """The image ids of canonical_images, computed in Arrow (no Python row per image). Ingest
    keeps one present canonical file per content, so each id comes once: not made unique
    again (hashing 10^6 ids as strings took 0.2-0.3 s, 10^7 seconds)."""
    return _canonical(settings, ["image_id"]).column(0).combine_chunks()


def canonical_table(settings: Any) -> pa.Table:
    """(image_id, path) of each canonical image."""
    return _canonical(settings, ["image_id", "path"])


class _Unreadable(Exception):
    """DuckDB could not read the manifest (its message, on one line)."""


def _manifest_rows(
    settings: Any,
    sql: str,
    params: list[Any],
    tables: dict[str, pa.Table] | None = None,
    read: ImageRows | None = None,
) -> list[tuple[Any, ...]]:
    """The rows of a DuckDB query over the manifest (the view `manifest`; `tables` registered
    by name): DuckDB reads only the rows a filter or semi join keeps of the columns it does not
    filter on. `read`: rows read from it already (rows_of_images) that the query needs alone,
    queried instead while the manifest is the file they were read from. Raises _Unreadable
    where it cannot read the manifest."""
    import duckdb  # not for every importer of the manifest: `cbir sql` stays quick either way

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_progress_bar = false")
        for name, table in (tables or {}).items():
            con.register(name, table)
        if read is not None and read.current(settings):
            con.register("manifest", read.table)
        else:
            path = str(layout(settings).files).replace("'", "''")
            con.execute(f"CREATE TEMP VIEW manifest AS SELECT * FROM read_parquet('{path}')")
        return con.execute(sql, params).fetchall()
    except duckdb.Error as exc:
        raise _Unreadable(one_line(exc)) from None
    finally:
        con.close()


def exact_copies(settings: Any, read: ImageRows | None = None) -> list[tuple[str, str, str]]:
    """(image_id, canonical path, copy's path) of each present byte-identical copy, sorted by
    id and path. DuckDB reads the paths of the copies' rows and their canonical rows alone (at
    10^7 rows, against 1.2 s for every path in Arrow); from `read` (rows_of_images: every row
    of each image with a copy) where it still holds the manifest's rows, without a pass."""
    try:
        rows = _manifest_rows(
            settings,
            """WITH d AS (SELECT image_id, path FROM manifest WHERE status = $1),
            c AS (SELECT image_id, path FROM manifest SEMI JOIN d USING (image_id)
                  WHERE status = $2 AND is_canonical)
            SELECT d.image_id, c.path, d.path FROM d JOIN c USING (image_id)
            ORDER BY d.image_id, d.path""",
            [DUPLICATE, OK],
            read=read,
        )
    except _Unreadable as exc:
        load_manifest(settings, ["image_id", "path", "status", "is_canonical"])  # names it
        raise CbirError(f"cannot read the manifest {layout(settings).files}: {exc}") from None
    return [(str(i), str(c), str(p)) for i, c, p in rows]


def canonical_paths_of(settings: Any, ids: list[str]) -> dict[str, str] | None:
    """image_id -> path of the canonical images among `ids`, where DuckDB reads the manifest:
    it reads the paths of those rows alone (10^7 rows, 2,000 ids: 0.4 s, against 2.7 s for
    every canonical path in Arrow). None where it cannot (the caller reads the manifest as
    usual, which names the problem)."""
    try:
        rows = _manifest_rows(
            settings,
            "SELECT f.image_id, f.path FROM manifest f SEMI JOIN wanted w "
            "ON f.image_id = w.id WHERE f.status = $1 AND f.is_canonical",
            [OK],
            {"wanted": pa.table({"id": pa.array(ids, pa.string())})},
        )
    except _Unreadable:
        return None
    found: dict[str, str] = {}
    for image_id, path in rows:
        found.setdefault(str(image_id), str(path))
    return found


@dataclass(frozen=True)
class ImageRows:
    """Every manifest row of some images (`ids`: each one's rows are all in `table`), in the
    columns asked, read in one pass (rows_of_images); `stamp`: the file they were read from."""

    ids: pa.Array
    table: pa.Table
    stamp: Stamp

    def paths_of(self, ids: Iterable[str]) -> dict[str, str | None]:
        """The canonical path of each of `ids` that was read (None: not a canonical image, as
        a lookup gives); those not read are left out. In Arrow: the rows read include those
        of every image with an exact copy, which may be many."""
        asked = pa.array(sorted(set(ids)), pa.string())
        t = self.table
        t = t.filter(pc.and_(canonical_mask(t), pc.is_in(t.column("image_id"), value_set=asked)))
        found = dict(
            zip(t.column("image_id").to_pylist(), t.column("path").to_pylist(), strict=True)
        )
        listed = pc.is_in(asked, value_set=self.ids).to_pylist()
        return {i: found.get(i) for i, ok in zip(asked.to_pylist(), listed, strict=True) if ok}

    def current(self, settings: Any) -> bool:
        """Whether the manifest is still the file they were read from."""
        return file_stamps([layout(settings).files]) == self.stamp


def rows_of_images(settings: Any, ids: Iterable[str], columns: Sequence[str]) -> ImageRows | None:
    """Every manifest row of the images `ids` and of each image with a byte-identical copy, in
    `columns` (with status, is_canonical and path), from one DuckDB pass: a night's new pairs'
    paths and the rows its stored reports grow from (store.catalog), which were two passes over
    the manifest (10^7 rows: about 0.6 s each). None where DuckDB cannot read it, or it
    changed meanwhile."""
    import duckdb

    files = layout(settings).files
    stamp = file_stamps([files])
    names = list(dict.fromkeys([*columns, "image_id", "path", "status", "is_canonical"]))
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_progress_bar = false")
        con.register("wanted", pa.table({"id": pa.array(sorted(set(ids)), pa.string())}))
        con.execute(
            "CREATE TEMP TABLE asked AS SELECT id FROM wanted UNION "
            "SELECT image_id FROM read_parquet($1) WHERE status = $2",
            [str(files), DUPLICATE],
        )
        cols = ", ".join(f'"{c}"' for c in names)
        # con.sql: Arrow straight from the query (a DB-API result's copies the rows again)
        table = con.sql(
            f"SELECT {cols} FROM read_parquet($1) WHERE image_id IN (SELECT id FROM asked)",
            params=[str(files)],
        ).to_arrow_table()
        listed = con.sql("SELECT id FROM asked ORDER BY id").to_arrow_table()
    except duckdb.Error:
        return None
    finally:
        con.close()
    if stamp[0] is None or file_stamps([files]) != stamp or table is None or listed is None:
        return None
    return ImageRows(listed.column(0).combine_chunks(), table.replace_schema_metadata(None), stamp)


def canonical_epoch(settings: Any) -> str | None:
    """The manifest's canonical epoch (CANONICAL_EPOCH; None: no manifest, or one written
    before epochs were kept): read from its footer, not its rows."""
    return metadata_value(layout(settings).files, CANONICAL_EPOCH)


def rows_epoch(settings: Any) -> str | None:
    """The manifest's rows epoch (ROWS_EPOCH; None: no manifest, or one written before)."""
    mark = rows_mark(settings)
    return mark[0] if mark is not None else None


def rows_mark(settings: Any) -> tuple[str, int] | None:
    """The manifest's rows epoch and its number of rows, from one read of its footer (None: no
    manifest, or one without a rows epoch)."""
    try:
        meta = pq.read_metadata(layout(settings).files)
    except (OSError, pa.ArrowException):
        return None
    epoch = (meta.metadata or {}).get(ROWS_EPOCH.encode())
    return (epoch.decode("utf-8", "replace"), meta.num_rows) if epoch else None


def sorted_keys(ids: pa.Array) -> np.ndarray:
    """Sorted string ids as a NumPy bytes array for binary search: ids of one length (cbir's
    hex ids) are viewed in place (10^7 ids of 16 characters: 160 MB, no Python string each)."""
    ids = pa.array(ids, pa.string()) if not isinstance(ids, pa.Array) else ids
    ids = ids.cast(pa.string())
    if len(ids) and ids.null_count == 0:
        offsets = np.frombuffer(ids.buffers()[1], np.int32, len(ids) + 1, offset=ids.offset * 4)
        width = int(offsets[1] - offsets[0])
        if width > 0 and bool((np.diff(offsets) == width).all()):
            data = np.frombuffer(
                ids.buffers()[2], np.uint8, width * len(ids), offset=int(offsets[0])
            )
            return data.view(f"S{width}")
    return np.array([x.encode() for x in ids.to_pylist()], dtype=bytes)


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


def hex_keys(ids: pa.Array) -> np.ndarray | None:
    """cbir's image ids (16 lowercase hex digits) as uint64 in the same order as the strings,
    so that sorting and membership are integer work (10^7 ids: a second, against 30 s for
    strings); None where any id is of another form."""
    keys = sorted_keys(ids)
    if not len(keys):
        return np.zeros(0, np.uint64)
    if keys.dtype.itemsize != 16:
        return None
    digits = keys.view(np.uint8).reshape(-1, 16)
    out = np.empty(len(keys), np.uint64)
    step = 1 << 18  # a chunk at a time: temporaries of 4 MB, not 400 MB of fresh pages at 10^7
    for start in range(0, len(keys), step):
        nibbles = _HEX[digits[start : start + step]]
        if (nibbles == 255).any():
            return None
        packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
        out[start : start + step] = packed.view(">u8").ravel()
    return out


# the four hex digits of each 16-bit word, as the four bytes of a uint32 in memory order
_WORDS = np.frombuffer(b"".join(b"%04x" % i for i in range(1 << 16)), np.uint32)


def hex_ids(keys: np.ndarray) -> pa.Array:
    """The inverse of hex_keys: uint64 keys as cbir's ids (16 lowercase hex digits), written
    into one Arrow buffer by a table of 16-bit words (10^7 ids: 0.1 s, no Python string)."""
    n = len(keys)
    chars = np.empty((n, 4), np.uint32)
    words = np.asarray(keys, "<u8").view("<u2").reshape(-1, 4)[:, ::-1]  # the high word first
    step = 1 << 16  # a chunk at a time: its indices stay small
    for start in range(0, n, step):
        np.take(_WORDS, words[start : start + step], out=chars[start : start + step])
    kind, width = (pa.string(), np.int32) if 16 * n < 2**31 else (pa.large_string(), np.int64)
    offsets = np.arange(0, 16 * n + 1, 16, dtype=width)
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


class ImageIds(Sequence[str]):
    """Image ids held as one Arrow array, read like the list of strings it replaces (indexing,
    slicing, iteration, comparison with a list): 10^7 ids as Python strings cost 1.4 s to make
    and 0.7 GB, and 1.6 s to turn back into Arrow or 1.8 s into FAISS ids. Ids made from their
    hex_keys (`from_keys`) are written as strings only where asked (hex_ids: 0.5-0.7 s at 10^7,
    which a night that reads a few of them need not pay)."""

    def __init__(
        self, ids: pa.Array | pa.ChunkedArray | None, keys: np.ndarray | None = None
    ) -> None:
        """`keys`: the ids' hex_keys, where the caller has made them (`ids` None: from them)."""
        if ids is None and keys is None:
            raise ValueError("ImageIds wants ids or their keys")
        if ids is not None:
            ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
            ids = ids.cast(pa.string())
        self._arrow: pa.Array | None = ids
        self._keys, self._keyed = keys, keys is not None

    @classmethod
    def of(cls, ids: Sequence[str]) -> ImageIds:
        """`ids` as ImageIds (the same object where they are)."""
        return ids if isinstance(ids, ImageIds) else cls(pa.array(list(ids), pa.string()))

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> ImageIds:
        """The ids whose hex_keys are `keys`."""
        return cls(None, keys)

    @property
    def arrow(self) -> pa.Array:
        """The ids as one Arrow string array."""
        if self._arrow is None:
            assert self._keys is not None
            self._arrow = hex_ids(self._keys)
        return self._arrow

    def _strings(self, rows: slice | np.ndarray) -> list[str]:
        if self._arrow is None and self._keys is not None:  # only those asked written
            return hex_ids(self._keys[rows]).to_pylist()
        if isinstance(rows, slice):
            return self.arrow.slice(rows.start, rows.stop - rows.start).to_pylist()
        return self.arrow.take(pa.array(rows)).to_pylist()

    def __len__(self) -> int:
        if self._arrow is not None:
            return len(self._arrow)
        return len(self._keys) if self._keys is not None else 0

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self._strings(slice(start, max(start, stop)))
            return self.take(np.arange(start, stop, step))
        n = len(self)
        at = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= at < n:
            raise IndexError(i)
        return self._strings(slice(at, at + 1))[0]

    def __iter__(self) -> Iterator[str]:
        n = len(self)
        for start in range(0, n, 1 << 16):  # a block of strings at a time
            yield from self._strings(slice(start, min(n, start + (1 << 16))))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ImageIds):
            mine, theirs = self.hex_keys(), other.hex_keys()
            if mine is not None and theirs is not None:
                return bool(np.array_equal(mine, theirs))
            return self.arrow.equals(other.arrow)
        if isinstance(other, list | tuple):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like the list it replaces

    def __repr__(self) -> str:
        return f"ImageIds({len(self)} ids)"

    def take(self, rows: np.ndarray | Sequence[int]) -> list[str]:
        """The ids at `rows`, as strings."""
        return self._strings(np.asarray(rows, np.int64))

    def hex_keys(self) -> np.ndarray | None:
        """The ids as hex_keys (None: not all cbir's ids), made once."""
        if not self._keyed:
            self._keys, self._keyed = hex_keys(self.arrow), True
        return self._keys


IdsLike: TypeAlias = pa.Array | pa.ChunkedArray | ImageIds


def ids_in(values: IdsLike, value_set: IdsLike) -> np.ndarray:
    """Whether each of `values` is among `value_set` (image ids), as a bool array: pc.is_in,
    done as integer binary search for cbir's hex ids (10^6 in 10^6: 0.3 s against 1.8 s)."""
    have, among = _keys_of(values), _keys_of(value_set)
    if have is None or among is None:
        return np.asarray(
            pc.fill_null(pc.is_in(_arrow_of(values), value_set=_arrow_of(value_set)), False),
            bool,
        )
    return keys_in(have, among)


def _arrow_of(ids: IdsLike) -> pa.Array:
    if isinstance(ids, ImageIds):
        return ids.arrow
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids


def _keys_of(ids: IdsLike) -> np.ndarray | None:
    """The hex_keys of `ids` (kept by ImageIds, made once)."""
    return ids.hex_keys() if isinstance(ids, ImageIds) else hex_keys(_arrow_of(ids))


def keys_in(have: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Whether each of the hex_keys `have` is among `among`, by binary search. (Looking `among`
    up in a sorted `have` instead was tried: 10^7 unsorted keys searched at random took the
    index step from 10 s to 23 s at 10^7.)"""
    if not len(among):
        return np.zeros(len(have), bool)
    among = sorted_runs(among)
    at = np.minimum(np.searchsorted(among, have), len(among) - 1)
    return np.asarray(among[at] == have, bool)


def sorted_runs(keys: np.ndarray) -> np.ndarray:
    """`keys` sorted. Keys that are a few sorted runs (the searched files of a pairs run, one
    per night, each written sorted) are merged by a stable sort (timsort: 10^7 keys in three
    runs 0.04 s against 0.72 s); others take the default sort (0.67 s against 0.78 s)."""
    if len(keys) < 2:
        return keys
    descents = int(np.count_nonzero(keys[1:] < keys[:-1]))
    if not descents:
        return keys
    return np.sort(keys, kind="stable" if descents <= 64 else "quicksort")


_SCAN_MAX = 100_000  # more ids than this are looked up in the sorted arrays (`_ready`)


class CanonicalPaths(Mapping[str, str]):
    """image_id -> path of each canonical image, read-only, built on first use from the
    manifest and searched by bisection in sorted arrays: no dictionary of 10^7 Python strings."""

    def __init__(
        self,
        load: Callable[[], pa.Table],
        lookup: Callable[[list[str]], dict[str, str] | None] | None = None,
    ) -> None:
        self._load = load  # (image_id, path)
        self._lookup = lookup  # a few ids' paths without loading them all (None: cannot)
        self._keys: np.ndarray | None = None
        self._paths: pa.Array | None = None
        self._hexed: np.ndarray | None = None  # the keys as hex_keys, where they are cbir's
        self._table: pa.Table | None = None  # as loaded, while only `paths` has been asked

    def _ready(self) -> tuple[np.ndarray, pa.Array]:
        if self._keys is None or self._paths is None:
            t = self._table if self._table is not None else self._load()
            self._table = None
            ids = t.column("image_id").combine_chunks()
            hexed = hex_keys(ids)  # cbir's ids sort as integers: 10^7 in 4 s, not 17
            if hexed is not None:
                order_np = np.argsort(hexed, kind="stable")
                self._hexed = hexed[order_np]
                order = pa.array(order_np)
            else:
                order = pc.sort_indices(ids)
            self._keys = sorted_keys(ids.take(order))
            self._paths = t.column("path").combine_chunks().take(order)
        return self._keys, self._paths

    def paths(self, ids: list[str]) -> list[str | None]:
        """The canonical path of each of `ids` (None: no canonical image), as `get` would give
        them. Before the sorted arrays are built (`_ready`), a few ids are looked up by `lookup`
        (the rows' paths alone), else by one pass over the manifest's rows: a night's new pairs
        name a few thousand images, and sorting 10^7 ids and paths for them costs seconds."""
        if not ids:
            return []
        if self._keys is not None or len(ids) > _SCAN_MAX:
            return self.path_array(pa.array(ids, pa.string())).to_pylist()
        looked = self._lookup(ids) if self._lookup is not None and self._table is None else None
        if looked is not None:
            return [looked.get(i) for i in ids]
        if self._table is None:  # kept: the clusters a night touches come next
            self._table = self._load()
        t = self._table
        # a hash set of the few ids asked (10^7 rows: 0.2 s, against 1 s as sorted integers)
        hit = pc.is_in(t.column("image_id"), value_set=pa.array(ids, pa.string()))
        rows = t.filter(pc.fill_null(hit, False))
        found: dict[str, str] = {}
        got = rows.column("image_id").to_pylist(), rows.column("path").to_pylist()
        for i, path in zip(*got, strict=True):
            found.setdefault(i, path)  # the first, as the bisection finds (a stable sort)
        return [found.get(i) for i in ids]

    def _positions(self, ids: pa.Array) -> np.ndarray:
        """The row of each of `ids` in the sorted arrays (the first of an id held twice, as
        `get` finds it), -1 for none: in arrays, by bisection (integers where the ids are
        cbir's, not 16-byte strings)."""
        keys, _ = self._ready()
        if not len(ids):
            return np.zeros(0, np.int64)
        ids = pa.array(ids, pa.string())
        hexed = hex_keys(ids) if self._hexed is not None else None
        if self._hexed is not None and hexed is not None:
            return found_at(self._hexed, hexed)
        return found_at(keys, sorted_keys(ids))

    def path_array(self, ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The canonical path of each of `ids` as an Arrow array (null: no canonical image),
        as `get` gives them one by one: a full clustering at 10^7 names 2x10^6 members, which
        one by one took 24 s."""
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        at = self._positions(ids)
        if not len(at) or not bool((at >= 0).any()):
            return pa.nulls(len(at), pa.string())
        paths = self._ready()[1].take(pa.array(np.maximum(at, 0)))
        return pc.if_else(pa.array(at >= 0), paths, pa.scalar(None, pa.string()))

    def moved(self, ids: pa.Array, paths: pa.Array) -> bool:
        """Whether any image of `ids` is recorded under a path that is not its canonical one
        now (or is no canonical image now): in arrays, by bisection."""
        keys, now = self._ready()
        if not len(ids):
            return False
        if not len(keys):
            return True
        at = self._positions(ids)
        if bool((at < 0).any()):
            return True
        same = pc.equal(now.take(pa.array(at)), pa.array(paths, pa.string()))
        return not pc.all(pc.fill_null(same, False)).as_py()

    def _row(self, key: object) -> int:
        if not isinstance(key, str):
            return -1
        keys, _ = self._ready()
        k = key.encode()
        i = int(np.searchsorted(keys, k))
        return i if i < len(keys) and keys[i] == k else -1

    def __getitem__(self, key: str) -> str:
        i = self._row(key)
        if i < 0:
            raise KeyError(key)
        return str(self._ready()[1][i].as_py())

    def __contains__(self, key: object) -> bool:
        return self._row(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._ready()[0])

    def __len__(self) -> int:
        return len(self._ready()[0])


def why_no_images(settings: Any) -> str | None:
    """Why the manifest holds no present image, in words naming what helps; None when it holds
    one. A step with nothing to work on says this rather than blame the step before it."""
    lay = layout(settings)
    if not os.path.lexists(lay.files) or latest_run(settings) == 0:
        return "nothing is ingested yet: run `cbir ingest`"
    status = load_manifest(settings, ["status"]).column(0)
    if pc.any(pc.is_in(status, pa.array(PRESENT))).as_py():
        return None
    quarantined = pq.read_metadata(lay.quarantine).num_rows if lay.quarantine.is_file() else 0
    if quarantined:
        return (
            f"none of the files in the scans folder {lay.scans} is a usable image: "
            f"{quarantined} quarantined, see why with "
            f'cbir sql "SELECT path, reason FROM quarantine"'
        )
    return f"the scans folder {lay.scans} holds no image files (check data.scans_dir)"


def latest_run(settings: Any) -> int:
    """The id of the last ingest run (0 before the first)."""
    path = layout(settings).runs
    if not path.is_file():
        return 0
    runs = read_table(path, RUNS_SCHEMA, MANIFEST_FIX, columns=["run_id"])  # foreign: one line
    return max(runs.column(0).to_pylist(), default=0)
