"""What the nightly run reports and records: the new duplicate pairs, and the new state in DVC.

The steps of a nightly run are the pipeline's own (ingest, embed, index, `run_pairs(...,
incremental=True)`, evaluate); this module adds its report and the DVC bookkeeping. Prefect-free,
like the rest of `cbir/`: the flow in `flows/nightly.py` calls it through `tasks/`.

"Pairs found in run N" is a query on the catalogue's `new_pairs` view, which dates every pair by
the ingest run that brought its newer image (and leaves out the pairs a reviewer has decided):

    SELECT new_path, match_path, score, kind FROM new_pairs WHERE new_run = 7 ORDER BY score DESC

The report lists the partial copies among them (geometric verification found one picture a
detail of the other) apart from the whole-picture duplicates: a detail is reviewed against the
region of the original it was cut from, not as a second copy of the whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import faults
from ..config import Settings
from ..errors import CbirError
from ..fsutil import clean_stale_tmp, write_json, write_text
from ..lock import dvc_root
from ..safetext import counted, md_cell
from ..store.catalog import query
from ..store.decisions import ensure_folder as ensure_decisions_folder
from ..store.layout import layout
from ..store.manifest import latest_run
from ..store.pairs import PARTIAL, on_margin

PENDING = "pending.json"  # the start of a report not written yet

# The pairs of the images that arrived in runs (after, upto]; also what `cbir sql` users run.
NEW_PAIRS_SQL = """
SELECT new_run, new_path, match_path, round(score, 4) AS score, kind, master_path, relation,
       inliers, round(covered, 3) AS covered, detail_path, whole_path
