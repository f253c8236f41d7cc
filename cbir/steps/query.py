"""`cbir query`: the nearest images of the collection to image files, inside it or not."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..imaging import not_regular
from ..model import pick_device, retrieval_model
from ..probe import sha256_of
from ..regions import Candidate
from ..store.index import open_searcher
from ..store.manifest import PRESENT, load_manifest
from .embed import embed_files


@dataclass
class QueryResult:
    query: str
    neighbours: list[tuple[str, str, float]] = field(default_factory=list)  # id, path, score
    # beside each neighbour: which search found it, its best region's box (cbir.regions)
    candidates: list[Candidate] = field(default_factory=list)
    exact_copies_of: list[str] = field(default_factory=list)  # manifest paths, same bytes
    error: str | None = None


def query_images(settings: Settings, paths: list[Path], k: int = 10) -> list[QueryResult]:
    """Top-k neighbours of image files (inside or outside the collection): with embed.regions,
    the union of the global and the regional search (Searcher.candidates)."""
    model, pp, fp, _ = retrieval_model(settings)
    s = open_searcher(settings, fingerprint=fp)
    results = [QueryResult(query=str(p), error=_unreadable(p)) for p in paths]
    todo = [i for i, r in enumerate(results) if r.error is None]
    files = [os.fsencode(paths[i]) for i in todo]
    done, vectors, failed = embed_files(
        model,
        files,
        pp,
        batch_size=settings.embed.batch_size,
        workers=0,
        device=pick_device(settings.embed.device),
        max_pixels=settings.ingest.max_pixels,
    )
    done = [todo[i] for i in done]
    for i, why in failed:
        results[todo[i]].error = f"cannot be read: {why}"
    manifest = load_manifest(settings).select(["sha256", "path", "status"]).to_pylist()
    by_sha: dict[str, list[str]] = {}
    for r in manifest:
        if r["status"] in PRESENT:
            by_sha.setdefault(r["sha256"], []).append(r["path"])
    if done:
        for row, cands in enumerate(s.candidates(vectors, k)):
            res = results[done[row]]
            sha = sha256_of(os.fsencode(paths[done[row]]))
            res.exact_copies_of = sorted(by_sha.get(sha, [])) if sha else []
            res.candidates = cands
            res.neighbours = [(c.image_id, s.path_of.get(c.image_id, "?"), c.score) for c in cands]
    return results


def _unreadable(path: Path) -> str | None:
    """Why a query file cannot be opened, or None. Only regular files are opened: a FIFO or a
    device would block the read forever (imaging.open_regular guards every open too)."""
    return not_regular(path)
