"""What the review server reads: pages of the queue, progress, a cluster and its links.

Everything goes through `catalog.connect` (read only, guarded), one connection per request, so a
decision recorded a moment ago (a new part of the decisions log) is seen by the next request.
The queue is paged by keyset: each page asks for the rows after the last one's sort key, with a
LIMIT, so a million pairs are never loaded whole and a page deep in the queue costs what the
first does. Its order is what helps most: pairs new in the latest ingest runs first (highest
`new_run`), then those whose score lies nearest the pair threshold (the least certain), then
the pair's ids (a total order, so paging neither skips nor repeats a pair).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb

from ..errors import CbirError
from ..store import catalog
from ..store.tables import one_line

if TYPE_CHECKING:
    from ..config import Settings

#: What the decision filter may ask for; the queue shows undecided pairs unless asked.
DECISION_FILTERS = ("undecided", "same", "different", "unsure", "decided", "all")
PAGE_DEFAULT = 50
PAGE_MAX = 500
MAX_MEMBERS = 1000  # members shown of one cluster
MAX_LINKS = 5000  # links shown of one cluster (the strongest)
_RUN_MAX = 2**31 - 1


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

    @classmethod
    def parse(cls, q: Mapping[str, str]) -> Filters:
        decision = q.get("decision", "").strip() or "undecided"
        if decision not in DECISION_FILTERS:
            raise BadRequest(f"decision must be one of {', '.join(DECISION_FILTERS)}")
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
        )

    def where(self, *, with_decision: bool = True) -> tuple[list[str], list[Any]]:
        """SQL conditions on the queue's rows (`p`) and their parameters."""
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
            cond.append(
                "p.ka IN (SELECT image_id FROM clusters WHERE cluster_id = ?) "
                "AND p.kb IN (SELECT image_id FROM clusters WHERE cluster_id = ?)"
            )
            params += [self.cluster, self.cluster]
        if with_decision:
            if self.decision == "undecided":
                cond.append("p.decision IS NULL")
            elif self.decision == "decided":
                cond.append("p.decision IS NOT NULL")
            elif self.decision != "all":
                cond.append("p.decision = ?")
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


def _has(con: duckdb.DuckDBPyConnection, *views: str) -> set[str]:
    names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    return {v for v in views if v in names}


def _connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    con = catalog.connect(settings)
    if "pair_report" not in _has(con, "pair_report"):
        con.close()
        raise CbirError("no pairs in the catalogue: run `cbir pairs` first")
    return con


# The near pairs (exact copies are byte-identical: nothing to decide) with their sort key and
# the pair's key in the decisions' order, its current decision and its cluster.
_ROWS = """
WITH p AS (
    SELECT r.*, least(r.image_a, r.image_b) AS ka, greatest(r.image_a, r.image_b) AS kb,
           coalesce(r.new_run, 0) AS run_key, abs(r.score - ?) AS dist
    FROM pair_report r WHERE r.kind = 'near'
)
SELECT p.*, d.decision, d.master AS decided_master, d.note AS decided_note, d.decision_id,
       d.reviewer AS decided_by, {cluster} AS cluster_id
FROM p
LEFT JOIN decisions d ON d.image_a = p.ka AND d.image_b = p.kb
{cluster_join}
"""
_CLUSTER_OF = "(SELECT image_id, min(cluster_id) AS cluster_id FROM clusters GROUP BY image_id)"
# the cluster that holds both images (a pair between two clusters belongs to neither)
_CLUSTER_JOIN = (
    f"LEFT JOIN {_CLUSTER_OF} ca ON ca.image_id = p.image_a "
    f"LEFT JOIN {_CLUSTER_OF} cb ON cb.image_id = p.image_b"
)


def _rows_sql(has_clusters: bool) -> str:
    return _ROWS.format(
        cluster="CASE WHEN ca.cluster_id = cb.cluster_id THEN ca.cluster_id END"
        if has_clusters
        else "NULL::INTEGER",
        cluster_join=_CLUSTER_JOIN if has_clusters else "",
    )


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description or ()]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


_SHOWN = (
    "image_a", "image_b", "path_a", "path_b", "score", "kind", "width_a", "height_a",
    "width_b", "height_b", "bytes_a", "bytes_b", "format_a", "format_b", "first_run_a",
    "first_run_b", "master_path", "master_reason", "new_run", "cluster_id", "decision",
    "decided_master", "decided_note", "decision_id", "decided_by",
)  # fmt: skip


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in _SHOWN}
    out["master"] = r["image_a"] if r.get("master_path") == r["path_a"] else r["image_b"]
    out["key"] = Cursor(int(r["run_key"]), float(r["dist"]), r["ka"], r["kb"]).text()
    return out


def _condition_sql(cond: list[str]) -> str:
    return ("WHERE " + " AND ".join(cond)) if cond else ""