FROM new_pairs WHERE new_run > ? AND new_run <= ?
ORDER BY new_run, kind DESC, score DESC, new_path, match_path
"""
# The files of those runs that could not be used: they would otherwise go unseen till asked for.
QUARANTINED_SQL = """
SELECT path, reason FROM quarantine WHERE first_run > ? AND first_run <= ? ORDER BY path
"""
#: The headings of the report's two tables (rows: `_whole`, `_partial`).
WHOLE_COLUMNS = ["run", "new image", "matches", "score", "kind", "likely master", "verified"]
PARTIAL_COLUMNS = ["run", "detail", "cut from", "covers", "matching points", "score"]


def begin_nightly(settings: Settings) -> int:
    """Call before a nightly run's ingest: the run after which its report starts.

    That is the latest ingest run now - unless an earlier nightly run stopped before its report,
    whose start is kept (in `reports/nightly/pending.json`), so that no arrival goes unreported.
    A run killed after writing its report but before removing pending.json has reported up to
    the latest ingest run already: its start is dropped, so no pair is reported twice.
    """
    folder = layout(settings).nightly
    pending = folder / PENDING
    clean_stale_tmp(folder)  # left by a killed run
    latest = latest_run(settings)
    try:
        since = int(json.loads(pending.read_text(encoding="utf-8"))["since_run"])
    except (OSError, ValueError, KeyError, TypeError):
        since = None
    if since is not None and not report_file(folder, latest).is_file():
        return since
    write_json({"since_run": latest}, pending)
    return latest


def report_file(folder: Path, run_id: int) -> Path:
    """The nightly report that closes ingest run `run_id`."""
    return folder / f"run-{run_id:05d}.md"


@dataclass
class NightlyReport:
    run_id: int  # the ingest run this report closes
    since_run: int  # it lists the pairs of images that arrived after this run
    columns: list[str] = field(default_factory=list)
    pairs: list[tuple[Any, ...]] = field(default_factory=list)
    file: Path | None = None
    review_url: str = ""  # where `cbir review` serves (review.host/port); ?run=N: run N's pairs
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) arrived

    @property
    def n_near(self) -> int:
        return sum(1 for r in self.pairs if r[self.columns.index("kind")] == "near")

    def row(self, values: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(self.columns, values, strict=True))

    @property
    def partial(self) -> list[dict[str, Any]]:
        """The new pairs where one picture is a detail of the other."""
        return [r for r in map(self.row, self.pairs) if r.get("relation") in PARTIAL]

    @property
    def whole(self) -> list[dict[str, Any]]:
        """The new pairs of whole pictures (verified the same, contradicted, or not checked)."""
        return [r for r in map(self.row, self.pairs) if r.get("relation") not in PARTIAL]

    def review_links(self) -> list[str]:
        """The review queue of each ingest run this report covers (newest first, a few)."""
        runs = range(self.run_id, max(self.since_run, self.run_id - 5), -1)
        return [f"{self.review_url}?run={n}" for n in runs] if self.review_url else []

    def lines(self) -> list[str]:
        runs = (
            f"run {self.run_id}"
            if self.since_run >= self.run_id - 1
            else f"runs {self.since_run + 1}-{self.run_id}"
        )
        n = len(self.partial)
        partial = f"; {n} of them {'a partial copy' if n == 1 else 'partial copies'}" if n else ""
        out = [
            f"nightly report: {counted(len(self.pairs), 'new duplicate pair')} "
            f"({self.n_near} near, "
            f"{len(self.pairs) - self.n_near} exact{partial}) of the images ingested in {runs}",
            f"  {self.file}",
        ]
        if self.pairs and self.review_links():
            out.append(
                f"  review them: {' '.join(self.review_links())} (with `cbir review` running)"
            )
        if self.quarantined:
            n = len(self.quarantined)
            what = "file that arrived was" if n == 1 else "files that arrived were"
            out.append(f"  {n} {what} quarantined, not ingested (listed in the report, with why)")
        return out

    def markdown(self, limit: int = 50) -> str:
        head = (
            f"# New duplicate pairs, ingest run {self.run_id}\n\n"
            f"{counted(len(self.pairs), 'pair')} ({counted(self.n_near, 'near-duplicate')}) "
            f"{'involves' if len(self.pairs) == 1 else 'involve'} images that "
            f"arrived after run {self.since_run}, and no reviewer has decided yet.\n\n"
        )
        out: list[str] = []
        bad: list[str] = []  # after the pairs
        if self.quarantined:
            bad += [
                "## Quarantined",
                "",
                f"{counted(len(self.quarantined), 'file')} that arrived could not be used and "
                f"{'was' if len(self.quarantined) == 1 else 'were'} not "
                f"ingested; each is tried again when it changes (a scan caught half-written is "
                f"ingested once complete).",
                "",
                *_table(["file", "why"], self.quarantined, limit=50),
                "",
            ]
        if not self.pairs:
            return head + "\n".join(bad)
        if self.review_links():  # bare addresses: markdown viewers link them, nothing to escape
            head += (
                f"Review them in the browser: {', '.join(self.review_links())} (start cbir "
                f"review in the workspace first; the links work while it runs).\n\n"
            )
        whole, partial = self.whole, self.partial
        if whole:
            out += ["## Whole pictures", "", *_table(WHOLE_COLUMNS, map(_whole, whole), limit), ""]
        if partial:
            out += [
                "## Partial copies",
                "",
                f"{counted(len(partial), 'pair')} where one picture is a detail of the other "
                f"(geometric verification): `covers` is the share of the whole picture the "
                f"detail shows; the review screen outlines where"
                + (f" ({self.review_url}?relation=partial)." if self.review_url else "."),
                "",
                *_table(PARTIAL_COLUMNS, map(_partial, partial), limit),
                "",
            ]
        sql = " ".join(NEW_PAIRS_SQL.split())
        query = f"\nQuery: `{sql}` with ({self.since_run}, {self.run_id})\n"
        return head + "\n".join(out + bad) + query


def _table(columns: list[str], rows: Iterable[Sequence[Any]], limit: int) -> list[str]:
    """A markdown table of at most `limit` rows, and how many more there are."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    listed = list(rows)
    out += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in listed[:limit]]
    if len(listed) > limit:
        out += ["", f"... and {len(listed) - limit} more (see the catalogue)"]
    return out


def _whole(r: dict[str, Any]) -> list[Any]:
    # the verification columns are absent from a report read before verification existed
    full = "same picture"
    if on_margin(r.get("relation"), r.get("covered")):
        full = "same picture, one on a blank margin"
    check = {"full": f"{full} ({r.get('inliers')} points)", "none": "not confirmed"}
    return [r["new_run"], r["new_path"], r["match_path"], r["score"], r["kind"],
            r["master_path"], check.get(r.get("relation") or "", "")]  # fmt: skip


def _partial(r: dict[str, Any]) -> list[Any]:
    covers = "?" if r["covered"] is None else f"{r['covered'] * 100:.0f} %"
    return [r["new_run"], r["detail_path"], r["whole_path"], covers, r["inliers"], r["score"]]


