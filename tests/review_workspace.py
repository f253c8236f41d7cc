"""A workspace to review: real scans (JPEG, PNG, TIFF, a file named like HTML) ingested in two
runs, and near pairs and clusters written with the store's schemas and chosen scores, so the
queue's order is known. Seconds: no model is trained or run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import photo, save, write_params
from PIL import Image

from cbir.config import Settings, load_settings
from cbir.store import catalog
from cbir.store.layout import layout
from cbir.store.pairs import CLUSTERS_SCHEMA, PAIRS_SCHEMA

HOSTILE = '"><img src=x onerror=alert(1)>.jpg'
FINGERPRINT = "0123456789abcdef"
THRESHOLD = 0.8
RUN1 = ["box-a/p0.jpg", "box-a/p1.png", "box-a/p2.tif", "box-b/p3.jpg", "box-b/p4.jpg",
        f"box-b/{HOSTILE}"]
RUN2 = ["late/p6.jpg", "late/p7.png"]


def build(root: Path) -> Settings:
    scans = root / "scans"
    for i, name in enumerate(RUN1):
        save(photo(i, (120, 90)), scans / name)
    params = write_params(root, {
        "data": {"scans_dir": "scans", "ground_truth": None},
        "ingest": {"workers": 1},
        "search": {"pair_threshold": THRESHOLD, "cluster_threshold": 0.6},
    })
    settings = load_settings(params)
    from cbir.steps.ingest import run_ingest
    run_ingest(settings)
    # the new arrivals are rescans of two earlier photographs, at a higher resolution
    for seed, name in zip((3, 1), RUN2, strict=True):
        save(photo(seed, (120, 90)).resize((160, 120), Image.Resampling.BICUBIC), scans / name)
    run_ingest(settings)
    ids = image_ids(settings)
    write_pairs(settings, ids)
    return settings


def image_ids(settings: Settings) -> dict[str, str]:
    """path -> image id, from the catalogue."""
    _, rows = catalog.query(settings, "SELECT path, image_id FROM images")
    return dict(rows)


# Every pair of the eight images gets a score (28 pairs); the clusters are fixed.
def scores(ids: dict[str, str]) -> dict[tuple[str, str], float]:
    paths = RUN1 + RUN2
    out = {}
    for n, (a, b) in enumerate(itertools.combinations(paths, 2)):
        out[(a, b)] = round(0.62 + 0.013 * n, 4)  # 0.62 .. 0.971, all distinct
    return out


CLUSTERS = [[RUN1[0], RUN1[1], RUN1[2]], [RUN1[3], RUN1[5], RUN2[0]]]

# What geometric verification recorded for some pairs (the others were not checked): the two
# rescans are the same picture; box-a/p0 is a detail of box-a/p2 (a quarter of it, in its
# middle); late/p6 a detail of box-b/p4 (its top right tenth); the file named like HTML a detail
# of late/p7 (its top half); box-a/p0 and box-a/p1 contradicted. Sizes: RUN1 120x90, RUN2
# 160x120. Keys are (path_a, path_b) in the order `scores` writes them.
VERIFIED = {
    (RUN1[3], RUN2[0]): {"inliers": 140, "relation": "full", "covered": 1.0, "box_on": "b",
                         "box": (0, 0, 160, 120)},
    (RUN1[1], RUN2[1]): {"inliers": 95, "relation": "full", "covered": 0.98, "box_on": "b",
                         "box": (0, 1, 160, 119)},
    (RUN1[0], RUN1[2]): {"inliers": 41, "relation": "a_in_b", "covered": 0.25, "box_on": "b",
                         "box": (30, 18, 90, 63)},
    (RUN1[4], RUN2[0]): {"inliers": 23, "relation": "b_in_a", "covered": 0.1, "box_on": "a",
                         "box": (84, 0, 120, 30)},
    (RUN1[5], RUN2[1]): {"inliers": 30, "relation": "a_in_b", "covered": 0.5, "box_on": "b",
                         "box": (0, 0, 160, 60)},
    (RUN1[0], RUN1[1]): {"inliers": 3, "relation": "none", "covered": None, "box_on": None,
                         "box": (None, None, None, None)},
}


def assert_verified_rows(rows: dict[tuple[str, str], dict]) -> None:
    """Rows keyed by (path_a, path_b), from any reader, carry VERIFIED's checks as written."""
    for key, v in VERIFIED.items():
        r = rows[key]
        assert (r["relation"], r["inliers"], r["box_on"]) == (v["relation"], v["inliers"],
                                                              v["box_on"])
        assert (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) == v["box"]


def write_pairs(settings: Settings, ids: dict[str, str]) -> None:
    lay = layout(settings)
    rows = []
    for (pa_, pb), score in scores(ids).items():
        row = {"image_a": ids[pa_], "image_b": ids[pb], "path_a": pa_, "path_b": pb,
               "score": score, "rank": 1, "kind": "near"}
        if (pa_, pb) in VERIFIED:
            v = VERIFIED[(pa_, pb)]
            row |= {k: v[k] for k in ("inliers", "relation", "covered", "box_on")}
            row |= dict(zip(("box_x0", "box_y0", "box_x1", "box_y1"), v["box"], strict=True))
        rows.append(row)
    assert sum("relation" in r for r in rows) == len(VERIFIED)
    lay.pairs_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), lay.pairs)
    crow = []
    for cid, members in enumerate(CLUSTERS):
        for p in members:
            crow.append({"cluster_id": cid, "image_id": ids[p], "path": p,
                         "size": len(members), "weakest_link": 0.9})
    pq.write_table(pa.Table.from_pylist(crow, schema=CLUSTERS_SCHEMA), lay.clusters)
    searched = pa.table({"image_id": pa.array(sorted(ids.values()), pa.string())})
    searched = searched.replace_schema_metadata({"fingerprint": FINGERPRINT})
    pq.write_table(searched, lay.searched)
