"""Reviewers' decisions on pairs (`data.decisions_dir`): an append-only log of Parquet parts.

A decision says of two images, by content id, "same photograph", "different" or "unsure" (and
which one is the master). Keyed by content, it survives re-training, re-embedding, re-indexing
and file moves. Every call of `record` writes one new part file (atomically, under a name no
other writer can pick), so two reviewers in two browser tabs, or the review server beside
`cbir decide`, never lose each other's work and need no lock; nothing is ever rewritten, except
by `compact`, which merges parts into one and only then removes them (a crash between leaves
rows twice, which readers drop by `decision_id`).

An `undo` row withdraws one earlier decision (`undoes` names it); the history keeps both. A
pair's current decision is its latest row (by time, then id) that is not undone; `current`
gives them, and the catalogue's `decisions` view is the same rule in SQL.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_text
from .layout import DECISION_PART_GLOB, DECISION_PART_PREFIX, DECISIONS_README
from .tables import damaged, read_table

SAME = "same"
DIFFERENT = "different"
UNSURE = "unsure"
UNDO = "undo"
#: What a reviewer can decide of a pair (skipping a pair records nothing).
VERDICTS = (SAME, DIFFERENT, UNSURE)
KINDS = (*VERDICTS, UNDO)
SOURCES = ("review", "cli", "import")

DECISIONS_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("image_a", pa.string()),  # content ids, image_a < image_b
        ("image_b", pa.string()),
        ("path_a", pa.string()),  # the files' paths when it was decided
        ("path_b", pa.string()),
        ("decision", pa.string()),  # same / different / unsure / undo
        ("master", pa.string()),  # the image id of the master (same only), or null
        ("reviewer", pa.string()),
        ("note", pa.string()),
        ("model", pa.string()),  # the model fingerprint whose score the reviewer saw
        ("score", pa.float32()),  # that score, or null (a pair decided outside the pairs)
        ("source", pa.string()),  # review / cli / import
        ("undoes", pa.string()),  # the decision_id an undo withdraws
    ]
)
DECISIONS_FIX = (
    "move the file away (the other decisions stay), or restore the folder with `dvc checkout`"
)
#: How many parts `compact` leaves alone (a reviewer's session writes one per decision).
COMPACT_AT = 256
MAX_NOTE = 2000  # characters


@dataclass(frozen=True)
class Decision:
    """One decision (or an undo) on the pair of images `image_a`, `image_b` (content ids)."""

    image_a: str
    image_b: str
    decision: str
    path_a: str = ""
    path_b: str = ""
    master: str | None = None
    reviewer: str = ""
    note: str = ""
    model: str | None = None
    score: float | None = None
    source: str = "cli"
    undoes: str | None = None
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime | None = None  # now, when recorded

    def checked(self) -> Decision:
        """The decision in canonical order (image_a < image_b), or CbirError saying what is
        wrong with it in one line."""
        if self.decision not in KINDS:
            raise CbirError(f"unknown decision {self.decision!r}: one of {', '.join(KINDS)}")
        if self.source not in SOURCES:
            raise CbirError(f"unknown decision source {self.source!r}")
        if not self.image_a or not self.image_b:
            raise CbirError("a decision needs the image ids of both sides")
        if self.image_a == self.image_b:
            raise CbirError(f"a decision needs two different images, not {self.image_a} twice")
        if self.master is not None:
            if self.decision != SAME:
                raise CbirError("only a 'same' decision names a master")
            if self.master not in (self.image_a, self.image_b):
                raise CbirError(f"the master {self.master} is neither side of the pair")
        if (self.decision == UNDO) != (self.undoes is not None):
            raise CbirError("an undo names the decision it withdraws, and only an undo does")
        if len(self.note) > MAX_NOTE:
            raise CbirError(f"a note holds at most {MAX_NOTE} characters, not {len(self.note)}")
        if self.image_a < self.image_b:
            return self
        return Decision(
            self.image_b, self.image_a, self.decision, self.path_b, self.path_a, self.master,
            self.reviewer, self.note, self.model, self.score, self.source, self.undoes,
            self.decision_id, self.time,
        )  # fmt: skip


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The order decisions key a pair by."""
    return (a, b) if a < b else (b, a)


