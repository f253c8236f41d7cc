"""Ingest: walk the scans folder, hash and decode new files, keep a deduplicated manifest.

A stat walk decides what needs work: a file whose size and mtime are unchanged since the last run
is neither read nor decoded. New or changed files are hashed (SHA-256) and decoded in parallel;
content already in the manifest is recognised by its hash and never decoded twice. Files that
cannot be used go to the quarantine with a reason, and the run goes on.

Crash safety: decode results are journalled in small Parquet parts while the run goes on; the
manifest itself is replaced atomically at the end. A run killed at any point leaves the previous
manifest intact, and the next run reuses the journal instead of decoding again.

The folder walk is the kernel `cbir.walk`; the merge of what a run saw into the manifest (statuses
new, changed, missing, replaced; one canonical row per content) is `_merge` and what follows it.
Cost follows the run's new work, not the collection: the manifest stays an Arrow table, the walk
is joined to it in Arrow (`_triage`), and only the rows of the paths and contents a run touches
become dicts for the merge (`_Touched`); a decoded file that can only be a new image (a new path,
a new content) never does: its row is made in Arrow (`_split_new`, `_new_rows`), so a first run
holds columns, not a dict a file. An unchanged rerun writes only the run log. The
manifest carries a canonical epoch (store.manifest.CANONICAL_EPOCH), drawn afresh when a run
changes which path an image is known by: the pairs step trusts its recorded paths while it holds;
and a rows epoch (ROWS_EPOCH), drawn afresh when a run changes a row rather than appending: the
catalogue keeps its stored report rows while it holds.
Longer than 400 lines: the walk and the per-file probe are kernels (cbir/walk.py, cbir/probe.py);
what remains, the merge into the manifest and its crash journal, is this step's own logic.
"""

from __future__ import annotations

import os
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import faults
from ..arrays import unique_sorted
from ..config import Settings
from ..errors import CbirError
from ..fsutil import APPENDED_ROW_GROUP, clean_stale_tmp, write_parquet
from ..imaging import names_an_image
from ..parallel import worker_map
from ..probe import Entry, display_path, init_worker, probe_batch, sha256_batch
from ..progress import bar as progress_bar
from ..safetext import counted
from ..store.catalog import SEEN_FIRST, clean_stale, refresh_catalog
from ..store.layout import Layout, layout
from ..store.manifest import (
    CANONICAL_EPOCH,
    DUPLICATE,
    FILES_SCHEMA,
    MANIFEST_FIX,
    MISSING,
    OK,
    PRESENT,
    QUARANTINE_SCHEMA,
    REPLACED,
    ROWS_EPOCH,
    RUNS_SCHEMA,
)
from ..store.tables import metadata_value, read_table
from ..walk import walk_scans

# Journal parts hold raw worker results; the manifest rows are derived from them at commit.
JOURNAL_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("path_raw", pa.binary()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("format", pa.string()),
        ("pages", pa.int32()),
        ("phash", pa.uint64()),
        ("reason", pa.string()),
    ]
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def image_id_of(sha256: str) -> str:
    """Stable image id: the first 64 bits of the content's SHA-256, as 16 hex digits."""
    return sha256[:16]


# --------------------------------------------------------------------------- state on disk


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    if not os.path.lexists(path):
        return schema.empty_table()
    return read_table(path, schema, MANIFEST_FIX)


def _rows(table: pa.Table, rows: np.ndarray) -> list[dict[str, Any]]:
    """Some rows of a table as dicts (the few a run changes)."""
    return table.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []


def _journal_parts(jdir: Path) -> list[Path]:
    return sorted(jdir.glob("part-*.parquet")) if jdir.is_dir() else []


def _read_journal(jdir: Path) -> pa.Table:
    """What killed runs decoded (JOURNAL_SCHEMA), the last result of each path, as columns: a
    first run killed late holds a row a file here (10^7 of them as dicts: about 13 GiB)."""
    parts = []
    for part in _journal_parts(jdir):
        try:
            parts.append(pq.read_table(part, schema=JOURNAL_SCHEMA))
        except (OSError, pa.ArrowException):
            continue  # a part is written atomically, so this is damage: just decode again
    if not parts:
        return JOURNAL_SCHEMA.empty_table()
    table = pa.concat_tables(parts)  # parts in the order written
    raw = table.column("path_raw").combine_chunks()
    codes = pc.index_in(raw, value_set=pc.unique(raw)).to_numpy(zero_copy_only=False)
    _, first_from_end = np.unique(codes[::-1], return_index=True)
    last = np.sort(len(codes) - 1 - first_from_end)
    return table.take(pa.array(last, pa.int64()))


