"""Embed -> index -> pairs -> evaluate on a small demo collection, with kills and staleness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cbir.store.layout import layout
from cbir.config import load_settings
from cbir.steps.demo import generate_demo_collection
from cbir.steps.embed import plan_shards, run_embed
from cbir.store.embeddings import load_embeddings
from cbir.errors import CbirError
from cbir.store.labels import read_ground_truth
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.model import retrieval_model
from cbir.steps.pairs import clusters_from_pairs
from cbir.store.index import open_searcher
from cbir.steps.query import query_images
from conftest import CBIR, REPO, open_catalogue, photo, save, write_params

SMALL = {
    "embed": {"resolution": 64, "batch_size": 16, "shard_size": 16, "workers": 0},
    "ingest": {"workers": 2},
    "search": {"k": 5, "pair_threshold": 0.5, "cluster_threshold": 0.9},
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_collection(root / "demo", n_groups=8, n_distractors=8, max_copies=3, size=128,
                             seed=1)
    return root


def _workspace(tmp_path: Path, demo_root: Path, **extra) -> Path:
    params = {"data": {"scans_dir": str(demo_root / "demo" / "scans"),
                       "ground_truth": str(demo_root / "demo" / "ground_truth.csv")}, **SMALL}
    for k, v in extra.items():
        params[k] = {**params.get(k, {}), **v}
    return write_params(tmp_path / "ws", params)


def test_end_to_end_on_the_demo_collection(tmp_path, demo_root):
    params = _workspace(tmp_path, demo_root)
    for step in ("ingest", "embed", "index", "pairs", "evaluate"):
        out = subprocess.run([*CBIR, step, "--params", str(params)], capture_output=True,
                             text=True, cwd=REPO)
        assert out.returncode == 0, (step, out.stderr)
    settings = load_settings(params)
    n_images = len(list((demo_root / "demo" / "scans").rglob("scan-*")))
    assert "| Model | Precision@1 | Recall@1 |" in out.stdout  # evaluate prints the table

    metrics = json.loads((settings.path(settings.data.reports_dir) / "metrics.json").read_text())
    assert set(metrics) == {"model", "untrained", "phash", "labels"}
    assert metrics["labels"]["queries"] > 0 and metrics["labels"]["decided_same"] == 0
    for name, vals in metrics.items():
        if name == "labels":  # what the figures rest on
            continue
        for key in ("precision@1", "recall@5", "f1@10", "map@10", "micro_ap"):
            assert 0.0 <= vals[key] <= 1.0, (name, key)
    gt = read_ground_truth(settings)
    sizes = {}
    for g in gt.group_of.values():
        sizes[g] = sizes.get(g, 0) + 1
    assert metrics["model"]["n_queries"] == sum(n for n in sizes.values() if n >= 2)

    nb = pq.read_table(settings.path(settings.data.reports_dir) / "neighbors.parquet").to_pylist()
    assert nb and all(r["query_path"] != r["neighbor_path"] for r in nb)
    assert max(r["rank"] for r in nb) == 10

    con = open_catalogue(settings)
    n_pairs = con.execute("SELECT count(*) FROM duplicate_pairs WHERE kind = 'near'").fetchone()[0]
    assert n_pairs > 0
    assert con.execute("SELECT min(score) FROM duplicate_pairs").fetchone()[0] >= 0.5
    assert con.execute("SELECT count(*) FROM duplicate_pairs WHERE image_a >= image_b "
                       "AND kind = 'near'").fetchone()[0] == 0
    con.close()

    # query by image: a file of the collection finds itself first, named as itself
    some = sorted((demo_root / "demo" / "scans").rglob("scan-*.jpg"))[0]
    out = subprocess.run([*CBIR, "query", str(some), "--k", "3", "--params", str(params)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"in the collection as {some.relative_to(demo_root / 'demo' / 'scans').as_posix()}" \
        in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3 and "1.0000" in lines[0]
    held = sorted(p.name for p in settings.path(settings.data.index_dir).glob("index.*"))
    assert held[:1] + held[2:] == ["index.faiss", "index.json"]  # no staged file, no delta
    assert held[1].startswith("index.ids-") and held[1].endswith(".npy")  # the sorted ids
    assert n_images > 0


def test_embedding_is_sharded_resumable_and_incremental(tmp_path):
    scans = tmp_path / "ws" / "scans"
    for i in range(40):
        save(photo(i), scans / f"p{i:02d}.jpg")
    params = write_params(tmp_path / "ws", {"data": {"scans_dir": "scans"}, **SMALL,
                                             "embed": {**SMALL["embed"], "shard_size": 8}})
    settings = load_settings(params)
    run_ingest(settings)

    env = {**os.environ, "CBIR_KILL_AT": "embed.shard:3"}  # dies writing the third shard
    out = subprocess.run([*CBIR, "embed", "--params", str(params)], env=env, capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == -signal.SIGKILL
    _, _, fp, _ = retrieval_model(settings)
    folder = layout(settings).embeddings(fp)
    assert len(list(folder.glob("shard-*.parquet"))) == 2  # two whole shards, no partial one
    plan = plan_shards(settings, fp)
    assert plan.already == 16 and sum(len(s.image_ids) for s in plan.shards) == 24

    resumed = run_embed(settings)
    assert resumed.embedded == 24 and resumed.already == 16
    ids, vectors = load_embeddings(folder)
    assert len(ids) == len(set(ids)) == 40 and vectors.shape == (40, 512)

    # the result equals an uninterrupted run's
    ref = load_settings(write_params(tmp_path / "ref", {"data": {"scans_dir": str(scans)},
                                                       **SMALL}))
    run_ingest(ref)
    run_embed(ref)
    ref_ids, ref_vectors = load_embeddings(layout(ref).embeddings(fp))
    assert ref_ids == ids
    np.testing.assert_allclose(ref_vectors, vectors, atol=1e-5)

    save(photo(100), scans / "new.jpg")
    run_ingest(settings)
    again = run_embed(settings)
    assert again.embedded == 1 and again.already == 40


def _photo_workspace(tmp_path: Path, n: int, name: str) -> tuple[Path, Path]:
    """n small photos named `name.format(i)`, ingested and embedded; returns (scans, params)."""
    scans = tmp_path / "ws" / "scans"
    for i in range(n):
        save(photo(i), scans / name.format(i))
    params = write_params(tmp_path / "ws", {"data": {"scans_dir": "scans"}, **SMALL})
    settings = load_settings(params)
    run_ingest(settings)
    run_embed(settings)
    return scans, params


def test_index_updates_in_place_and_refuses_a_stale_model(tmp_path):
    scans, params = _photo_workspace(tmp_path, 12, "p{:02d}.jpg")
    settings = load_settings(params)
    first = run_index(settings)
    assert first.rebuilt and first.info.n_vectors == 12

    save(photo(50), scans / "new.jpg")
    (scans / "p00.jpg").unlink()
    run_ingest(settings)
    run_embed(settings)
    second = run_index(settings)
    assert not second.rebuilt and second.added == 1 and second.removed == 1
    assert second.info.n_vectors == 12
    s = open_searcher(settings)
    new_id = [i for i, p in s.path_of.items() if p == "new.jpg"][0]
    row = s.image_ids.index(new_id)
    _, ids = s.search(s.vectors[row:row + 1], 1)
    assert ids[0][0] == new_id

    # another model (a different seed) makes the index stale: refused with a clear message
    stale = load_settings(params, overrides={"model.seed": 1})
    run_embed(stale)
    with pytest.raises(CbirError, match="rebuild with `cbir index`"):
        open_searcher(stale)
    out = subprocess.run([*CBIR, "pairs", "--params", str(params)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0  # the configured model still matches its index
    rebuilt = run_index(stale)
    assert rebuilt.rebuilt and "model changed" in rebuilt.reason


def test_query_reports_unreadable_files(tmp_path):
    _, params = _photo_workspace(tmp_path, 6, "p{}.jpg")
    settings = load_settings(params)
    run_index(settings)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    outside = save(photo(3).resize((80, 50)), tmp_path / "copy.png")
    res = query_images(settings, [bad, outside], k=2)
    assert res[0].error and "not an image" in res[0].error
    assert res[1].error is None and len(res[1].neighbours) == 2
    assert res[1].neighbours[0][1] == "p3.jpg"


def test_clusters_are_components_with_their_weakest_link():
    pairs = {("a", "b"): (0.95, 1), ("b", "c"): (0.92, 1), ("a", "c"): (0.97, 1),
             ("d", "e"): (0.99, 1), ("c", "d"): (0.85, 2), ("f", "g"): (0.5, 1)}
    clusters = clusters_from_pairs(pairs, threshold=0.9)
    # a-c 0.97 and a-b 0.95 join {a,b,c}; b-c is redundant; c-d (0.85) is below the threshold
    assert clusters == [(["a", "b", "c"], 0.95), (["d", "e"], 0.99)]
    assert clusters_from_pairs(pairs, threshold=0.8)[0] == (["a", "b", "c", "d", "e"], 0.85)


def test_ground_truth_outside_the_scans_folder_or_unknown_is_refused(tmp_path, demo_root):
    params = _workspace(tmp_path, demo_root)
    settings = load_settings(params)
    run_ingest(settings)
    bad = tmp_path / "gt.csv"
    bad.write_text("path,group\n../../etc/passwd,g1\n")
    with pytest.raises(CbirError, match="outside the scans folder"):
        read_ground_truth(load_settings(params, overrides={"data.ground_truth": str(bad)}))
    bad.write_text(f"path,group\n{demo_root}/demo/scans/nope.jpg,g1\n")
    with pytest.raises(CbirError, match="1 path is not an ingested image"):
        read_ground_truth(load_settings(params, overrides={"data.ground_truth": str(bad)}))
