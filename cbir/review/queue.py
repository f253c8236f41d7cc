"""What the review server reads: pages of the queue, progress, a cluster and its links.

Everything goes through one `catalog.connect` connection (read only, guarded) held by `Queue`.
The queue is paged by keyset: each page asks for the rows after the last one's sort key, with a
LIMIT, so a million pairs are never loaded whole and a page deep in the queue costs what the
first does. Its order is what helps most: pairs new in the latest ingest runs first (highest
`new_run`), then those whose score lies nearest the pair threshold (the least certain), then
the pair's ids (a total order, so paging neither skips nor repeats a pair).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from ..errors import CbirError
from ..fsutil import file_stamps
from ..linkage import DisjointSets
from ..store import catalog, decisions
from ..store.layout import layout
from ..store.pairs import PARTIAL, current_cluster_ids, on_margin
from ..store.tables import one_line

if TYPE_CHECKING:
    from ..config import Settings

#: What the decision filter may ask for; the queue shows undecided pairs unless asked.
DECISION_FILTERS = ("undecided", "same", "different", "unsure", "decided", "all")
#: What the verification filter may ask for (any, when not given): the condition on the
#: queue's rows (`p`) of each.
RELATION_FILTERS = {
    "partial": f"p.relation IN ({', '.join(repr(r) for r in PARTIAL)})",
    "full": "p.relation = 'full'",
    "none": "p.relation = 'none'",
    "unchecked": "p.relation IS NULL",
}
PAGE_DEFAULT = 50
PAGE_MAX = 500
MAX_MEMBERS = 1000  # members shown of one cluster
MAX_LINKS = 5000  # links shown of one cluster (the strongest)
_RUN_MAX = 2**31 - 1
T = TypeVar("T")


class BadRequest(CbirError):
    """A query parameter that cannot be used: the server answers 400 with this line."""


def _float(q: Mapping[str, str], key: str) -> float | None:
    text = q.get(key, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{key} must be a number, not {text[:40]!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number")
    return value


def _int(q: Mapping[str, str], key: str) -> int | None:
    text = q.get(key, "").strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 10 or int(text) > _RUN_MAX:
        raise BadRequest(f"{key} must be a whole number from 0 to {_RUN_MAX}, not {text[:40]!r}")
    return int(text)


@dataclass(frozen=True)
class Filters:
    """Which pairs the queue shows (the review screen's filters, from the URL)."""

    score_min: float | None = None
    score_max: float | None = None
    cluster: int | None = None
    folder: str = ""  # a path prefix: either side's path starts with it
    decision: str = "undecided"
    run: int | None = None  # pairs new in this ingest run (the nightly report's link)
    relation: str = ""  # a key of RELATION_FILTERS (what verification found), "": any

    @classmethod
    def parse(cls, q: Mapping[str, str]) -> Filters:
        decision = q.get("decision", "").strip() or "undecided"
        if decision not in DECISION_FILTERS:
            raise BadRequest(f"decision must be one of {', '.join(DECISION_FILTERS)}")
        relation = q.get("relation", "").strip()
        if relation and relation not in RELATION_FILTERS:
            raise BadRequest(f"relation must be one of {', '.join(RELATION_FILTERS)}")
        folder = q.get("folder", "")
        if len(folder) > 4096:
            raise BadRequest("folder is longer than 4096 characters")
        return cls(
            score_min=_float(q, "min"),
            score_max=_float(q, "max"),
            cluster=_int(q, "cluster"),
            folder=folder,
            decision=decision,
            run=_int(q, "run"),
            relation=relation,
        )

    def where(self, *, with_decision: bool = True) -> tuple[list[str], list[Any]]:
        """SQL conditions on the queue's rows (`p`) and their decisions (`d`), and their
        parameters."""
        cond: list[str] = []
        params: list[Any] = []
        if self.score_min is not None:
            cond.append("p.score >= ?")
            params.append(self.score_min)
        if self.score_max is not None:
            cond.append("p.score <= ?")
            params.append(self.score_max)
        if self.run is not None:
            cond.append("p.run_key = ?")
            params.append(self.run)
        if self.folder:
            cond.append("(starts_with(p.path_a, ?) OR starts_with(p.path_b, ?))")
            params += [self.folder, self.folder]
        if self.cluster is not None:
            cond.append("p.cluster_id = ?")  # both images in it
            params.append(self.cluster)
        if self.relation:
            cond.append(RELATION_FILTERS[self.relation])
        if with_decision:
            if self.decision == "undecided":
                cond.append("d.decision IS NULL")
            elif self.decision == "decided":
                cond.append("d.decision IS NOT NULL")
            elif self.decision != "all":
                cond.append("d.decision = ?")
                params.append(self.decision)
        return cond, params


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the sort key of its last row (sent back as `after`)."""

    run: int
    dist: float
    a: str
    b: str

    def text(self) -> str:
        return f"{self.run}~{self.dist!r}~{self.a}~{self.b}"

    @classmethod
    def parse(cls, text: str) -> Cursor | None:
        if not text:
            return None
        parts = text.split("~")
        try:
            if len(parts) != 4 or len(parts[2]) > 64 or len(parts[3]) > 64:
                raise ValueError
            return cls(int(parts[0]), float(parts[1]), parts[2], parts[3])
        except ValueError:
            raise BadRequest("after is not a cursor this server gave") from None


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description or ()]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}


_CLUSTER_OF = "(SELECT image_id, min(cluster_id) AS cluster_id FROM clusters GROUP BY image_id)"
# The near pairs (exact copies are byte-identical: nothing to decide) as `pair_report` shows
# them, with the pair's key in the decisions' order (ka < kb), the queue's sort key (run_key,
# dist) and the cluster that holds both images (a pair between two clusters belongs to neither).
_QUEUE_TABLE = """
CREATE OR REPLACE TEMP TABLE review_queue AS
SELECT r.*, least(r.image_a, r.image_b) AS ka, greatest(r.image_a, r.image_b) AS kb,
       coalesce(r.new_run, 0) AS run_key, abs(r.score - {threshold}) AS dist,
       {cluster} AS cluster_id
FROM pair_report r {cluster_join}
WHERE r.kind = 'near'
ORDER BY run_key DESC, dist, ka, kb
"""
_WITH_CLUSTERS = {
    "cluster": "CASE WHEN ca.cluster_id = cb.cluster_id THEN ca.cluster_id END",
    "cluster_join": f"LEFT JOIN {_CLUSTER_OF} ca ON ca.image_id = r.image_a "
    f"LEFT JOIN {_CLUSTER_OF} cb ON cb.image_id = r.image_b",
}
_NO_CLUSTERS = {"cluster": "NULL::INTEGER", "cluster_join": ""}
# each queued pair with its current decision
_ROWS = """
SELECT p.*, d.decision, d.master AS decided_master, d.note AS decided_note, d.decision_id,
       d.reviewer AS decided_by
FROM review_queue p LEFT JOIN decisions d ON d.image_a = p.ka AND d.image_b = p.kb
"""

_SHOWN = (
    "image_a", "image_b", "path_a", "path_b", "score", "kind", "width_a", "height_a",
    "width_b", "height_b", "bytes_a", "bytes_b", "format_a", "format_b", "arrived_a",
    "arrived_b", "master_path", "master_reason", "new_run", "cluster_id", "decision",
    "decided_master", "decided_note", "decision_id", "decided_by",
    # geometric verification (null: not checked): the box is on side box_on, in its pixels
    "relation", "inliers", "covered", "detail_path", "whole_path", "box_on", "box_x0",
    "box_y0", "box_x1", "box_y1",
)  # fmt: skip


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in _SHOWN}
    out["master"] = r["image_a"] if r.get("master_path") == r["path_a"] else r["image_b"]
    # the same picture, one on a blank margin of the other (box_on): decided here, not in the page
    out["on_margin"] = on_margin(r.get("relation"), r.get("covered"))
    out["key"] = Cursor(int(r["run_key"]), float(r["dist"]), r["ka"], r["kb"]).text()
    return out


def _condition_sql(cond: list[str]) -> str:
    return ("WHERE " + " AND ".join(cond)) if cond else ""


class Queue:
    """The server's one guarded catalogue connection (`catalog.connect`: read only, sandboxed)
    and the queue's pairs in a temporary table of it, sorted once.

    Joining a million pairs to their files costs seconds; the table makes a page a scan of
    memory plus the join with the current decisions (read afresh by every query, so a decision
    another tab or `cbir decide` recorded a moment ago is seen). The table is made again when
    the pairs, clusters or manifest change on disk or the threshold does (a `cbir pairs` or
    `calibrate` while the server runs), and the connection is opened again when the decisions
    log gets its first part (a view over no part reads none). Requests take turns on it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.stamp: tuple[Any, ...] | None = None
        self.views: set[str] = set()

    def _stamp(self, threshold: float) -> tuple[Any, ...]:
        lay = layout(self.settings)
        files = file_stamps(
            (lay.pairs, lay.pairs_state, lay.exact, lay.clusters, lay.files, lay.runs)
        )
        return (threshold, bool(decisions.parts(lay.decisions_dir)), *files)

    def _open(self, threshold: float) -> duckdb.DuckDBPyConnection:
        stamp = self._stamp(threshold)
        if self.con is not None and stamp == self.stamp:
            return self.con
        self.close()
        con = catalog.connect(self.settings)
        try:
            views = _views(con)
            if "pair_report" not in views:
                raise CbirError("no pairs in the catalogue: run `cbir pairs` first")
            parts = _WITH_CLUSTERS if "clusters" in views else _NO_CLUSTERS
            con.execute(_QUEUE_TABLE.format(threshold=repr(float(threshold)), **parts))
        except BaseException:
            con.close()
            raise
        self.con, self.stamp, self.views = con, stamp, views
        return con

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
        self.con, self.stamp = None, None

    def run(self, threshold: float, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`work` on the connection, its table current; once more on a fresh one when the
        files changed under the query (a compaction of the decisions log)."""
        with self.lock:
            for attempt in (1, 2):
                con = self._open(threshold)
                try:
                    return work(con)
                except duckdb.IOException:
                    self.close()
                    if attempt == 2:
                        raise
                except duckdb.Error as exc:
                    raise CbirError(f"cannot read the catalogue: {one_line(exc)}") from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ what the server asks
    def page(
        self, threshold: float, filters: Filters, after: Cursor | None = None,
        limit: int = PAGE_DEFAULT,
    ) -> dict[str, Any]:  # fmt: skip
        """One page of the queue: `rows` (at most `limit`) after `after`, and `next`, the
        cursor of the following page (None at the end)."""
        limit = max(1, min(limit, PAGE_MAX))
        cond, params = filters.where()
        if after is not None:
            cond.append(
                "(p.run_key < ? OR (p.run_key = ? AND (p.dist > ? OR (p.dist = ? AND "
                "(p.ka > ? OR (p.ka = ? AND p.kb > ?))))))"
            )
            params += [after.run, after.run, after.dist, after.dist, after.a, after.a, after.b]
        sql = f"{_ROWS} {_condition_sql(cond)} ORDER BY p.run_key DESC, p.dist, p.ka, p.kb LIMIT ?"
        rows = self.run(threshold, lambda con: _dicts(con.execute(sql, [*params, limit + 1])))
        shown = [_shown(r) for r in rows[:limit]]
        return {"rows": shown, "next": shown[-1]["key"] if len(rows) > limit else None}

    def progress(self, threshold: float, filters: Filters) -> dict[str, int]:
        """How many pairs the filters (all but the decision filter) select, and how many of
        them have a current decision."""
        cond, params = filters.where(with_decision=False)
        sql = f"SELECT count(*), count(d.decision) {_ROWS[_ROWS.index('FROM') :]} "
        sql += _condition_sql(cond)
        row = self.run(threshold, lambda con: con.execute(sql, params).fetchone())
        total, reviewed = (int(row[0]), int(row[1])) if row else (0, 0)
        return {"total": total, "reviewed": reviewed, "remaining": total - reviewed}

    def pair(self, threshold: float, a: str, b: str) -> dict[str, Any] | None:
        """The near pair of images `a` and `b` (paths, score), or None."""
        ka, kb = min(a, b), max(a, b)
        rows = self.run(threshold, lambda con: _dicts(con.execute(
            "SELECT image_a, image_b, path_a, path_b, score FROM review_queue "
            "WHERE ka = ? AND kb = ? ORDER BY score DESC LIMIT 1", [ka, kb])))  # fmt: skip
        return rows[0] if rows else None

    def logged(self, threshold: float, decision_id: str) -> dict[str, Any] | None:
        """One row of the decisions log by its id, or None."""
        rows = self.run(threshold, lambda con: _dicts(con.execute(
            "SELECT image_a, image_b, path_a, path_b, decision, score, model FROM decision_log "
            "WHERE decision_id = ? LIMIT 1", [decision_id])))  # fmt: skip
        return rows[0] if rows else None

    def scan_file(self, threshold: float, image_id: str) -> dict[str, Any] | None:
        """A present file of image `image_id` (the canonical one first) as the manifest has
        it."""
        sql = (
            "SELECT path, path_raw, bytes, mtime_ns FROM files WHERE image_id = ? AND status "
            "IN ('ok', 'duplicate') ORDER BY is_canonical DESC, path LIMIT 1"
        )
        rows = self.run(threshold, lambda con: _dicts(con.execute(sql, [image_id])))
        return rows[0] if rows else None

    def clusters(self, threshold: float, limit: int = 200) -> list[dict[str, Any]]:
        """The largest clusters (the cluster view's index)."""

        def work(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            if "cluster_report" not in self.views:
                return []
            return _dicts(con.execute(
                "SELECT cluster_id, size, weakest_link, master_path FROM cluster_report "
                "ORDER BY size DESC, cluster_id LIMIT ?", [limit]))  # fmt: skip

        return self.run(threshold, work)

    def cluster(
        self, threshold: float, cluster_id: int, link_threshold: float | None
    ) -> dict[str, Any]:
        """A cluster's members, its links (the near pairs inside it at or above
        `link_threshold`, the strongest first) with their current decisions, and the
        components left when the links decided `different` are cut."""

        def work(con: duckdb.DuckDBPyConnection) -> tuple[list[Any], list[Any]]:
            if "clusters" not in self.views:
                raise BadRequest("no clusters in the catalogue: run `cbir pairs` first")
            members = _dicts(con.execute(
                "SELECT c.image_id, c.path, i.width, i.height, i.bytes, i.format "
                "FROM clusters c LEFT JOIN images i ON i.image_id = c.image_id "
                "WHERE c.cluster_id = ? ORDER BY c.path LIMIT ?",
                [cluster_id, MAX_MEMBERS + 1]))  # fmt: skip
            links = _dicts(con.execute(
                """
                SELECT p.image_a, p.image_b, p.path_a, p.path_b, p.score, d.decision,
                       d.decision_id
                FROM duplicate_pairs p
                JOIN clusters ca ON ca.image_id = p.image_a AND ca.cluster_id = ?
                JOIN clusters cb ON cb.image_id = p.image_b AND cb.cluster_id = ?
                LEFT JOIN decisions d ON d.image_a = least(p.image_a, p.image_b)
                                     AND d.image_b = greatest(p.image_a, p.image_b)
                WHERE p.kind = 'near' AND p.score >= ?
                ORDER BY p.score DESC, p.image_a, p.image_b LIMIT ?
                """,
                [cluster_id, cluster_id, -1.0 if link_threshold is None else link_threshold,
                 MAX_LINKS + 1]))  # fmt: skip
            return members, links

        members, links = self.run(threshold, work)
        if not members:
            given = current_cluster_ids(layout(self.settings))
            if given is not None and cluster_id >= given.next:  # a mistyped or made-up id
                raise BadRequest(
                    f"no cluster {cluster_id}: no cluster has had that id (the highest given "
                    f"is {given.next - 1}); see the clusters list"
                )
            # ids stay while a cluster is unchanged (store.pairs.CLUSTER_IDS): a bookmarked one
            # that is gone gained or lost members, or all were clustered again
            raise BadRequest(
                f"no cluster {cluster_id}: it has changed since (a cluster that gains or loses "
                "members takes a new id); see the clusters list"
            )
        return {
            "cluster_id": cluster_id,
            "members": members[:MAX_MEMBERS],
            "more_members": len(members) > MAX_MEMBERS,
            "links": links[:MAX_LINKS],
            "more_links": len(links) > MAX_LINKS,
            "components": components(members[:MAX_MEMBERS], links[:MAX_LINKS]),
        }


def components(members: list[dict[str, Any]], links: list[dict[str, Any]]) -> list[list[str]]:
    """The groups of member ids the links join, leaving out the links rejected as different;
    the largest first."""
    ids = {m["image_id"] for m in members}
    sets = DisjointSets(ids)
    for link in links:
        a, b = link["image_a"], link["image_b"]
        if link.get("decision") == "different" or a not in ids or b not in ids:
            continue
        sets.join(a, b)
    groups: dict[str, list[str]] = {}
    for m in members:
        groups.setdefault(sets.find(m["image_id"]), []).append(m["image_id"])
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