def parts(folder: Path) -> list[Path]:
    """The log's part files, oldest first (their names start with the time they were written)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(DECISION_PART_GLOB) if p.is_file())


def _part_name() -> str:
    # time first (so names sort by age), then a random tail no other writer can pick
    return f"{DECISION_PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"


def _table(decisions: Sequence[Decision]) -> pa.Table:
    now = datetime.now(UTC)
    rows = []
    for d in decisions:
        d = d.checked()
        rows.append(
            {
                "decision_id": d.decision_id,
                "time": d.time or now,
                "image_a": d.image_a,
                "image_b": d.image_b,
                "path_a": d.path_a,
                "path_b": d.path_b,
                "decision": d.decision,
                "master": d.master,
                "reviewer": d.reviewer,
                "note": d.note,
                "model": d.model,
                "score": d.score,
                "source": d.source,
                "undoes": d.undoes,
            }
        )
    return pa.Table.from_pylist(rows, schema=DECISIONS_SCHEMA)


_README_TEXT = """\
Reviewers' decisions on pairs of images: same, different, unsure (cbir review, cbir decide,
cbir decisions import). Each part-*.parquet file holds decisions as they were recorded; nothing
here is computed, so nothing can rebuild it: keep it, and let DVC version it (`dvc repro` and
`cbir nightly` record it). `cbir decisions export FILE.csv` writes the current decisions as a
CSV; `cbir sql "SELECT * FROM decisions"` shows them.
"""


def ensure_folder(folder: Path) -> None:
    """The log's folder, with the note saying what it is: DVC, which versions the folder,
    warned "'data/decisions' is empty" a dozen times in a first `dvc repro` before it."""
    if not (folder / DECISIONS_README).is_file():
        write_text(_README_TEXT, folder / DECISIONS_README)


def record(folder: Path, decisions: Sequence[Decision]) -> Path | None:
    """Append `decisions` to the log as one new part file (atomic: a crash leaves the log as it
    was). Returns the part, or None when there was nothing to record."""
    if not decisions:
        return None
    table = _table(decisions)
    ensure_folder(folder)
    target = folder / _part_name()
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return target


def _read_parts(paths: Iterable[Path]) -> list[pa.Table]:
    tables = []
    for path in paths:
        try:
            tables.append(read_table(path, DECISIONS_SCHEMA, DECISIONS_FIX))
        except CbirError:
            if not os.path.lexists(path):  # merged away by a `compact` running beside us
                raise FileNotFoundError(path) from None
            raise
    return tables


def read_log(folder: Path) -> pa.Table:
    """Every decision ever recorded (undos too), each once, oldest first."""
    for _ in range(5):  # a compaction beside us removes parts it merged: list them again
        try:
            tables = _read_parts(parts(folder))
            break
        except FileNotFoundError:
            continue
    else:
        raise CbirError(f"the decisions in {folder} kept changing while being read; try again")
    if not tables:
        return DECISIONS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    rows = table.to_pylist()
    seen: set[str] = set()
    unique = []
    for r in sorted(rows, key=lambda r: (r["time"], r["decision_id"])):
        if r["decision_id"] not in seen:
            seen.add(r["decision_id"])
            unique.append(r)
    return pa.Table.from_pylist(unique, schema=DECISIONS_SCHEMA)


def current(log: pa.Table) -> dict[tuple[str, str], dict[str, Any]]:
    """Each decided pair's current decision: its latest row not undone (undos excluded)."""
    rows = log.to_pylist()
    undone = {r["undoes"] for r in rows if r["decision"] == UNDO}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["time"], r["decision_id"])):
        if r["decision"] == UNDO or r["decision_id"] in undone:
            continue
        out[(r["image_a"], r["image_b"])] = r
    return out


def current_decisions(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The current decision of every decided pair in the log at `folder`."""
    return current(read_log(folder))


def compact(folder: Path, *, keep: int = COMPACT_AT) -> int:
    """Merge the log's parts into one when there are more than `keep`; returns how many parts
    were merged. Safe beside writers (they add new parts, never touch old ones) and readers
    (which list the parts again when one disappears)."""
    ensure_folder(folder)
    clean_stale_tmp(folder)
    old = parts(folder)
    if len(old) <= keep:
        return 0
    tables = _read_parts(old)
    merged = pa.concat_tables(tables) if tables else DECISIONS_SCHEMA.empty_table()
    # named like a part of the newest merged one's time, so the order of names stays the order
    # of writing for everything written after it
    newest = old[-1].name[len(DECISION_PART_PREFIX) :].split("-")[0]
    target = folder / f"{DECISION_PART_PREFIX}{newest}-merged-{uuid.uuid4().hex[:12]}.parquet"
    with atomic_path(target) as tmp:
        pq.write_table(merged, tmp, compression="zstd")
    for p in old:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise damaged(p, f"cannot remove a merged part ({exc})", DECISIONS_FIX) from None
    return len(old)


# --------------------------------------------------------------------------- what steps read


@dataclass(frozen=True)
class Labels:
    """The current same/different decisions, as the pipeline uses them (unsure ones say
    nothing): `same` and `different` hold pair keys (image_a < image_b), `master` the image a
    `same` decision names as the master, by pair."""

    same: frozenset[tuple[str, str]] = frozenset()
    different: frozenset[tuple[str, str]] = frozenset()
    master: dict[tuple[str, str], str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.same or self.different)

    def only(self, present: Container[str]) -> Labels:
        """The decisions on pairs whose images are both in `present`."""

        def keep(key: tuple[str, str]) -> bool:
            return key[0] in present and key[1] in present

        return Labels(
            frozenset(k for k in self.same if keep(k)),
            frozenset(k for k in self.different if keep(k)),
            {k: m for k, m in self.master.items() if keep(k)},
        )

    def digest(self) -> str:
        """A short fingerprint of these labels (what a calibration on them depends on)."""
        import hashlib

        text = "\n".join(
            [f"same {a} {b}" for a, b in sorted(self.same)]
            + [f"different {a} {b}" for a, b in sorted(self.different)]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def labels(folder: Path) -> Labels:
    """The current `same` and `different` decisions in the log at `folder` (none when the
    folder is absent)."""
    now = current_decisions(folder)
    same = frozenset(k for k, r in now.items() if r["decision"] == SAME)
    different = frozenset(k for k, r in now.items() if r["decision"] == DIFFERENT)
    master = {k: r["master"] for k, r in now.items() if r["decision"] == SAME and r["master"]}
    return Labels(same, different, master)