def page(
    settings: Settings,
    threshold: float,
    filters: Filters,
    after: Cursor | None = None,
    limit: int = PAGE_DEFAULT,
) -> dict[str, Any]:
    """One page of the queue: `rows` (at most `limit`) after `after`, and `next`, the cursor of
    the following page (None at the end)."""
    limit = max(1, min(limit, PAGE_MAX))
    con = _connect(settings)
    try:
        has_clusters = "clusters" in _has(con, "clusters")
        if filters.cluster is not None and not has_clusters:
            return {"rows": [], "next": None}
        cond, params = filters.where()
        if after is not None:
            cond.append(
                "(p.run_key < ? OR (p.run_key = ? AND (p.dist > ? OR (p.dist = ? AND "
                "(p.ka > ? OR (p.ka = ? AND p.kb > ?))))))"
            )
            params += [after.run, after.run, after.dist, after.dist, after.a, after.a, after.b]
        sql = (
            f"SELECT * FROM ({_rows_sql(has_clusters)}) p {_condition_sql(cond)} "
            "ORDER BY p.run_key DESC, p.dist, p.ka, p.kb LIMIT ?"
        )
        rows = _dicts(con.execute(sql, [threshold, *params, limit + 1]))
    except duckdb.Error as exc:
        raise CbirError(f"cannot read the queue: {one_line(exc)}") from None
    finally:
        con.close()
    shown = [_shown(r) for r in rows[:limit]]
    return {"rows": shown, "next": shown[-1]["key"] if len(rows) > limit else None}


def progress(settings: Settings, filters: Filters) -> dict[str, int]:
    """How many pairs the filters (all but the decision filter) select, and how many of them
    have a current decision."""
    con = _connect(settings)
    try:
        has_clusters = "clusters" in _has(con, "clusters")
        if filters.cluster is not None and not has_clusters:
            return {"total": 0, "reviewed": 0, "remaining": 0}
        cond, params = filters.where(with_decision=False)
        sql = (
            "SELECT count(*), count(p.decision) "
            f"FROM ({_rows_sql(has_clusters)}) p {_condition_sql(cond)}"
        )
        row = con.execute(sql, [0.0, *params]).fetchone()
    except duckdb.Error as exc:
        raise CbirError(f"cannot count the queue: {one_line(exc)}") from None
    finally:
        con.close()
    total, reviewed = (int(row[0]), int(row[1])) if row else (0, 0)
    return {"total": total, "reviewed": reviewed, "remaining": total - reviewed}


def pair(settings: Settings, a: str, b: str) -> dict[str, Any] | None:
    """The near pair of images `a` and `b` as recorded (paths, score), or None."""
    con = _connect(settings)
    try:
        row = con.execute(
            "SELECT image_a, image_b, path_a, path_b, score FROM duplicate_pairs "
            "WHERE kind = 'near' AND ((image_a = ? AND image_b = ?) OR (image_a = ? AND "
            "image_b = ?)) ORDER BY score DESC LIMIT 1",
            [a, b, b, a],
        ).fetchone()
    finally:
        con.close()
    if row is None:
        return None
    return dict(zip(("image_a", "image_b", "path_a", "path_b", "score"), row, strict=True))


def logged(settings: Settings, decision_id: str) -> dict[str, Any] | None:
    """One row of the decisions log by its id, or None."""
    con = catalog.connect(settings)
    try:
        cur = con.execute(
            "SELECT image_a, image_b, path_a, path_b, decision, score, model FROM decision_log "
            "WHERE decision_id = ? LIMIT 1",
            [decision_id],
        )
        rows = _dicts(cur)
    finally:
        con.close()
    return rows[0] if rows else None


def scan_file(settings: Settings, image_id: str) -> dict[str, Any] | None:
    """A present file of image `image_id` (the canonical one first) as the manifest has it."""
    con = catalog.connect(settings)
    try:
        cur = con.execute(
            "SELECT path, path_raw, bytes, mtime_ns FROM files WHERE image_id = ? AND status "
            "IN ('ok', 'duplicate') ORDER BY is_canonical DESC, path LIMIT 1",
            [image_id],
        )
        rows = _dicts(cur)
    finally:
        con.close()
    return rows[0] if rows else None


def clusters(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    """The largest clusters (the cluster view's index)."""
    con = _connect(settings)
    try:
        if "cluster_report" not in _has(con, "cluster_report"):
            return []
        cur = con.execute(
            "SELECT cluster_id, size, weakest_link, master_path FROM cluster_report "
            "ORDER BY size DESC, cluster_id LIMIT ?",
            [limit],
        )
        return _dicts(cur)
    finally:
        con.close()


def cluster(settings: Settings, cluster_id: int, link_threshold: float | None) -> dict[str, Any]:
    """A cluster's members, its links (the near pairs inside it at or above `link_threshold`,
    the strongest first) with their current decisions, and the components left when the links
    decided `different` are cut."""
    con = _connect(settings)
    try:
        if "clusters" not in _has(con, "clusters"):
            raise BadRequest("no clusters in the catalogue: run `cbir pairs` first")
        members = _dicts(
            con.execute(
                "SELECT c.image_id, c.path, i.width, i.height, i.bytes, i.format "
                "FROM clusters c LEFT JOIN images i ON i.image_id = c.image_id "
                "WHERE c.cluster_id = ? ORDER BY c.path LIMIT ?",
                [cluster_id, MAX_MEMBERS + 1],
            )
        )
        links = _dicts(
            con.execute(
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
                 MAX_LINKS + 1],
            )
        )  # fmt: skip
    finally:
        con.close()
    if not members:
        raise BadRequest(f"no cluster {cluster_id}")
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
    parent = {m["image_id"]: m["image_id"] for m in members}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for link in links:
        a, b = link["image_a"], link["image_b"]
        if link.get("decision") == "different" or a not in parent or b not in parent:
            continue
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for m in members:
        groups.setdefault(root(m["image_id"]), []).append(m["image_id"])
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
