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
Longer than 400 lines: the walk and the per-file probe are kernels (cbir/walk.py, cbir/probe.py);
what remains, the merge into the manifest and its crash journal, is this step's own logic.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults
from ..config import Settings
from ..errors import CbirError
from ..fsutil import clean_stale_tmp, write_parquet
from ..parallel import worker_map
from ..probe import Entry, display_path, init_worker, probe_star, sha256_of
from ..progress import bar as progress_bar
from ..store.catalog import SEEN_FIRST, clean_stale, refresh_catalog
from ..store.layout import Layout, layout
from ..store.manifest import (
    DUPLICATE,
    FILES_SCHEMA,
    MANIFEST_FIX,
    MISSING,
    OK,
    PRESENT,
    QUARANTINE_SCHEMA,
    REPLACED,
    RUNS_SCHEMA,
)
from ..store.tables import read_table
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


def image_id_of(sha256: str) -> str:
    """Stable image id: the first 64 bits of the content's SHA-256, as 16 hex digits."""
    return sha256[:16]


# --------------------------------------------------------------------------- state on disk


def _read(path: Path, schema: pa.Schema) -> list[dict[str, Any]]:
    if not os.path.lexists(path):
        return []
    return read_table(path, schema, MANIFEST_FIX).to_pylist()


def _journal_parts(jdir: Path) -> list[Path]:
    return sorted(jdir.glob("part-*.parquet")) if jdir.is_dir() else []


def _read_journal(jdir: Path) -> dict[tuple[bytes, int, int], dict[str, Any]]:
    cache: dict[tuple[bytes, int, int], dict[str, Any]] = {}
    for part in _journal_parts(jdir):
        try:
            rows = pq.read_table(part).to_pylist()
        except (OSError, pa.ArrowException):
            continue  # a part is written atomically, so this is damage: just decode again
        for r in rows:
            cache[(r["path_raw"], r["bytes"], r["mtime_ns"])] = r
    return cache