def _cell(v: Any) -> str:
    return md_cell(v)  # a file name may hold HTML, markdown, line breaks, control characters


def review_url(settings: Settings) -> str:
    """Where `cbir review` serves with the workspace's settings (a wildcard address is reached
    on this machine as 127.0.0.1)."""
    host = settings.review.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.review.port}/" if settings.review.port else ""


def nightly_report(settings: Settings, run_id: int, since_run: int) -> NightlyReport:
    """Report the duplicate pairs of the images that arrived in ingest runs (since_run, run_id],
    into `reports/nightly/run-<run_id>.md`, and close the pending report (begin_nightly)."""
    folder = layout(settings).nightly
    cols, rows = query(settings, NEW_PAIRS_SQL, [since_run, run_id])
    _, quarantined = query(settings, QUARANTINED_SQL, [since_run, run_id])
    file = report_file(folder, run_id)
    report = NightlyReport(
        run_id=run_id,
        since_run=since_run,
        columns=cols,
        pairs=rows,
        file=file,
        review_url=review_url(settings),
        quarantined=[(str(p), str(r)) for p, r in quarantined],
    )
    write_text(report.markdown(limit=1000), file)
    faults.point("nightly.reported")
    (folder / PENDING).unlink(missing_ok=True)
    return report


# --------------------------------------------------------------------------- DVC


@dataclass
class DvcRecord:
    root: Path | None
    committed: bool = False
    pushed: bool = False
    messages: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"dvc: {m}" for m in self.messages]


class DvcLocked(RuntimeError):
    """DVC's repository lock is busy: a transient failure (tasks retry it)."""


def dvc_workspace(settings: Settings) -> tuple[Path | None, str]:
    """The DVC repository whose dvc.yaml describes this workspace, or None and why not."""
    root = dvc_root(settings.root)
    if root is None:
        return None, f"{settings.root} is not in a DVC repository"
    if not (settings.root / "dvc.yaml").is_file():
        return None, f"no dvc.yaml beside {settings.params_path}"
    if settings.params_path.name != "params.yaml":
        return None, f"dvc.yaml reads params.yaml, not {settings.params_path.name}"
    return root, ""


def _dvc(args: list[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env
    )
    if out.returncode != 0 and check:
        text = (out.stderr or out.stdout).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # DVC warns first (an empty output folder) and says what failed after
        first = next(
            (ln for ln in lines if ln.startswith("ERROR")), lines[0] if lines else "failed"
        )
        if "does not exist" in first:  # an output no step has written yet (never trained)
            first += "; every stage's outputs must exist to be recorded: run `dvc repro` once"
        if "Unable to acquire lock" in text:
            raise DvcLocked(
                f"`dvc {' '.join(args)}`: another DVC command holds the repository lock in {cwd}"
            )
        raise CbirError(f"`dvc {' '.join(args)}` failed in {cwd}: {first}")
    return out


def record_with_dvc(settings: Settings, *, push: bool = True) -> DvcRecord:
    """`dvc commit -f` the pipeline's outputs, so that `dvc status` is clean afterwards, and
    `dvc push` them when a default remote is configured. Nothing when the workspace is not a
    DVC project (the reason is in the record)."""
    root, why = dvc_workspace(settings)
    rec = DvcRecord(root=root)
    if root is None:
        rec.messages.append(f"not recorded: {why}")
        return rec
    if not layout(settings).checkpoint.is_file():  # built with --no-train: no train stage output
        rec.messages.append(
            "not recorded: no trained model yet; `dvc repro` in the workspace trains and "
            "records every stage"
        )
        return rec
    cwd = settings.root
    # the decisions stage's output, before anyone decided (a workspace built before the stage)
    ensure_decisions_folder(layout(settings).decisions_dir)
    _dvc(["commit", "-f"], cwd)  # not --quiet: DVC then says nothing of why it failed
    rec.committed = True
    rec.messages.append(f"outputs committed (dvc.lock in {cwd})")
    if push:
        default = _dvc(["remote", "default"], cwd, check=False)
        remote = default.stdout.strip() if default.returncode == 0 else ""
        if remote:
            _dvc(["push", "--quiet"], cwd)
            rec.pushed = True
            rec.messages.append(f"pushed to remote {remote}")
        else:
            rec.messages.append("no default DVC remote: nothing pushed")
    return rec
