"""Decisions without a browser: `cbir decide`, `cbir decisions import|export|compact`, and
`cbir export --remove-list` (what to keep and what to remove, from the confirmed duplicates).

A pair's two images are named by their paths as the manifest holds them (relative to the scans
folder), by absolute paths inside the scans folder, or by their content ids; each is looked up in
the manifest (`Resolver`), so a decision is always about ingested images. Decisions go to the
append-only log of `cbir.store.decisions` (no writer lock: the log needs none). Nothing here
deletes or moves a scan: the remove list is a CSV for the archivist to act on.

Longer than 400 lines: four commands over one log (decide and undo, import with its
all-or-nothing checks, export, the remove list) sharing the resolver and the CSV guards.
"""

from __future__ import annotations

import csv
import getpass
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..config import Settings
from ..errors import CbirError
from ..fsutil import write_text
from ..linkage import link
from ..safetext import counted
from ..spelling import Spellings
from ..store import decisions as D
from ..store.catalog import LOSSY_FORMATS, MARGIN_RESOLUTION, REDUCED_TONE
from ..store.layout import layout
from ..store.manifest import PRESENT, load_manifest
from ..store.pairs import CHECK_COLUMNS, on_margin, scores_fingerprint
from ..store.user_csv import csv_target, csv_text

#: The columns `cbir decisions import` reads (the first three are required).
IMPORT_COLUMNS = ("path_a", "path_b", "decision", "master", "note", "reviewer")
#: What `cbir decisions export` writes (import reads its first six, and image_a/image_b when a
#: path no longer names an ingested file).
EXPORT_COLUMNS = (
    *IMPORT_COLUMNS,
    "time",
    "image_a",
    "image_b",
    "score",
    "model",
    "source",
    "decision_id",
    "undoes",
)
REMOVE_COLUMNS = ("remove", "keep", "reason", "group")
MAX_BAD_ROWS = 20  # bad rows listed one per line; the rest counted


def _reviewer(name: str | None) -> str:
    if name is not None:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment
        return ""


# --------------------------------------------------------------------------- naming images