class _Journal:
    """Buffers worker results and writes them out in atomic parts."""

    def __init__(self, jdir: Path, every: int) -> None:
        self.dir = jdir
        self.every = every
        self.buffer: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        rows = [{k: r.get(k) for k in JOURNAL_SCHEMA.names} for r in self.buffer]
        write_parquet(
            pa.Table.from_pylist(rows, schema=JOURNAL_SCHEMA),
            self.dir / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet",
        )
        self.buffer = []

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
    seconds: float = 0.0
    manifest: Path | None = None
    catalog: Path | None = None

    def lines(self) -> list[str]:
        c, t = self.counts, self.totals
        return [
            f"ingest run {self.run_id}: {c.get('files_seen', 0)} files seen in {self.scans_dir}",
            f"  this run: {c.get('new', 0)} new, {c.get('changed', 0)} changed, "
            f"{c.get('unchanged', 0)} unchanged, {c.get('new_duplicates', 0)} new exact "
            f"duplicates, {c.get('newly_missing', 0)} newly missing, {self.decoded} decoded "
            f"in {self.seconds:.1f} s",
            "  manifest: "
            + ", ".join(f"{t.get(s, 0)} {s}" for s in (OK, DUPLICATE, MISSING, REPLACED))
            + f"; {c.get('quarantined', 0)} quarantined",
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
    files: list[dict[str, Any]], quarantine: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> int:
    seen = [r["run_id"] for r in runs]
    seen += [r["last_run"] for r in files] + [r["last_run"] for r in quarantine]
    return max(seen, default=0) + 1


def _decode_all(
    root: Path,
    todo: list[Entry],
    known: frozenset[str],
    settings: Settings,
    journal: _Journal,
    progress: bool,
    on_result: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    if not todo:
        return results
    root_b = os.fsencode(root)
    bar = progress_bar(len(todo), "ingest", "file", progress)
    workers = min(settings.decode_workers, max(1, len(todo) // 4))
    args = [(root_b, e) for e in todo]
    try:
        with worker_map(
            probe_star,
            args,
            workers,
            preload=["cbir.probe"],
            initializer=init_worker,
            initargs=(known, settings.ingest.max_pixels),
        ) as stream:
            for row in stream:
                results.append(row)
                journal.add(row)
                faults.point("ingest.result")
                if on_result is not None:
                    on_result(row)
                bar.update(1)
    except BaseException:
        journal.flush()  # keep what was decoded before the interruption
        raise
    finally:
        bar.close()
    return results


def _split_same_content(
    root: Path,
    todo: list[Entry],
) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Keep one file per content among new files of equal size (only those can be identical).

    Returns the files to decode and (copy, sha256) for the byte-identical copies left out.
    """
    by_size: dict[int, list[Entry]] = {}
    for e in todo:
        by_size.setdefault(e.size, []).append(e)
    keep: list[Entry] = []
    copies: list[tuple[Entry, str]] = []
    root_b = os.fsencode(root)
    for size, group in by_size.items():
        if len(group) == 1 or size == 0:
            keep += group
            continue
        first_of: dict[str, Entry] = {}
        for e in group:
            sha = sha256_of(os.path.join(root_b, e.raw))
            if sha is None or sha not in first_of:
                keep.append(e)
                if sha is not None:
                    first_of[sha] = e
            else:
                copies.append((e, sha))
    return keep, copies


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
) -> IngestSummary:
    """One ingest run over data.scans_dir. Returns a summary; raises CbirError on setup problems.

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

    files, quarantine, runs, run_id = _load_state(lay)
    before = _state_key(files, quarantine)
    current = {r["path_raw"]: r for r in files if r["status"] != REPLACED}
    quarantined = {r["path_raw"]: r for r in quarantine}
    known_sha = frozenset(r["sha256"] for r in files if r["status"] in PRESENT)
    journal_cache = _read_journal(lay.journal)

    entries = list(walk_scans(root, settings.ingest.ignore))
    counts: Counter[str] = Counter(files_seen=len(entries))
    work = _triage(entries, current, quarantined, journal_cache)
    journal = _Journal(lay.journal, settings.ingest.journal_every)
    todo, copies = _split_same_content(root, work.todo)
    fresh = _decode_all(root, todo, known_sha, settings, journal, progress, on_result)
    decoded = sum(1 for r in fresh if r.get("width") is not None)
    results = work.results + fresh
    results += _resolve_copies(copies, results)

    new_rows = _merge(files, current, work, results, run_id, counts)
    _mark_absent(files, {e.raw for e in entries}, work.problems, counts)
    counts["new_duplicates"] = _assign_canonical(files, new_rows)
    for row in files:
        row["mtime"] = datetime.fromtimestamp(row["mtime_ns"] / 1e9, tz=UTC)
    new_quarantine = _quarantine_rows(work.problems, quarantined, run_id)
    counts["quarantined"] = len(new_quarantine)

    seconds = time.perf_counter() - t0
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
    _commit(lay, files, new_quarantine, runs, changed=_state_key(files, new_quarantine) != before)
    journal.clear()
    catalog = refresh_catalog(settings)

    totals = Counter(r["status"] for r in files)
    return IngestSummary(
        run_id=run_id,
        scans_dir=root,
        counts=dict(counts),
        totals=dict(totals),
        decoded=decoded,
        seconds=time.perf_counter() - t0,
        manifest=lay.files,
        catalog=catalog,
    )


def _load_state(
    lay: Layout,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """(files, quarantine, runs, this run's id) as the last run left them."""
    files = _read(lay.files, FILES_SCHEMA)
    quarantine = _read(lay.quarantine, QUARANTINE_SCHEMA)
    runs = _read(lay.runs, RUNS_SCHEMA)
    run_id = _next_run_id(files, quarantine, runs)
    last_logged = max((r["run_id"] for r in runs), default=0)
    for r in files:  # present files were seen by every run since the last rewrite (see catalog)
        if r["status"] in PRESENT:
            r["last_run"] = max(r["last_run"], last_logged)
    return files, quarantine, runs, run_id


@dataclass
class _Work:
    """What the stat walk decided for each file (by path_raw where keyed)."""

    unchanged: list[Entry] = field(default_factory=list)  # same size and mtime: not read
    problems: dict[bytes, tuple[Entry, str]] = field(default_factory=dict)  # -> quarantine
    todo: list[Entry] = field(default_factory=list)  # to hash and decode
    results: list[dict[str, Any]] = field(default_factory=list)  # decoded before (the journal)


def _triage(
    entries: list[Entry],
    current: dict[bytes, dict[str, Any]],
    quarantined: dict[bytes, dict[str, Any]],
    journal_cache: dict[tuple[bytes, int, int], dict[str, Any]],
) -> _Work:
    work = _Work()
    for e in entries:
        prev = current.get(e.raw)
        q = quarantined.get(e.raw)
        if e.problem is not None:
            work.problems[e.raw] = (e, e.problem)
        elif prev is not None and (prev["bytes"], prev["mtime_ns"]) == (e.size, e.mtime_ns):
            work.unchanged.append(e)
        elif q is not None and (q["bytes"], q["mtime_ns"]) == (e.size, e.mtime_ns):
            work.problems[e.raw] = (e, q["reason"])  # same bytes as when it failed: don't retry
        elif (e.raw, e.size, e.mtime_ns) in journal_cache:
            work.results.append(journal_cache[(e.raw, e.size, e.mtime_ns)])
        else:
            work.todo.append(e)
    return work


# --------------------------------------------------------------------------- the merge


def _merge(
    files: list[dict[str, Any]],
    current: dict[bytes, dict[str, Any]],
    work: _Work,
    results: list[dict[str, Any]],
    run_id: int,
    counts: Counter[str],
) -> list[dict[str, Any]]:
    """Update the manifest rows for what this run saw: unchanged files are touched, decoded ones
    are new, changed (the old version becomes replaced) or touched; failures go to
    `work.problems`. Returns the new rows (already appended to `files`)."""
    by_sha = {r["sha256"]: r for r in files if r.get("width") is not None}
    new_rows: list[dict[str, Any]] = []
    for e in work.unchanged:
        row = current[e.raw]
        if row["status"] == MISSING:
            row["status"] = OK  # back again; canonical status is recomputed below
        row["last_run"] = run_id
    counts["unchanged"] = len(work.unchanged)
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
    return {
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


def _mark_absent(
    files: list[dict[str, Any]],
    seen_raw: set[bytes],
    problems: dict[bytes, tuple[Entry, str]],
    counts: Counter[str],
) -> None:
    """Present rows whose file was not seen become missing; those now unusable, replaced."""
    for row in files:
        if row["status"] in PRESENT and row["path_raw"] not in seen_raw:
            row["status"] = MISSING
            counts["newly_missing"] += 1
        elif row["status"] in PRESENT and row["path_raw"] in problems:
            row["status"] = REPLACED


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
    files: list[dict[str, Any]],
    quarantine: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    *,
    changed: bool,
) -> None:
    """Each file is replaced atomically; the run log goes last. When nothing but the run itself
    changed, only the run log is written (the catalogue derives last_run then); a file missing
    because a run was killed between the two (or never wrote them) is written."""
    faults.point("ingest.commit")
    if changed or not all(p.is_file() for p in (lay.files, lay.quarantine)):
        write_parquet(pa.Table.from_pylist(files, schema=FILES_SCHEMA), lay.files)
        faults.point("ingest.commit")
        write_parquet(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), lay.quarantine)
        faults.point("ingest.commit")
    write_parquet(pa.Table.from_pylist(runs, schema=RUNS_SCHEMA), lay.runs)
    faults.point("ingest.commit")


def _state_key(files: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> tuple:
    """Everything a run can change except last_run (which the catalogue can derive)."""
    return (
        tuple(
            (r["path_raw"], r["version"], r["status"], r["is_canonical"], r["bytes"], r["mtime_ns"])
            for r in files
        ),
        tuple((r["path_raw"], r["reason"], r["bytes"], r["mtime_ns"]) for r in quarantine),
    )


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
