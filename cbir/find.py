"""One call for the common case: every near-duplicate in a folder of scans.

`find_duplicates(scans)` (the `cbir find-duplicates` command) makes a workspace beside the
current folder (or reuses the one given, when it is for the same scans), then runs the pipeline
with its defaults: ingest, train, embed, index, calibrate, pairs, report, and records the result
with DVC. It is what an imagededup or fastdup user expects from one command; the workspace it
leaves behind is a normal one (`dvc repro`, `cbir nightly` and the rest work there).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings, load_settings
from .errors import CbirError, ConfigError
from .safetext import counted
from .store.layout import layout
from .store.manifest import PRESENT, why_no_images
from .workspace import init_workspace, is_workspace


@dataclass
class FindSummary:
    workspace: Path
    steps: list[tuple[str, Any]] = field(default_factory=list)  # (step, its summary)
    gallery: Path | None = None
    pairs: Path | None = None
    catalog: Path | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [line for _, s in self.steps for line in s.lines()] + [""] + self.final_lines()

    def final_lines(self) -> list[str]:
        """Where the results are (after the steps' own summaries)."""
        pairs = next((s for name, s in self.steps if name == "pairs"), None)
        out = [f"find-duplicates: done in {self.seconds / 60:.1f} min; workspace {self.workspace}"]
        if pairs is not None:
            out.append(
                f"  {counted(pairs.n_near_pairs, 'near-duplicate pair')}, "
                f"{counted(pairs.n_exact_pairs, 'exact copy', 'exact copies')}, "
                f"{counted(pairs.n_clusters, 'cluster')}"
            )
        out += [
            f"  gallery     {self.gallery} (open it in a browser)",
            f"  pair table  {self.pairs}",
            f"  catalogue   {self.catalog}   e.g. cd {self.workspace} && cbir sql "
            f'"SELECT path_a, path_b, score, master_path FROM pair_report ORDER BY score '
            f'DESC LIMIT 20"',
        ]
        return out


def default_workspace(scans: Path) -> Path:
    """`<scans folder name>-cbir` in the current folder."""
    return Path.cwd() / f"{Path(os.path.realpath(scans)).name or 'scans'}-cbir"


def _here_or_beside(scans: Path) -> tuple[Path, Settings | None]:
    """The workspace when none is given, with its settings where they were read: the current
    folder where it is a workspace (`cd archive-cbir; cbir find-duplicates ../scans`), never
    one made inside it (a git and DVC repository inside another); else default_workspace."""
    here = Path.cwd()
    if is_workspace(here):
        with contextlib.suppress(ConfigError):  # a params.yaml of something else
            return here, load_settings(here / "params.yaml")
    return default_workspace(scans), None


def find_duplicates(
    scans: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    train: bool = True,
    accept_missing: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> FindSummary:
    """init (or reuse) a workspace for `scans`, then run every step in it with the defaults
    (`accept_missing`: see run_ingest)."""
    from .environ import confined
    from .lock import writer_lock
    from .steps.calibrate import run_calibrate
    from .steps.embed import run_embed
    from .steps.evaluate import run_evaluate
    from .steps.index import run_index
    from .steps.ingest import run_ingest
    from .steps.nightly import record_with_dvc
    from .steps.pairs import run_pairs
    from .steps.report import run_report
    from .steps.train import resume_or_restart

    t0 = time.perf_counter()
    scans_path = Path(os.path.realpath(Path(scans).expanduser()))
    folder, settings = (Path(out).expanduser(), None) if out else _here_or_beside(scans_path)
    params = folder / "params.yaml"
    if settings is not None or params.exists():
        settings = settings or load_settings(params)
        have = Path(os.path.realpath(layout(settings).scans))
        if have != scans_path:
            raise CbirError(
                f"the current folder {folder} is the workspace of other scans ({have}): run "
                f"find-duplicates from outside it, or give --out"
                if folder == Path.cwd() and not out
                else f"{folder} is the workspace of other scans ({have}); choose another --out"
            )
        log(f"find-duplicates: reusing the workspace {folder} (what is up to date is not redone)")
    else:
        for line in init_workspace(folder, scans_path).lines():
            log(line)
        settings = load_settings(params)
    result = FindSummary(workspace=folder)

    def step(name: str, summary: Any) -> None:
        result.steps.append((name, summary))
        for line in summary.lines():
            log(line)

    # caches in the workspace, not in the user's home (cbir/environ.py)
    with confined(settings), writer_lock(settings, f"cbir find-duplicates {scans_path}"):
        ingested = run_ingest(settings, progress=progress, accept_missing=accept_missing)
        step("ingest", ingested)
        # nothing usable: said here, rather than as a later step's complaint about the last
        if not any(ingested.totals.get(status) for status in PRESENT):
            why = why_no_images(settings)
            raise CbirError(f"no images to compare: {why} (workspace {folder})")
        if train:
            step("train", resume_or_restart(settings, progress=progress, log=log))
        step("embed", run_embed(settings, progress=progress))
        step("index", run_index(settings))
        step("calibrate", run_calibrate(settings, progress=progress))
        step("pairs", run_pairs(settings, progress=progress))
        if settings.data.ground_truth is not None:  # labels.csv: empty until someone labels
            step("evaluate", run_evaluate(settings, progress=progress))
        step("report", run_report(settings, progress=progress))
        # every stage of dvc.yaml ran where a model was trained: recorded as `dvc repro` would
        step("dvc", record_with_dvc(settings, push=False))
    lay = layout(settings)
    result.gallery = lay.gallery / "index.html"
    result.pairs = lay.pairs
    result.catalog = lay.catalog
    result.seconds = time.perf_counter() - t0
    return result
