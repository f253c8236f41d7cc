"""The files the report writes, by name: only names it writes are ever deleted (a user's own
file put in the gallery or plots folder stays), and a page is rewritten only when it changed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ... import plots
from ...fsutil import write_text

PAGE_NAME = re.compile(
    r"(index|evaluation)\.html|(pairs|clusters|queries)-\d{4,}\.html"
    r"|cluster-\d{5,}(-\d+)?\.html|query-\d{5,}\.html"
)
PLOT_NAME = re.compile(rf"({'|'.join(map(re.escape, plots.NAMES))})\.(png|csv)")
THUMB_NAME = re.compile(r"[0-9a-f]{16}\.jpg")


def pair_page(p: int) -> str:
    """Page `p` of the pairs, strongest first."""
    return f"pairs-{p:04d}.html"


def clusters_page(p: int) -> str:
    """Page `p` of the list of clusters, largest first."""
    return f"clusters-{p:04d}.html"


def cluster_page(cluster_id: int, p: int = 1) -> str:
    """Page `p` of a cluster's members (the first also lists its pairs)."""
    return f"cluster-{cluster_id:05d}.html" if p == 1 else f"cluster-{cluster_id:05d}-{p}.html"


def queries_page(p: int) -> str:
    """Page `p` of the list of evaluated queries, worst first."""
    return f"queries-{p:04d}.html"


def query_page(i: int) -> str:
    """The `i`-th query (1 is the worst) with its neighbours."""
    return f"query-{i:05d}.html"


def remove_stale(folder: Path, keep: Iterable[Path], own: re.Pattern[str]) -> int:
    """Delete this step's earlier outputs that this run did not write (e.g. surplus pages):
    files whose names match `own`, the names this step writes. Returns how many."""
    keep_names = {p.name for p in keep}
    n = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if own.fullmatch(p.name) and p.name not in keep_names and p.is_file():
            p.unlink()
            n += 1
    return n


def write_if_changed(text: str, target: Path) -> None:
    """An unchanged page is left alone: no write (each is fsynced), and its mtime says so."""
    try:
        if target.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text(text, target)
