"""`cbir query`: the nearest images of the collection to image files, inside it or not.

With search.verify, the top search.verify_top candidates of the descriptor are checked with
local features (cbir.verify) and re-ranked (`rerank`): verified ones first, most inliers first,
then the others in the descriptor's order. The candidates' features come from the workspace's
cache (cbir.store.features), extracted and added there when missing; the query's own are
extracted each time (its cost is reported apart: `QueryResult.features_seconds`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .. import verify
from ..config import Settings
from ..fsutil import write_text
from ..imaging import ImageRejected, not_regular
from ..model import pick_device, retrieval_model
from ..probe import sha256_of
from ..regions import Candidate
from ..safetext import counted
from ..store.features import extract_file, feature_cache, features_of, scan_files
from ..store.index import open_searcher
from ..store.layout import layout
from ..store.local import open_local
from ..store.manifest import PRESENT, load_manifest
from ..store.user_csv import csv_target, csv_text
from ..walk import walk_scans
from .calibrate import current_pair_threshold
from .embed import embed_files

#: QueryResult.verdict's values, from the surest to the least.
VERDICTS = (
    "in the collection",
    "exact copy",
    "near-duplicate",
    "no match",
    "not an image",
    "error",
)


@dataclass
class QueryResult:
    query: str
    neighbours: list[tuple[str, str, float]] = field(default_factory=list)  # id, path, score
    # beside each neighbour: which search found it, its best region's box (cbir.regions)
    candidates: list[Candidate] = field(default_factory=list)
    exact_copies_of: list[str] = field(default_factory=list)  # manifest paths, same bytes
    error: str | None = None
    # aligned with `neighbours`: the geometric verification of each (None: not checked)
    verification: list[verify.Match | None] = field(default_factory=list)
    features_seconds: float = 0.0  # the query's own local features
    verify_seconds: float = 0.0  # its candidates' features (cache) and their verification
    # `cbir pairs`' threshold for this model and its source (None: not calibrated for it)
    threshold: tuple[float, str] | None = None
    itself: str | None = None  # the manifest path that is this very file (a scan queried)
    not_image: bool = False  # the error: no decoder recognises the content

    @property
    def verdict(self) -> str:
        """What the file is to the collection, for a table of many queries: one of VERDICTS."""
        if self.error is not None:
            return "not an image" if self.not_image else "error"
        if self.itself is not None:
            return "in the collection"
        if self.exact_copies_of:
            return "exact copy"
        if any(self.near(i) for i in range(len(self.neighbours))):
            return "near-duplicate"
        return "no match"

    def near(self, i: int) -> bool:
        """Whether neighbour `i` is a near-duplicate by `cbir pairs`' rule: at or above the
        pair threshold, or confirmed by local features. One found by the query turned
        (search.query_turns) only when confirmed: the threshold was calibrated on upright
        pictures, and the best of four orientations scores a stranger higher."""
        m = self.verification[i] if i < len(self.verification) else None
        if m is not None and m.verified:
            return True
        if i < len(self.candidates) and self.candidates[i].turned:
            return False
        return self.threshold is not None and self.neighbours[i][2] >= self.threshold[0]


def rerank(
    candidates: Sequence[tuple[str, float]], matches: Sequence[verify.Match | None]
) -> list[int]:
    """The order of (image_id, score) candidates after verification: the verified ones first,
    most inliers first, then the others in their given (descriptor) order. `matches` may be
    shorter than `candidates` (only the top were checked)."""

    def key(i: int) -> tuple[int, int, int]:
        m = matches[i] if i < len(matches) else None
        return (0, -m.inliers, i) if m is not None and m.verified else (1, 0, i)

    return sorted(range(len(candidates)), key=key)


#: Orientations a query is searched in (search.query_turns): upright, and turned by 90, 180 and
#: 270 degrees anticlockwise.
TURNS = 4


def _best_turns(
    per_turn: list[list[list[Candidate]]], depth: int, gate: float | None
) -> list[list[Candidate]]:
    """Per query, its upright candidates joined by those a turn scored at least the gate
    (the pair threshold; None: the upright search's best): each image once, with the turn
    that scored it best (the upright one on a tie), best first, at most `depth`. The best of
    four orientations scores strangers higher too (a halftone's third neighbour 0.963 turned
    0.977), so below the gate a turned match would push upright ones down the list."""
    out = []
    for q in range(len(per_turn[0])):
        upright = per_turn[0][q]
        floor = gate if gate is not None else max((c.score for c in upright), default=-1.0)
        best = {c.image_id: c for c in upright}
        for t, found in enumerate(per_turn[1:], start=1):
            for c in found[q]:
                if c.score >= floor and (
                    c.image_id not in best or c.score > best[c.image_id].score
                ):
                    best[c.image_id] = replace(c, turned=t)
        out.append(sorted(best.values(), key=lambda c: -c.score)[:depth])
    return out


class Querier:
    """The collection opened once (the model, the index, the manifest's contents) for the
    queries of many files, asked a batch at a time (`cbir query` of a folder)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, self.pp, fp, _ = retrieval_model(settings)
        self.searcher = open_searcher(settings, fingerprint=fp)
        self.local = open_local(settings)
        self.threshold = current_pair_threshold(settings, fp, len(self.searcher.image_ids))
        self.scans = layout(settings).scans
        manifest = load_manifest(settings, ["sha256", "path", "status"])
        # the present files' contents, kept in Arrow and searched for a batch's exact copies
        # (a dictionary of every file took 1.6-1.7 s at 10^6 files, a batch's search 0.06 s)
        self.files = manifest.filter(pc.is_in(manifest["status"], pa.array(PRESENT))).select(
            ["sha256", "path"]
        )

    def exact_copies(self, shas: Sequence[str | None]) -> dict[str, list[str]]:
        """The collection's present files with each of these contents (SHA-256), by content."""
        asked = [s for s in shas if s]
        if not asked:
            return {}
        hit = self.files.filter(pc.is_in(self.files["sha256"], pa.array(asked)))
        out: dict[str, list[str]] = {}
        for sha, path in zip(hit["sha256"].to_pylist(), hit["path"].to_pylist(), strict=True):
            out.setdefault(sha, []).append(path)
        return out

    def __call__(self, paths: Sequence[Path], k: int = 10) -> list[QueryResult]:
        """Top-k neighbours of image files (inside or outside the collection): with
        embed.regions, the union of the global and the regional search (Searcher.candidates),
        and with search.local_candidates, of the pictures the query's keypoints vote for
        (cbir.votes)."""
        settings, s, threshold = self.settings, self.searcher, self.threshold
        results = [
            QueryResult(query=str(p), error=_unreadable(p), threshold=threshold) for p in paths
        ]
        todo = [i for i, r in enumerate(results) if r.error is None]
        files = [os.fsencode(paths[i]) for i in todo]
        turns = TURNS if settings.search.query_turns else 1
        done, vectors, failed = embed_files(
            self.model,
            files,
            self.pp,
            batch_size=settings.embed.batch_size,
            workers=0,
            device=pick_device(settings.embed.device),
            max_pixels=settings.ingest.max_pixels,
            turns=turns,
        )
        done = [todo[i] for i in done]
        for i, why in failed:
            results[todo[i]].error = f"cannot be read: {why}"
            results[todo[i]].not_image = why.startswith("not an image")
        top = settings.search.verify_top if settings.search.verify else 0
        if not done:
            return results
        # the query's own local features: voted with (search.local_candidates), then verified
        own = _own_features(settings, [results[i] for i in done], [paths[i] for i in done], top)
        voted = (
            self.local.votes(own, settings.search.local_candidates) if self.local and own else None
        )
        depth = max(k, top)
        if turns == 1:
            found = s.candidates(vectors, depth, voted)
        else:  # the upright query votes; every turn searches
            each = [
                s.candidates(vectors[:, t], depth, voted if t == 0 else None) for t in range(turns)
            ]
            found = _best_turns(each, depth, threshold[0] if threshold is not None else None)
        shas = [sha256_of(os.fsencode(paths[i])) for i in done]
        copies = self.exact_copies(shas)
        for row, cands in enumerate(found):
            res = results[done[row]]
            res.exact_copies_of = sorted(copies.get(shas[row] or "", []))
            res.itself = next(
                (p for p in res.exact_copies_of if _same_file(paths[done[row]], self.scans / p)),
                None,
            )
            res.candidates = cands
            res.neighbours = [(c.image_id, s.path_of.get(c.image_id, "?"), c.score) for c in cands]
        if own is not None and top:
            verify_results(settings, [results[i] for i in done], own, top)
        for i in done:
            res = results[i]
            res.neighbours = res.neighbours[:k]
            res.candidates = res.candidates[:k]
            res.verification = res.verification[:k]
        return results


def query_images(settings: Settings, paths: list[Path], k: int = 10) -> list[QueryResult]:
    """Top-k neighbours of image files (Querier, opened for them alone)."""
    return Querier(settings)(paths, k)


#: Files a Querier is asked at a time by `cbir query` of many (their local features are held
#: together: about 0.1-1 MB a file).
QUERY_BATCH = 32

#: A query table's columns: a row per neighbour (rank 0: a file of the collection with the
#: query's very bytes), or one for a file that could not be read (its reason in `check`).
TABLE_COLUMNS = ("query", "verdict", "rank", "near", "score", "path", "image_id", "check")


class QueryTable:
    """`cbir query --csv`: every queried file's neighbours, one row each, written at the end
    (whole, atomically; the target is checked first, before any work)."""

    def __init__(self, settings: Settings, file: str | os.PathLike[str]) -> None:
        self.target = csv_target(settings, file, ",".join(TABLE_COLUMNS))
        self.rows: list[dict[str, object]] = []

    def add(self, res: QueryResult) -> None:
        head = {"query": res.query, "verdict": res.verdict}
        if res.error is not None:
            self.rows.append({**head, "check": res.error})
            return
        for path in res.exact_copies_of:
            same = "this very file" if path == res.itself else "the same bytes"
            self.rows.append(
                {**head, "rank": 0, "near": 1, "score": "1.0000", "path": path, "check": same}
            )
        for i, (image_id, path, score) in enumerate(res.neighbours):
            m = res.verification[i] if i < len(res.verification) else None
            self.rows.append(
                {
                    **head,
                    "rank": i + 1,
                    "near": int(res.near(i)),
                    "score": f"{score:.4f}",
                    "path": path,
                    "image_id": image_id,
                    "check": describe(m, "it"),
                }
            )

    def write(self) -> Path:
        write_text(csv_text(TABLE_COLUMNS, self.rows), self.target)
        return self.target


@dataclass(frozen=True)
class QueryFile:
    """A file to query: named on the command line, or found in a folder that was."""

    path: Path
    in_folder: bool = False


def query_files(names: Sequence[Path], ignore: Sequence[str]) -> list[QueryFile]:
    """The files `cbir query` asks about, in order: each named file, and every file under each
    named folder (recursively, in name order, skipping data.ingest.ignore's names as ingest
    does). A named path that is neither is kept: its query says why it cannot be read."""
    out: list[QueryFile] = []
    for name in names:
        if not name.is_dir():
            out.append(QueryFile(name))
            continue
        root = os.fsencode(name)
        for entry in walk_scans(name, list(ignore)):
            out.append(QueryFile(Path(os.fsdecode(os.path.join(root, entry.raw))), True))
    return out


def _own_features(
    settings: Settings, results: Sequence[QueryResult], paths: Sequence[Path], top: int
) -> list[verify.Features | None] | None:
    """Each query file's local features (timed into its result), extracted once for the votes
    (search.local_candidates) and the verification of the `top` candidates; None when
    neither asks for them."""
    if settings.search.local_candidates <= 0 and top <= 0:
        return None
    out: list[verify.Features | None] = []
    for res, path in zip(results, paths, strict=True):
        t0 = time.perf_counter()
        try:
            out.append(extract_file(path, settings.ingest.max_pixels))
        except (ImageRejected, OSError):  # embedded, so readable: a file changed since
            out.append(None)
        res.features_seconds = time.perf_counter() - t0
    return out


def verify_results(
    settings: Settings,
    results: Sequence[QueryResult],
    own: Sequence[verify.Features | None],
    top: int,
) -> None:
    """Verify each result's top candidates against its query's features (`own`; None: the
    file could not be read) and re-rank its neighbours."""
    cache = feature_cache(settings)
    files = scan_files(
        settings, {image_id for r in results for image_id, _, _ in r.neighbours[:top]}
    )
    for res, q in zip(results, own, strict=True):
        if q is None:
            res.verification = [None] * len(res.neighbours)
            continue
        t1 = time.perf_counter()
        cands = res.neighbours[:top]
        feats = features_of(cache, [c[0] for c in cands], files, settings.ingest.max_pixels)
        matches: list[verify.Match | None] = list(verify.verify_many(q, feats))
        for j, f in enumerate(feats):
            if f is None:
                matches[j] = None  # its scan could not be read: not checked
        order = rerank([(c[0], c[2]) for c in cands], matches)
        res.neighbours = [cands[j] for j in order] + res.neighbours[top:]
        if res.candidates:  # which search found each follows its neighbour
            res.candidates = [res.candidates[j] for j in order] + res.candidates[top:]
        res.verification = [matches[j] for j in order] + [None] * len(res.neighbours[top:])
        res.verify_seconds = time.perf_counter() - t1


def describe(match: verify.Match | None, other: str) -> str:
    """How an archivist reads a verification, `other` naming the collection's picture."""
    if match is None:
        return ""
    points = counted(match.inliers, "matching point")
    if not match.verified:
        return f"not confirmed by local features ({points})"
    box = ""
    if match.box is not None:
        x0, y0, x1, y1 = match.box
        box = f", box {x0},{y0}\u2013{x1},{y1}"
    pct = f"{match.covered:.0%}".replace("%", " %")
    flip = ", mirrored" if match.mirrored else ""  # one is the other flipped left-right
    if match.relation == "a_in_b":
        return f"detail of {other}{flip} (covers {pct} of it{box}; {points})"
    if match.relation == "b_in_a":
        return f"{other} is a detail of the query{flip} (covers {pct} of the query{box}; {points})"
    if match.on_margin:
        if match.box_on == "b":
            return (
                f"same picture as {other}{flip}, which adds a blank margin ({pct} of it is the "
                f"picture{box}; {points})"
            )
        return (
            f"same picture as {other}{flip}; the query adds a blank margin ({pct} of the query "
            f"is the picture{box}; {points})"
        )
    return f"same picture as {other}{flip} (confirmed by {points})"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _unreadable(path: Path) -> str | None:
    """Why a query file cannot be opened, or None. Only regular files are opened: a FIFO or a
    device would block the read forever (imaging.open_regular guards every open too)."""
    return not_regular(path)