class _Journal:
    """Buffers worker results and writes them out in atomic parts; what it wrote stays as
    columns, the run's results (`table`): each result becomes Arrow once."""

    def __init__(self, jdir: Path, every: int) -> None:
        self.dir = jdir
        self.every = every
        self.buffer: list[dict[str, Any]] = []
        self.written: list[pa.Table] = []

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        # from_pylist takes the schema's keys: a missing one is null
        part = pa.Table.from_pylist(self.buffer, schema=JOURNAL_SCHEMA)
        write_parquet(part, self.dir / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
        self.written.append(part)
        self.buffer = []

    def table(self) -> pa.Table:
        """Every result added, as columns (those still in the buffer too, unwritten)."""
        rest = [pa.Table.from_pylist(self.buffer, schema=JOURNAL_SCHEMA)] if self.buffer else []
        return pa.concat_tables([JOURNAL_SCHEMA.empty_table(), *self.written, *rest])

    def clear(self) -> None:
        for p in _journal_parts(self.dir):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run


@dataclass
class IngestSummary:
    run_id: int
    scans_dir: Path
    counts: dict[str, int] = field(default_factory=dict)  # this run: new, changed, ...
    totals: dict[str, int] = field(default_factory=dict)  # manifest: rows by status
    decoded: int = 0
    newly_quarantined: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    manifest: Path | None = None
    catalog: Path | None = None

    def _ignore_hint(self) -> list[str]:
        """A line naming the ingest.ignore patterns that would skip the quarantined files no
        decoder recognises, by suffix (archives keep METS/ALTO XML, OCR text and PDFs beside
        their scans: a trial's 23 XML sidecars were quarantined as "not an image" each)."""
        by_suffix: dict[str, int] = {}
        for path, reason in self.newly_quarantined:
            suffix = os.path.splitext(path)[1]
            if (
                reason.startswith("not an image")
                and suffix.isprintable()
                and suffix not in ("", ".")
                and not names_an_image(suffix)  # a damaged scan: never advised away
            ):
                by_suffix[suffix] = by_suffix.get(suffix, 0) + 1
        if not by_suffix:
            return []
        common = sorted(by_suffix, key=lambda x: (-by_suffix[x], x))[:5]
        files = ", ".join(f"{by_suffix[x]} *{x}" for x in common)
        patterns = ", ".join(repr(f"*{x}") for x in common)
        return [
            f"  of them not images: {files}; to leave such files out, add {patterns} to "
            f"ingest.ignore in params.yaml"
        ]

    def lines(self) -> list[str]:
        c, t = self.counts, self.totals
        flagged = []
        if self.newly_quarantined:  # a file that would otherwise pass unnoticed in "0 new"
            path, reason = self.newly_quarantined[0]
            flagged = [
                f"  {len(self.newly_quarantined)} quarantined in this run, e.g. {path}: "
                f'{reason}; all: cbir sql "SELECT path, reason FROM quarantine WHERE '
                f'first_run = {self.run_id}"'
            ]
            flagged += self._ignore_hint()
        # a reorganised folder is not new work: its pictures keep their runs and embeddings
        moved = f" ({c['moved']} of them moved from a path now missing)" if c.get("moved") else ""
        return [
            f"ingest run {self.run_id}: {c.get('files_seen', 0)} files seen in {self.scans_dir}",
            f"  this run: {c.get('new', 0)} new{moved}, {c.get('changed', 0)} changed, "
            f"{c.get('unchanged', 0)} unchanged, "
            f"{counted(c.get('new_duplicates', 0), 'new exact duplicate')}, "
            f"{c.get('newly_missing', 0)} newly missing, {self.decoded} decoded "
            f"in {self.seconds:.1f} s",
            "  manifest: "
            + ", ".join(f"{t.get(s, 0)} {s}" for s in (OK, DUPLICATE, MISSING, REPLACED))
            + f"; {c.get('quarantined', 0)} quarantined",
            *flagged,
            f"  manifest {self.manifest}; catalogue {self.catalog}",
        ]


def _check_scans_dir(root: Path) -> None:
    if not root.exists():
        raise CbirError(f"scans folder not found: {root} (data.scans_dir in params)")
    if not root.is_dir():
        raise CbirError(f"scans folder is not a folder: {root} (data.scans_dir in params)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise CbirError(f"scans folder cannot be read: {root} (permission denied)")
    try:
        with os.scandir(root):
            pass
    except OSError as exc:
        raise CbirError(f"scans folder cannot be read: {root} ({exc.strerror})") from None


def _next_run_id(
    files: pa.Table, quarantine: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> int:
    seen = [r["run_id"] for r in runs] + [r["last_run"] for r in quarantine]
    last = pc.max(files.column("last_run")).as_py()
    return max(seen + ([last] if last is not None else []), default=0) + 1


#: A worker's job is a batch of files, up to this many files or bytes (whichever comes first):
#: one round trip to the pool per batch, and still small enough that a killed run loses little
#: and the workers finish together.
BATCH_FILES = 64
BATCH_BYTES = 64 << 20


def _batches(sizes: list[int], workers: int) -> list[slice]:
    """Consecutive runs of items (by their sizes in bytes) for the workers' jobs: at most
    BATCH_FILES or BATCH_BYTES, and at most a quarter of a worker's share, so that every
    worker gets work and none is left with a long last batch."""
    most = max(1, min(BATCH_FILES, len(sizes) // (4 * max(1, workers))))
    out: list[slice] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= most or total + size > BATCH_BYTES):
            out.append(slice(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(slice(start, len(sizes)))
    return out


def _workers(settings: Settings, n: int) -> int:
    return min(settings.decode_workers, max(1, n // 4))


def _decode_all(
    root: Path,
    seen: _Seen,
    todo: np.ndarray,
    known: frozenset[str],
    settings: Settings,
    journal: _Journal,
    progress: bool,
    on_result: Callable[[dict[str, Any]], None] | None,
) -> pa.Table:
    """Hash and decode the files at walk positions `todo` in the worker pool; their results
    (JOURNAL_SCHEMA), as the journal holds them."""
    if not len(todo):
        return JOURNAL_SCHEMA.empty_table()
    root_b = os.fsencode(root)
    bar = progress_bar(len(todo), "ingest", "file", progress)
    workers = _workers(settings, len(todo))
    # a batch's entries are made as the pool takes it (a generator): none held for the collection
    jobs = ((root_b, seen.entries(todo[b])) for b in _batches(seen.size[todo].tolist(), workers))
    try:
        with worker_map(
            probe_batch,
            jobs,
            workers,
            preload=["cbir.probe"],
            initializer=init_worker,
            initargs=(known, settings.ingest.max_pixels),
            chunksize=1,
        ) as stream:
            for rows in stream:
                for row in rows:
                    journal.add(row)
                    faults.point("ingest.result")
                    if on_result is not None:
                        on_result(row)
                bar.update(len(rows))
    except BaseException:
        journal.flush()  # keep what was decoded before the interruption
        raise
    finally:
        bar.close()
    return journal.table()


def _split_decoded(
    results: pa.Table, twins: frozenset[str]
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The results (JOURNAL_SCHEMA) that can only be new images, as columns: decoded, and no
    twin of a byte-identical copy left out of decoding (`twins`: their contents; the copy's row
    is made from its twin's dict). The others (failures, known contents, twins) as dicts, for
    the merge. A first run of 10^6 files held 1.3 KB of dict a file."""
    twin = pc.is_in(results.column("sha256"), value_set=pa.array(list(twins), pa.string()))
    cand = _mask(pc.and_(pc.is_valid(results.column("width")), pc.invert(twin)))
    if cand.all():
        return results, []
    return results.filter(pa.array(cand)), results.filter(pa.array(~cand)).to_pylist()


def _split_new(
    cands: pa.Table, files: pa.Table, results: list[dict[str, Any]]
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Of the candidates (_split_decoded), the plain new images: a path with no current
    manifest row, and a content that no manifest row (of any status) and no other file of the
    run has. Each is a row of its own, canonical, touching no other (as the merge would make
    it); their rows are made in Arrow (_new_rows). The other candidates go back to the merge
    as dicts."""
    if not cands.num_rows:
        return cands, []
    ids = pc.utf8_slice_codeunits(cands.column("sha256"), 0, 16)  # image_id_of
    counts = pc.value_counts(ids)
    clash = [  # contents that another file of the run has too
        pa.array([image_id_of(r["sha256"]) for r in results if r.get("sha256")], pa.string()),
        counts.field("values").filter(pc.greater(counts.field("counts"), 1)),
    ]
    taken = pa.array([], pa.binary())  # the candidates' paths that have a current row
    if len(files):  # scan the manifest against the candidates: a hash of the night's files
        in_files = pc.is_in(files.column("image_id"), value_set=ids.combine_chunks())
        clash += files.column("image_id").filter(in_files).chunks
        current = pc.fill_null(pc.not_equal(files.column("status"), REPLACED), True)
        paths = cands.column("path_raw").combine_chunks()
        at = pc.and_(current, pc.is_in(files.column("path_raw"), value_set=paths))
        taken = files.column("path_raw").filter(at).combine_chunks()
    bad = _mask(pc.is_in(ids, value_set=pa.concat_arrays(clash))) | _mask(
        pc.is_in(cands.column("path_raw"), value_set=taken)
    )
    back = cands.filter(pa.array(bad)).to_pylist() if bad.any() else []
    return (cands.filter(pa.array(~bad)) if bad.any() else cands), back


def _new_rows(plain: pa.Table, run_id: int) -> pa.Table:
    """The manifest rows of plain new images (_split_new), as `_new_version` makes them."""
    n = plain.num_rows
    mtime_ns = _int64(plain, "mtime_ns")
    columns = {
        "image_id": pc.utf8_slice_codeunits(plain.column("sha256"), 0, 16),
        "path": plain.column("path"),
        "path_raw": plain.column("path_raw"),
        "version": pa.array(np.ones(n, np.int32)),
        "status": pa.repeat(pa.scalar(OK), n),
        "is_canonical": pa.repeat(pa.scalar(True), n),
        "duplicate_of": pa.nulls(n, pa.string()),
        "sha256": plain.column("sha256"),
        "bytes": plain.column("bytes"),
        "mtime": pa.array(mtime_ns // 1000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "mtime_ns": plain.column("mtime_ns"),
        **{c: plain.column(c) for c in ("width", "height", "mode", "format", "pages", "phash")},
        "first_run": pa.array(np.full(n, run_id, np.int32)),
        "last_run": pa.array(np.full(n, run_id, np.int32)),
    }
    return pa.table({name: columns[name] for name in FILES_SCHEMA.names}).cast(FILES_SCHEMA)


def _hash_all(
    root: Path, seen: _Seen, rows: np.ndarray, settings: Settings, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """SHA-256 digests of the files at walk positions `rows` (uint8 [n, 32]: not a string a
    file) and whether each file could be read, in the worker pool."""
    digests = np.zeros((len(rows), 32), np.uint8)
    readable = np.zeros(len(rows), bool)
    if not len(rows):
        return digests, readable
    root_b = os.fsencode(root)
    workers = _workers(settings, len(rows))
    batches = _batches(seen.size[rows].tolist(), workers)
    jobs = ((root_b, seen.raw.take(pa.array(rows[b], pa.int64())).to_pylist()) for b in batches)
    # a scanner's uncompressed TIFFs all have one size: all are read here first, so say so
    bar = progress_bar(len(rows), "ingest: hashing files of equal size", "file", progress)
    try:
        with worker_map(
            sha256_batch, jobs, workers, preload=["cbir.probe"], ordered=True, chunksize=1
        ) as stream:
            for b, shas in zip(batches, stream, strict=True):
                for i, sha in enumerate(shas, start=b.start):
                    if sha is not None:
                        digests[i] = np.frombuffer(bytes.fromhex(sha), np.uint8)
                        readable[i] = True
                bar.update(len(shas))
    finally:
        bar.close()
    return digests, readable


def _split_same_content(
    root: Path,
    seen: _Seen,
    todo: np.ndarray,
    settings: Settings,
    progress: bool = False,
) -> tuple[np.ndarray, list[tuple[Entry, str]]]:
    """Keep one file per content among new files of equal size (only those can be identical).

    Returns the walk positions of the files to decode, in walk order, and (copy, sha256) for the
    byte-identical copies left out (the first in walk order is kept). The files of shared sizes
    are hashed in the worker pool (in small archive files most sizes are shared, and a
    scanner's uncompressed TIFFs all have one size).
    """
    sizes = seen.size[todo]
    _, inverse, counts = np.unique(sizes, return_inverse=True, return_counts=True)
    shared = todo[(counts[inverse] > 1) & (sizes > 0)]
    digests, ok = _hash_all(root, seen, shared, settings, progress)
    readable = np.flatnonzero(ok)
    whole = np.ascontiguousarray(digests[readable]).view("V32").ravel()  # one value a digest
    _, first = np.unique(whole, return_index=True)  # identical bytes: one size, so one group
    is_copy = np.ones(len(readable), bool)
    is_copy[first] = False
    copies = readable[is_copy]  # positions in `shared`
    keep = todo[~np.isin(todo, shared[copies])]
    out = [(seen.entry(int(shared[i])), digests[i].tobytes().hex()) for i in copies]
    return keep, out


def _resolve_copies(
    copies: list[tuple[Entry, str]],
    results: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Results for the copies left out of decoding: the decoded twin's, with their own path."""
    if not copies:
        return []
    decoded = {r["sha256"]: r for r in results if r.get("sha256") and not r.get("reason")}
    out = []
    for e, sha in copies:
        twin = decoded.get(sha)
        row = {
            **(twin or {}),
            "path": e.path,
            "path_raw": e.raw,
            "bytes": e.size,
            "mtime_ns": e.mtime_ns,
            "sha256": sha,
        }
        if twin is None:  # its twin failed to decode: so does this copy, for the same reason
            twin_reason = next(
                (r["reason"] for r in results if r.get("sha256") == sha and r.get("reason")),
                "damaged image",
            )
            row["reason"] = twin_reason
        else:
            row = {
                k: v
                for k, v in row.items()
                if k not in ("width", "height", "mode", "format", "pages", "phash")
            }
        out.append(row)
    return out


def run_ingest(
    settings: Settings,
    *,
    progress: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    accept_missing: bool = False,
) -> IngestSummary:
    """One ingest run over data.scans_dir. Returns a summary; raises CbirError on setup problems.

    A run that finds many of the images ingested before gone (`_refuse_mass_missing`: a drive
    or share not mounted looks like that) changes nothing unless `accept_missing`.
    `on_result` is called in the parent for every decoded file (tests use it to interrupt a run).
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    lay = layout(settings)
    root = lay.scans
    _check_scans_dir(root)
    lay.manifest_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(lay.manifest_dir)
    clean_stale_tmp(lay.journal)
    clean_stale(settings)

    state = _load_state(lay)
    run_id = state.run_id
    quarantined = {r["path_raw"]: r for r in state.quarantine}
    journalled = _read_journal(lay.journal)

    seen = _Seen.of(walk_scans(root, settings.ingest.ignore))
    counts: Counter[str] = Counter(files_seen=len(seen))
    work = _triage(seen, state.files, quarantined, journalled)
    journal = _Journal(lay.journal, settings.ingest.journal_every)
    todo, copies = _split_same_content(root, seen, work.todo, settings, progress)
    known_sha = _known_sha(state.files, seen.size[todo])
    twins = frozenset(sha for _, sha in copies)
    fresh = _decode_all(root, seen, todo, known_sha, settings, journal, progress, on_result)
    decoded = fresh.num_rows - fresh.column("width").null_count  # in this run
    cands, results = _split_decoded(pa.concat_tables([fresh, work.journalled]), twins)
    plain, back = _split_new(cands, state.files, results)
    results += back
    results += _resolve_copies(copies, results)

    manifest = _Touched.of(state.files, seen, work, results, run_id, _new_rows(plain, run_id))
    files = manifest.rows  # the rows this run can change, as dicts; the rest stay in Arrow
    before = _state_key(files, state.quarantine)
    known_as = _canonical_paths(files)
    counts["unchanged"] = len(work.unchanged)
    if len(plain):
        counts["new"] = len(plain)
    new_rows = _merge(files, manifest.unchanged, work, results, run_id, counts)
    absent = _mark_absent(files, manifest.seen_paths(results), work.problems, counts)
    gone = {r["sha256"] for r in absent}
    # a known picture at a new path, gone from its old one: moved (a folder reorganised)
    counts["moved"] = sum(1 for r in new_rows if r["version"] == 1 and r["sha256"] in gone)
    counts["new_duplicates"] = _assign_canonical(files, new_rows)
    if not accept_missing:
        _refuse_mass_missing(absent, files, state.files, root)
    now_as = _canonical_paths(files)
    epoch = (
        state.epoch
        if state.epoch and all(now_as.get(i) == p for i, p in known_as.items())
        else uuid.uuid4().hex  # an image is known by another path now, or by none
    )
    rows_epoch = (
        state.rows_epoch
        if state.rows_epoch and _only_appended(files, before[0])
        else uuid.uuid4().hex  # a row changed: what was computed from the rows is stale
    )
    for row in files:  # whole microseconds, as _new_rows makes them
        row["mtime"] = _EPOCH + timedelta(microseconds=row["mtime_ns"] // 1000)
    new_quarantine = _quarantine_rows(work.problems, quarantined, run_id)
    counts["quarantined"] = len(new_quarantine)

    seconds = time.perf_counter() - t0
    runs = state.runs
    runs.append(
        {
            "run_id": run_id,
            "started_at": started,
            "finished_at": datetime.now(UTC),
            "scans_dir": str(root),
            "decoded": decoded,
            "seconds": round(seconds, 3),
            **{
                k: counts.get(k, 0)
                for k in (
                    "files_seen",
                    "new",
                    "changed",
                    "unchanged",
                    "new_duplicates",
                    "newly_missing",
                    "quarantined",
                )
            },
        }
    )
    # a manifest written before epochs gets them (written once, then carried over)
    changed = (
        len(plain) > 0
        or _state_key(files, new_quarantine) != before
        or not (state.epoch and state.rows_epoch)
    )
    meta = {CANONICAL_EPOCH: epoch, ROWS_EPOCH: rows_epoch}
    _commit(
        lay,
        lambda: manifest.table().replace_schema_metadata(meta),
        new_quarantine,
        runs,
        changed=changed,
    )
    journal.clear()
    # the stored reports are left to the pairs step (a nightly run would compute them twice)
    catalog = refresh_catalog(settings, stored=False)

    return IngestSummary(
        run_id=run_id,
        scans_dir=root,
        counts=dict(counts),
        totals=manifest.totals(),
        decoded=decoded,
        newly_quarantined=[
            (q["path"], q["reason"]) for q in new_quarantine if q["first_run"] == run_id
        ],
        seconds=time.perf_counter() - t0,
        manifest=lay.files,
        catalog=catalog,
    )


@dataclass
class _State:
    """The manifest as the last run left it."""

    files: pa.Table  # FILES_SCHEMA, present rows' last_run brought up to the last run
    quarantine: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    run_id: int  # this run's
    epoch: str | None  # the manifest's canonical epoch (CANONICAL_EPOCH)
    rows_epoch: str | None  # and its rows epoch (ROWS_EPOCH)


def _load_state(lay: Layout) -> _State:
    files = _read(lay.files, FILES_SCHEMA)
    epoch = metadata_value(lay.files, CANONICAL_EPOCH) if len(files) else None
    rows_epoch = metadata_value(lay.files, ROWS_EPOCH) if len(files) else None
    quarantine = _read(lay.quarantine, QUARANTINE_SCHEMA).to_pylist()
    runs = _read(lay.runs, RUNS_SCHEMA).to_pylist()
    run_id = _next_run_id(files, quarantine, runs)
    last_logged = max((r["run_id"] for r in runs), default=0)
    last_run = _last_run(files)
    present = _present(files)  # seen by every run since the last rewrite (see catalog)
    last_run[present] = np.maximum(last_run[present], last_logged)
    return _State(_with_last_run(files, last_run), quarantine, runs, run_id, epoch, rows_epoch)


def _last_run(files: pa.Table) -> np.ndarray:
    return np.asarray(files.column("last_run").to_numpy(zero_copy_only=False), np.int32).copy()


def _with_last_run(files: pa.Table, last_run: np.ndarray) -> pa.Table:
    i = files.schema.get_field_index("last_run")
    return files.set_column(i, "last_run", pa.array(last_run, pa.int32()))


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as a numpy mask (a missing value is false)."""
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def _present(files: pa.Table) -> np.ndarray:
    """Whether each manifest row is present (ok or duplicate)."""
    return _mask(pc.is_in(files.column("status"), value_set=pa.array(PRESENT)))


@dataclass
class _Seen:
    """The files the walk found, as columns (for joins with the manifest)."""

    raw: pa.Array  # binary: path relative to the scans root
    size: np.ndarray
    mtime_ns: np.ndarray
    usable: np.ndarray  # no problem known from the walk
    problems: dict[int, str]  # the walk's problem of a file, by its position

    #: entries taken into columns at a time: a walk of 10^7 files holds no Python object per file
    CHUNK = 65_536

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> _Seen:
        raws: list[pa.Array] = []
        numbers = array("q")  # size, mtime_ns of each file, interleaved
        problems: dict[int, str] = {}
        batch: list[bytes] = []
        for e in entries:
            if e.problem is not None:
                problems[len(numbers) // 2] = e.problem
            numbers.extend((e.size, e.mtime_ns))
            batch.append(e.raw)
            if len(batch) == cls.CHUNK:
                raws.append(pa.array(batch, pa.binary()))
                batch = []
        raws.append(pa.array(batch, pa.binary()))
        pairs = np.frombuffer(numbers, np.int64).reshape(-1, 2)
        usable = np.ones(len(pairs), bool)
        usable[list(problems)] = False
        raw = pa.concat_arrays(raws)
        return cls(raw, pairs[:, 0].copy(), pairs[:, 1].copy(), usable, problems)

    def __len__(self) -> int:
        return len(self.size)

    def entries(self, rows: np.ndarray) -> list[Entry]:
        """The entries at walk positions `rows` (a batch's: made when it is sent)."""
        raws = self.raw.take(pa.array(rows, pa.int64())).to_pylist()
        sizes, mtimes = self.size[rows].tolist(), self.mtime_ns[rows].tolist()
        return [
            Entry(raw, size, mtime, self.problems.get(i))
            for raw, size, mtime, i in zip(raws, sizes, mtimes, rows.tolist(), strict=True)
        ]

    def entry(self, i: int) -> Entry:
        return self.entries(np.array([i], np.int64))[0]


@dataclass
class _Work:
    """What the stat walk decided for each file (by path_raw where keyed)."""

    unchanged: np.ndarray  # manifest rows of files with the same size and mtime: not read
    problems: dict[bytes, tuple[Entry, str]] = field(default_factory=dict)  # -> quarantine
    todo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # walk positions
    # of the files to hash and decode (a first run of 10^6 files held 240 B of Entry a file)
    journalled: pa.Table = field(default_factory=JOURNAL_SCHEMA.empty_table)  # decoded before


def _current_rows(files: pa.Table, seen: _Seen) -> np.ndarray:
    """For each file seen, its path's current (not replaced) manifest row, or -1: a hash join
    in Arrow, not a dict of every row (the last such row wins, as a dict's would)."""
    not_replaced = pc.fill_null(pc.not_equal(files.column("status"), REPLACED), True)
    current = np.flatnonzero(_mask(not_replaced))[::-1]
    paths = files.column("path_raw").take(pa.array(current, pa.int64())).combine_chunks()
    where = pc.index_in(seen.raw, value_set=paths)  # the first of the reversed: the last
    pos = pc.fill_null(where, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(pos >= 0, current[np.maximum(pos, 0)] if len(current) else -1, -1)


def _triage(
    seen: _Seen,
    files: pa.Table,
    quarantined: dict[bytes, dict[str, Any]],
    journal: pa.Table,
) -> _Work:
    prev = _current_rows(files, seen)
    has = prev >= 0
    at = np.where(has, prev, 0)
    size = _int64(files, "bytes")
    mtime = _int64(files, "mtime_ns")
    same = seen.usable & has
    if len(files):
        same &= (size[at] == seen.size) & (mtime[at] == seen.mtime_ns)
    work = _Work(unchanged=prev[same])
    rest = np.flatnonzero(~same)  # new, changed or unusable: to decode, unless ...
    look = ~seen.usable[rest]  # ... the walk found a problem, or it failed before
    # (the paths of the files, taken only where there is something to look them up in)
    raws = seen.raw.take(pa.array(rest, pa.int64())) if quarantined or journal.num_rows else None
    if quarantined and len(rest):
        look |= _mask(pc.is_in(raws, value_set=pa.array(list(quarantined), pa.binary())))
    # ... or a killed run decoded these very bytes (the journal: its row of the path)
    at = np.full(len(rest), -1, np.int64)
    if journal.num_rows and len(rest):
        paths = journal.column("path_raw").combine_chunks()
        found = pc.fill_null(pc.index_in(raws, value_set=paths), -1)
        at = np.asarray(found.to_numpy(zero_copy_only=False), np.int64)
        hit = at >= 0
        where = np.maximum(at, 0)
        hit &= _int64(journal, "bytes")[where] == seen.size[rest]
        hit &= _int64(journal, "mtime_ns")[where] == seen.mtime_ns[rest]
        at[~hit] = -1
    problem = np.zeros(len(rest), bool)
    for j in np.flatnonzero(look):  # few
        e = seen.entry(int(rest[j]))
        q = quarantined.get(e.raw)
        if e.problem is not None:
            work.problems[e.raw] = (e, e.problem)
        elif q is not None and (q["bytes"], q["mtime_ns"]) == (e.size, e.mtime_ns):
            work.problems[e.raw] = (e, q["reason"])  # same bytes as when it failed: don't retry
        else:
            continue  # changed since it failed: decoded before (journal) or again
        problem[j] = True
    work.journalled = journal.take(pa.array(np.sort(at[(at >= 0) & ~problem]), pa.int64()))
    work.todo = rest[(at < 0) & ~problem]
    return work


def _int64(files: pa.Table, name: str) -> np.ndarray:
    """A manifest column as int64 (a missing value never equals a file's size or mtime)."""
    col = pc.fill_null(files.column(name), -1)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)


def _known_sha(files: pa.Table, sizes_todo: np.ndarray) -> frozenset[str]:
    """The contents already in the manifest that a file to decode could have: present ones of
    the same size (identical bytes have the same size), so the set follows the night's files."""
    if not len(sizes_todo) or not len(files):
        return frozenset()
    sizes = pa.array(unique_sorted(sizes_todo), pa.int64())
    mask = pc.and_(pa.array(_present(files)), pc.is_in(files.column("bytes"), value_set=sizes))
    return frozenset(files.column("sha256").filter(mask).to_pylist())


# --------------------------------------------------------------------------- the merge


@dataclass
class _Touched:
    """The manifest split for the merge: the rows this run can change, as dicts (`rows`: every
    version of every content that a changed path, a decoded file or a vanished file has), and
    the rest, left in Arrow. A row of the rest is unchanged but for its last_run, and so is its
    content's canonical choice (no row of its content changed), so an unchanged rerun or a
    night's few new files cost dicts for the few rows they touch, not for the collection."""

    files: pa.Table
    picked: np.ndarray  # manifest row numbers of `rows`, ascending
    rows: list[dict[str, Any]]  # grows by the new rows (the merge appends them)
    unchanged: list[dict[str, Any]]  # the rows among `rows` of files seen unchanged
    seen_raw: np.ndarray  # whether each of the picked rows' paths was seen by the walk
    new: pa.Table  # the rows of plain new images (_new_rows): they touch no other row

    @classmethod
    def of(
        cls,
        files: pa.Table,
        seen: _Seen,
        work: _Work,
        results: list[dict[str, Any]],
        run_id: int,
        new: pa.Table,
    ) -> _Touched:
        n = len(files)
        last_run = _last_run(files)
        last_run[work.unchanged] = run_id  # seen again, unchanged
        files = _with_last_run(files, last_run)
        was_seen = _mask(pc.is_in(files.column("path_raw"), value_set=seen.raw))
        paths = pa.array(list({r["path_raw"] for r in results} | set(work.problems)), pa.binary())
        dirty = _mask(pc.is_in(files.column("path_raw"), value_set=paths))  # results, problems
        dirty |= _present(files) & ~was_seen  # to become missing
        unchanged = np.zeros(n, bool)
        unchanged[work.unchanged] = True
        dirty |= unchanged & _mask(pc.equal(files.column("status"), MISSING))  # back again
        ids = set(files.column("image_id").filter(pa.array(dirty)).to_pylist())
        ids |= {image_id_of(r["sha256"]) for r in results if r.get("sha256")}
        picked = np.flatnonzero(
            _mask(pc.is_in(files.column("image_id"), value_set=pa.array(list(ids), pa.string())))
        )
        rows = _rows(files, picked)
        touched = [r for r, i in zip(rows, picked, strict=True) if unchanged[i]]
        return cls(files, picked, rows, touched, was_seen[picked], new)

    def seen_paths(self, results: list[dict[str, Any]]) -> set[bytes]:
        """The paths of `rows` that the walk found (every result's path is one)."""
        old = self.rows[: len(self.picked)]
        return {r["path_raw"] for r, s in zip(old, self.seen_raw, strict=True) if s} | {
            r["path_raw"] for r in results
        }

    def _rest(self) -> np.ndarray:
        keep = np.ones(len(self.files), bool)
        keep[self.picked] = False
        return keep

    def table(self) -> pa.Table:
        """The whole manifest after the merge, in its order (new rows last, the plain new
        images' after the merge's)."""
        return pa.concat_tables([self._merged(), self.new])

    def _merged(self) -> pa.Table:
        keep = self._rest()
        rest = self.files.filter(pa.array(keep)).cast(FILES_SCHEMA)
        if not self.rows:
            return rest
        touched = pa.Table.from_pylist(self.rows, schema=FILES_SCHEMA)
        n, added = len(self.files), len(self.rows) - len(self.picked)
        where = np.concatenate(
            [np.flatnonzero(keep), self.picked, np.arange(n, n + added, dtype=np.int64)]
        )
        combined = pa.concat_tables([rest, touched])
        if not len(self.picked):  # only new rows: they go last, as they are
            return combined
        return combined.take(pa.array(np.argsort(where, kind="stable"), pa.int64()))

    def totals(self) -> dict[str, int]:
        """Manifest rows by status after the merge."""
        rest = self.files.column("status").filter(pa.array(self._rest()))
        totals: Counter[str] = Counter(r["status"] for r in self.rows)
        if self.new.num_rows:
            totals[OK] += self.new.num_rows
        for item in pc.value_counts(rest).to_pylist():
            totals[item["values"]] += item["counts"]
        return dict(totals)


def _merge(
    files: list[dict[str, Any]],
    unchanged: list[dict[str, Any]],
    work: _Work,
    results: list[dict[str, Any]],
    run_id: int,
    counts: Counter[str],
) -> list[dict[str, Any]]:
    """Update the manifest rows for what this run saw: unchanged files are touched, decoded ones
    are new, changed (the old version becomes replaced) or touched; failures go to
    `work.problems`. `files` holds every row of each path and content involved (_Touched).
    Returns the new rows (already appended to `files`)."""
    current = {r["path_raw"]: r for r in files if r["status"] != REPLACED}
    by_sha = {r["sha256"]: r for r in files if r.get("width") is not None}
    new_rows: list[dict[str, Any]] = []
    for row in unchanged:
        if row["status"] == MISSING:
            row["status"] = OK  # back again; canonical status is recomputed below
        row["last_run"] = run_id
    for r in results:
        raw = r["path_raw"]
        if r.get("reason"):
            work.problems[raw] = (Entry(raw, r["bytes"] or 0, r["mtime_ns"] or 0), r["reason"])
            prev = current.get(raw)
            if prev is not None and prev["status"] != MISSING:
                prev["status"] = REPLACED  # the good file at this path was overwritten by a bad one
            continue
        props = r if r.get("width") is not None else by_sha.get(r["sha256"])
        if props is None:  # known content vanished from the manifest meanwhile: treat as damage
            work.problems[raw] = (
                Entry(raw, r["bytes"], r["mtime_ns"]),
                "content could not be matched",
            )
            continue
        prev = current.get(raw)
        if prev is not None and prev["sha256"] == r["sha256"]:
            prev.update(bytes=r["bytes"], mtime_ns=r["mtime_ns"], last_run=run_id)
            if prev["status"] == MISSING:
                prev["status"] = OK
            counts["unchanged"] += 1  # touched, same content
            continue
        row = _new_version(r, props, prev, run_id, counts)
        new_rows.append(row)
        by_sha.setdefault(r["sha256"], row)
        current[raw] = row
    files.extend(new_rows)
    return new_rows


def _new_version(
    r: dict[str, Any],
    props: dict[str, Any],
    prev: dict[str, Any] | None,
    run_id: int,
    counts: Counter[str],
) -> dict[str, Any]:
    """The manifest row of a new file, or of a path's new content (its old row is replaced)."""
    version = 1
    if prev is not None:
        prev["status"] = REPLACED
        version = prev["version"] + 1
        counts["changed"] += 1
    else:
        counts["new"] += 1
    row = {
        "image_id": image_id_of(r["sha256"]),
        "path": r["path"],
        "path_raw": r["path_raw"],
        "version": version,
        "status": OK,
        "is_canonical": False,
        "duplicate_of": None,
        "sha256": r["sha256"],
        "bytes": r["bytes"],
        "mtime_ns": r["mtime_ns"],
        "width": props["width"],
        "height": props["height"],
        "mode": props["mode"],
        "format": props["format"],
        "pages": props["pages"],
        "phash": props["phash"],
        "first_run": run_id,
        "last_run": run_id,
    }
    if props is r:  # a file decoded in this run: its result becomes its row (10^6 new files
        r.update(row)  # held a result and a row each, 1.5 KB a file)
        return r
    return row


def _mark_absent(
    files: list[dict[str, Any]],
    seen_raw: set[bytes],
    problems: dict[bytes, tuple[Entry, str]],
    counts: Counter[str],
) -> list[dict[str, Any]]:
    """Present rows whose file was not seen become missing; those now unusable, replaced.
    Returns the rows that became missing."""
    gone = []
    for row in files:
        if row["status"] in PRESENT and row["path_raw"] not in seen_raw:
            row["status"] = MISSING
            counts["newly_missing"] += 1
            gone.append(row)
        elif row["status"] in PRESENT and row["path_raw"] in problems:
            row["status"] = REPLACED
    return gone


#: A run refuses when the images whose every file has gone number at least this many and at
#: least half of those present before (or all of them): that is what an unmounted drive or
#: share looks like (an empty mount point, a missing subfolder), not a night's weeding.
VANISHED_MIN = 10


def _present_images(files: pa.Table) -> int:
    """Images (contents) present in a manifest: one `ok` row each."""
    return int(pc.sum(pc.equal(files.column("status"), OK)).as_py() or 0)


def _refuse_mass_missing(
    absent: list[dict[str, Any]], files: list[dict[str, Any]], manifest: pa.Table, root: Path
) -> None:
    """Raise, changing nothing, where this run would find most images gone (VANISHED_MIN).
    An image is gone when no file of its content is present any more: a moved or renamed
    folder, or one copy of two deleted, loses nothing. `files` holds every row of the
    contents of `absent` (see _Touched), already merged with this run's files; `manifest` is
    the manifest before the run, counted only when an image is gone (a night reads no column
    of every image for this)."""
    here = {r["sha256"] for r in files if r["status"] in PRESENT}
    lost = {r["sha256"] for r in absent} - here
    n = len(lost)
    if not n:
        return
    before = _present_images(manifest)
    if n < before and (n < VANISHED_MIN or 2 * n < before):
        return
    folders: Counter[str] = Counter()
    for r in absent:
        if r["sha256"] in lost:
            head, sep, _ = r["path"].partition("/")
            folders[f"{head}/" if sep else "its top level"] += 1
    named = ", ".join(f"{counted(c, 'file')} under {f}" for f, c in folders.most_common(3))
    more = f" and {len(folders) - 3} more folders" if len(folders) > 3 else ""
    raise CbirError(
        f"{n} of the {before} images ingested before are gone from the scans folder {root} "
        f"({named}{more}): is a drive or network share not mounted? Nothing was changed; "
        f"if they were removed on purpose, run again with --accept-missing to record them as "
        f"missing"
    )


def _quarantine_rows(
    problems: dict[bytes, tuple[Entry, str]],
    quarantined: dict[bytes, dict[str, Any]],
    run_id: int,
) -> list[dict[str, Any]]:
    out = []
    for raw, (e, reason) in sorted(problems.items()):
        old = quarantined.get(raw)
        out.append(
            {
                "path": display_path(raw),
                "path_raw": raw,
                "reason": reason,
                "bytes": e.size,
                "mtime_ns": e.mtime_ns,
                "first_run": old["first_run"] if old else run_id,
                "last_run": run_id,
            }
        )
    return out


def _commit(
    lay: Layout,
    files: Callable[[], pa.Table],
    quarantine: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    *,
    changed: bool,
) -> None:
    """Each file is replaced atomically; the run log goes last. When nothing but the run itself
    changed, only the run log is written (the catalogue derives last_run then; the manifest
    table is not even assembled); a file missing because a run was killed between the two (or
    never wrote them) is written."""
    faults.point("ingest.commit")
    if changed or not all(p.is_file() for p in (lay.files, lay.quarantine)):
        write_parquet(files(), lay.files, APPENDED_ROW_GROUP)
        faults.point("ingest.commit")
        write_parquet(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), lay.quarantine)
        faults.point("ingest.commit")
    write_parquet(pa.Table.from_pylist(runs, schema=RUNS_SCHEMA), lay.runs)
    faults.point("ingest.commit")


def _only_appended(files: list[dict[str, Any]], given: tuple) -> bool:
    """Whether the merge left the rows it was given as they were (`given`: their part of
    _state_key) and only appended rows, each of a path and content no row has (ROWS_EPOCH).
    The rows it was not given change only in last_run, and all those of a new row's content
    are given."""
    old = files[: len(given)]
    if _state_key(old, [])[0] != given:
        return False
    had = {(r["image_id"], r["path_raw"]) for r in old}
    return all((r["image_id"], r["path_raw"]) not in had for r in files[len(given) :])


def _state_key(files: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> tuple:
    """Everything a run can change except last_run (which the catalogue can derive)."""
    return (
        tuple(
            (r["path_raw"], r["version"], r["status"], r["is_canonical"], r["bytes"], r["mtime_ns"])
            for r in files
        ),
        tuple((r["path_raw"], r["reason"], r["bytes"], r["mtime_ns"]) for r in quarantine),
    )


def _canonical_paths(files: list[dict[str, Any]]) -> dict[str, str]:
    """image_id -> path of the canonical present rows among `files` (canonical_table's rows)."""
    return {r["image_id"]: r["path"] for r in files if r["status"] == OK and r["is_canonical"]}


def _assign_canonical(files: list[dict[str, Any]], new_rows: list[dict[str, Any]]) -> int:
    """One canonical row per content: the earliest-seen present file; the rest are duplicates.

    Returns how many of `new_rows` became duplicates.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in files:
        groups.setdefault(row["image_id"], []).append(row)
    rank = {OK: 0, DUPLICATE: 0, MISSING: 1, REPLACED: 2}
    for rows in groups.values():
        rows.sort(key=lambda r: (rank[r["status"]], *(r[c] for c in SEEN_FIRST)))
        head = rows[0]
        for r in rows:
            r["is_canonical"] = r is head
            if r["status"] in PRESENT:
                is_dup = r is not head
                r["status"] = DUPLICATE if is_dup else OK
                r["duplicate_of"] = head["path"] if is_dup else None
            else:
                r["duplicate_of"] = None
    new_ids = {id(r) for r in new_rows}
    return sum(1 for r in files if id(r) in new_ids and r["status"] == DUPLICATE)