@dataclass
class Resolver:
    """Ingested images by path (manifest paths, relative to the scans folder) and by id."""

    scans: Path
    id_of: dict[str, str]  # present path -> image id
    path_of: dict[str, str]  # image id -> its canonical present path
    rows: list[dict[str, Any]]  # the present files' manifest rows
    table: pa.Table  # every manifest row (gone versions too): what `for_rule` reads

    @cached_property
    def spellings(self) -> Spellings:
        """The present paths by the other ways a person may spell them (made on a miss)."""
        return Spellings(self.id_of)

    @classmethod
    def of(cls, settings: Settings) -> Resolver:
        cols = ["image_id", "path", "status", "is_canonical", "width", "height", "mode", "bytes"]
        cols += ["first_run", "mtime_ns"]
        table = load_manifest(settings, [*cols, "format"])
        rows = [r for r in table.select(cols).to_pylist() if r["status"] in PRESENT]
        path_of = {r["image_id"]: r["path"] for r in rows if r["is_canonical"]}
        for r in rows:  # a content whose canonical file is gone: any present copy names it
            path_of.setdefault(r["image_id"], r["path"])
        return cls(
            scans=Path(os.path.realpath(layout(settings).scans)),
            id_of={r["path"]: r["image_id"] for r in rows},
            path_of=path_of,
            rows=rows,
            table=table,
        )

    def for_rule(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`rows` with what the likely master's rule reads besides: each file's `format`, and
        `arrived`, the run that first brought its picture under any path (a moved scan keeps
        it). Looked up for these rows' images alone: for every row, 2.4 s more at 10^6."""
        ids = pa.array(sorted({r["image_id"] for r in rows}), pa.string())
        mine = self.table.filter(pc.is_in(self.table.column("image_id"), ids))
        cols = ["image_id", "path", "status", "format", "first_run"]
        arrived: dict[str, int] = {}
        fmt: dict[tuple[str, str], str | None] = {}
        for r in mine.select(cols).to_pylist():
            arrived[r["image_id"]] = min(r["first_run"], arrived.get(r["image_id"], r["first_run"]))
            if r["status"] in PRESENT:
                fmt[r["image_id"], r["path"]] = r["format"]
        return [
            {**r, "arrived": arrived[r["image_id"]], "format": fmt.get((r["image_id"], r["path"]))}
            for r in rows
        ]

    def resolve(self, text: str) -> tuple[str, str]:
        """(image id, path) of an image named by path or id; CbirError in one line when none."""
        raw = text.strip()
        if not raw:
            raise CbirError("an empty name: give an image's path or content id")
        if raw in self.path_of:
            return raw, self.path_of[raw]
        candidates = [] if os.path.isabs(raw) else [os.path.normpath(raw)]
        full = os.path.realpath(raw)  # absolute, or relative to the current folder
        if os.path.commonpath([str(self.scans), full]) == str(self.scans):
            candidates.append(os.path.relpath(full, self.scans))
        for path in candidates:
            if path in self.id_of:
                return self.id_of[path], path
        spelt = self.spellings
        for path in candidates:  # the same name in another Unicode form (a Mac's files)
            if (same := spelt.same(path)) is not None:
                return self.id_of[same], same
        # a spreadsheet from Windows writes box\0042.jpg (here a backslash is a name's
        # letter), or a name in another letter case: a person's to confirm
        guess = next(filter(None, map(spelt.suggest, candidates or [raw])), None)
        if guess is not None:
            how = "written with /, " if "\\" in raw else ""
            raise CbirError(
                f"{raw!r} is no ingested image; did you mean {guess!r}? (paths are {how}as "
                f'`cbir sql "SELECT path FROM images"` lists them)'
            )
        raise CbirError(
            f"{raw!r} is no ingested image: give its path relative to the scans folder "
            f'{self.scans} (as `cbir sql "SELECT path FROM images"` lists them), an '
            f"absolute path inside it, or its image id; run `cbir ingest` for new scans"
        )


# --------------------------------------------------------------------------- cbir decide


@dataclass
class DecideSummary:
    decision: D.Decision
    previous: dict[str, Any] | None = None  # the pair's current decision before this one
    now: dict[str, Any] | None = None  # after an undo: the decision that is current again
    likely: tuple[str, str] | None = None  # `same` with no master named: (path, why) of the rule

    def lines(self) -> list[str]:
        d = self.decision
        pair = f"{d.path_a} and {d.path_b}"
        if d.decision == D.UNDO:
            assert self.previous is not None
            after = f"now {self.now['decision']}" if self.now else "now undecided"
            return [f"decide: withdrew {self.previous['decision']!r} on {pair} ({after})"]
        master = ""
        if d.master is not None:
            master = f", master {d.path_a if d.master == d.image_a else d.path_b}"
        was = f" (was {self.previous['decision']})" if self.previous else ""
        out = [f"decide: {pair}: {d.decision}{master}{was}"]
        if self.likely is not None:
            out.append(
                f"  no master named: the likely master is {self.likely[0]} ({self.likely[1]}); "
                f"`--master PATH` names the one to keep"
            )
        return out


def _found(settings: Settings, key: tuple[str, str]) -> tuple[float | None, dict[str, Any]]:
    """The pair's score and verification in the pairs files, when `cbir pairs` found it
    (relation: `a_in_b` where key[0]'s picture is a detail of key[1]'s; None: not checked)."""
    import pyarrow.compute as pc

    from ..store.pairs import read_pairs

    try:
        table = read_pairs(settings)
    except CbirError:
        return None, {}
    mask = pc.and_(pc.equal(table["image_a"], key[0]), pc.equal(table["image_b"], key[1]))
    found = table.filter(mask).select(["score", *_CHECK_COLUMNS]).to_pylist()
    if not found:
        return None, {}
    return float(found[0]["score"]), found[0]


def run_decide(
    settings: Settings,
    a: str,
    b: str,
    verdict: str,
    *,
    master: str | None = None,
    note: str = "",
    reviewer: str | None = None,
) -> DecideSummary:
    """Record one decision on the images named `a` and `b` (paths or ids)."""
    if verdict not in D.VERDICTS:
        raise CbirError(f"unknown decision {verdict!r}: one of {', '.join(D.VERDICTS)}")
    names = Resolver.of(settings)
    (ia, pa_), (ib, pb) = names.resolve(a), names.resolve(b)
    if ia == ib:
        raise CbirError(
            f"{a!r} and {b!r} are the same image (byte-identical files): nothing to decide"
        )
    master_id = None
    if master is not None:
        if verdict != D.SAME:
            raise CbirError("--master goes with --same: only a duplicate has a master")
        master_id = names.resolve(master)[0]
        if master_id not in (ia, ib):
            raise CbirError(f"the master {master!r} is neither {a!r} nor {b!r}")
    key = D.pair_key(ia, ib)
    score, check = _found(settings, key)
    decision = D.Decision(
        ia, ib, verdict, pa_, pb, master_id, _reviewer(reviewer), note,
        score=score, model=scores_fingerprint(settings) if score is not None else None,
        source="cli",
    ).checked()  # fmt: skip
    folder = layout(settings).decisions_dir
    previous = D.current_decisions(folder).get(key)
    D.record(folder, [decision])
    likely = None
    if verdict == D.SAME and master_id is None:  # what the remove list would keep
        path = {ia: pa_, ib: pb}
        two = names.for_rule([r for r in names.rows if (r["image_id"], r["path"]) in path.items()])
        if len(two) == 2:
            keep, why = _master_of(two, Relations.of([check] if check else []))
            likely = (keep["path"], why)
    return DecideSummary(decision, previous, likely=likely)


def run_undo(settings: Settings, a: str, b: str, *, reviewer: str | None = None) -> DecideSummary:
    """Withdraw the current decision on `a` and `b` (the one before it, if any, is current
    again; the history keeps both)."""
    names = Resolver.of(settings)
    (ia, pa_), (ib, pb) = names.resolve(a), names.resolve(b)
    folder = layout(settings).decisions_dir
    key = D.pair_key(ia, ib)
    log = D.read_log(folder)
    previous = D.current(log).get(key)
    if previous is None:
        raise CbirError(f"no decision on {a!r} and {b!r} to undo")
    undo = D.Decision(
        ia, ib, D.UNDO, pa_, pb, reviewer=_reviewer(reviewer), source="cli",
        undoes=previous["decision_id"],
    ).checked()  # fmt: skip
    D.record(folder, [undo])
    return DecideSummary(undo, previous, D.current_decisions(folder).get(key))


# --------------------------------------------------------------------------- import


class ImportRefused(CbirError):
    """Bad rows in an import: nothing was imported; `problems` holds one line per bad row."""

    def __init__(self, message: str, problems: Sequence[str]) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class ImportSummary:
    file: Path
    rows: int = 0
    recorded: int = 0
    unchanged: int = 0  # rows that say what the pair's current decision already says

    def lines(self) -> list[str]:
        return [
            f"decisions import: {self.rows} rows of {self.file}: {self.recorded} recorded, "
            f"{self.unchanged} already current"
        ]


def _read_csv(file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CbirError(f"{file}: no such file") from None
    except UnicodeDecodeError:
        raise CbirError(f"{file} is not UTF-8 text") from None
    except OSError as exc:
        raise CbirError(f"cannot read {file}: {exc.strerror}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise CbirError(f"{file}, line {reader.line_num}: not CSV ({exc})") from None
    return header, rows


def import_decisions(
    settings: Settings, file: str | os.PathLike[str], *, reviewer: str | None = None
) -> ImportSummary:
    """Record every row of a CSV (path_a,path_b,decision[,master,note,reviewer]) as a decision,
    all or nothing: every row is checked first; one bad row and nothing is recorded
    (ImportRefused, one line per bad row). Rows that repeat a pair's current decision are
    skipped; the rest go into the log as one part (written atomically)."""
    path = Path(file)
    header, rows = _read_csv(path)
    missing = [c for c in IMPORT_COLUMNS[:3] if c not in header]
    if missing:
        raise CbirError(
            f"{path}: expected a header with columns {','.join(IMPORT_COLUMNS[:3])}"
            f"[,master,note,reviewer] (missing {', '.join(missing)})"
        )
    names = Resolver.of(settings)
    default_reviewer = _reviewer(reviewer)
    problems: list[str] = []
    decided: list[D.Decision] = []
    seen: dict[tuple[str, str], int] = {}

    def side(row: dict[str, str], which: str) -> tuple[str, str]:
        try:
            return names.resolve(row.get(f"path_{which}") or "")
        except CbirError:
            image_id = (row.get(f"image_{which}") or "").strip()
            if image_id in names.path_of:  # an export's id, where the file has moved
                return image_id, names.path_of[image_id]
            raise

    for line, row in rows:
        try:
            if None in row:
                raise CbirError("more cells than the header has columns")
            verdict = (row.get("decision") or "").strip().lower()
            if verdict not in D.VERDICTS:
                raise CbirError(
                    f"decision {row.get('decision')!r} is not one of {', '.join(D.VERDICTS)}"
                    + (" (undo rows of a --history export are not imported)" if verdict else "")
                )
            (ia, pa_), (ib, pb) = side(row, "a"), side(row, "b")
            if ia == ib:
                raise CbirError("both paths are the same image (byte-identical files)")
            master = (row.get("master") or "").strip()
            master_id = names.resolve(master)[0] if master else None
            if master_id is not None and master_id not in (ia, ib):
                raise CbirError(f"the master {master!r} is neither side of the pair")
            key = D.pair_key(ia, ib)
            if key in seen:
                raise CbirError(f"the same pair as line {seen[key]} (one decision per pair)")
            seen[key] = line
            decided.append(
                D.Decision(
                    ia,
                    ib,
                    verdict,
                    pa_,
                    pb,
                    master_id,
                    (row.get("reviewer") or "").strip() or default_reviewer,
                    row.get("note") or "",
                    source="import",
                ).checked()
            )
        except CbirError as exc:
            problems.append(f"{path}, line {line}: {exc}")
    if problems:
        shown = problems[:MAX_BAD_ROWS]
        if len(problems) > MAX_BAD_ROWS:
            shown.append(f"... and {len(problems) - MAX_BAD_ROWS} more bad rows")
        raise ImportRefused(
            f"{path}: {len(problems)} of {len(rows)} rows are bad; nothing imported", shown
        )
    folder = layout(settings).decisions_dir
    now = D.current_decisions(folder)
    fresh = [
        d
        for d in decided
        if not (
            (old := now.get((d.image_a, d.image_b))) is not None
            and (old["decision"], old["master"], old["note"]) == (d.decision, d.master, d.note)
        )
    ]
    D.record(folder, fresh)
    return ImportSummary(path, len(rows), len(fresh), len(decided) - len(fresh))


# --------------------------------------------------------------------------- writing CSVs


@dataclass
class ExportSummary:
    file: Path
    rows: int
    history: bool

    def lines(self) -> list[str]:
        what = "rows of the decisions log" if self.history else "current decisions"
        return [f"decisions export: {self.rows} {what} to {self.file}"]


def export_decisions(
    settings: Settings, file: str | os.PathLike[str], *, history: bool = False
) -> ExportSummary:
    """Write the current decisions (or, with `history`, every row of the log, undos too) to a
    CSV that `import_decisions` reads back; paths are where the images are now (else where
    they were when decided). Written atomically; never over a file cbir did not export."""
    target = csv_target(settings, file, ",".join(EXPORT_COLUMNS))
    names = Resolver.of(settings)
    log = D.read_log(layout(settings).decisions_dir)
    chosen = log.to_pylist() if history else list(D.current(log).values())
    rows = []
    for r in chosen:
        path_a = names.path_of.get(r["image_a"], r["path_a"])
        path_b = names.path_of.get(r["image_b"], r["path_b"])
        master = {r["image_a"]: path_a, r["image_b"]: path_b}.get(r["master"] or "")
        rows.append(
            {
                **r,
                "path_a": path_a,
                "path_b": path_b,
                "master": master,
                "time": r["time"].isoformat() if r["time"] is not None else None,
            }
        )
    write_text(csv_text(EXPORT_COLUMNS, rows), target)
    return ExportSummary(target, len(rows), history)


# --------------------------------------------------------------------------- compaction


@dataclass
class CompactSummary:
    folder: Path
    merged: int
    parts: int

    def lines(self) -> list[str]:
        if not self.merged:
            return [f"decisions compact: {self.parts} parts in {self.folder}, nothing to merge"]
        return [f"decisions compact: merged {self.merged} parts into one in {self.folder}"]


def run_compact(settings: Settings, *, everything: bool = False) -> CompactSummary:
    """Merge the log's parts into one when there are many (or, `everything`, more than one)."""
    folder = layout(settings).decisions_dir
    folder.mkdir(parents=True, exist_ok=True)  # the DVC stage's output exists from the start
    merged = D.compact(folder, keep=1 if everything else D.COMPACT_AT)
    return CompactSummary(folder, merged, len(D.parts(folder)))


# --------------------------------------------------------------------------- the remove list


@dataclass
class RemoveSummary:
    file: Path
    groups: int = 0  # confirmed groups (joined by `same` decisions)
    exact_groups: int = 0  # byte-identical copies outside them
    remove: int = 0
    keep: int = 0
    # confirmed groups whose master no reviewer named (the likely master kept), by the criterion
    # that chose it (the catalogue's master_reason)
    by_rule: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"remove list: {counted(self.remove, 'file')} to remove, keeping "
            f"{counted(self.keep, 'master')}, from {counted(self.groups, 'confirmed group')} and "
            f"{counted(self.exact_groups, 'set')} of byte-identical copies; nothing was deleted",
            f"  {self.file}",
        ]
        by_rule = sum(self.by_rule.values())
        if by_rule:
            # the rule reads the files (tone, pixels, format, run, bytes), not the pictures: a
            # halftone reprint scanned in grey to a PNG outranks the photograph's JPEG
            which = (
                "the group keeps"
                if self.groups == 1
                else f"{by_rule} of the {self.groups} groups {'keeps' if by_rule == 1 else 'keep'}"
            )
            rules = ", ".join(
                f"{rule} {n}" if len(self.by_rule) > 1 else rule
                for rule, n in sorted(self.by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            out.append(
                f"  {which} the likely master (no reviewer named one; chosen by {rules}, as the "
                f"reason column says): check {'it' if by_rule == 1 else 'them'}, and name another "
                f"with `cbir decide A B same --master PATH`"
            )
        return out


def _lossless(row: dict[str, Any]) -> bool:
    return row["format"] is not None and row["format"] not in LOSSY_FORMATS


#: The likely master's criteria in order, each with the catalogue's `master_reason` word.
_MASTER_RULE: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("continuous tone", lambda r: r["mode"] in REDUCED_TONE),
    ("higher resolution", lambda r: -(r["width"] or 0) * (r["height"] or 0)),
    ("lossless file", lambda r: not _lossless(r)),
    ("arrived first", lambda r: 0 if _lossless(r) else r["arrived"]),  # of two lossy files
    ("larger file", lambda r: -(r["bytes"] or 0)),
    ("earlier", lambda r: (r["first_run"], r["mtime_ns"], r["path"])),
)


def _likely_master(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The catalogue's rule (pair_report, cluster_report): continuous tone (not bilevel or
    palette), else more pixels, else a lossless format, else, of two lossy files, the picture
    that arrived first (`arrived`: its earliest ingest run under any path), else more bytes,
    else seen first (the file's earlier run, older modification time, then path). Returns the
    master and the criterion that chose it over the runner-up (the catalogue's master_reason)."""
    ranked = sorted(rows, key=lambda r: tuple(key(r) for _, key in _MASTER_RULE))
    if len(ranked) < 2:
        return ranked[0], "earlier"
    keep, runner_up = ranked[0], ranked[1]
    why = next(word for word, key in _MASTER_RULE if key(keep) != key(runner_up))
    return keep, why


#: The columns of a recorded pair the master rule reads (cbir.store.pairs).
_CHECK_COLUMNS = ["image_a", "image_b", *CHECK_COLUMNS]


@dataclass(frozen=True)
class Relations:
    """What verified pairs say about which picture to keep: `details` maps each detail's id to
    the ids of the pictures it was cut from; `margins` maps the id of a picture that shows
    another on a blank margin to {that other's id: the picture's pixels on it (its box)}."""

    details: dict[str, set[str]] = field(default_factory=dict)
    margins: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[dict[str, Any]]) -> Relations:
        out = cls()
        for r in rows:
            a, b, relation = str(r["image_a"]), str(r["image_b"]), r.get("relation")
            if relation == "a_in_b":
                out.details.setdefault(a, set()).add(b)
            elif relation == "b_in_a":
                out.details.setdefault(b, set()).add(a)
            elif on_margin(relation, r.get("covered")) and r.get("box_x1") is not None:
                on, other = (a, b) if r.get("box_on") == "a" else (b, a)
                box = (r["box_x1"] - r["box_x0"]) * (r["box_y1"] - r["box_y0"])
                out.margins.setdefault(on, {})[other] = box
        return out


def _master_of(rows: list[dict[str, Any]], relations: Relations) -> tuple[dict[str, Any], str]:
    """The likely master of a group's files, as the catalogue's rule: never a detail cut from
    another of them (verified pairs' relation), nor a picture on a blank margin where another
    of them shows it without the margin, at no lower resolution (MARGIN_RESOLUTION) and in no
    reduced tone; then the files' rule (_likely_master)."""
    ids = {r["image_id"] for r in rows}
    wholes = [r for r in rows if not relations.details.get(r["image_id"], set()) & ids]
    if wholes and len(wholes) < len(rows):
        return _likely_master(wholes)[0], "the whole picture"
    by_id = {r["image_id"]: r for r in rows}

    def gives_way(r: dict[str, Any]) -> bool:
        tone = r["mode"] not in REDUCED_TONE
        for other, box in relations.margins.get(r["image_id"], {}).items():
            o = by_id.get(other)
            if o is None:
                continue
            if (o["width"] or 0) * (o["height"] or 0) * MARGIN_RESOLUTION >= box and (
                o["mode"] not in REDUCED_TONE or not tone
            ):
                return True
        return False

    trimmed = [r for r in rows if not gives_way(r)]
    if trimmed and len(trimmed) < len(rows):
        return _likely_master(trimmed)[0], "no blank margin"
    return _likely_master(rows)


def _all_relations(settings: Settings) -> Relations:
    """Relations of every recorded pair (none before `cbir pairs`)."""
    from ..store.pairs import read_pairs

    try:
        t = read_pairs(settings).select(_CHECK_COLUMNS)
    except CbirError:
        return Relations()
    return Relations.of(t.to_pylist())


def remove_list(settings: Settings, file: str | os.PathLike[str]) -> RemoveSummary:
    """A CSV of the files to remove, keeping one master of each confirmed group of duplicates,
    as imagededup's `find_duplicates_to_remove` gives: one row per file to remove (columns
    remove, keep, reason, group; paths relative to the scans folder). Confirmed groups are
    images joined by `same` decisions (never two images decided `different`); the master is
    the one a `same` decision named (the latest), else the likely master. Byte-identical copies
    are listed too: of a group's images, and of any other image (its first-seen file is kept).
    Nothing is deleted or moved."""
    target = csv_target(settings, file, ",".join(REMOVE_COLUMNS))
    names = Resolver.of(settings)
    present = set(names.path_of)
    log = D.read_log(layout(settings).decisions_dir)
    now = [r for r in D.current(log).values() if r["image_a"] in present]
    now = [r for r in now if r["image_b"] in present]
    same = [r for r in now if r["decision"] == D.SAME]
    apart = [(r["image_a"], r["image_b"]) for r in now if r["decision"] == D.DIFFERENT]
    same.sort(key=lambda r: (r["time"], r["decision_id"]))
    groups = link(((1.0, r["image_a"], r["image_b"]) for r in same), apart)
    files: dict[str, list[dict[str, Any]]] = {}
    for r in names.rows:
        files.setdefault(r["image_id"], []).append(r)
    summary = RemoveSummary(target)
    relations = _all_relations(settings) if groups else Relations()
    canonical = [f for members, _ in groups for m in members for f in files[m]]
    canonical = [f for f in canonical if f["path"] == names.path_of[f["image_id"]]]
    ruled = {(f["image_id"], f["path"]): f for f in names.for_rule(canonical)} if groups else {}
    rows: list[dict[str, Any]] = []
    grouped: set[str] = set()
    for n, (members, _) in enumerate(groups, start=1):
        grouped.update(members)
        inside = set(members)
        masters = [  # oldest first: the latest decision in the group that names one wins
            r["master"]
            for r in same
            if r["master"] and r["image_a"] in inside and r["image_b"] in inside
        ]
        canon = [ruled[m, names.path_of[m]] for m in members]
        if masters:
            keep_id = masters[-1]
            keep = next(f for f in files[keep_id] if f["path"] == names.path_of[keep_id])
            why = "duplicate (decided same; master named by a reviewer)"
        else:
            keep, rule = _master_of(canon, relations)
            why = f"duplicate (decided same; likely master kept: {rule})"
            summary.by_rule[rule] = summary.by_rule.get(rule, 0) + 1
        summary.groups += 1
        summary.keep += 1
        for m in members:
            for f in sorted(files[m], key=lambda f: f["path"]):
                if f["path"] == keep["path"]:
                    continue
                reason = "byte-identical copy" if m == keep["image_id"] else why
                rows.append(
                    {"remove": f["path"], "keep": keep["path"], "reason": reason, "group": n}
                )
    for image_id in sorted(set(files) - grouped):
        copies = files[image_id]
        if len(copies) < 2:
            continue
        keep_path = names.path_of[image_id]
        summary.exact_groups += 1
        summary.keep += 1
        for f in sorted(copies, key=lambda f: f["path"]):
            if f["path"] != keep_path:
                rows.append(
                    {
                        "remove": f["path"],
                        "keep": keep_path,
                        "reason": "byte-identical copy",
                        "group": f"exact-{image_id[:12]}",
                    }
                )
    summary.remove = len(rows)
    write_text(csv_text(REMOVE_COLUMNS, rows), target)
    return summary
